"""The CamGeo distillation: what the method adds to the student's training.

A frozen teacher (teacher.py) reads the video the student predicts, x0_hat, and returns cameras and depth; two
losses pull the student toward geometric consistency, switched on by a coarse-to-fine curriculum:

    L_total = L_diff + alpha(step) [(1 - beta(step)) L_traj + beta(step) L_geo]

DistillConfig holds every choice of the distillation (train.py's distillation options are its fields). How CamGeo
reads the teacher: teacher_geometry (its depth at the student's resolution, and its cameras from its head or from
aligning the frames through that depth, alignment.py). One function per equation of the paper: teacher_weight (the
gate on the noise level), trajectory_loss (L_traj, keyframe trajectory distillation), geometry_loss (L_geo,
cross-frame depth-warping consistency with the trajectory-smoothness term), curriculum_weights (alpha, beta) and
total_loss (L_total); distillation_losses runs the teacher on a training batch and applies them. training.py calls
it; sampling (sample.py) never imports this file or the teacher, so a CamGeo checkpoint samples exactly as fast as
the plain model.
"""
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import alignment
import geometry
import teacher

# -----------------------------------------------------------------------------
# the choices: the paper gives the losses and the phases, not these values

CAMERA_SOURCES = ("head", "aligned")  # the teacher's camera head, or its frames aligned through its depth
# The head's fields of view are clamped to this range (wider than any camera's): at its ReLU floor, FoV 0, the
# focal length is infinite and every projection NaN.
FOV_RANGE_DEG = (10.0, 150.0)


@dataclass
class DistillConfig:
    """Every choice of the distillation. train.py exposes the ones a user sets (the teacher, its cameras and
    cadence, the loss weights, the paper's ablations and printed forms); a CamGeo checkpoint records them all."""
    # the teacher
    teacher: str = os.path.join("assets", "teacher_small.safetensors")  # trained here: python train_teacher.py
    teacher_cameras: Optional[str] = None  # "head" or "aligned"; None: default_cameras, by the kind of teacher
    teacher_every: int = 1  # on every N-th step, weighted N times there: 1/N of its cost, but a jerkier pull
    teacher_fraction: float = 0.125  # at most this share of a batch is distilled: the teacher is most of a step
    teacher_gate: str = "linear"  # per-clip weight 1 - t / t_max ("flat": 1 below t_max): clearer x0_hat, more say
    teacher_t_max: float = 0.5  # past SNR = 1 (t = 0.5) x0_hat is a blurred guess, too vague for the teacher
    teacher_gradient_sigma: float = 3.0  # low-pass (px) of the teacher's gradient: layout passes, pixel patterns not
    # the losses
    distill_target: str = "teacher"  # the teacher's reading of the real clip (zero at the data) or "truth" (printed)
    traj_weight: float = 0.05  # the paper's 1 makes one distilled clip pull as hard as the batch's diffusion loss
    geo_weight: float = 0.05  # the same for L_geo
    traj_intrinsics: bool = False  # the paper's |K_hat - K|: a teacher's inexact FoV can only be met by fooling it
    spans: tuple = (1, 2, 4)  # frame spans k of L_geo: 1 keeps neighbours consistent, 4 ties far frames (drift)
    gamma: float = 0.075  # w = exp(gamma k): a mild extra tilt toward long spans on top of lambda(k)
    eta: float = 5.0  # w = exp(-eta |grad I|_1): less weight on strong edges, where depth jumps and occlusions start
    smoothness_weight: float = 1.0  # of L_geo's trajectory-smoothness term (0: the "w/o smoothness" ablation)
    # the curriculum
    schedule: str = "sigmoid"  # "linear": the paper's linear-vs-sigmoid ablation
    warmup: bool = True  # phase 1, diffusion only (False: the "w/o warm-up" ablation)
    geo_gate: str = "beta"  # L_geo waits for beta as the phases describe ("printed": alpha only, as the equation)
    warmup_fraction: float = 0.1  # phase 1 ends here, as a fraction of the run
    alpha_mid: float = 0.2  # alpha (distillation on) is centred here, after the warm-up
    beta_mid: float = 0.5  # beta (trajectory -> depth) halfway: a camera first, then its depth
    schedule_width: float = 0.03  # each sigmoid rises over about +-3 widths: a short hand-over, not a step

    def __post_init__(self):
        if self.teacher_cameras not in (None, *CAMERA_SOURCES):
            raise ValueError(f"teacher_cameras must be one of {CAMERA_SOURCES} or None, got {self.teacher_cameras!r}")
        if self.teacher_every < 1:
            raise ValueError(f"teacher_every must be >= 1, got {self.teacher_every}")
        if not (0.0 < self.teacher_t_max <= 1.0 and 0.0 < self.teacher_fraction <= 1.0):
            raise ValueError(f"teacher_t_max and teacher_fraction must be in (0, 1], got {self.teacher_t_max} and "
                             f"{self.teacher_fraction}")
        if self.teacher_gradient_sigma < 0:
            raise ValueError(f"teacher_gradient_sigma must be >= 0, got {self.teacher_gradient_sigma}")
        if self.distill_target not in ("teacher", "truth"):
            raise ValueError(f"distill_target must be 'teacher' or 'truth', got {self.distill_target!r}")


DEFAULTS = DistillConfig()  # the functions' defaults
GEO_SCALE_MODE = "lstsq"  # depth scale by least squares: a gradient to every valid pixel (a median's: to one)


# -----------------------------------------------------------------------------
# the teacher's reading of a video

def default_cameras(config):
    """Where a teacher's cameras come from unless told otherwise: the released VGGT (DINOv2 patch embedding)
    has an accurate camera head; a teacher trained from scratch on a CPU has not (RESULTS.md), and its
    cameras come from aligning the frames through its own depth (alignment.py)."""
    return "head" if config.patch_embed == "dinov2" else "aligned"


def teacher_geometry(model, video, cameras=None, intrinsics=None, alignment_config=None):
    """Run the teacher on frames of any size and return geometry in the input's pixels.

    video (B, F, 3, H, W) or (F, 3, H, W) in [0, 1] -> dict (batch dims as given):
      pose_enc (B, F, 9) (the head's, FoV clamped), extrinsics (B, F, 4, 4) w2c relative to frame 0 (teacher's
      own scale),
      intrinsics (B, F, 3, 3) in pixels of H x W, depth (B, F, H, W), depth_conf (B, F, H, W).
    cameras: "head" (the camera head, FoV clamped to FOV_RANGE_DEG), "aligned" (alignment.align_cameras:
    direct alignment of consecutive frames through the teacher's depth, started from the head's cameras; VGGT's
    authors refine the head the same way, by bundle adjustment on its depth), or None for default_cameras.
    intrinsics (B, 3, 3) or (B, F, 3, 3): known intrinsics in pixels of H x W, used instead of the head's.
    Differentiable w.r.t. the video, through the aligned cameras too.
    """
    if video.dim() not in (4, 5) or video.shape[-3] != 3:
        raise ValueError(f"teacher_geometry expects video (B, F, 3, H, W) or (F, 3, H, W), got {tuple(video.shape)}")
    cameras = cameras or default_cameras(model.config)
    if cameras not in CAMERA_SOURCES:
        raise ValueError(f"cameras must be one of {CAMERA_SOURCES}, got {cameras!r}")
    unbatched = video.dim() == 4
    if unbatched:
        video = video.unsqueeze(0)
        intrinsics = None if intrinsics is None else intrinsics.unsqueeze(0)
    B, Fr, _, H, W = video.shape
    size = teacher.teacher_input_size(model.config, H, W)
    frames = video.flatten(0, 1)
    if size != (H, W):
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
    out = model(frames.unflatten(0, (B, Fr)), point_maps=False)
    # The encoding holds fields of view, not focal lengths: decoding it at H x W directly gives
    # the intrinsics of the (stretched) input frames.
    low, high = (math.radians(d) for d in FOV_RANGE_DEG)
    pose_enc = torch.cat([out["pose_enc"][..., :7], out["pose_enc"][..., 7:].clamp(low, high)], dim=-1)
    extrinsics, head_intrinsics = geometry.pose_encoding_to_extri_intri(pose_enc, (H, W))
    extrinsics = geometry.to_homogeneous(extrinsics)
    if intrinsics is None:
        intrinsics = head_intrinsics
    elif intrinsics.shape[-2:] != (3, 3) or intrinsics.shape[0] != B or intrinsics.dim() not in (3, 4):
        raise ValueError(f"intrinsics must be (B, 3, 3) or (B, F, 3, 3) for B = {B}, got {tuple(intrinsics.shape)}")
    else:
        per_frame = intrinsics if intrinsics.dim() == 4 else intrinsics[:, None]
        intrinsics = per_frame.to(video.dtype).expand(B, Fr, 3, 3)
    depth = torch.stack([out["depth"][..., 0], out["depth_conf"]], dim=2).flatten(0, 1)  # (B*F, 2, h, w)
    if size != (H, W):
        depth = F.interpolate(depth, size=(H, W), mode="bilinear", align_corners=False)
    depth = depth.unflatten(0, (B, Fr))
    if cameras == "aligned":
        extrinsics = alignment.align_cameras(video, depth[:, :, 0], intrinsics, init_w2c=extrinsics,
                                             config=alignment_config or alignment.AlignmentConfig())
    result = {"pose_enc": pose_enc, "extrinsics": extrinsics, "intrinsics": intrinsics,
              "depth": depth[:, :, 0], "depth_conf": depth[:, :, 1]}
    return {k: v[0] for k, v in result.items()} if unbatched else result


# -----------------------------------------------------------------------------
# the gate on the noise level, and the frames the teacher reads


def teacher_weight(t, t_max=DEFAULTS.teacher_t_max, shape=DEFAULTS.teacher_gate):
    """Per-clip weight of the distillation losses at flow time t (B,): "linear" w(t) = max(0, 1 - t / t_max),
    "flat" w(t) = 1 for t < t_max, else 0. Clips of weight 0 are not shown to the teacher at all."""
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"teacher t_max must be in (0, 1], got {t_max}")
    if shape not in ("linear", "flat"):
        raise ValueError(f"teacher gate must be 'linear' or 'flat', got {shape!r}")
    if shape == "flat":
        return (t < t_max).to(t.dtype)
    return (1 - t / t_max).clamp(min=0)


def select_teacher_clips(weights, fraction=DEFAULTS.teacher_fraction):
    """Indices (n,) of the clips the teacher looks at this step: those of positive weight, at most
    ceil(fraction * B) of them, in batch order (the batch order is already random)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"teacher batch fraction must be in (0, 1], got {fraction}")
    open_clips = (weights > 0).nonzero().flatten()
    return open_clips[: math.ceil(fraction * weights.shape[0])]


class LowPassGradient(torch.autograd.Function):
    """Identity in the forward pass; the backward pass blurs the incoming gradient of (..., C, H, W) frames with
    a Gaussian of width sigma (geometry.gaussian_blur). A filter on the signal the student receives, not the
    gradient of any function: the teacher still reads the frames unchanged. Why: a network's input gradient
    carries fine patterns that change its reading without being content; passed on whole, they are what the
    student learns fastest (a mottled texture at the size of its patches), while the layout of a frame, which
    is what the cameras move, passes a low-pass of a few pixels."""

    @staticmethod
    def forward(ctx, frames, sigma):
        ctx.sigma = sigma
        return frames.clone()

    @staticmethod
    def backward(ctx, grad):
        blurred = geometry.gaussian_blur(grad.reshape(-1, *grad.shape[-3:]), ctx.sigma)
        return blurred.reshape(grad.shape), None


def teacher_frames(x0_pred, gradient_sigma=DEFAULTS.teacher_gradient_sigma):
    """The predicted video as the teacher sees it: clamped to [0, 1] (it was trained on images) in the forward
    pass, with the gradient passed straight through, so a saturated pixel can still be pulled back, and
    low-passed by gradient_sigma (LowPassGradient; 0 leaves it whole). The teacher reads x0_hat whole, frame 0
    included, as the paper describes it."""
    if gradient_sigma < 0:
        raise ValueError(f"teacher gradient sigma must be >= 0, got {gradient_sigma}")
    if gradient_sigma > 0:
        if x0_pred.dim() < 3:
            raise ValueError(f"a low-passed gradient needs frames (..., C, H, W), got {tuple(x0_pred.shape)}")
        x0_pred = LowPassGradient.apply(x0_pred, gradient_sigma)
    return x0_pred + (x0_pred.clamp(0, 1) - x0_pred).detach()


# -----------------------------------------------------------------------------
# L_traj and L_geo


def scene_scale(depth):
    """(B, F, H, W) depth -> (B,) median depth of frame 0: the unit in which L_traj and L_geo measure
    translations. A trajectory's own extent would blow a pan's hand-shake up to unit length in a random
    direction; the distance to the scene is what the image motion of a translation is relative to."""
    return depth[:, 0].flatten(1).median(dim=1).values.clamp(min=geometry.DEPTH_EPS)


def trajectory_loss(pred_w2c, pred_K, target_w2c, target_K, keyframe_mask, image_size_hw, pred_scale,
                    target_scale, use_intrinsics=False):
    """Keyframe trajectory distillation, per clip (B,):

        L_traj = mean_{s in S, s != 0} |phi(R_hat_s) - phi(R_s)|_1 + |T_hat_s - T_s|_1 [+ |K_hat_s - K_s|_1]

    pred_w2c (B, F, 3|4, 4), pred_K (B, F, 3, 3): the teacher's cameras of the predicted video; target_w2c,
    target_K (B, F, ...) or (B, 3, 3): what they should be (the teacher's cameras of the real clip, or the true
    ones); keyframe_mask (B, F). Both trajectories are made relative to frame 0 (VGGT's world is its first frame)
    with translations divided by their own scene scale (pred_scale, target_scale (B,), see scene_scale: VGGT's
    scale is its own), then encoded as VGGT does (geometry.extri_intri_to_pose_encoding): T the w2c translation,
    phi the XYZW unit quaternion with w >= 0, flipped onto the target's hemisphere (near 180 degrees the two can
    be standardised to opposite signs), K as the two fields of view in radians. use_intrinsics=False leaves the
    |K_hat - K| term out: a teacher whose field of view is not accurate can only be met there by being fooled.
    """
    if keyframe_mask.shape != target_w2c.shape[:2] or pred_w2c.shape[:2] != target_w2c.shape[:2]:
        raise ValueError(f"trajectory_loss: keyframe_mask {tuple(keyframe_mask.shape)}, predicted "
                         f"{tuple(pred_w2c.shape)} and target {tuple(target_w2c.shape)} poses disagree on (B, F)")
    if target_K.dim() == 3:
        target_K = target_K[:, None].expand(-1, target_w2c.shape[1], 3, 3)
    pred_w2c = geometry.invert_pose(geometry.scaled_relative_c2w(pred_w2c, pred_scale))
    target_w2c = geometry.invert_pose(geometry.scaled_relative_c2w(target_w2c, target_scale))
    pred = geometry.extri_intri_to_pose_encoding(pred_w2c, pred_K, image_size_hw)
    target = geometry.extri_intri_to_pose_encoding(target_w2c, target_K, image_size_hw)
    q_pred, q_target = pred[..., 3:7], target[..., 3:7]  # (B, F, 9) encodings: T, quaternion, two FoVs
    q_pred = torch.where((q_pred * q_target).sum(-1, keepdim=True) < 0, -q_pred, q_pred)
    error = (pred[..., :3] - target[..., :3]).abs().sum(-1) + (q_pred - q_target).abs().sum(-1)  # (B, F)
    if use_intrinsics:
        error = error + (pred[..., 7:] - target[..., 7:]).abs().sum(-1)
    weight = keyframe_mask.to(error.dtype).clone()
    weight[:, 0] = 0  # frame 0 is the identity on both sides
    return (error * weight).sum(-1) / weight.sum(-1).clamp(min=1)


def span_pairs(num_frames, spans, gamma=DEFAULTS.gamma):
    """The pairs (f, f + k), k in spans (those < num_frames), and their weights, as tensors of length P:
    first, second (frame indices), following (index of the pair (f + k, f + 2k), or -1 if it does not exist),
    depth_weight = lambda(k) exp(gamma k) / (pairs of span k), smooth_weight = lambda(k) exp(gamma k) /
    (pairs of span k that have a following pair), 0 for those that do not.
    lambda(k) = k / sum_{k' in spans} k': the span selector favours long spans (they anchor frames far apart
    and stop drift), normalised so the weights of a clip's spans sum to 1 whatever the clip length."""
    usable = sorted({int(k) for k in spans if 0 < int(k) < num_frames})
    if not usable:
        raise ValueError(f"no usable span in {tuple(spans)} for clips of {num_frames} frames (need 0 < k < F)")
    first, span = [], []
    for k in usable:
        first += list(range(num_frames - k))
        span += [k] * (num_frames - k)
    index = {(f, k): i for i, (f, k) in enumerate(zip(first, span))}
    following = [index.get((f + k, k), -1) for f, k in zip(first, span)]
    depth_weight, smooth_weight = [], []
    for k, nxt in zip(span, following):
        span_weight = k / sum(usable) * math.exp(gamma * k)
        depth_weight.append(span_weight / (num_frames - k))
        with_following = max(0, num_frames - 2 * k)
        smooth_weight.append(span_weight / with_following if nxt >= 0 else 0.0)
    first = torch.tensor(first)
    return (first, first + torch.tensor(span), torch.tensor(following),
            torch.tensor(depth_weight, dtype=torch.float64), torch.tensor(smooth_weight, dtype=torch.float64))


def image_gradient_l1(frames):
    """|grad I|_1 per pixel: mean over channels of |I(x+1) - I(x)| + |I(y+1) - I(y)| (zero past the
    last row / column). frames (..., C, H, W) -> (..., H, W)."""
    dx = F.pad((frames[..., :, 1:] - frames[..., :, :-1]).abs(), (0, 1))
    dy = F.pad((frames[..., 1:, :] - frames[..., :-1, :]).abs(), (0, 0, 0, 1))
    return (dx + dy).mean(dim=-3)


def geometry_pairs(depth, w2c, K, frames, spans=DEFAULTS.spans, gamma=DEFAULTS.gamma, eta=DEFAULTS.eta,
                   scale_mode=GEO_SCALE_MODE):
    """The two terms of L_geo pair by pair, weighted: (depth term, smoothness term), each (B, P) over the pairs of
    span_pairs; geometry_loss sums them. The part of L_geo that training compiles (training.make_geometry_pairs)."""
    B, num_frames, H, W = depth.shape
    first, second, following, depth_weight, smooth_weight = (
        x.to(depth.device) for x in span_pairs(num_frames, spans, gamma))
    depth_weight, smooth_weight = depth_weight.to(depth.dtype), smooth_weight.to(depth.dtype)
    w2c = geometry.to_homogeneous(w2c)  # (B, F, 4, 4)
    relative = w2c[:, second] @ geometry.invert_pose(w2c[:, first])  # (B, P, 4, 4) camera f -> camera f + k

    # pairs of one span are two slices of the clip; slices (not an index gather) keep the backward a plain add
    usable_spans = sorted({int(k) for k in spans if 0 < int(k) < num_frames})
    depth_a = torch.cat([depth[:, :num_frames - k] for k in usable_spans], dim=1)  # (B, P, H, W)
    depth_b = torch.cat([depth[:, k:] for k in usable_spans], dim=1)
    residual, valid = geometry.depth_consistency_residual(depth_a, depth_b, K[:, first], relative, scale_mode,
                                                          K_b=K[:, second])  # (B, P, H, W) each
    edge_weight = torch.exp(-eta * image_gradient_l1(frames.detach()))  # (B, F, H, W)
    edge_weight = torch.cat([edge_weight[:, :num_frames - k] for k in usable_spans], dim=1)
    per_pair = (edge_weight * residual).flatten(2).sum(-1) / valid.flatten(2).sum(-1).clamp(min=1)  # (B, P)

    # smoothness: change of relative motion between consecutive pairs of the same span
    motion = torch.cat([relative[..., :3, :3], relative[..., :3, 3:] / scene_scale(depth)[:, None, None, None]], -1)
    change = (motion[:, following.clamp(min=0)] - motion).abs().flatten(2).sum(-1)  # (B, P)
    return per_pair * depth_weight, change * smooth_weight


def geometry_loss(depth, w2c, K, frames, spans=DEFAULTS.spans, gamma=DEFAULTS.gamma, eta=DEFAULTS.eta,
                  scale_mode=GEO_SCALE_MODE, smoothness_weight=DEFAULTS.smoothness_weight):
    """Cross-frame consistency distillation for all pairs of a batch at once, per clip (B,):

        L_geo = sum_{f,k} lambda(k) w_{f,f+k} ( |D_hat_{f+k} - W(D_hat_f, dE_{f,f+k}, K_hat)|_1
                                               + |Delta(C_hat_{f+k}, C_hat_f)|_1 )
        w_{f,f+k} = exp(gamma k) exp(-eta |grad I_f|_1),   lambda(k) = k / sum_{k' in spans} k'.

    depth (B, F, H, W), w2c (B, F, 3|4, 4), K (B, F, 3, 3): the teacher's depth and cameras of the video frames
    (B, F, 3, H, W) in [0, 1]. Returns (L_geo, depth term, smoothness term), each (B,).

    Depth term: W and the scale-invariant residual are geometry.depth_consistency_residual (warp frame f's depth
    by dE = w2c_{f+k} c2w_f, align frame f+k's sampled depth to it in scale, divide by the median warped depth),
    for every pair of every clip as one batch. Per pair: sum of w r over valid pixels / number of valid pixels;
    pairs are averaged within a span, then summed over spans with lambda(k) exp(gamma k). The edge weight
    exp(-eta |grad I_f|_1) is detached: otherwise the network could lower the loss by painting edges where the
    depths disagree.

    Smoothness term, our reading: |Delta(C_{f+k}, C_f)|_1 taken literally is the size of the relative motion and
    would fight every camera move the student is asked for. We penalise its *change* instead (second order):
    |dE_{f+k,f+2k} - dE_{f,f+k}|_1 over the 3x4 [R|t] entries, translations in units of the scene scale. A
    constant-velocity camera (in its own frame) costs nothing. Weighted by lambda(k) exp(gamma k), averaged
    within a span.

    No Python loop over pairs (index tensors and slices gather all pairs at once): training compiles it.
    """
    depth_pairs, smooth_pairs = geometry_pairs(depth, w2c, K, frames, spans, gamma, eta, scale_mode)
    depth_term, smooth_term = depth_pairs.sum(-1), smooth_pairs.sum(-1)  # (B,)
    return depth_term + smoothness_weight * smooth_term, depth_term, smooth_term


# -----------------------------------------------------------------------------
# the curriculum and L_total


def curriculum_weights(step, total_steps, schedule=DEFAULTS.schedule, warmup=DEFAULTS.warmup,
                       warmup_fraction=DEFAULTS.warmup_fraction, alpha_mid=DEFAULTS.alpha_mid,
                       beta_mid=DEFAULTS.beta_mid, width=DEFAULTS.schedule_width):
    """Coarse-to-fine curriculum -> (alpha, beta) python floats for

        L_total = L_diff + alpha(step) [(1 - beta(step)) L_traj + beta(step) L_geo]

    alpha(s) = sigma((s / N - alpha_mid) / width) when geometry switches on, beta(s) = sigma((s / N - beta_mid)
    / width) the move from trajectory to depth (N = total_steps, sigma the logistic sigmoid).
    Phase 1 (warm-up, s < warmup_fraction N): alpha = 0 exactly, diffusion only. Phase 2 (alpha up, beta
    low): the trajectory. Phase 3 (beta up): cross-frame depth consistency.
    schedule="linear": the same midpoints and the same slope at the midpoint (1 / (4 width)), clipped to
    [0, 1]: clamp(0.5 + (s / N - mid) / (4 width), 0, 1) (the paper's linear-vs-sigmoid ablation).
    warmup=False: alpha = 1 from the first step (the "w/o warm-up" ablation); beta is unchanged.
    """
    if schedule not in ("sigmoid", "linear"):
        raise ValueError(f"curriculum schedule must be 'sigmoid' or 'linear', got {schedule!r}")
    if total_steps < 1 or width <= 0:
        raise ValueError(f"need total_steps >= 1 and width > 0, got {total_steps} and {width}")
    progress = step / total_steps

    def ramp(mid):
        x = (progress - mid) / width
        if schedule == "linear":
            return min(1.0, max(0.0, 0.5 + x / 4))
        return 1 / (1 + math.exp(-x))

    if not warmup:
        alpha = 1.0
    elif progress < warmup_fraction:
        alpha = 0.0
    else:
        alpha = ramp(alpha_mid)
    return alpha, ramp(beta_mid)


def total_loss(loss_diff, loss_traj, loss_geo, alpha, beta, geo_gate=DEFAULTS.geo_gate,
               traj_weight=DEFAULTS.traj_weight, geo_weight=DEFAULTS.geo_weight):
    """L_total = L_diff + alpha [(1 - beta) w_traj L_traj + beta w_geo L_geo]   (geo_gate="beta", the default:
    L_geo waits for phase 3 as the paper's phases describe), or the printed
    L_diff + alpha [(1 - beta) w_traj L_traj + w_geo L_geo] (geo_gate="printed", L_geo on as soon as alpha is).
    The paper's weights are w_traj = w_geo = 1."""
    if geo_gate not in ("beta", "printed"):
        raise ValueError(f"geo_gate must be 'beta' or 'printed', got {geo_gate!r}")
    geo_factor = beta if geo_gate == "beta" else 1.0
    return loss_diff + alpha * ((1 - beta) * traj_weight * loss_traj + geo_factor * geo_weight * loss_geo)


# -----------------------------------------------------------------------------
# the teacher on a training batch


def distillation_losses(teacher_model, geometry_pairs, out, batch, keyframe_mask, config=DEFAULTS):
    """The teacher's view of the predicted video -> {loss_traj, loss_geo, loss_geo_depth, loss_geo_smooth} and
    teacher_clips. Each loss is summed over the clips shown to the teacher and divided by the batch size, so a
    distilled clip weighs what its own diffusion loss weighs. config: a DistillConfig.

    Clips pass the gate by their flow time (teacher_weight) and only if their camera was not dropped for
    guidance (with no camera given there is no trajectory to follow), at most config.teacher_fraction of the
    batch (select_teacher_clips). The teacher sees x0_hat through teacher_frames (its gradient low-passed by
    config.teacher_gradient_sigma) and reads it with teacher_geometry; its parameters are frozen, the gradient
    flows through it to x0_hat. With distill_target "teacher" it also reads the real clip (no gradient) and that
    reading is the target: L_traj between the two trajectories at the keyframes, and L_geo only by how much x0_hat
    is less consistent than x0, max(0, L_geo(x0_hat) - L_geo(x0)) of the clip's whole sum. With "truth", the true
    keyframe poses and the plain L_geo, as printed. geometry_pairs is distill.geometry_pairs or its compiled form.
    """
    B = out["t"].shape[0]
    weights = teacher_weight(out["t"], config.teacher_t_max, config.teacher_gate) * ~out["camera_drop"]
    chosen = select_teacher_clips(weights, config.teacher_fraction)
    zero = out["loss"].new_zeros(())
    terms = {"loss_traj": zero, "loss_geo": zero, "loss_geo_depth": zero, "loss_geo_smooth": zero,
             "teacher_clips": chosen.numel()}
    if chosen.numel() == 0:
        return terms
    video, w2c, K = (batch[key][chosen] for key in ("video", "w2c", "K"))
    frames = teacher_frames(out["x0_pred"][chosen], config.teacher_gradient_sigma)  # (n, F, 3, H, W)
    geo_options = dict(spans=tuple(config.spans), gamma=config.gamma, eta=config.eta)
    seen = teacher_geometry(teacher_model, frames, config.teacher_cameras, intrinsics=K)
    depth_pairs, smooth_pairs = geometry_pairs(seen["depth"], seen["extrinsics"], seen["intrinsics"], frames,
                                               **geo_options)
    geo_depth, geo_smooth = depth_pairs.sum(-1), smooth_pairs.sum(-1)
    geo = geo_depth + config.smoothness_weight * geo_smooth
    if config.distill_target == "teacher":
        with torch.no_grad():
            real = teacher_geometry(teacher_model, video, config.teacher_cameras, intrinsics=K)
            real_depth, real_smooth = geometry_pairs(real["depth"], real["extrinsics"], real["intrinsics"], video,
                                                     **geo_options)
        target_w2c, target_K, target_scale = real["extrinsics"], real["intrinsics"], scene_scale(real["depth"])
        geo = (geo - (real_depth.sum(-1) + config.smoothness_weight * real_smooth.sum(-1))).clamp(min=0)
    else:
        target_w2c, target_K, target_scale = w2c, K, scene_scale(batch["depth"][chosen])
    traj = trajectory_loss(seen["extrinsics"], seen["intrinsics"], target_w2c, target_K, keyframe_mask[chosen],
                           frames.shape[-2:], scene_scale(seen["depth"]), target_scale, config.traj_intrinsics)
    gate = weights[chosen]
    terms.update({name: (gate * value).sum() / B for name, value in
                  (("loss_traj", traj), ("loss_geo", geo), ("loss_geo_depth", geo_depth),
                   ("loss_geo_smooth", geo_smooth))})
    return terms


# -----------------------------------------------------------------------------
# diagnostics: what the teacher reads in place of a real clip (train_teacher.py --eval, tools/teacher_pull.py)


def degraded_frames(video, batch, start):
    """Frames made to look generated (estimator.degrade: blur, colour cast, noise), one seed per clip."""
    import estimator
    return torch.stack([estimator.degrade(v, torch.Generator().manual_seed(start + i)) for i, v in enumerate(video)])


def student_predictions(student_path, t):
    """-> frames function: a CamGeo student's one-step clean-video prediction x0_hat from x_t at flow time t,
    conditioned as it was trained (its method and keyframe ratio), for the teacher to read as in training."""
    import camgeo  # the student: loaded here only, by the diagnostics
    import conditioning
    student, info = camgeo.load_checkpoint(student_path)
    method, ratio = info["method"], info["options"].get("sparse", 0.5)

    @torch.no_grad()
    def frames(video, batch, start):
        size = video.shape[-1]
        camera, _, _ = conditioning.camera_inputs(batch["w2c"], batch["K"], method, ratio, height=size, width=size)
        noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(start))
        x0 = video * 2 - 1
        x_t = (1 - t) * x0 + t * noise
        x0_hat = student(x_t, torch.full((video.shape[0],), t), x0[:, 0], batch["prompt"], camera)
        return ((x0_hat + 1) / 2).clamp(0, 1)

    return frames
