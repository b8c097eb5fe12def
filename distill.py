"""The CamGeo distillation: what the method adds to the student's training.

A frozen teacher (teacher.py) reads the video the student predicts, x0_hat, and returns cameras and depth; two
losses pull the student toward geometric consistency, switched on by a coarse-to-fine curriculum:

    L_total = L_diff + alpha(step) [(1 - beta(step)) L_traj + beta(step) L_geo]

One function per equation of the paper: teacher_weight (the gate on the noise level), trajectory_loss (L_traj,
keyframe trajectory distillation), geometry_loss (L_geo, cross-frame depth-warping consistency with the
trajectory-smoothness term), curriculum_weights (alpha, beta) and total_loss (L_total); distillation_losses runs
the teacher on a training batch and applies them. train.py calls it; sampling (sample.py) never imports this file
or the teacher, so a CamGeo checkpoint samples exactly as fast as the plain model.
"""
import math

import torch
import torch.nn.functional as F

import geometry
import teacher

# -----------------------------------------------------------------------------
# choices the paper leaves open (each is an option of train.py)

# The teacher reads x0_hat. Past SNR = 1 (t = 0.5 in rectified flow, where noise and signal weigh the same in x_t)
# x0_hat is a blurred guess; "linear" ramps the weight from 0 there to 1 at t = 0, "flat" gives every clip below
# t_max the full weight (so the noise levels where the camera decides the layout count as much as clean ones).
TEACHER_T_MAX = 0.5
TEACHER_GATE = "linear"
# The teacher's gradient reaches x0_hat low-passed by a Gaussian of this width, in pixels of the student's frames
# (0: unfiltered). The forward pass is untouched: the teacher reads x0_hat itself. A network's input gradient
# carries fine patterns that change its reading without being content; passed on whole, they are what the
# student learns fastest (the mottled texture at the size of its 4-pixel patches). sigma = 3 keeps 6% of an
# 8-pixel period and half of a 16-pixel one: the layout of a 32-pixel frame, which is what the cameras move, passes.
# Against 1.5 it halves the distillation's cost in image (evaluate.py --check against Sparse, RESULTS.md).
TEACHER_GRADIENT_SIGMA = 3.0
# The teacher's frame 0. "predicted": x0_hat's own frame 0 (the teacher sees the generated video whole, as the
# paper describes it). "reference": the reference image the student was given, since in image-to-video frame 0 is
# an input, not a prediction. The teacher's world is its first frame (VGGT makes every camera relative to it) and
# the aligned cameras are chained from it; read from x0_hat, frame 0 receives the largest L_traj gradient of any
# frame (train_teacher.py --pull), so the student could move every camera at once by repainting its copy of the
# reference. Measured, it does not: paired with Sparse on 64 clips the two score the same, frame by frame
# (RESULTS.md), so the default stays the paper's.
TEACHER_FRAME0 = "predicted"
# At most this fraction of each batch goes through the teacher (rounded up, so at least one clip): the teacher's
# forward + backward is the expensive part of a CamGeo step (bench.py).
TEACHER_BATCH_FRACTION = 0.125
# The teacher runs on every N-th step after the warm-up, and there its two losses weigh N times as much: the
# expected gradient is the same as running it every step (lazy regularisation, as StyleGAN2 does for its R1
# penalty), for 1/N of the teacher's cost, which is most of what a CamGeo step adds (bench.py). It is not free: Adam
# is not linear in its gradients, and a pull N times as strong on 1/N of the steps costs image (RESULTS.md: at
# weights 0.25 every step scores 0.1 dB above every third step in the study; at the defaults' weights every third
# step falls below Sparse on --check at seed 0, every step stays above it at both seeds). The default keeps the
# paper's cadence, at 1.5x a Sparse step's cost: `python train.py --sparse 0.5` takes 19 to 24 minutes on 2 cores.
TEACHER_EVERY = 1
# What the teacher's reading of x0_hat is compared with. "teacher": its reading of the real clip x0 (L_traj
# between the two trajectories; L_geo only where x0_hat is less consistent than x0), so both losses are exactly
# zero at x0_hat = x0 and never pull the student off the data to suit the teacher's own errors. "truth": the
# ground-truth keyframe poses and the plain L_geo, as printed in the paper.
DISTILL_TARGET = "teacher"
# The frames L_traj compares. "keyframes": the frames whose pose the student is given (the paper's S). "all": every
# frame, which only the teacher target allows: the teacher's reading of the real clip needs no camera label, so it
# can supervise the frames between keyframes, where a sparse student has no pose to follow.
TRAJ_FRAMES = "keyframes"
# With the teacher target, how L_geo's excess over the real clip is taken. "clip": max(0, L_geo(x0_hat) -
# L_geo(x0)) of the clip's whole sum, so one term's shortfall can pay for the other's excess. "pair": each term of
# each pair on its own, max(0, x0_hat's - x0's): no pair and no term pays for another, a prediction whose camera
# moves more evenly than the real clip's earns nothing, and the smoothness term cannot pull a keyframe's camera
# off the data's to make up for depth that is less consistent elsewhere. Measured, their students score the same
# (paired with Sparse on 64 clips, RESULTS.md), so the default keeps the simpler one.
GEO_EXCESS = "clip"
# Weights of the two distillation terms inside L_total. The paper's are 1; here one distilled clip, read by a
# teacher that sees a prediction much less well than a real frame, then pulls on the student as hard as the
# diffusion loss of the whole batch, and costs image quality (RESULTS.md). The cost falls with the weight; at 0.05,
# with the low-pass above and the teacher on every step, the headline command's `evaluate.py --check` PSNR is above
# Sparse's at both training seeds measured (+0.006 and +0.010 dB, 64 clips paired).
TRAJ_WEIGHT = 0.05
GEO_WEIGHT = 0.05
# Frame spans k of the pairs (f, f + k) in L_geo; spans >= the clip length are dropped. Span 1 keeps
# neighbours consistent, span 4 (half the default 8-frame clip) ties distant frames together against drift.
GEO_SPANS = (1, 2, 4)
# w = exp(gamma k): a mild extra tilt toward long spans (x1.25 for k = 4 vs k = 1) on top of lambda(k).
GEO_GAMMA = 0.075
# w = exp(-eta |grad I|_1), |grad I|_1 in [0, 1] image units (mean over RGB of |dI/dx| + |dI/dy|): a strong
# edge (0.3) gets weight 0.22, a flat region 1. Edges are where depth is discontinuous and occlusions begin.
GEO_ETA = 5.0
# Scale alignment of the sampled depth to the warped depth: least squares (gradient reaches every valid
# pixel, and it is two sums) rather than a median (gradient to a single pixel, a sort).
GEO_SCALE_MODE = "lstsq"
# Weight of the trajectory-smoothness term inside L_geo (0: the "w/o smoothness" ablation).
GEO_SMOOTHNESS_WEIGHT = 1.0
# Curriculum, as fractions of the run. Phase 1 (warm-up, diffusion only) ends at 10%; alpha (distillation
# on) is centred at 20%, beta (trajectory -> depth) at 50%; each sigmoid rises over about +-3 widths.
CURRICULUM_WARMUP = 0.1
CURRICULUM_ALPHA_MID = 0.2
CURRICULUM_BETA_MID = 0.5
CURRICULUM_WIDTH = 0.03


def teacher_weight(t, t_max=TEACHER_T_MAX, shape=TEACHER_GATE):
    """Per-clip weight of the distillation losses at flow time t (B,): "linear" w(t) = max(0, 1 - t / t_max),
    "flat" w(t) = 1 for t < t_max, else 0. Clips of weight 0 are not shown to the teacher at all."""
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"teacher t_max must be in (0, 1], got {t_max}")
    if shape not in ("linear", "flat"):
        raise ValueError(f"teacher gate must be 'linear' or 'flat', got {shape!r}")
    if shape == "flat":
        return (t < t_max).to(t.dtype)
    return (1 - t / t_max).clamp(min=0)


def select_teacher_clips(weights, fraction=TEACHER_BATCH_FRACTION):
    """Indices (n,) of the clips the teacher looks at this step: those of positive weight, at most
    ceil(fraction * B) of them, in batch order (the batch order is already random)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"teacher batch fraction must be in (0, 1], got {fraction}")
    open_clips = (weights > 0).nonzero().flatten()
    return open_clips[: math.ceil(fraction * weights.shape[0])]


class LowPassGradient(torch.autograd.Function):
    """Identity in the forward pass; the backward pass blurs the incoming gradient of (..., C, H, W) frames with
    a Gaussian of width sigma (geometry.gaussian_blur). A filter on the signal the student receives, not the
    gradient of any function: the teacher still reads the frames unchanged."""

    @staticmethod
    def forward(ctx, frames, sigma):
        ctx.sigma = sigma
        return frames.clone()

    @staticmethod
    def backward(ctx, grad):
        blurred = geometry.gaussian_blur(grad.reshape(-1, *grad.shape[-3:]), ctx.sigma)
        return blurred.reshape(grad.shape), None


def teacher_frames(x0_pred, gradient_sigma=TEACHER_GRADIENT_SIGMA, reference=None):
    """The predicted video as the teacher sees it: clamped to [0, 1] (it was trained on images) in the forward
    pass, with the gradient passed straight through, so a saturated pixel can still be pulled back, and
    low-passed by gradient_sigma (LowPassGradient; 0 leaves it whole). reference (..., C, H, W) in [0, 1], if
    given, replaces frame 0 (TEACHER_FRAME0 = "reference"); no gradient reaches x0_pred's frame 0 then."""
    if reference is not None:
        if reference.shape != x0_pred[..., 0, :, :, :].shape:
            raise ValueError(f"reference {tuple(reference.shape)} does not match the frames of {tuple(x0_pred.shape)}")
        x0_pred = torch.cat([reference.unsqueeze(-4).to(x0_pred.dtype), x0_pred[..., 1:, :, :, :]], dim=-4)
    if gradient_sigma < 0:
        raise ValueError(f"teacher gradient sigma must be >= 0, got {gradient_sigma}")
    if gradient_sigma > 0:
        if x0_pred.dim() < 3:
            raise ValueError(f"a low-passed gradient needs frames (..., C, H, W), got {tuple(x0_pred.shape)}")
        x0_pred = LowPassGradient.apply(x0_pred, gradient_sigma)
    return x0_pred + (x0_pred.clamp(0, 1) - x0_pred).detach()


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


def span_pairs(num_frames, spans, gamma=GEO_GAMMA):
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


def geometry_pairs(depth, w2c, K, frames, spans=GEO_SPANS, gamma=GEO_GAMMA, eta=GEO_ETA,
                   scale_mode=GEO_SCALE_MODE):
    """The two terms of L_geo pair by pair, weighted: (depth term, smoothness term), each (B, P) over the pairs of
    span_pairs; geometry_loss sums them. Kept apart so that a target can be compared pair by pair (GEO_EXCESS)."""
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


def geometry_loss(depth, w2c, K, frames, spans=GEO_SPANS, gamma=GEO_GAMMA, eta=GEO_ETA,
                  scale_mode=GEO_SCALE_MODE, smoothness_weight=GEO_SMOOTHNESS_WEIGHT):
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

    No Python loop over pairs (index tensors and slices gather all pairs at once): train.py compiles it.
    """
    depth_pairs, smooth_pairs = geometry_pairs(depth, w2c, K, frames, spans, gamma, eta, scale_mode)
    depth_term, smooth_term = depth_pairs.sum(-1), smooth_pairs.sum(-1)  # (B,)
    return depth_term + smoothness_weight * smooth_term, depth_term, smooth_term


def geometry_excess(seen, real, smoothness_weight=GEO_SMOOTHNESS_WEIGHT, mode=GEO_EXCESS):
    """L_geo with the teacher target: how much less consistent x0_hat is than x0. seen and real are geometry_pairs
    of the two, (depth term, smoothness term) each (B, P) -> (B,). mode "pair": sum over pairs and
    terms of max(0, seen - real); "clip" (GEO_EXCESS): max(0, L_geo(seen) - L_geo(real))."""
    if mode == "pair":
        return ((seen[0] - real[0]).clamp(min=0).sum(-1)
                + smoothness_weight * (seen[1] - real[1]).clamp(min=0).sum(-1))
    if mode == "clip":
        total = lambda terms: terms[0].sum(-1) + smoothness_weight * terms[1].sum(-1)
        return (total(seen) - total(real)).clamp(min=0)
    raise ValueError(f"geo excess must be 'pair' or 'clip', got {mode!r}")


def curriculum_weights(step, total_steps, schedule="sigmoid", warmup=True, warmup_fraction=CURRICULUM_WARMUP,
                       alpha_mid=CURRICULUM_ALPHA_MID, beta_mid=CURRICULUM_BETA_MID, width=CURRICULUM_WIDTH):
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


def total_loss(loss_diff, loss_traj, loss_geo, alpha, beta, geo_gate="beta", traj_weight=TRAJ_WEIGHT,
               geo_weight=GEO_WEIGHT):
    """L_total = L_diff + alpha [(1 - beta) w_traj L_traj + beta w_geo L_geo]   (geo_gate="beta", the default:
    L_geo waits for phase 3 as the paper's phases describe), or the printed
    L_diff + alpha [(1 - beta) w_traj L_traj + w_geo L_geo] (geo_gate="printed", L_geo on as soon as alpha is).
    The paper's weights are w_traj = w_geo = 1."""
    if geo_gate not in ("beta", "printed"):
        raise ValueError(f"geo_gate must be 'beta' or 'printed', got {geo_gate!r}")
    geo_factor = beta if geo_gate == "beta" else 1.0
    return loss_diff + alpha * ((1 - beta) * traj_weight * loss_traj + geo_factor * geo_weight * loss_geo)


# -----------------------------------------------------------------------------
# the teacher's reading of a training batch


def distillation_losses(teacher_model, geometry_pairs, out, batch, keyframe_mask, args):
    """The teacher's view of the predicted video -> {loss_traj, loss_geo, loss_geo_depth, loss_geo_smooth} and
    teacher_clips. Each loss is summed over the clips shown to the teacher and divided by the batch size, so a
    distilled clip weighs what its own diffusion loss weighs.

    Clips pass the gate by their flow time (teacher_weight) and only if their camera was not dropped for
    guidance (with no camera given there is no trajectory to follow), at most --teacher-fraction of the batch
    (select_teacher_clips). The teacher sees x0_hat through teacher_frames and resizes it to its own patch
    multiple (teacher.teacher_geometry); its parameters are frozen, the gradient flows through it to x0_hat,
    low-passed by --teacher-gradient-sigma; with --teacher-frame0 reference its frame 0 is the
    reference image the student was given, not x0_hat's copy of it.
    With --distill-target teacher it also reads the real clip (no gradient) and that reading is the target:
    L_traj between the two trajectories (at the keyframes, or with --traj-frames all at every frame), and L_geo
    only by how much x0_hat is less consistent than x0 (pair by pair and term by term, or with --geo-excess clip
    over the clip's sum). geometry_pairs is distill.geometry_pairs or its compiled form.
    """
    B = out["t"].shape[0]
    weights = teacher_weight(out["t"], args.teacher_t_max, args.teacher_gate) * ~out["camera_drop"]
    chosen = select_teacher_clips(weights, args.teacher_fraction)
    zero = out["loss"].new_zeros(())
    terms = {"loss_traj": zero, "loss_geo": zero, "loss_geo_depth": zero, "loss_geo_smooth": zero,
             "teacher_clips": chosen.numel()}
    if chosen.numel() == 0:
        return terms
    video, w2c, K = (batch[key][chosen] for key in ("video", "w2c", "K"))
    reference = video[:, 0] if args.teacher_frame0 == "reference" else None
    frames = teacher_frames(out["x0_pred"][chosen], args.teacher_gradient_sigma, reference)  # (n, F, 3, H, W)
    geo_options = dict(spans=tuple(args.spans), gamma=args.gamma, eta=args.eta)
    smoothness_weight = args.smoothness_weight
    seen = teacher.teacher_geometry(teacher_model, frames, args.teacher_cameras, intrinsics=K)
    depth_pairs, smooth_pairs = geometry_pairs(seen["depth"], seen["extrinsics"], seen["intrinsics"], frames,
                                               **geo_options)
    geo_depth, geo_smooth = depth_pairs.sum(-1), smooth_pairs.sum(-1)
    geo = geo_depth + smoothness_weight * geo_smooth
    if args.distill_target == "teacher":
        with torch.no_grad():
            real = teacher.teacher_geometry(teacher_model, video, args.teacher_cameras, intrinsics=K)
            real_depth, real_smooth = geometry_pairs(real["depth"], real["extrinsics"], real["intrinsics"], video,
                                                     **geo_options)
        target_w2c, target_K, target_scale = real["extrinsics"], real["intrinsics"], scene_scale(real["depth"])
        geo = geometry_excess((depth_pairs, smooth_pairs), (real_depth, real_smooth), smoothness_weight,
                              args.geo_excess)
    else:
        target_w2c, target_K, target_scale = w2c, K, scene_scale(batch["depth"][chosen])
    traj_mask = keyframe_mask[chosen] if args.traj_frames == "keyframes" else torch.ones_like(keyframe_mask[chosen])
    traj = trajectory_loss(seen["extrinsics"], seen["intrinsics"], target_w2c, target_K, traj_mask,
                           frames.shape[-2:], scene_scale(seen["depth"]), target_scale, args.traj_intrinsics)
    gate = weights[chosen]
    terms.update({name: (gate * value).sum() / B for name, value in
                  (("loss_traj", traj), ("loss_geo", geo), ("loss_geo_depth", geo_depth),
                   ("loss_geo_smooth", geo_smooth))})
    return terms
