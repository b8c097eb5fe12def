"""The study's camera estimator: the camera path of a generated video, by analysis by synthesis.

The estimator shares nothing with the distillation teacher (teacher.py): a CamGeo student graded by the VGGT
it was distilled from would be graded by its own tutor. Because the synthetic scene is known exactly, each
frame's 6-DoF pose is found instead as the pose from which data.render's image of the true scene best matches
the generated frame: Levenberg-Marquardt on a robust, colour-matched photometric residual, coarse to fine over
blur levels (finite-difference Jacobians while blurred, forward-mode derivatives through the ray-caster at the
sharp level), initialised from the previous frames, with the render blurred as much as the video's frame 0 is
(calibrated where the pose is known). Frame 0 is the reference frame, whose pose is the given frame-0 keyframe,
so it is fixed there. `python tools/validate_estimator.py` measures the estimator's own error (RESULTS.md).
"""
from dataclasses import dataclass

import torch
from torch.autograd import forward_ad

import data
import geometry

# Coarse to fine: both the render and the target are blurred by a Gaussian of this many pixels (0 = none).
# Wide blur first makes the photometric error smooth over a few pixels of misalignment (a wide basin);
# the sharp level then pins the pose to sub-pixel accuracy.
BLUR_LEVELS = (3.0, 1.0, 0.0)
ITERATIONS_PER_LEVEL = 10
# Finite-difference Jacobian (blurred levels): steps of about half a pixel of image motion at 32x32 (focal ~28 px,
# scene ~3 m away): long enough to average over the pixel staircase of a point-sampled render.
DIFFERENCE_STEPS = (0.02, 0.02, 0.02, 0.05, 0.05, 0.05)  # radians x3, metres x3
DIFFERENCE_MIN_SIGMA = 0.5  # levels blurred at least this much (pixels) use differences, sharper ones autograd
DAMPING_START = 1e-3  # Levenberg-Marquardt lambda, relative to diag(J^T J)
DAMPING_UP, DAMPING_DOWN = 4.0, 3.0
MAX_DAMPING = 1e6
STEP_TOLERANCE = 1e-5  # radians and metres: a level ends once every camera's next step is smaller than this
# Robust loss: Huber weights with the threshold at HUBER_K robust standard deviations of the residuals, so the
# wrong pixels of a generated frame (smudged objects, colour drift) do not drag the pose.
HUBER_K = 1.345
HUBER_FLOOR = 0.01  # intensity; keeps the threshold sane when a residual is almost exactly zero
# Per-channel colour gain the photometric fit may apply to the render (see residuals_and_jacobian); bounded so a
# flat, textureless frame cannot make the render vanish.
GAIN_RANGE = (0.5, 2.0)
RENDER_SUPERSAMPLE = 1  # the clips the students learn from are rendered with one ray per pixel: match that
# Generated frames are softer than renders. How much softer is measured on frame 0 (known pose) among these
# Gaussian blurs (pixels), and the render is blurred to match (calibrate_blur).
FRAME_BLUR_CANDIDATES = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def blur_each(images, sigmas):
    """(M, ..., H, W) images, sigmas (M,) -> each image blurred by its own sigma (few distinct values)."""
    out = torch.empty_like(images)
    for sigma in sigmas.unique().tolist():
        chosen = sigmas == sigma
        flat = images[chosen].flatten(0, -4)  # (n, C, H, W)
        out[chosen] = geometry.gaussian_blur(flat, sigma).view_as(images[chosen])
    return out


def apply_increment(c2w, delta):
    """Move cameras c2w (..., 4, 4) by delta (..., 6) = [rotation (axis-angle), translation], both in the
    camera's own frame: R <- R exp(w), centre <- centre + R tau. Zero delta is the identity."""
    rotation = c2w[..., :3, :3]
    new_rotation = rotation @ geometry.so3_exp(delta[..., :3])
    new_centre = c2w[..., :3, 3] + (rotation @ delta[..., 3:, None])[..., 0]
    return geometry.to_homogeneous(torch.cat([new_rotation, new_centre[..., None]], dim=-1))


def relative_motion(c2w_a, c2w_b):
    return geometry.invert_pose(c2w_a) @ c2w_b


def increment_tangents(c2w):
    """d apply_increment(c2w, delta) / d delta_k at delta = 0, for k = 0..5: (M, 6, 4, 4)."""
    generators = torch.zeros(6, 4, 4, dtype=c2w.dtype)
    basis = torch.eye(3, dtype=c2w.dtype)
    for k in range(3):  # rotation: R -> R skew(e_k)
        generators[k, :3, :3] = torch.linalg.cross(basis[k].expand(3, 3), basis, dim=-1).T
    for k in range(3):  # translation: centre -> centre + R e_k
        generators[3 + k, :3, 3] = basis[k]
    rigid = c2w.clone()
    rigid[:, :3, 3] = 0  # the tangent of the centre is R e_k: the camera's translation does not enter
    return rigid[:, None] @ generators[None]  # (M, 6, 4, 4)


@dataclass
class EstimatorConfig:
    blur_levels: tuple = BLUR_LEVELS
    iterations_per_level: int = ITERATIONS_PER_LEVEL
    supersample: int = RENDER_SUPERSAMPLE
    blur_candidates: tuple = FRAME_BLUR_CANDIDATES
    difference_min_sigma: float = DIFFERENCE_MIN_SIGMA


def render_with_jacobian(scene, K, c2w, H, W, supersample, method):
    """Images of cameras c2w (M, 4, 4) -> (images (M, 3, H, W), d image / d increment (M, 6, 3, H, W)).

    method "autograd": forward-mode differentiation through the ray-caster; six copies of each camera in one
    render call, each carrying one tangent. Exact for texture and shading moving across the image, but blind
    to a silhouette edge that moves (a jump in a point-sampled render). method "differences": central
    differences over DIFFERENCE_STEPS (about half a pixel), 13 renders per camera; they see edges move, at
    the price of being approximate. See refine_poses for which is used when.
    """
    M = c2w.shape[0]
    c2w = c2w.float()
    if method == "autograd":
        copies = c2w[:, None].expand(M, 6, 4, 4).reshape(-1, 4, 4)
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(copies.contiguous(), increment_tangents(c2w).reshape(-1, 4, 4))
            video, _ = data.render(scene, dual, K, H, W, supersample)
            image, tangent = forward_ad.unpack_dual(video)  # (6M, 3, H, W) each
        return image.view(M, 6, 3, H, W)[:, 0], tangent.view(M, 6, 3, H, W)
    steps = torch.tensor(DIFFERENCE_STEPS)
    offsets = torch.cat([torch.zeros(1, 6), torch.diag(steps), -torch.diag(steps)])  # (13, 6)
    probes = apply_increment(c2w[:, None], offsets[None].expand(M, 13, 6))  # (M, 13, 4, 4)
    video, _ = data.render(scene, probes.reshape(-1, 4, 4), K, H, W, supersample)
    video = video.view(M, 13, 3, H, W)
    return video[:, 0], (video[:, 1:7] - video[:, 7:]) / (2 * steps.view(1, 6, 1, 1, 1))


def residuals_and_jacobian(scene, K, c2w, targets_blurred, render_sigma, supersample, method="autograd"):
    """Blurred render of c2w (M, 4, 4), colour-matched, minus blurred targets (M, 3, H, W) -> residuals (M, P),
    P = 3*H*W, and their Jacobian (M, 6, P) w.r.t. the pose increment (the colour fit held fixed in it).
    render_sigma (M,): blur of each render, pixels."""
    M = c2w.shape[0]
    H, W = targets_blurred.shape[-2:]
    image, tangent = render_with_jacobian(scene, K, c2w, H, W, supersample, method)
    image = blur_each(image, render_sigma)
    jacobian = blur_each(tangent, render_sigma).view(M, 6, 3, H * W)  # blurring is linear: blur the derivative
    # Generated frames drift in colour. Per frame and channel, the render is first mapped by the gain and offset
    # that best fit the target (least squares), so only structure, not a colour cast, pulls on the pose.
    rendered, target = image.flatten(2), targets_blurred.flatten(2)  # (M, 3, H*W)
    centred = rendered - rendered.mean(-1, keepdim=True)
    gain = (centred * target).sum(-1) / (centred * centred).sum(-1).clamp(min=1e-8)  # (M, 3)
    gain = gain.clamp(*GAIN_RANGE)[..., None]
    offset = target.mean(-1, keepdim=True) - gain * rendered.mean(-1, keepdim=True)
    residual = gain * rendered + offset - target
    return residual.flatten(1), (gain[:, None] * jacobian).flatten(2)


def huber_weights(residuals):
    """(M, P) residuals -> (M, P) IRLS weights, threshold from each row's median absolute deviation."""
    scale = 1.4826 * residuals.abs().median(dim=1, keepdim=True).values
    threshold = (HUBER_K * scale).clamp(min=HUBER_FLOOR)
    return (threshold / residuals.abs().clamp(min=1e-12)).clamp(max=1.0)


def refine_poses(scene, K, frames, c2w_init, config=EstimatorConfig(), frame_blur=None):
    """Levenberg-Marquardt of M independent camera poses against M frames of the same scene.

    frames (M, 3, H, W) in [0, 1], c2w_init (M, 4, 4). All M problems are solved together, one ray-casting
    call per iteration. frame_blur (M,) is how blurred each frame already is (pixels, see calibrate_blur): the
    render gets that much more blur at every level, so a soft frame is not matched against a sharp render.
    Returns (c2w (M, 4, 4) float32, cost (M,) robust mean squared residual at the last level).
    """
    M = frames.shape[0]
    frame_blur = torch.zeros(M) if frame_blur is None else frame_blur
    c2w = c2w_init.float().clone()
    for sigma in config.blur_levels:
        targets = geometry.gaussian_blur(frames.float(), sigma)  # (M, 3, H, W)
        render_sigma = (sigma ** 2 + frame_blur ** 2).sqrt()  # Gaussian blurs add in quadrature
        # Blurred levels: differences, which see silhouettes move and so find the right basin. The sharp level:
        # the exact texture derivative, which then lands on the minimum (exactly, for a ground-truth frame).
        method = "differences" if sigma >= config.difference_min_sigma else "autograd"
        damping = torch.full((M,), DAMPING_START)
        cost = torch.full((M,), float("inf"))
        candidate = c2w.clone()
        settled = torch.zeros(M, dtype=torch.bool)
        for _ in range(config.iterations_per_level + 1):
            if bool(settled.all()):
                break
            residual_new, jacobian_new = residuals_and_jacobian(scene, K, candidate, targets, render_sigma,
                                                                config.supersample, method)
            weights_new = huber_weights(residual_new)
            cost_new = (weights_new * residual_new ** 2).mean(1)
            # Keep a candidate only if it lowers the cost; otherwise stay put and damp harder (Marquardt).
            accepted = cost_new < cost
            if torch.isinf(cost).all():  # first evaluation at this level: there is nothing to keep yet
                residual, jacobian, weights = residual_new, jacobian_new, weights_new
            keep = accepted[:, None]
            c2w = torch.where(accepted[:, None, None], candidate, c2w)
            cost = torch.where(accepted, cost_new, cost)
            residual = torch.where(keep, residual_new, residual)
            weights = torch.where(keep, weights_new, weights)
            jacobian = torch.where(keep[..., None], jacobian_new, jacobian)
            damping = torch.where(accepted, damping / DAMPING_DOWN, (damping * DAMPING_UP).clamp(max=MAX_DAMPING))
            # Normal equations (J W J^T + lambda diag) delta = -J W r, one 6x6 system per problem.
            weighted = jacobian * weights[:, None]  # (M, 6, P)
            normal = weighted @ jacobian.transpose(1, 2)  # (M, 6, 6)
            gradient = (weighted * residual[:, None]).sum(-1)  # (M, 6)
            diagonal = torch.diagonal(normal, dim1=1, dim2=2).clamp(min=1e-9)
            system = normal + torch.diag_embed(damping[:, None] * diagonal)
            delta = -torch.linalg.solve(system, gradient[..., None])[..., 0]
            candidate = apply_increment(c2w, delta)
            # Settled: the next step would move the camera by less than STEP_TOLERANCE (radians / metres), or no
            # step is taken any more. Settled problems ride along until all are (one render call for all).
            settled = (delta.abs().amax(1) < STEP_TOLERANCE) | (damping >= MAX_DAMPING)
    return c2w, cost


def calibrate_blur(scene, K, first_frames, c2w_first, config=EstimatorConfig()):
    """How blurred each video is, read off its frame 0, whose pose is known: the candidate blur (pixels) under
    which the render of that pose best matches the frame. first_frames (N, 3, H, W) -> (N,)."""
    N = first_frames.shape[0]
    candidates = torch.tensor(config.blur_candidates)
    poses = c2w_first.float().expand(len(candidates) * N, 4, 4)
    frames = first_frames.float().repeat(len(candidates), 1, 1, 1)
    residual, _ = residuals_and_jacobian(scene, K, poses, frames, candidates.repeat_interleave(N), config.supersample,
                                         "differences")
    cost = residual.pow(2).mean(1).view(len(candidates), N)
    return candidates[cost.argmin(0)]


def estimate_paths(scene, K, videos, c2w_first, config=EstimatorConfig()):
    """Camera paths of videos (N, F, 3, H, W) of one known scene -> c2w (N, F, 4, 4).

    Frame 0 is the reference frame, whose pose (c2w_first (4, 4)) the model was given: it is fixed there. Frame f
    starts from two guesses, the previous estimate and the constant-velocity prediction from the two before;
    both are refined and the one with the lower photometric cost is kept (a second start for robustness).
    """
    N, num_frames = videos.shape[:2]
    frame_blur = calibrate_blur(scene, K, videos[:, 0], c2w_first, config)  # (N,)
    paths = c2w_first.float().expand(N, 1, 4, 4).clone()  # (N, 1, 4, 4), grows by one frame per step
    for f in range(1, num_frames):
        previous = paths[:, -1]
        guesses = [previous]
        if f >= 2:
            guesses.append(previous @ relative_motion(paths[:, -2], previous))
        starts = torch.cat(guesses)  # (G*N, 4, 4)
        frames = videos[:, f].repeat(len(guesses), 1, 1, 1)
        refined, cost = refine_poses(scene, K, frames, starts, config, frame_blur.repeat(len(guesses)))
        best = cost.view(len(guesses), N).argmin(0)  # (N,)
        chosen = refined.view(len(guesses), N, 4, 4)[best, torch.arange(N)]
        paths = torch.cat([paths, chosen[:, None]], dim=1)
    return paths


def degrade(video, generator, blur=1.0, noise=0.03, colour=0.1):
    """A ground-truth video made to look generated: blurred, a colour cast (per-channel gain 1 +- colour and
    offset +- colour/3), and pixel noise. Used to show the estimator's floor on imperfect frames."""
    gain = 1 + colour * (2 * torch.rand(1, 3, 1, 1, generator=generator) - 1)
    offset = colour / 3 * (2 * torch.rand(1, 3, 1, 1, generator=generator) - 1)
    noisy = geometry.gaussian_blur(video, blur) * gain + offset + noise * torch.randn(video.shape, generator=generator)
    return noisy.clamp(0, 1)
