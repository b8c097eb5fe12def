"""How far can the study's camera estimator be trusted? Its error on ground-truth videos, next to naive paths.

The study (evaluate.py) scores a generated video's camera by estimating its path (estimator.py). This measures
that estimator's own error on held-out ground-truth videos, clean and degraded like generated ones, and on a
video rendered along a known wrong path (SLERP of the keyframes at 1/2), next to the errors of naive paths
(camera held at frame 0; linear / SLERP of the keyframes): the floor against which method differences are read.

    python tools/validate_estimator.py --clips 16 --out out/eval     # -> out/eval/validation.md
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one up

import conditioning  # noqa: E402
import data  # noqa: E402
import estimator  # noqa: E402
import geometry  # noqa: E402
from evaluation import STUDY_PRESETS, held_out_clips, ratio_label, summarise  # noqa: E402


def interpolated_path(c2w, ratio, mode):
    """The path linear / SLERP interpolation of the keyframes at `ratio` would request (a naive guess)."""
    index = conditioning.keyframe_indices(c2w.shape[0], ratio)
    return geometry.interpolate_trajectory(c2w[index].double(), index, c2w.shape[0], mode).float()


def validate(num_clips, num_frames, size, config, seed=0):
    """Estimator error on ground-truth videos (clean and degraded) and, for scale, the error of naive paths
    (camera held at frame 0; linear / SLERP of the keyframes) against the truth. Returns Markdown."""
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    worst = {}
    start = time.perf_counter()
    gaps = []
    for clip in held_out_clips(num_clips, num_frames, size):
        # A stand-in for a method that misses the hand-shake: the video along the SLERP-at-1/2 path, degraded.
        # Its true error is known, so we see whether the estimator measures such a difference correctly.
        slerp_path = interpolated_path(clip.c2w, 0.5, "slerp")
        slerp_video, _ = data.render(clip.scene, slerp_path, clip.K, size, size)
        videos = torch.stack([clip.video, estimator.degrade(clip.video, generator),
                              estimator.degrade(slerp_video, generator)])
        estimated = estimator.estimate_paths(clip.scene, clip.K, videos, clip.c2w[0], config)  # (3, F, 4, 4)
        candidates = {"estimator, ground-truth video": estimated[0],
                      "estimator, degraded ground-truth video": estimated[1],
                      "estimator, degraded video rendered along SLERP at 1/2": estimated[2],
                      "naive: camera held at frame 0": clip.c2w[:1].expand_as(clip.c2w)}
        true_error = geometry.camera_metrics(clip.c2w, slerp_path)["RotErr"]
        gaps.append(abs(geometry.camera_metrics(clip.c2w, estimated[2])["RotErr"] - true_error))
        for ratio in (0.5, 1 / 3, 0.25):
            for mode, name in (("slerp", "SLERP"), ("linear", "linear")):
                label = f"naive: {name} of keyframes at {ratio_label(ratio)}"
                candidates[label] = interpolated_path(clip.c2w, ratio, mode)
        for name, path in candidates.items():
            metrics = geometry.camera_metrics(clip.c2w, path)
            metrics["centre error (m, mean)"] = (path[:, :3, 3] - clip.c2w[:, :3, 3]).norm(dim=-1).mean().item()
            rows.setdefault(name, []).append(metrics)
        for name in list(candidates)[:2]:
            worst.setdefault(name, []).append((rows[name][-1]["RotErr"], clip.seed))
        print(f"clip {clip.seed}: estimator RotErr {rows['estimator, ground-truth video'][-1]['RotErr']:.4f} "
              f"(degraded {rows['estimator, degraded ground-truth video'][-1]['RotErr']:.4f}), "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    keys = ["RotErr", "TransErr", "CamMC", "centre error (m, mean)"]
    lines = [f"{num_clips} test clips (seeds {data.SPLIT_SEEDS['test'][0]}..), {num_frames} frames at {size}x{size}; "
             "mean ± std (median) over clips; RotErr in radians summed over frames, TransErr / CamMC on paths "
             "normalised by their own largest translation (CamI2V).", "",
             "| path vs ground truth | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(summarise([m[k] for m in metrics]) for k in keys) + " |")
    for name, pairs in worst.items():
        value, seed = max(pairs)
        lines.append(f"\nworst clip for '{name}': seed {seed}, RotErr {value:.4f}")
    lines.append(f"\nvideo along SLERP at 1/2: |estimated RotErr - true RotErr| = {summarise(gaps)} (true RotErr is "
                 "the 'naive: SLERP of keyframes at 1/2' row)")
    lines.append(f"\nestimation time: {(time.perf_counter() - start) / num_clips:.1f} s per clip (3 videos)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=16, help="held-out test clips")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip")
    parser.add_argument("--size", type=int, default=32, help="pixels")
    parser.add_argument("--preset", choices=list(STUDY_PRESETS), default="cpu", help="the study preset's estimator")
    parser.add_argument("--out", default=os.path.join("out", "eval"), help="folder for validation.md")
    args = parser.parse_args(argv)
    if min(args.clips, args.frames, args.size) < 1:
        parser.error("--clips, --frames and --size must be >= 1")
    torch.set_num_threads(1)  # the estimator's many small calls: a second thread only waits
    os.makedirs(args.out, exist_ok=True)
    validation = validate(args.clips, args.frames, args.size, STUDY_PRESETS[args.preset].estimator_config)
    command = "python tools/validate_estimator.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(os.path.join(args.out, "validation.md"), "w") as f:
        f.write(f"# Camera estimator validation\n\n`{command}`\n\n{validation}\n")
    print(validation)


if __name__ == "__main__":
    main()
