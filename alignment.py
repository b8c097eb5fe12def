"""Teacher cameras by differentiable direct alignment: SE(3) Gauss-Newton on the teacher's own depth.

VGGT's authors refine the camera head's output by bundle adjustment on the model's own depth and
tracks. The small teacher's camera head learned nothing, but its depth is good, so it gets its
cameras the same way in spirit: for every pair of consecutive frames (f-1, f), frame f-1's pixels
are lifted with its depth, moved by a rigid motion, projected into frame f, and the motion (with a
per-channel colour gain) is the one that makes the two frames agree photometrically. The solver is
damped Gauss-Newton on SE(3) with a Huber loss (IRLS weights), coarse to fine over a Gaussian blur
pyramid at full resolution, batched over clips and frame pairs in one tensor; the pair motions are
then chained into w2c poses relative to frame 0.

Gradients reach the frames, the depth and K, so losses on these cameras train the student. By
default the solver runs detached and only its last steps keep the graph (see `align_cameras`).

Conventions (README.md, Conventions): OpenCV cameras, w2c extrinsics, K in pixels, pixel centres at
(j + 0.5, i + 0.5); translations come out in the depth's units. Pure functions, no I/O.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import geometry


@dataclass(frozen=True)
class AlignmentConfig:
    """Solver settings, chosen on held-out synthetic clips of 8 frames at 32x32 (the student's training shape)."""
    # coarse to fine: a wide blur widens the basin to the few pixels consecutive frames move; the last level keeps
    # a little, so the central-difference Jacobian matches the bilinear interpolant and the final steps' gradient
    blur_sigmas: tuple = (2.0, 1.0, 0.5)
    iterations_per_level: int = 4  # Gauss-Newton steps per level: more gave no better accuracy
    huber_delta: float = 0.02  # residuals beyond it weigh delta/|r|: occlusions, new surfaces, aliasing pull little
    damping: float = 1e-3  # Marquardt lambda diag(H): weakly observed motion (forward, in a pan) cannot jump
    estimate_gain: bool = True  # a per-channel gain of the target frame absorbs exposure and white-balance changes
    view_margin: float = 0.5  # warped points count from this far inside (px): past the pixel centres is no scene
    # finest-level steps that keep the graph (see align_cameras): each brings their gradient closer to the
    # implicit-function gradient of the optimum
    differentiable_steps: int = 2
    # keep the graph through every iteration instead: the exact gradient of the whole solver (for gradcheck; memory
    # and time linear in the iteration count)
    unroll: bool = False

    def __post_init__(self):
        if len(self.blur_sigmas) < 1 or any(s < 0 for s in self.blur_sigmas):
            raise ValueError(f"blur_sigmas must be a non-empty sequence of values >= 0, got {self.blur_sigmas}")
        if self.iterations_per_level < 1:
            raise ValueError(f"iterations_per_level must be >= 1, got {self.iterations_per_level}")
        if self.huber_delta <= 0 or self.damping < 0 or self.differentiable_steps < 0:
            raise ValueError(f"need huber_delta > 0, damping >= 0, differentiable_steps >= 0, got "
                             f"{self.huber_delta}, {self.damping}, {self.differentiable_steps}")


# A small multiple of the mean diagonal added to the normal equations, so that a pair with no valid
# or no textured pixel (H = 0, gradient 0) solves to a zero step instead of a singular system.
RIDGE = 1e-6
# Newton steps give outliers this fraction of their IRLS curvature instead of psi'(r) = 0, so a
# pair with (almost) no inlier keeps a well-posed system; it biases their derivative by a few %.
OUTLIER_CURVATURE = 0.1
# Width in pixels of the band inside the view margin over which a warped pixel's weight fades in.
BORDER_RAMP = 1.0


def image_gradients(images):
    """Central differences d/du, d/dv of images (N, C, H, W) with replicated edges -> two (N, C, H, W)."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    grad_u = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    grad_v = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    return grad_u, grad_v


def gauss_newton_step(relative, gain, source, target_stack, points, target_K, config, newton=False):
    """One robust Gauss-Newton (Levenberg-Marquardt) update of a batch of pair motions.

    relative (N, 4, 4) source camera -> target camera; gain (N, C) the target's colour gain;
    source (N, C, H, W); target_stack (N, 3C, H, W) = target colours, d/du, d/dv;
    points (N, 3, H, W) in the source camera (zero where its depth is unusable); target_K (N, 3, 3).
    Residual r = gain * I_target(project(relative @ X)) - I_source, per pixel and channel. The pose
    update is a left perturbation relative <- [exp(omega) | v] @ relative, xi = (v, omega), so
    the point Jacobian is [I | -[Y]x], Y the point in the target camera.
    newton: curvature psi'(r) of the Huber loss instead of IRLS's psi(r) / r (see below).
    Returns (relative (N, 4, 4), gain (N, C)).
    """
    N, C, H, W = source.shape
    # geometry.transform_points / project_points do the same with one 3x3 product per pixel; one
    # matrix product per pair is an order of magnitude faster, and this runs every iteration.
    moved = torch.baddbmm(relative[:, :3, 3:], relative[:, :3, :3], points.flatten(2))  # (N, 3, HW)
    x, y, z = moved.unbind(1)  # (N, HW) each
    in_front = z > geometry.DEPTH_EPS
    inverse_z = 1 / torch.where(in_front, z, torch.ones_like(z))
    uv = ((target_K[:, :2] @ moved) * inverse_z[:, None]).transpose(1, 2).reshape(N, H, W, 2)
    colour, grad_u, grad_v = geometry.sample_at(target_stack, uv).reshape(N, 3, C, H * W).unbind(1)
    # Weight 1 inside the view (less the margin), fading to 0 over BORDER_RAMP pixels: with a hard
    # mask the cost, and so the solution, would jump whenever a pixel crosses the border.
    u, v = uv.reshape(N, -1, 2).unbind(-1)
    border_distance = torch.minimum(torch.minimum(u, W - u), torch.minimum(v, H - v))  # (N, HW)
    in_view = ((border_distance - config.view_margin) / BORDER_RAMP).clamp(0, 1)
    valid = (in_view > 0) & in_front & (points[:, 2].reshape(N, -1) > geometry.DEPTH_EPS)  # (N, HW)

    # Chain rule: dr/dxi = gain * [grad of I_target w.r.t. normalised coordinates (a, b) = (x, y)/z]
    # . d(a, b)/dY . dY/dxi. The image gradient in (a, b) is (du, dv) @ K[:2, :2]; the geometric
    # part d(a, b)/dY @ [I | -[Y]x] is written out, 2 x 6 per pixel.
    grad_u, grad_v = gain[..., None] * grad_u, gain[..., None] * grad_v  # (N, C, HW)
    grad_a = target_K[:, 0, 0, None, None] * grad_u
    grad_b = target_K[:, 0, 1, None, None] * grad_u + target_K[:, 1, 1, None, None] * grad_v
    a, b = x * inverse_z, y * inverse_z
    zero = torch.zeros_like(a)
    da = torch.stack([inverse_z, zero, -a * inverse_z, -a * b, 1 + a * a, -b], dim=1)  # (N, 6, HW)
    db = torch.stack([zero, inverse_z, -b * inverse_z, -1 - b * b, a * b, a], dim=1)
    pose_jacobian = grad_a[:, None] * da[:, :, None] + grad_b[:, None] * db[:, :, None]  # (N, 6, C, HW)
    residual = gain[..., None] * colour - source.reshape(N, C, -1)  # (N, C, HW)

    # Huber loss rho: the gradient of the cost is J^T psi(r), psi(r) = r min(1, delta / |r|).
    # IRLS curvature psi(r) / r counts every residual and converges robustly; Newton's curvature
    # psi'(r) (1 inside delta, 0 outside) is rho's own second derivative, so the derivative of a
    # step taken with it at the optimum is the implicit-function derivative (align_cameras).
    fade = torch.where(valid, in_view, torch.zeros_like(in_view))[:, None]  # (N, 1, HW)
    inside = residual.abs() <= config.huber_delta
    psi = residual.clamp(-config.huber_delta, config.huber_delta) * fade  # (N, C, HW)
    irls_curvature = config.huber_delta / residual.abs().clamp(min=config.huber_delta)
    if newton:
        curvature = torch.where(inside, torch.ones_like(residual), OUTLIER_CURVATURE * irls_curvature) * fade
    else:
        curvature = irls_curvature * fade
    curved = pose_jacobian * curvature[:, None]  # (N, 6, C, HW)
    hessian = curved.flatten(2) @ pose_jacobian.flatten(2).transpose(1, 2)  # (N, 6, 6)
    gradient = (pose_jacobian * psi[:, None]).flatten(2).sum(-1)  # (N, 6)
    if config.estimate_gain:
        # dr/dgain_c is I_target on channel c and zero elsewhere, so the gain rows of the normal
        # equations are per-channel sums; the gain block is diagonal.
        cross = (curved * colour[:, None]).sum(-1)  # (N, 6, C)
        gain_block = torch.diag_embed((curvature * colour * colour).sum(-1))  # (N, C, C)
        hessian = torch.cat([torch.cat([hessian, cross], dim=2),
                             torch.cat([cross.transpose(1, 2), gain_block], dim=2)], dim=1)
        gradient = torch.cat([gradient, (psi * colour).sum(-1)], dim=1)  # (N, 6 + C)
    diagonal = hessian.diagonal(dim1=-2, dim2=-1)
    ridge = RIDGE * diagonal.mean(-1, keepdim=True) + torch.finfo(hessian.dtype).tiny ** 0.5
    damped = hessian + torch.diag_embed(config.damping * diagonal + ridge)
    step = -torch.linalg.solve(damped, gradient[..., None])[..., 0]  # (N, 6) or (N, 6 + C)

    rotation = geometry.so3_exp(step[:, 3:6])  # (N, 3, 3)
    new_pose = torch.cat([rotation @ relative[:, :3, :3],
                          rotation @ relative[:, :3, 3:] + step[:, :3, None]], dim=-1)
    if config.estimate_gain:
        gain = gain + step[:, 6:]
    return geometry.to_homogeneous(new_pose), gain


def align_pairs(source, target, source_depth, source_K, target_K, init_relative=None,
                config=AlignmentConfig()):
    """Motions source camera -> target camera for a batch of frame pairs, coarse to fine.

    source, target (N, C, H, W); source_depth (N, H, W); source_K, target_K (N, 3, 3);
    init_relative (N, 4, 4) or None (identity). Returns relative (N, 4, 4): X_target = relative @ X_source.
    """
    N, C = source.shape[:2]
    relative = (torch.eye(4, dtype=source.dtype, device=source.device).expand(N, 4, 4)
                if init_relative is None else geometry.to_homogeneous(init_relative).to(source))
    if not config.unroll:
        relative = relative.detach()
    gain = torch.ones(N, C, dtype=source.dtype, device=source.device)
    inputs = (source, target, source_depth, source_K, target_K)
    detached = tuple(x.detach() for x in inputs)

    def prepare(source, target, depth, source_K, target_K, sigma):
        # Per level: blurred source colours, target colours and gradients stacked for one
        # bilinear lookup, and the source points (zeroed where the depth is unusable).
        blurred = geometry.gaussian_blur(torch.cat([source, target]), sigma)  # (2N, C, H, W)
        grad_u, grad_v = image_gradients(blurred[N:])
        points = geometry.unproject_depth(depth, source_K).permute(0, 3, 1, 2)  # (N, 3, H, W)
        usable = (depth > geometry.DEPTH_EPS) & torch.isfinite(points).all(1)
        points = torch.where(usable[:, None], points, torch.zeros_like(points))
        return blurred[:N], torch.cat([blurred[N:], grad_u, grad_v], dim=1), points, target_K

    iterations = config.iterations_per_level
    for level, sigma in enumerate(config.blur_sigmas):
        finest = level == len(config.blur_sigmas) - 1
        final_steps = min(config.differentiable_steps, iterations) if finest else 0
        with_graph = config.unroll or final_steps > 0
        with torch.set_grad_enabled(with_graph and torch.is_grad_enabled()):
            prepared = prepare(*(inputs if with_graph else detached), sigma)
        # The last steps of the finest level keep the graph and take Newton steps whatever unroll
        # says, so both modes return the same poses; the others run detached unless unrolled.
        for keep_graph, newton, count in ((config.unroll, False, iterations - final_steps), (True, True, final_steps)):
            step_inputs = prepared if keep_graph else tuple(p.detach() for p in prepared)
            with torch.set_grad_enabled(keep_graph and torch.is_grad_enabled()):
                for _ in range(count):
                    relative, gain = gauss_newton_step(relative, gain, *step_inputs, config, newton)
    return relative


def _check_inputs(frames, depth, K, init_w2c):
    def shape_of(x):
        return tuple(x.shape) if torch.is_tensor(x) else type(x).__name__

    if (not torch.is_tensor(frames) or frames.dim() != 5 or frames.shape[2] != 3
            or frames.dtype not in (torch.float32, torch.float64)):
        raise ValueError(f"frames must be a float32 or float64 tensor (B, F, 3, H, W), got {shape_of(frames)}"
                         + (f" {frames.dtype}" if torch.is_tensor(frames) else ""))
    B, Fr, _, H, W = frames.shape
    if min(B, Fr, H, W) < 1:
        raise ValueError(f"frames (B, F, 3, H, W) needs B, F, H, W >= 1, got {tuple(frames.shape)}")
    if not torch.is_tensor(depth) or tuple(depth.shape) != (B, Fr, H, W) or depth.dtype != frames.dtype:
        raise ValueError(f"depth must be a {frames.dtype} tensor (B, F, H, W) = {(B, Fr, H, W)}, got "
                         f"{shape_of(depth)}" + (f" {depth.dtype}" if torch.is_tensor(depth) else ""))
    if not torch.is_tensor(K) or tuple(K.shape) not in ((B, Fr, 3, 3), (B, 3, 3)) or not K.is_floating_point():
        raise ValueError(f"K must be a floating tensor (B, F, 3, 3) = {(B, Fr, 3, 3)} or (B, 3, 3), "
                         f"got {shape_of(K)}")
    if init_w2c is not None and (not torch.is_tensor(init_w2c) or not init_w2c.is_floating_point()
                                 or tuple(init_w2c.shape) not in ((B, Fr, 4, 4), (B, Fr, 3, 4))):
        raise ValueError(f"init_w2c must be a floating tensor (B, F, 4, 4) = {(B, Fr, 4, 4)} or "
                         f"(B, F, 3, 4), got {shape_of(init_w2c)}")
    K = K.to(frames)
    return K if K.dim() == 4 else K[:, None].expand(B, Fr, 3, 3)


def align_cameras(frames, depth, K, init_w2c=None, config=AlignmentConfig()):
    """Camera poses of a video from photometric alignment of consecutive frames through its depth.

    frames (B, F, 3, H, W) in [0, 1]; depth (B, F, H, W) > 0 (any scale); K (B, F, 3, 3) or
    (B, 3, 3) in pixels; init_w2c (B, F, 4, 4) (or 3 x 4) in any world and scale consistent with
    depth, e.g. a camera head's, or None (every pair starts at the identity).
    Returns w2c (B, F, 4, 4) relative to frame 0 (frame 0 is exactly the identity), translations in
    the depth's units. All pairs are solved at once, then chained: w2c_f = relative_f @ w2c_{f-1}.

    Differentiable w.r.t. frames, depth and K. By default all iterations but the last
    config.differentiable_steps run detached; those last steps start from the detached estimate
    and use Newton's curvature of the Huber loss, H = J^T diag(psi'(r)) J. At a converged optimum
    xi*(theta), where the cost gradient g(xi*, theta) = J^T psi(r) is zero, a step
    xi* - H^-1 g(xi*, theta) has the derivative -H^-1 dg/dtheta: the implicit-function theorem's
    dxi*/dtheta, up to the Gauss-Newton approximation of H, and each further step shrinks that
    remainder. config.unroll=True keeps the graph through every iteration (same poses).
    """
    K = _check_inputs(frames, depth, K, init_w2c)
    B, Fr = frames.shape[:2]
    identity = torch.eye(4, dtype=frames.dtype, device=frames.device).expand(B, 1, 4, 4)
    if Fr == 1:
        return identity.clone()
    init_relative = None
    if init_w2c is not None:
        init_w2c = geometry.to_homogeneous(init_w2c.to(frames))
        init_relative = (init_w2c[:, 1:] @ geometry.invert_pose(init_w2c[:, :-1])).flatten(0, 1)

    def pairs(x, start, stop):  # (B, F, ...) -> (B * (F - 1), ...)
        return x[:, start:stop].flatten(0, 1)

    relative = align_pairs(pairs(frames, 0, -1), pairs(frames, 1, None), pairs(depth, 0, -1),
                           pairs(K, 0, -1), pairs(K, 1, None), init_relative, config)
    relative = relative.unflatten(0, (B, Fr - 1))  # (B, F - 1, 4, 4)
    # Chaining is F - 1 products of 4 x 4 matrices; the solve above is one batch for all pairs.
    poses = [identity[:, 0]]
    for f in range(Fr - 1):
        poses.append(relative[:, f] @ poses[-1])
    return torch.stack(poses, dim=1)  # (B, F, 4, 4)
