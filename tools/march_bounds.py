"""What the marched copy can reach from the inputs a student has: the reference marched through the true depth
(camgeo.reference_on_surface), with that depth's scale as given and as a student must guess it, scored on the
co-visible pixels of held-out clips with every pose given.

    python tools/march_bounds.py --clips 32
    python tools/march_bounds.py --clips 32 --student assets/student.safetensors

A student's poses are normalised (translations divided by the clip's largest), so it reads inverse depth in a unit
one image does not show: the largest translation in metres. The synthetic world draws that distance per path kind
(a dolly moves 0.6-1.5 m, a pan a few centimetres), which the poses' shape tells; within a kind it is a coin the
inputs never show. The rows: the true scale (then off by 20%, blurred, noisy); the kind's median (one guess for
all clips of a kind); a scale drawn from the kind's training clips (what a calibrated sampler commits to, mean of
--draws draws); the mean of the videos marched at the kind's scale deciles (a hedge, as a one-step prediction
hedges). With --student: the student's own depth head read from pure noise (t = 0.95) and marched, as given and
with its scale set to the truth's median per clip. With --estimate: also the camera path the study's estimator
(evaluation.score, as check.py --estimate) reads from each row's video, RotErr and TransErr against the true path:
what a student that copies exactly this way would score in the study's camera columns.

    python tools/march_bounds.py --clips 16 --student assets/student.safetensors --estimate --workers 2
"""
import argparse
import os
import sys
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one up

import camgeo  # noqa: E402
import conditioning  # noqa: E402
import data  # noqa: E402
import geometry  # noqa: E402
from evaluation import STUDY_PRESETS, camera_for, covisible_psnr, held_out_clips, score  # noqa: E402


def largest_translation(world, num_frames):
    """The poses' unit (conditioning.translation_scale, every pose given) of the clip a world renders."""
    c2w = torch.tensor(world.path.c2w(data.frame_times(num_frames)), dtype=torch.float32)
    return conditioning.translation_scale(geometry.invert_pose(c2w)[None], torch.ones(1, num_frames)).item()


def march(reference, camera, inverse_depth):
    return camgeo.reference_on_surface(reference, camera, camgeo.depth_test(inverse_depth, camera))[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--scale-clips", type=int, default=1500,
                        help="training clips whose paths give each kind's distribution of the largest translation")
    parser.add_argument("--student", help="a checkpoint whose depth head is marched too")
    parser.add_argument("--estimate", action="store_true",
                        help="also estimate each video's camera path (RotErr, TransErr; about a minute a row)")
    parser.add_argument("--workers", type=int, default=1, help="--estimate: processes estimating in parallel")
    parser.add_argument("--preset", choices=list(STUDY_PRESETS), default="cpu",
                        help="--estimate: whose estimator settings (evaluate.py's presets; smoke is for CI)")
    args = parser.parse_args()
    num_frames, size = 8, 32
    clips = held_out_clips(args.clips, num_frames, size)
    camera = torch.cat([camera_for(clip, "full", 1.0, size) for clip in clips])
    reference = torch.stack([clip.video[0] for clip in clips]) * 2 - 1
    w2c = torch.stack([geometry.invert_pose(clip.c2w) for clip in clips])
    every_pose = torch.ones(args.clips, num_frames)
    true_inverse = conditioning.reference_inverse_depth(torch.stack([clip.depth[0] for clip in clips]), w2c,
                                                        every_pose)
    log_scales = defaultdict(list)
    first = data.SPLIT_SEEDS["train"][0]
    for seed in range(first, first + args.scale_clips):
        world = data.sample_world(seed)
        log_scales[world.path.kind].append(np.log(largest_translation(world, num_frames)))
    kinds = [data.sample_world(clip.seed).path.kind for clip in clips]
    actual = conditioning.translation_scale(w2c, every_pose).numpy()

    def rescaled(scales):  # inverse depth in the poses' unit scales with the unit: a guessed unit multiplies it
        return true_inverse * torch.tensor(scales / actual, dtype=torch.float32)[:, None, None]

    def scores(videos):  # [(C, F, 3, H, W) in [-1, 1]] -> (F - 1,) co-visible PSNR of frames 1..F-1 and, with
        # --estimate, (RotErr, TransErr): each a mean over the clips and over the videos (several draws of a scale)
        videos = [((video + 1) / 2).clamp(0, 1) for video in videos]
        per_frame = np.mean([np.nanmean(covisible_psnr(clips, video)[:, 1:].numpy(), axis=0) for video in videos], 0)
        if not args.estimate:
            return per_frame, ()
        cameras = [score(clips, video, STUDY_PRESETS[args.preset].estimator_config, args.workers)[1][:, :2].mean(0)
                   for video in videos]
        return per_frame, torch.stack(cameras).mean(0).tolist()

    rows = [("rotation-only warp", [conditioning.reference_guess(reference, camera)]),
            ("marched through the true depth", [march(reference, camera, true_inverse)]),
            ("  its scale x 0.8", [march(reference, camera, 0.8 * true_inverse)]),
            ("  its scale x 1.25", [march(reference, camera, 1.25 * true_inverse)]),
            ("  blurred 3x3", [march(reference, camera, F.avg_pool2d(true_inverse[:, None], 3, stride=1, padding=1,
                                                                    count_include_pad=False)[:, 0])]),
            ("  10% noise per pixel", [march(reference, camera, true_inverse * torch.exp(
                0.1 * torch.randn(true_inverse.shape, generator=torch.Generator().manual_seed(0))))]),
            ("  its scale: the path kind's median",
             [march(reference, camera, rescaled(np.exp([np.median(log_scales[k]) for k in kinds])))])]
    generator = np.random.default_rng(0)
    rows.append((f"  its scale: drawn from the kind (mean of {args.draws})",
                 [march(reference, camera, rescaled(np.exp([generator.choice(log_scales[k]) for k in kinds])))
                  for _ in range(args.draws)]))
    deciles = [march(reference, camera, rescaled(np.exp([np.quantile(log_scales[k], q) for k in kinds])))
               for q in np.linspace(0.05, 0.95, 10)]
    rows.append(("  mean of the videos at the kind's scale deciles", [torch.stack(deciles).mean(0)]))
    if args.student:
        model, _ = camgeo.load_checkpoint(args.student)
        noise = torch.randn((args.clips, num_frames, 3, size, size), generator=torch.Generator().manual_seed(0))
        x0 = torch.stack([clip.video for clip in clips]) * 2 - 1
        t = 0.95
        with torch.no_grad():
            _, read = model((1 - t) * x0 + t * noise, torch.full((args.clips,), t), reference,
                            [clip.prompt for clip in clips], camera, with_depth=True)
        to_truth = (true_inverse / read.clamp_min(1e-4)).flatten(1).median(1).values
        rows.append(("the student's depth (t = 0.95)", [march(reference, camera, read)]))
        rows.append(("  its scale set to the truth's", [march(reference, camera, read * to_truth[:, None, None])]))
    frames = " | ".join(f"frame {f}" for f in range(1, num_frames))
    cameras = " | RotErr | TransErr" if args.estimate else ""
    print(f"| marched copy, {args.clips} held-out clips, every pose | co-visible PSNR | {frames}{cameras} |")
    print("|---" * (num_frames + 1 + 2 * args.estimate) + "|")
    for name, videos in rows:
        per_frame, camera_errors = scores(videos)
        cells = [f"{np.mean(per_frame):.2f}"] + [f"{x:.2f}" for x in per_frame] + [f"{x:.3f}" for x in camera_errors]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
