"""Train and evaluate the small teacher: VGGT's architecture (teacher.SMALL_TEACHER) trained from scratch
on the synthetic world of data.py with VGGT's losses, so that CamGeo has a teacher without downloads.

    python train_teacher.py --out assets/teacher_small.safetensors --half   # the shipped file (see RESULTS.md)
    python train_teacher.py --eval assets/teacher_small.safetensors         # its accuracy on held-out clips

How hard each distillation term pulls on each frame through a teacher: tools/teacher_pull.py.

Targets are expressed as VGGT expects them (vggt_targets): cameras relative to frame 0, lengths divided by the
mean distance of the scene points from camera 0. Losses are VGGT's: L1 on the pose encoding over every
refinement iteration (camera_loss) and the confidence-aware regression on depth and points (confidence_loss).
"""
import argparse
import math
import time

import torch

import data
import geometry
from distill import degraded_frames, student_predictions, teacher_geometry
from teacher import SMALL_TEACHER, VGGT, freeze, load_vggt, save_teacher

CAMERA_LOSS_GAMMA = 0.6   # iteration i of n weighs gamma^(n-1-i): the last refinement counts most (VGGT)
FOV_LOSS_WEIGHT = 0.5     # VGGT weighs the field-of-view error half as much as T and the quaternion
CONF_ALPHA = 0.2          # weight of -log(conf) in the confidence-aware regression losses (VGGT)
WARMUP_FRACTION = 0.05    # linear learning-rate warm-up, then cosine decay to zero
MIN_BASELINE = 0.05       # eval: translation direction is only scored where the camera moved this far
                          # (in units of the scene scale); hand-shake alone has no meaningful direction


def vggt_targets(w2c, K, depth):
    """Ground truth in VGGT's frame and scale.

    w2c (B, F, 4, 4), K (B, 3, 3), depth (B, F, H, W) ->
      pose_enc (B, F, 9) of w2c relative to frame 0, depth (B, F, H, W), world_points (B, F, H, W, 3)
      in frame 0's camera coordinates, scale (B,).
    Scale normalisation (VGGT's): lengths are divided by the mean distance of all ground-truth scene
    points from camera 0, the same factor for translations, depth and points, so they stay consistent.
    Unlike a camera-path scale it stays defined when the camera hardly moves (pans).
    """
    B, Fr, H, W = depth.shape
    K = K[:, None].expand(B, Fr, 3, 3)
    c2w = geometry.relative_to_first(geometry.invert_pose(w2c))  # (B, F, 4, 4)
    points = geometry.transform_points(c2w, geometry.unproject_depth(depth, K))  # (B, F, H, W, 3)
    scale = points.norm(dim=-1).flatten(1).mean(1)  # (B,)
    w2c_rel = geometry.invert_pose(c2w)[..., :3, :]
    w2c_rel = torch.cat([w2c_rel[..., :3], w2c_rel[..., 3:] / scale[:, None, None, None]], dim=-1)
    pose_enc = geometry.extri_intri_to_pose_encoding(w2c_rel, K, (H, W))
    return pose_enc, depth / scale[:, None, None, None], points / scale[:, None, None, None, None], scale


def camera_loss(pose_enc_list, target):
    """L1 on translation, quaternion and (half-weighted) fields of view, every refinement iteration."""
    n, total = len(pose_enc_list), 0.0
    for i, pred in enumerate(pose_enc_list):
        error = (pred - target).abs()
        loss = error[..., :3].mean() + error[..., 3:7].mean() + FOV_LOSS_WEIGHT * error[..., 7:].mean()
        total = total + CAMERA_LOSS_GAMMA ** (n - 1 - i) * loss
    return total / n


def confidence_loss(pred, conf, target):
    """VGGT's aleatoric regression loss: conf * |pred - target| - alpha * log(conf), mean over pixels.
    pred, target (..., C); conf (...). Confident pixels pay more for errors; log(conf) stops conf -> 1."""
    return (conf * (pred - target).norm(dim=-1) - CONF_ALPHA * conf.log()).mean()


def render_split(split, count, num_frames, size):
    """Render `count` clips of a split once (deterministic by seed) -> stacked tensors.
    Videos are kept as 8-bit to keep the cache small: they are what a camera would give anyway."""
    from tqdm import tqdm

    clips = data.SyntheticClips(split, num_frames=num_frames, height=size, width=size, length=count)
    items = [clips[i] for i in tqdm(range(count), desc=f"rendering {split} clips", leave=False)]
    return {"video": (torch.stack([c["video"] for c in items]) * 255).round().to(torch.uint8),
            "depth": torch.stack([c["depth"] for c in items]), "w2c": torch.stack([c["w2c"] for c in items]),
            "K": torch.stack([c["K"] for c in items]), "prompt": [c["prompt"] for c in items]}


def train_small_teacher(args):
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    cache = render_split("train", args.train_clips, args.frames, SMALL_TEACHER.img_size)
    model = VGGT(SMALL_TEACHER).train()
    print(f"small teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{args.train_clips} cached clips of {args.frames} frames")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(WARMUP_FRACTION * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))))
    generator = torch.Generator().manual_seed(args.seed)
    progress = tqdm(range(args.steps), desc="training small teacher")
    for step in progress:
        index = torch.randint(args.train_clips, (args.batch_size,), generator=generator)
        batch = {k: v[index] for k, v in cache.items() if k != "prompt"}
        # Half the clips play backwards: a different first frame, so new relative poses for free.
        backwards = torch.rand(args.batch_size, generator=generator) < 0.5
        for k in ("video", "depth", "w2c"):
            batch[k] = torch.where(backwards.view(-1, *[1] * (batch[k].dim() - 1)), batch[k].flip(1), batch[k])
        video = batch["video"].float() / 255
        pose_enc, depth, points, _ = vggt_targets(batch["w2c"], batch["K"], batch["depth"])
        out = model(video)
        losses = {"camera": camera_loss(out["pose_enc_list"], pose_enc),
                  "depth": confidence_loss(out["depth"], out["depth_conf"], depth[..., None]),
                  "points": confidence_loss(out["world_points"], out["world_points_conf"], points)}
        loss = args.camera_weight * losses["camera"] + losses["depth"] + args.point_weight * losses["points"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
    # float16 halves the file we ship; the teacher still runs in float32 after loading.
    save_teacher(model, args.out, dtype=torch.float16 if args.half else None)
    print(f"saved {args.out}")


def angle_between_deg(a, b):
    """Angle in degrees between vectors (..., 3), via atan2 (accurate near 0 and 180)."""
    return torch.rad2deg(torch.atan2(torch.linalg.cross(a, b).norm(dim=-1), (a * b).sum(-1)))


def rotation_angle_deg(R):
    """Rotation angle of (..., 3, 3) in degrees, from its unit quaternion (w >= 0)."""
    q = geometry.mat_to_quat(R)
    return torch.rad2deg(2 * torch.atan2(q[..., :3].norm(dim=-1), q[..., 3]))


def evaluate_teacher(model, clips, cameras, frames=None, batch_size=16):
    """Per-frame errors of the teacher's `cameras` ("head" or "aligned") and depth, and of trivial baselines,
    on clips (dict of stacked tensors); frames(video, batch, start), if given, replaces each batch's frames
    (degraded_frames, student_predictions) while the scores stay against the true clip.

    rotation: angle of R_gt^T R_pred, poses relative to frame 0 (baseline: identity);
    translation direction: angle between camera-0-relative centres (baseline: straight forward),
      frames that moved >= MIN_BASELINE only; depth AbsRel after per-frame median scale alignment
      (baseline: a constant depth); horizontal field of view error (baseline: the data's mid FoV).
    The aligned cameras use the true intrinsics, as in training, so their FoV error is zero by construction.
    """
    model = freeze(model)
    sums = {}
    for start in range(0, clips["video"].shape[0], batch_size):
        batch = {k: v[start:start + batch_size] for k, v in clips.items()}
        video = batch["video"].float() / 255
        if frames is not None:
            video = frames(video, batch, start)
        B, Fr, _, H, W = video.shape
        intrinsics = batch["K"] if cameras == "aligned" else None
        with torch.no_grad():
            out = teacher_geometry(model, video, cameras, intrinsics=intrinsics)
        c2w_gt = geometry.relative_to_first(geometry.invert_pose(batch["w2c"]))[:, 1:]
        c2w_pred = geometry.relative_to_first(geometry.invert_pose(out["extrinsics"]))[:, 1:]
        _, _, _, scale = vggt_targets(batch["w2c"], batch["K"], batch["depth"])
        rot = rotation_angle_deg(c2w_gt[..., :3, :3].transpose(-1, -2) @ c2w_pred[..., :3, :3])
        rot_base = rotation_angle_deg(c2w_gt[..., :3, :3])
        centre_gt, centre_pred = c2w_gt[..., :3, 3], c2w_pred[..., :3, 3]
        moved = centre_gt.norm(dim=-1) >= MIN_BASELINE * scale[:, None]
        forward = centre_gt.new_tensor([0.0, 0.0, 1.0]).expand_as(centre_gt)
        direction = angle_between_deg(centre_gt, centre_pred)[moved]
        direction_base = angle_between_deg(centre_gt, forward)[moved]
        depth_gt, depth_pred = batch["depth"].flatten(0, 1), out["depth"].flatten(0, 1)  # (B*F, H, W)
        valid = depth_gt > 0
        s = geometry.align_depth_scale(depth_pred, depth_gt, valid, mode="median")
        absrel = ((s[:, None, None] * depth_pred - depth_gt).abs() / depth_gt).flatten(1).mean(1)
        median_gt = depth_gt.flatten(1).median(dim=1).values[:, None, None]
        absrel_base = ((median_gt - depth_gt).abs() / depth_gt).flatten(1).mean(1)
        fov_gt = torch.rad2deg(2 * torch.atan(W / 2 / batch["K"][:, 0, 0]))[:, None].expand(B, Fr)
        fov_pred = torch.rad2deg(2 * torch.atan(W / 2 / out["intrinsics"][..., 0, 0]))
        fov_base = torch.full_like(fov_gt, sum(data.FOV_X_RANGE_DEG) / 2)
        for name, values in (("rotation_deg", (rot, rot_base)), ("translation_dir_deg", (direction, direction_base)),
                             ("depth_absrel", (absrel, absrel_base)),
                             ("fov_deg", ((fov_pred - fov_gt).abs(), (fov_base - fov_gt).abs()))):
            for who, v in zip(("teacher", "baseline"), values):
                sums.setdefault((name, who), []).append(v.flatten())
    return {key: torch.cat(v) for key, v in sums.items()}


STUDENT_TIMES = (0.2, 0.4)  # flow times at which the teacher reads a student's predictions (--student)
BASELINES = {"rotation_deg": "identity rotation", "translation_dir_deg": "constant forward direction",
             "depth_absrel": "constant depth", "fov_deg": "constant 60 deg FoV"}


def eval_table(model, clips, student=None):
    """Markdown: every metric for the head's and the aligned cameras on clean and degraded frames (and on a
    student's predictions x0_hat at t = 0.2 and 0.4), with the baseline and the teacher / baseline ratio."""
    num_clips = clips["video"].shape[0]
    lines = [f"| metric ({num_clips} test clips) | frames | cameras | teacher mean | teacher median | baseline mean "
             "| teacher / baseline | frames scored |", "|---|---|---|---|---|---|---|---|"]
    conditions = {"clean": None, "degraded": degraded_frames}
    if student:
        conditions.update({f"student x0_hat, t = {t}": student_predictions(student, t) for t in STUDENT_TIMES})
    for condition, frames in conditions.items():
        errors = {cameras: evaluate_teacher(model, clips, cameras, frames) for cameras in ("head", "aligned")}
        for name, baseline in BASELINES.items():
            for cameras, result in errors.items():
                if name == "depth_absrel" and cameras == "aligned":
                    continue  # the same depth maps as the head row
                t, b = result[(name, "teacher")], result[(name, "baseline")]
                lines.append(f"| {name} (baseline: {baseline}) | {condition} | "
                             f"{cameras if name != 'depth_absrel' else '—'} | {t.mean():.3f} | {t.median():.3f} | "
                             f"{b.mean():.3f} | {t.mean() / b.mean():.0%} | {t.numel()} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="Train the small VGGT teacher on synthetic clips (the default), "
                                                 "or evaluate a teacher checkpoint (--eval).")
    parser.add_argument("--eval", metavar="CHECKPOINT", help="evaluate a teacher checkpoint on the test split")
    parser.add_argument("--student", metavar="CKPT",
                        help="--eval: also on this student's predictions x0_hat at t = 0.2 and 0.4 (what the teacher "
                             "reads in training)")
    parser.add_argument("--out", default="teacher_small.safetensors", help="where training writes the teacher")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--camera-weight", type=float, default=5.0, help="weight of the camera loss (VGGT: 5)")
    parser.add_argument("--point-weight", type=float, default=1.0, help="weight of the point-map loss (0: untrained)")
    parser.add_argument("--train-clips", type=int, default=4000, help="training clips rendered once and cached")
    parser.add_argument("--eval-clips", type=int, default=200)
    parser.add_argument("--half", action="store_true", help="store the trained weights as float16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.eval:
        model = load_vggt(args.eval)
        clips = render_split("test", args.eval_clips, args.frames, model.config.img_size)
        print(eval_table(model, clips, args.student))
    else:
        started = time.time()
        train_small_teacher(args)
        print(f"training took {(time.time() - started) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
