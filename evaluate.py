"""The CamGeo study, end to end: does the generated camera follow the requested one, method by method?

Held-out clips of the synthetic world (evaluation.held_out_clips: data.SPLIT_SEEDS["test"], never seen in
training) give a reference frame, a prompt, the keyframe poses a method is conditioned on, and the ground-truth
video along the ground-truth path, kept for scoring. Each student trains (python train.py ... --out
OUT/ckpt/<name>), generates a video per clip, and the camera path *of the generated video* is estimated
(estimator.py: analysis by synthesis against the known scene, no teacher involved) and compared with the requested
path; the frames are scored too, on every pixel and on the pixels the reference also sees (evaluation.py).

    python evaluate.py --preset smoke --out out/eval_smoke   # the whole study in seconds (CI)
    python evaluate.py --preset cpu --out out/eval           # a few hours on 2 CPU cores
    python evaluate.py --preset gpu --device cuda --workers 14 --out out/eval_gpu   # estimator: CPU processes
    python evaluate.py --seeds 1 --out out/eval_seed1        # a study in parts, one training seed each
    python evaluate.py --methods "" --ratios 1/2 --ablations camgeo_nosmooth,camgeo_nowarmup   # ablations only

It trains what is missing, reuses checkpoints that exist, samples every test clip with fixed seeds, estimates,
scores, and writes OUT/table.md, OUT/table.csv, OUT/per_clip.csv (one line per video), OUT/trajectories.png
(top-down requested vs estimated paths) and OUT/frames.png (generated vs ground truth). A checkpoint is reused when
its run finished and its recorded method, steps and options equal what the same train.py command resolves to now
(defaults included, so a changed default retrains); after a change to the model code, delete OUT/ckpt (and
OUT/runs, the cached videos and camera paths) to start afresh. One checkpoint alone: check.py. Parts of a study
combined, scorings compared, the scores' own noise: results.py. The estimator's own error:
tools/validate_estimator.py.
"""
import argparse
import concurrent.futures
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

import camgeo
import conditioning
import estimator
import report
from evaluation import (ABLATIONS, METHOD_NAMES, SAMPLE_SEED, STUDY_PRESETS, TABLE_ORDER, all_metrics, camera_for,
                        held_out_clips, ratio_label, score, study_differences)

GT_RUN, DEGRADED_RUN, STILL_RUN = "ground_truth", "ground_truth_degraded", "reference_repeated"
ROOT = os.path.dirname(os.path.abspath(__file__))


class StudyError(Exception):
    """A step of the study (a training subprocess) failed; reported as one line with its output's tail."""


@dataclass
class Run:
    name: str  # folder under OUT/ckpt and file under OUT/runs
    method: str  # train.py --method
    ratio: float  # keyframe ratio (1.0 for full)
    seed: int
    flags: tuple  # extra train.py flags (ablations)
    label: str  # row name in the table


def plan_runs(methods, ratios, seeds, ablations):
    """The trainings of a study: Full once per seed, every other method at every ratio, and the named ablations
    (ABLATIONS keys) of CamGeo at the first ratio."""
    runs = []
    for seed in seeds:
        if "full" in methods:
            runs.append(Run(f"full_1_{seed}", "full", 1.0, seed, (), "Full"))
        for ratio in ratios:
            for method in methods:
                if method != "full":
                    runs.append(Run(f"{method}_{ratio:.3g}_{seed}", method, ratio, seed, (), METHOD_NAMES[method]))
        for name in ablations:
            flags, label = ABLATIONS[name]
            runs.append(Run(f"{name}_{ratios[0]:.3g}_{seed}", "camgeo", ratios[0], seed, tuple(flags), label))
    return runs


def train_command(run, preset, out, device, threads):
    command = [sys.executable, "train.py", "--method", run.method, "--sparse", repr(run.ratio),
               "--preset", preset.train_preset, "--seed", str(run.seed), "--out", out, "--device", device,
               "--threads", str(threads), *preset.train_flags, *run.flags]
    if preset.train_steps is not None:
        command += ["--steps", str(preset.train_steps)]
    return command


def trained_by(ckpt, command):
    """Whether the finished checkpoint `ckpt` holds what train.py `command` would train today: the same method,
    preset, step count and options with train.py's current defaults filled in (training.checkpoint_options), so a
    changed default retrains instead of reusing weights trained with the old one. Unreadable -> False."""
    import training  # only when a checkpoint is there to check: it imports teacher.py, which sampling never needs
    args = training.parse_args(command[2:])  # past the interpreter and "train.py"
    wanted = json.loads(json.dumps(training.checkpoint_options(args)))  # lists and floats as the metadata holds them
    try:
        with safe_open(ckpt, framework="pt") as f:
            metadata = f.metadata() or {}
        recorded = json.loads(metadata.get("options", "{}"))
    except (OSError, ValueError, SafetensorError):  # truncated or not a checkpoint: train it again
        return False
    return (metadata.get("method") == args.method and metadata.get("step") == str(args.steps)
            and recorded == wanted)


def ensure_checkpoint(run, preset, out_dir, device, threads):
    """Train run unless OUT/ckpt/<name> already holds a finished checkpoint of what the same command trains now
    (trained_by). -> ckpt path."""
    folder = os.path.join(out_dir, "ckpt", run.name)
    ckpt, marker = os.path.join(folder, "ckpt.safetensors"), os.path.join(folder, "evaluate_command.json")
    command = train_command(run, preset, folder, device, threads)
    # the marker is written once training has finished: a checkpoint without it is a run that was cut short
    if os.path.exists(ckpt) and os.path.exists(marker) and trained_by(ckpt, command):
        print(f"[{run.name}] reusing {ckpt}", flush=True)
        return ckpt
    os.makedirs(folder, exist_ok=True)
    print(f"[{run.name}] training: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(os.path.join(folder, "train_output.txt"), "w") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not os.path.exists(ckpt):
        with open(os.path.join(folder, "train_output.txt")) as f:
            tail = f.read()[-800:]
        raise StudyError(f"training {run.name} failed (exit {result.returncode}); end of its output:\n{tail}")
    with open(marker, "w") as f:
        json.dump(command[1:], f)
    print(f"[{run.name}] trained in {time.perf_counter() - start:.0f} s", flush=True)
    return ckpt


def generate(ckpt, run, clips, preset, device):
    """Sample every clip (batch of one, fixed seeds) -> (videos (C, F, 3, H, W), seconds per video (C,))."""
    model, info = camgeo.load_checkpoint(ckpt, weights="ema", device=device)
    config = info["config"]
    videos, seconds = [], []
    for index, clip in enumerate([clips[0]] + clips):  # the first call warms up (allocations, caches): untimed
        reference = clip.video[0][None].to(device)
        camera = camera_for(clip, run.method, run.ratio, config.image_size).to(device)
        start = time.perf_counter()
        with torch.no_grad():
            video = camgeo.sample(model, reference, [clip.prompt], camera, num_steps=preset.sample_steps,
                                  cfg_scale=preset.cfg_scale, seed=SAMPLE_SEED + max(index - 1, 0))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if index > 0:
            seconds.append(time.perf_counter() - start)
            videos.append(video[0].float().cpu())
    return torch.stack(videos), torch.tensor(seconds)


def evaluate_run(run, ckpt, clips, preset, out_dir, device, workers=1):
    """Generate + estimate + score one run. The videos and estimated paths are cached in OUT/runs/<name>.pt
    (redone if anything they depend on changed: the checkpoint file, the clips, the sampling or estimator
    settings); the metrics are recomputed from them every time, which is cheap."""
    key = json.dumps({"ckpt_mtime": os.path.getmtime(ckpt) if ckpt else None, "clips": [c.seed for c in clips],
                      "frames": list(clips[0].video.shape), "sample_steps": preset.sample_steps,
                      "cfg": preset.cfg_scale, "estimator": repr(preset.estimator_config)})
    cache = os.path.join(out_dir, "runs", f"{run.name}.pt")
    if os.path.exists(cache):
        stored = torch.load(cache, weights_only=True)
        if stored["key"] == key:
            return {**stored, "metrics": all_metrics(clips, stored["videos"], stored["paths"])}
    start = time.perf_counter()
    if ckpt is None:  # reference rows: the ground truth, clean or degraded (the estimator's floor), or still
        videos, seconds = torch.stack([c.video for c in clips]), torch.full((len(clips),), float("nan"))
        if run.name == DEGRADED_RUN:
            videos = torch.stack([estimator.degrade(c.video, torch.Generator().manual_seed(c.seed)) for c in clips])
        elif run.name == STILL_RUN:  # the reference frame repeated: what a model that ignores the camera scores
            videos = videos[:, :1].expand_as(videos).clone()
    else:
        videos, seconds = generate(ckpt, run, clips, preset, device)
    paths, metrics = score(clips, videos, preset.estimator_config, workers)
    result = {"key": key, "videos": videos, "seconds": seconds, "paths": paths}
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    torch.save(result, cache)
    result["metrics"] = metrics
    print(f"[{run.name}] RotErr {metrics[:, 0].mean():.3f} TransErr {metrics[:, 1].mean():.3f} "
          f"CamMC {metrics[:, 2].mean():.3f} PSNR {metrics[:, 3].mean():.2f} SSIM {metrics[:, 4].mean():.3f} "
          f"co-visible PSNR {metrics[:, 5].nanmean():.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return result


def run_study(args):
    preset = dataclasses.replace(STUDY_PRESETS[args.preset])  # a copy: the options below override it
    for name in ("clips", "ratios", "seeds", "sample_steps"):
        if getattr(args, name) is not None:
            setattr(preset, name, getattr(args, name))
    if args.train_steps is not None:
        preset.train_steps = args.train_steps
    unknown = [m for m in args.methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHOD_NAMES)}")
    ablations = list(ABLATIONS) if preset.ablations else []
    if args.ablations is not None:
        ablations = args.ablations
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {list(ABLATIONS)}")
    if args.no_ablations or ("camgeo" not in args.methods and args.ablations is None):
        ablations = []
    if any(not 0 < r <= 1 for r in preset.ratios):
        raise ValueError(f"keyframe ratios must be in (0, 1], got {preset.ratios}")
    os.makedirs(args.out, exist_ok=True)
    model_config = camgeo.PRESETS[preset.train_preset]
    clips = held_out_clips(preset.clips, model_config.num_frames, model_config.image_size)
    runs = plan_runs(args.methods, preset.ratios, preset.seeds, ablations)
    # Trainings are subprocesses: --jobs of them run at once (threads here only wait for them). Each run is
    # sampled and scored here as soon as its checkpoint is ready, while the remaining trainings go on.
    results = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(ensure_checkpoint, run, preset, args.out, args.device, args.threads): run
                   for run in runs}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            results[run.name] = evaluate_run(run, future.result(), clips, preset, args.out, args.device, args.workers)
    references = [Run(GT_RUN, "", 1.0, 0, (), "Ground-truth video (estimator floor)"),
                  Run(DEGRADED_RUN, "", 1.0, 0, (), "Degraded ground-truth video (estimator floor)"),
                  Run(STILL_RUN, "", 1.0, 0, (), "Reference frame repeated (a camera that does not move)")]
    for run in references:
        results[run.name] = evaluate_run(run, None, clips, preset, args.out, args.device, args.workers)
    per_clip_path = os.path.join(args.out, "per_clip.csv")
    with open(per_clip_path, "w", newline="") as f:  # every video: the table below and any other statistic
        writer = csv.writer(f)
        writer.writerow(report.PER_CLIP_COLUMNS)
        for run in runs + references:
            result = results[run.name]
            for clip, values, seconds in zip(clips, result["metrics"].tolist(), result["seconds"].tolist()):
                writer.writerow([run.name, run.label, ratio_label(run.ratio), run.seed, clip.seed,
                                 *[f"{v:.6g}" for v in values], f"{seconds:.6g}"])
    records = report.read_per_clip([per_clip_path])
    rows = report.table_rows(records, TABLE_ORDER)
    notes = [f"# CamGeo study, preset {args.preset}",
             f"{len(clips)} held-out test clips (seeds {clips[0].seed}..{clips[-1].seed}), {model_config.num_frames} "
             f"frames at {model_config.image_size}x{model_config.image_size}; training seeds {list(preset.seeds)}; "
             f"{preset.sample_steps} sampling steps, CFG {preset.cfg_scale}.",
             "Camera paths of the generated videos are estimated by analysis by synthesis against the known scene "
             "(estimator.estimate_paths; no teacher involved) and compared with the requested path. RotErr (radians), "
             "TransErr, CamMC are CamI2V's, summed over frames; PSNR / SSIM against the ground-truth video, "
             f"frames 1 to {model_config.num_frames - 1} (frame 0 is the given reference); PSNR_covisible on the "
             "pixels of each frame the reference also sees (true depth, occlusion-checked), the mean over those "
             "frames. Cells: mean ± std over clips (median) (and the std of the per-seed means with several seeds); "
             "the estimator has a few ill-conditioned clips (tools/validate_estimator.py), so read the medians too. "
             "Sampling time: one video, "
             f"batch of one, on {args.device}. The last three rows are references: the ground-truth videos as "
             "rendered and degraded like a generated video (estimator.degrade), the estimator's own error and so "
             "the smallest method difference the table can resolve; and the reference frame repeated, what a "
             "video that ignores its camera scores."]
    # the paper's cost claim: the teacher is gone at inference, so CamGeo samples exactly as fast as Sparse
    timing = {(r["method"], r["keyframes"]): r["sample_s_per_video"] for r in rows}
    for (method, keyframes), seconds in timing.items():
        if method == "CamGeo" and ("Sparse", keyframes) in timing:
            ratio = seconds / timing[("Sparse", keyframes)]
            notes.append(f"Sampling time CamGeo / Sparse at {keyframes}: {ratio:.3f}.")
    notes.append(f"teacher.py imported by this process while sampling: {'yes' if 'teacher' in sys.modules else 'no'}.")
    report.write_tables(rows, args.out, notes, study_differences(records))
    # pictures: the first ratio and first seed, plus full
    shown = [r for r in runs if r.name in results and r.seed == preset.seeds[0]
             and (r.ratio == preset.ratios[0] or r.method == "full")]
    few = clips[:preset.plot_clips]
    report.draw_trajectories(few, [(f"{r.label} ({ratio_label(r.ratio)})", results[r.name]["paths"][:len(few)])
                            for r in shown], os.path.join(args.out, "trajectories.png"),
                      conditioning.keyframe_indices(model_config.num_frames, preset.ratios[0]).tolist())
    report.draw_frames(few[:2], [(f"{r.label} ({ratio_label(r.ratio)})", results[r.name]["videos"][:2]) for r in shown],
                os.path.join(args.out, "frames.png"))
    print(open(os.path.join(args.out, "table.md")).read())
    print(f"-> {args.out}/table.md, table.csv, per_clip.csv, trajectories.png, frames.png")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(STUDY_PRESETS), default="cpu")
    parser.add_argument("--out", default=os.path.join("out", "eval"))
    parser.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=list(METHOD_NAMES),
                        help="comma-separated subset of " + ",".join(METHOD_NAMES))
    parser.add_argument("--ratios", type=lambda s: tuple(float(eval_fraction(x)) for x in s.split(",")),
                        help="keyframe ratios, e.g. 1/2,1/4 (default: the preset's)")
    parser.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), help="training seeds")
    parser.add_argument("--clips", type=int, help="number of held-out test clips")
    parser.add_argument("--train-steps", type=int, help="override the preset's training steps")
    parser.add_argument("--sample-steps", type=int, help="Euler steps of the sampler")
    parser.add_argument("--ablations", type=lambda s: s.split(","),
                        help="comma-separated subset of " + ",".join(ABLATIONS) + " (default: the preset's, all)")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in train.py")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings run at once (each with --threads threads; e.g. 2 x 1 on a 2-core machine)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes estimating cameras in parallel (CPU; e.g. 8 on a 16-core GPU machine)")
    args = parser.parse_args(argv)
    if args.clips is not None and args.clips < 1:
        parser.error(f"--clips must be >= 1, got {args.clips}")
    return args


def eval_fraction(text):
    """'1/2' or '0.5' -> 0.5, with a one-line error for anything else."""
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a ratio: {text!r} (write 1/2 or 0.5)") from None


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run_study(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, StudyError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        sys.exit(2)
