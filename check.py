"""Does one student checkpoint follow the cameras it is given? A quick check on held-out clips, in minutes.

No training and, unless asked, no camera estimation: the checkpoint samples held-out clips (evaluation.py) with
its own cameras and with another clip's, and the samples are scored against the true frames 1..F-1, next to
what the reference alone gives:
- PSNR and SSIM on every pixel, keyframes and in-between frames apart;
- PSNR on the co-visible pixels, frame by frame: those each frame shares with the reference (the synthetic
  world's true depth, occlusion-checked: geometry.covisible_mask), where a student that moves the reference with
  the camera scores high whatever it generates for content coming into view. Beside the samples: the reference
  reprojected through the true depth (the ceiling), the reference repeated (a still camera), and the reference
  resampled along every frame's rays at infinity (the rotation-only warp, conditioning.reference_guess).

    python check.py out/camgeo/ckpt.safetensors --clips 32
    python check.py out/camgeo/ckpt.safetensors --against out/sparse/ckpt.safetensors --clips 64   # paired by clip
    python check.py assets/student.safetensors --estimate     # also estimate the samples' camera paths (slow)

--against samples a second checkpoint on the same clips with the same noise and reports the first's scores minus
the second's, clip by clip, with bootstrap intervals (report.paired_differences). Writes OUT/check.md and
OUT/check_frames.png (ground truth, samples with own and with another clip's cameras).
"""
import argparse
import os
import sys

import numpy as np
import torch

import camgeo
import conditioning
import geometry
import report
from evaluation import (STUDY_PRESETS, checkpoint_cameras, covisibility, covisible_psnr, held_out_clips,
                        mean_over_frames, ratio_label, sample_clips, score, summarise)

# sample.py's defaults (guidance, Euler steps), so the check scores the samples a user gets first
CFG_SCALE = 1.0
SAMPLE_STEPS = 25


def frame_groups(num_frames, ratio):
    """{name: frame indices} of the frames 1..F-1 scored: all of them, the keyframes, the frames in between (a
    group with no frame, e.g. in between for Full, is left out)."""
    keyframes = set(conditioning.keyframe_indices(num_frames, ratio).tolist()) - {0}
    groups = {"frames 1..F-1": list(range(1, num_frames)), "keyframes": sorted(keyframes),
              "in between": sorted(set(range(1, num_frames)) - keyframes)}
    return {name: frames for name, frames in groups.items() if frames}


def mean_over_clips(values):
    """(C,) scores -> their mean over the clips that have one (NaN: a frame with no co-visible pixel)."""
    return report.statistic(np.mean, report.known(values))


def covisible_table(clips, videos, keyframes=()):
    """Markdown lines: for each named video (C, F, 3, H, W), the co-visible PSNR averaged over clips, its mean
    over frames 1..F-1 and each frame apart (the given keyframes marked), then the full-frame PSNR of frames
    1..F-1."""
    truth = torch.stack([clip.video for clip in clips])
    num_frames = truth.shape[1]
    share = torch.stack([clip.covisible[1:].float().mean() for clip in clips]).mean().item()
    lines = [f"PSNR on the co-visible pixels ({share:.0%} of frames 1..{num_frames - 1}: those the reference also "
             "sees, by the true depth, occlusion-checked), mean over clips:", "",
             f"| video | co-visible, frames 1..{num_frames - 1} | "
             + " | ".join(f"frame {f}" + " (key)" * (f in keyframes) for f in range(1, num_frames))
             + " | full frame, frames 1..F-1 |",
             "|---|" + "---|" * (num_frames + 1)]
    for name, video in videos.items():
        per_frame = covisible_psnr(clips, video)  # (C, F)
        cells = [mean_over_clips(mean_over_frames(per_frame, list(range(1, num_frames))))]
        cells += [mean_over_clips(per_frame[:, f].numpy()) for f in range(1, num_frames)]
        cells.append(geometry.psnr(video[:, 1:], truth[:, 1:]).item())
        lines.append(f"| {name} | " + " | ".join(f"{cell:.2f}" for cell in cells) + " |")
    return lines


def check_against(samples, label, baseline_ckpt, clips, groups, sample_steps, cfg_scale, device):
    """Samples (C, F, 3, H, W) of the clips with their own cameras, against a baseline checkpoint's samples of the
    same clips with the same noise (sample_clips): per clip, the samples' PSNR, SSIM and co-visible PSNR minus the
    baseline's over each group of frames ({name: frame indices}), with the bootstrap 95% interval of the mean
    (report.paired_differences). A gap between two students is read against the spread of its own pairs, which
    the two means alone do not show. -> Markdown lines."""
    model, info = camgeo.load_checkpoint(baseline_ckpt, weights="ema", device=device)
    config, method = info["config"], info["method"]
    if (config.num_frames, config.image_size) != tuple(samples.shape[i] for i in (1, 3)):
        raise ValueError(f"{baseline_ckpt} makes {config.num_frames} frames of {config.image_size} pixels, the "
                         f"checked checkpoint {samples.shape[1]} of {samples.shape[3]}: their samples do not pair")
    cameras, ratio = checkpoint_cameras(info, clips)
    baseline = sample_clips(model, clips, cameras, sample_steps, cfg_scale, device)
    baseline_label = f"{method} `{baseline_ckpt}` ({ratio_label(ratio)} keyframes)"
    records = []
    for name, videos in ((label, samples), (baseline_label, baseline)):
        covisible = covisible_psnr(clips, videos)  # (C, F)
        for group, frames in groups.items():
            covisible_mean = mean_over_frames(covisible, frames)
            records += [{"method": name, "keyframes": group, "train_seed": 0, "clip_seed": clip.seed,
                         "PSNR": geometry.psnr(video[frames], clip.video[frames]).item(),
                         "SSIM": geometry.ssim(video[frames], clip.video[frames]).item(),
                         "PSNR_covisible": float(covisible_mean[c])}
                        for c, (clip, video) in enumerate(zip(clips, videos))]
    return report.paired_differences(records, label, baseline_label, metrics=("PSNR", "SSIM", "PSNR_covisible"))


def check_camera_following(ckpt, num_clips, sample_steps=SAMPLE_STEPS, cfg_scale=CFG_SCALE, device="cpu",
                           frames_png=None, estimate=False, workers=1, against=None):
    """Does a checkpoint follow the cameras it is given? Returns Markdown: PSNR and SSIM against the ground truth
    (frames 1..F-1; keyframes and in-between frames apart) of its samples on held-out clips with their own cameras
    and with another clip's cameras (each clip takes the next one's: the image and prompt stay, only the camera is
    wrong), next to repeating the reference frame and to the warp the model is given (conditioning.reference_guess
    with its own cameras: interpolated between keyframes); then the co-visible table (covisible_table).
    frames_png: also draw the first four clips; estimate: also estimate the camera path of the samples with their
    own cameras (estimator.py, as the study does), of repeating the reference and of the ceiling; against: another
    checkpoint's samples, paired (check_against), for the groups of frames above and for each frame."""
    model, info = camgeo.load_checkpoint(ckpt, weights="ema", device=device)
    config, method = info["config"], info["method"]
    clips = held_out_clips(num_clips, config.num_frames, config.image_size)
    cameras, ratio = checkpoint_cameras(info, clips)
    truth = torch.stack([clip.video for clip in clips])  # (C, F, 3, H, W)
    reference = truth[:, 0]
    videos = {"repeat the reference frame": reference[:, None].expand_as(truth),
              "reference resampled along its cameras' rays (the warp it is given)":
                  conditioning.reference_guess(reference, cameras)}
    for name, camera in (("samples, own cameras", cameras), ("samples, another clip's cameras", cameras.roll(1, 0))):
        videos[name] = sample_clips(model, clips, camera, sample_steps, cfg_scale, device)
    if frames_png:
        report.draw_frames(clips[:4], [(name.split(", ")[1], video[:4]) for name, video in videos.items()
                                       if name.startswith("samples")], frames_png)
    groups = frame_groups(config.num_frames, ratio)
    keyframes = conditioning.keyframe_indices(config.num_frames, ratio).tolist()
    header = " | ".join(f"PSNR {g} | SSIM {g}" for g in groups)
    lines = [f"`{ckpt}` ({method}, {ratio_label(ratio)} keyframes {keyframes}, step {info['step']}): "
             f"{num_clips} held-out clips, {sample_steps} Euler steps, guidance {cfg_scale}", "",
             f"| video | {header} |", "|---|" + "---|" * 2 * len(groups)]
    for name, video in videos.items():
        cells = [f"{metric(video[:, frames], truth[:, frames]).item():.{digits}f}"
                 for frames in groups.values() for metric, digits in ((geometry.psnr, 2), (geometry.ssim, 3))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # the rotation-only warp: the reference moved along every frame's rays at infinity, every pose given
    every_pose = torch.cat([conditioning.camera_inputs(geometry.invert_pose(clip.c2w)[None], clip.K[None], "full", 1.0,
                                                 height=config.image_size, width=config.image_size)[0]
                            for clip in clips])
    references = {"reference reprojected through the true depth (ceiling)":
                      torch.stack([covisibility(c.video, c.depth, c.c2w, c.K)[1] for c in clips]),
                  "reference repeated (a still camera)": videos["repeat the reference frame"],
                  "reference resampled along every pose's rays (rotation-only warp)":
                      conditioning.reference_guess(reference, every_pose),
                  "samples, own cameras": videos["samples, own cameras"]}
    lines += ["", *covisible_table(clips, references, keyframes)]
    if estimate:
        # the ceiling's row says what the estimator reads from a video exact on the co-visible pixels alone
        lines += ["", "| video | RotErr | TransErr | CamMC |", "|---|---|---|---|"]
        ceiling = "reference reprojected through the true depth (ceiling)"
        estimated = {ceiling: references[ceiling], "repeat the reference frame": videos["repeat the reference frame"],
                     "samples, own cameras": videos["samples, own cameras"]}
        for name, video in estimated.items():
            _, metrics = score(clips, video, STUDY_PRESETS["cpu"].estimator_config, workers)
            lines.append(f"| {name} | " + " | ".join(summarise(metrics[:, i].tolist()) for i in range(3)) + " |")
    if against:
        each_frame = {f"frame {f}": [f] for f in range(1, config.num_frames)}  # where in the clip a gap lies
        lines += ["", *check_against(videos["samples, own cameras"], f"{method} `{ckpt}`", against, clips,
                                     {**groups, **each_frame}, sample_steps, cfg_scale, device)]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="the student checkpoint to check (train.py's ckpt.safetensors)")
    parser.add_argument("--against", metavar="CKPT",
                        help="also sample this checkpoint (a baseline) on the same clips with the same noise and "
                             "report the checked one's PSNR, SSIM and co-visible PSNR minus its, per clip, with a "
                             "bootstrap 95%% interval")
    parser.add_argument("--clips", type=int, default=16, help="held-out test clips")
    parser.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS, help="Euler steps of the sampler")
    parser.add_argument("--cfg", type=float, default=CFG_SCALE, help="guidance scale (1: none, sample.py's default)")
    parser.add_argument("--estimate", action="store_true",
                        help="also estimate the camera path of the samples (RotErr, TransErr, CamMC; slow)")
    parser.add_argument("--workers", type=int, default=1, help="--estimate: processes estimating in parallel")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=os.path.join("out", "check"), help="folder for check.md and the picture")
    args = parser.parse_args(argv)
    for path in (args.ckpt, args.against):
        if path is not None and not os.path.isfile(path):
            parser.error(f"no checkpoint at {path}")
    if args.clips < 1 or args.sample_steps < 1:
        parser.error(f"--clips and --sample-steps must be >= 1, got {args.clips} and {args.sample_steps}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    frames_png = os.path.join(args.out, "check_frames.png")
    text = check_camera_following(args.ckpt, args.clips, args.sample_steps, args.cfg, args.device, frames_png,
                                  args.estimate, args.workers, args.against)
    command = "python check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(os.path.join(args.out, "check.md"), "w") as f:
        f.write(f"# Check of one checkpoint\n\n`{command}`\n\n{text}\n")
    print(text)
    print(f"-> {args.out}/check.md, {frames_png}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        print(f"check.py: error: {error}", file=sys.stderr)
        sys.exit(2)
