"""Which frames the distillation pulls on: the norm of the gradient that L_traj and L_geo's depth and smoothness
terms send to each frame the teacher reads, computed as training computes them (teacher-consistent target,
keyframes at 1/2, aligned cameras, the teacher's gradient low-passed), averaged over held-out clips. Read on
degraded real clips (frames that look generated) and, with --student, on a student's one-step predictions x0_hat
at t = 0.2 and 0.4; each with the teacher's frame 0 read from those frames or given the reference image.

    python tools/teacher_pull.py assets/teacher_small.safetensors --student out/sparse/ckpt.safetensors --clips 32
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one up

import conditioning  # noqa: E402
import data  # noqa: E402
import distill  # noqa: E402
import teacher  # noqa: E402

STUDENT_TIMES = (0.2, 0.4)  # flow times below the teacher gate's t_max, where the teacher reads x0_hat in training


def frame_pulls(model, clips, frames, reference_frame0, gradient_sigma, ratio=0.5, batch_size=16):
    """-> {term: (F,) mean over clips of the gradient norm it sends to each frame the teacher reads}.
    frames(video, batch, start) gives what the teacher reads in place of the real clip; reference_frame0 replaces
    its frame 0 with the real one (the reference image the student is given), which then receives nothing."""
    sums, count = {}, 0
    for start in range(0, clips["video"].shape[0], batch_size):
        batch = {k: v[start:start + batch_size] for k, v in clips.items()}
        video = batch["video"]
        B, num_frames = video.shape[:2]
        read = frames(video, batch, start).requires_grad_(True)
        shown = torch.cat([video[:, :1], read[:, 1:]], dim=1) if reference_frame0 else read
        seen_frames = distill.teacher_frames(shown, gradient_sigma)
        seen = distill.teacher_geometry(model, seen_frames, "aligned", intrinsics=batch["K"])
        with torch.no_grad():
            real = distill.teacher_geometry(model, video, "aligned", intrinsics=batch["K"])
        _, depth_term, smooth_term = distill.geometry_loss(seen["depth"], seen["extrinsics"], seen["intrinsics"],
                                                           seen_frames)
        keyframes = torch.zeros(B, num_frames, dtype=torch.bool)
        keyframes[:, conditioning.keyframe_indices(num_frames, ratio)] = True
        traj = distill.trajectory_loss(seen["extrinsics"], seen["intrinsics"], real["extrinsics"],
                                       real["intrinsics"], keyframes, video.shape[-2:],
                                       distill.scene_scale(seen["depth"]), distill.scene_scale(real["depth"]))
        for name, term in (("L_traj", traj), ("L_geo depth", depth_term), ("L_geo smoothness", smooth_term)):
            grad, = torch.autograd.grad(term.sum(), read, retain_graph=True)
            sums[name] = sums.get(name, 0) + grad.flatten(2).norm(dim=-1).sum(0)
        count += B
    return {name: total / count for name, total in sums.items()}


def pull_table(model, clips, student=None, gradient_sigma=distill.DEFAULTS.teacher_gradient_sigma):
    """Markdown: frame_pulls for every kind of frames read, with the teacher's frame 0 read or given."""
    num_frames = clips["video"].shape[1]
    lines = [f"| frames read ({clips['video'].shape[0]} test clips) | teacher's frame 0 | term | "
             + " | ".join(f"frame {f}" for f in range(num_frames)) + " |", "|---" * (num_frames + 3) + "|"]
    conditions = {"degraded": distill.degraded_frames}
    if student:
        conditions.update({f"student x0_hat, t = {t}": distill.student_predictions(student, t) for t in STUDENT_TIMES})
    for condition, frames in conditions.items():
        for reference_frame0 in (False, True):
            for term, per_frame in frame_pulls(model, clips, frames, reference_frame0, gradient_sigma).items():
                lines.append(f"| {condition} | {'reference' if reference_frame0 else 'predicted'} | {term} | "
                             + " | ".join(f"{v:.4f}" for v in per_frame.tolist()) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teacher", help="teacher checkpoint (teacher.load_vggt)")
    parser.add_argument("--student", metavar="CKPT", help="also on this student's predictions x0_hat")
    parser.add_argument("--gradient-sigma", type=float, default=distill.DEFAULTS.teacher_gradient_sigma,
                        help="the low-pass of the teacher's gradient, in pixels (default: training's)")
    parser.add_argument("--clips", type=int, default=200, help="held-out clips (the test split)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = teacher.freeze(teacher.load_vggt(args.teacher))
    size = model.config.img_size
    test = data.SyntheticClips("test", num_frames=args.frames, height=size, width=size, length=args.clips)
    items = [test[i] for i in range(args.clips)]
    clips = {key: torch.stack([item[key] for item in items]) for key in ("video", "w2c", "K")}
    clips["video"] = (clips["video"] * 255).round() / 255  # 8-bit, as a camera gives frames
    clips["prompt"] = [item["prompt"] for item in items]
    print(pull_table(model, clips, args.student, args.gradient_sigma))


if __name__ == "__main__":
    main()
