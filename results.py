"""Study results read back, without training or sampling anything: parts combined into one table, the same runs
scored twice compared, and the scores' own noise.

    python results.py combine out/eval/per_clip.csv out/eval_seed1/per_clip.csv --out out/eval_all
    python results.py compare out/eval/per_clip.csv out/eval_again/per_clip.csv   # the same runs, scored twice
    python results.py rescore out/eval/runs/camgeo_0.5_0.pt                 # its videos with invisible noise
    python results.py rescore out/eval/runs/sparse_0.5_0.pt out/eval/runs/camgeo_0.5_0.pt --draws 6   # averaged

A program of its own, beside evaluate.py (the study) and check.py (one checkpoint): reading results back trains
and samples nothing, and runs in seconds (rescore: minutes) on files a study left. Why not report.py itself: the
tables, intervals and pictures are report.py's, a module that the study and the check import, and no program
imports another.
"""
import argparse
import json
import os
import sys

import torch

import report
from evaluation import STUDY_PRESETS, TABLE_ORDER, all_metrics, held_out_clips, score, study_differences


def combine(paths, out):
    """The per_clip.csv files of several parts of a study (e.g. one training seed each) -> OUT/table.md and
    OUT/table.csv, with the paired differences (CamGeo - Sparse, each ablation - CamGeo). -> table.md's text."""
    os.makedirs(out, exist_ok=True)
    notes = ["# CamGeo study, combined from " + ", ".join(f"`{path}`" for path in paths)]
    records = report.read_per_clip(paths, notes)
    report.write_tables(report.table_rows(records, TABLE_ORDER), out, notes, study_differences(records))
    with open(os.path.join(out, "table.md")) as f:
        return f.read()


def rescore_with_noise(cache_paths, preset, noise, draws=1, workers=1):
    """Runs' cached videos (OUT/runs/<name>.pt) estimated and scored again, `draws` times each, with independent
    uniform noise of +-noise / 2 added to every pixel (1/255: the last bit of an 8-bit frame, invisible).
    -> Markdown lines. For each run, its scores averaged over the draws minus its scores as first scored, paired by
    clip: with one draw, how far the camera scores move for a change of the video that means nothing. With two
    runs, also the second minus the first, each clip's scores averaged over its draws: the estimator's noise
    shrinks with the number of draws, so camera differences smaller than one scoring's noise can be read."""
    if not 1 <= len(cache_paths) <= 2 or draws < 1:
        raise ValueError("rescore takes one or two runs, and --draws at least 1")
    lines, averaged = [], []  # averaged: per run, its clips' draw-averaged scores labelled by the run's path
    for path in cache_paths:
        if not os.path.isfile(path):
            raise ValueError(f"no cached run at {path} (a study writes OUT/runs/<name>.pt)")
        stored = torch.load(path, weights_only=True)
        key = json.loads(stored["key"])
        if key["estimator"] != repr(preset.estimator_config):
            raise ValueError(f"{path} was scored with another estimator configuration than this preset's; "
                             f"pass the --preset of its study")
        num_frames, _, size, _ = key["frames"]
        clips = held_out_clips(len(key["clips"]), num_frames, size)
        if [clip.seed for clip in clips] != key["clips"]:
            raise ValueError(f"{path} scores clips {key['clips']}, not the first held-out clips")
        videos, generator = stored["videos"], torch.Generator().manual_seed(0)
        scorings = [score(clips, (videos + noise * (torch.rand(videos.shape, generator=generator) - 0.5)).clamp(0, 1),
                          preset.estimator_config, workers)[1] for _ in range(draws)]
        name = os.path.splitext(os.path.basename(path))[0]
        noisy = f"{name}, noise {noise:.3g}" + (f", mean of {draws} draws" if draws > 1 else "")
        records = []
        for label, metrics in ((f"{name}, as cached", all_metrics(clips, videos, stored["paths"])),
                               (noisy, torch.stack(scorings).mean(0))):
            records += [{"method": label, "keyframes": "-", "train_seed": 0, "clip_seed": clip.seed,
                         **dict(zip(report.METRICS, values))} for clip, values in zip(clips, metrics.tolist())]
        lines += report.paired_differences(records, noisy, f"{name}, as cached") + [""]
        averaged += [{**r, "method": str(path)} for r in records if r["method"] == noisy]
    if len(cache_paths) == 2:
        lines += report.paired_differences(averaged, str(cache_paths[1]), str(cache_paths[0]))
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    combine_parser = commands.add_parser("combine", help="several parts' per_clip.csv -> OUT/table.md, table.csv")
    combine_parser.add_argument("per_clip", nargs="+", metavar="PER_CLIP_CSV")
    combine_parser.add_argument("--out", default=os.path.join("out", "eval_all"))
    compare_parser = commands.add_parser(
        "compare", help="the same runs scored twice (retrained, or on another machine): the second minus the "
                        "first, paired by clip, for every student run in both per_clip.csv files")
    compare_parser.add_argument("first", metavar="FIRST_CSV")
    compare_parser.add_argument("second", metavar="SECOND_CSV")
    rescore_parser = commands.add_parser(
        "rescore", help="one or two runs' cached videos (OUT/runs/<name>.pt) scored again with --noise added to "
                        "every pixel: how far the scores move for a change that means nothing; with two, their "
                        "difference with each clip's scores averaged over --draws")
    rescore_parser.add_argument("runs", nargs="+", metavar="RUN_PT")
    rescore_parser.add_argument("--preset", choices=list(STUDY_PRESETS), default="cpu",
                                help="the study preset the runs were scored with (its estimator)")
    rescore_parser.add_argument("--noise", type=float, default=1 / 255, help="width of the uniform pixel noise")
    rescore_parser.add_argument("--draws", type=int, default=1, help="noisy scorings averaged per clip")
    rescore_parser.add_argument("--workers", type=int, default=1, help="processes estimating cameras in parallel")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for path in getattr(args, "per_clip", []) + [getattr(args, name, None) for name in ("first", "second")]:
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"no results file at {path}")
    if args.command == "combine":
        print(combine(args.per_clip, args.out))
    elif args.command == "compare":
        print("\n".join(report.compare_scorings(args.first, args.second)))
    else:
        torch.set_num_threads(1)  # the estimator's many small calls: a second thread only waits
        print("\n".join(rescore_with_noise(args.runs, STUDY_PRESETS[args.preset], args.noise, args.draws,
                                           args.workers)))


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        print(f"results.py: error: {error}", file=sys.stderr)
        sys.exit(2)
