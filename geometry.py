"""Camera and depth geometry for CamGeo: pure functions on tensors.

Everything the other files need to talk about cameras lives here: quaternions, VGGT's pose
encoding, relative poses and translation normalisation, Plücker ray embeddings (the student's
camera conditioning), keyframe trajectory interpolation (the Linear / SLERP baselines), depth
projection and warping with validity masks (the cross-frame consistency loss), co-visibility with the
reference frame through true depth, camera metrics (RotErr / TransErr / CamMC) and image metrics
(PSNR / SSIM, PSNR on a mask of pixels).

Conventions (README.md, Conventions): OpenCV cameras (x right, y down, z forward); extrinsics are
world->camera (w2c), c2w is their inverse; quaternions are XYZW with w >= 0; pixel (row i, col j)
has its centre at (u, v) = (j + 0.5, i + 0.5); K is in pixels of the image it describes; depth is
z along the optical axis. Every function is batched over leading dims, works in float32 and
float64 and is differentiable (except where a docstring says otherwise). No nn.Modules, no I/O.
"""
import math

import torch
import torch.nn.functional as F

# Depths / denominators below this are treated as zero (behind the camera, degenerate scale).
DEPTH_EPS = 1e-6
# depth_consistency_residual only trusts samples between pixel centres: in the outer half-pixel
# ring sample_at repeats the border value, which is not the depth there (a biased residual).
# 1e-3 below 0.5 so that round-off does not drop border pixel centres that map onto themselves.
CONSISTENCY_VIEW_MARGIN = 0.5 - 1e-3
# Guards divisions by vector norms (quaternions, rays) against exactly-zero input.
NORM_EPS = 1e-12
# Largest translation norms below this count as "no translation" in normalize_translation.
TRANSLATION_EPS = 1e-8
# SLERP falls back to normalised lerp when the quaternions are this close (|cos| above it):
# sin(theta) -> 0 makes the SLERP weights 0/0 there, and lerp is exact to O(theta^2) anyway.
SLERP_LERP_THRESHOLD = 0.9995
# covisible_mask: a pixel is seen by the reference when the reference's own depth at its spot is within this fraction
# of its depth there; bilinear depth within one surface errs by under 3% at 32 px, an occluder is nearer by more.
COVISIBLE_DEPTH_TOLERANCE = 0.05
# PSNR is capped by flooring the MSE, so identical images give a large finite number (100 dB).
PSNR_MIN_MSE = 1e-10
# SSIM constants of Wang et al. 2004 for images in [0, 1].
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def _check_last_dims(name, tensor, dims):
    if not torch.is_tensor(tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape[-len(dims):]) != tuple(dims) or tensor.dim() < len(dims):
        shape = "x".join(str(d) for d in dims)
        raise ValueError(f"{name} must have shape (..., {shape}), got {tuple(tensor.shape)}")


# ----------------------------------------------------------------------------------------------
# Quaternions (XYZW, w >= 0)

def standardize_quat(q):
    """Return the representative of q / -q with w >= 0 (both are the same rotation)."""
    _check_last_dims("q", q, (4,))
    return torch.where(q[..., 3:4] < 0, -q, q)


def _sqrt_positive(x):
    # sqrt(max(x, 0)) whose gradient stays finite at and below 0 (zero there), so branches that
    # are computed but not selected in mat_to_quat never put inf * 0 = nan into the backward pass.
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def mat_to_quat(R):
    """Rotation matrix (..., 3, 3) -> unit quaternion (..., 4), XYZW, w >= 0.

    Shepperd's method: of 4x^2 = 1 + R00 - R11 - R22, 4y^2, 4z^2, 4w^2 = 1 + tr(R), take the
    largest (so we never divide by a component near zero: robust at 180 degrees where w = 0) and
    read the other three off the off-diagonal sums / differences, e.g. 4xy = R01 + R10.
    At exactly 180 degrees q and -q both have w = 0; which one comes out depends on round-off.
    Gradients are finite everywhere (unselected branches never divide by ~0 or take sqrt of <= 0).
    """
    _check_last_dims("R", R, (3, 3))
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    four_q_sq = torch.stack([
        1 + m00 - m11 - m22,   # 4 x^2
        1 - m00 + m11 - m22,   # 4 y^2
        1 - m00 - m11 + m22,   # 4 z^2
        1 + m00 + m11 + m22,   # 4 w^2
    ], dim=-1)  # (..., 4)
    # Row k holds 4 * q_k * (x, y, z, w), computed from the entries of R.
    candidates = torch.stack([
        torch.stack([four_q_sq[..., 0], m01 + m10, m02 + m20, m21 - m12], dim=-1),
        torch.stack([m01 + m10, four_q_sq[..., 1], m12 + m21, m02 - m20], dim=-1),
        torch.stack([m02 + m20, m12 + m21, four_q_sq[..., 2], m10 - m01], dim=-1),
        torch.stack([m21 - m12, m02 - m20, m10 - m01, four_q_sq[..., 3]], dim=-1),
    ], dim=-2)  # (..., 4, 4)
    # 4 |q_k| = 2 sqrt(4 q_k^2). The clamp only matters for rows that are not selected: the
    # selected row has 4 q_k^2 >= 1 (the largest squared component of a unit quaternion is >= 1/4).
    denominators = (2 * _sqrt_positive(four_q_sq)).clamp(min=0.1)
    candidates = candidates / denominators[..., :, None]
    best = four_q_sq.argmax(dim=-1)  # (...)
    index = best[..., None, None].expand(*best.shape, 1, 4)
    q = torch.gather(candidates, -2, index).squeeze(-2)  # (..., 4)
    # Only matters when R is not exactly orthonormal (noisy predictions, finite differences).
    q = q / q.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)
    return standardize_quat(q)


def quat_to_mat(q):
    """Quaternion (..., 4) XYZW -> rotation matrix (..., 3, 3); q is normalised first.

    R = [[1-2(y^2+z^2), 2(xy-zw), 2(xz+yw)], [2(xy+zw), 1-2(x^2+z^2), 2(yz-xw)],
         [2(xz-yw), 2(yz+xw), 1-2(x^2+y^2)]].
    """
    _check_last_dims("q", q, (4,))
    q = q / q.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)
    x, y, z, w = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


# ----------------------------------------------------------------------------------------------
# VGGT pose encoding "absT_quaR_FoV"

def _image_size(image_size_hw):
    if len(image_size_hw) != 2:
        raise ValueError(f"image_size_hw must be (H, W), got {image_size_hw}")
    H, W = (float(s) for s in image_size_hw)
    if H <= 0 or W <= 0:
        raise ValueError(f"image_size_hw must be positive, got {image_size_hw}")
    return H, W


def extri_intri_to_pose_encoding(extrinsics, intrinsics, image_size_hw):
    """w2c extrinsics (B, S, 3, 4) and intrinsics (B, S, 3, 3) -> VGGT pose encoding (B, S, 9).

    encoding = [t (3, of the w2c), quat(R) XYZW (4), fov_h, fov_w] with
    fov_h = 2 atan((H/2) / fy), fov_w = 2 atan((W/2) / fx). The principal point is not encoded
    (VGGT assumes the image centre). Unlike VGGT we keep the input dtype (no cast to float32).
    """
    if not torch.is_tensor(extrinsics) or extrinsics.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"extrinsics must have shape (..., 3, 4) or (..., 4, 4), "
                         f"got {tuple(getattr(extrinsics, 'shape', ()))}")
    _check_last_dims("intrinsics", intrinsics, (3, 3))
    H, W = _image_size(image_size_hw)
    R = extrinsics[..., :3, :3]
    t = extrinsics[..., :3, 3]
    fov_h = 2 * torch.atan((H / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2) / intrinsics[..., 0, 0])
    return torch.cat([t, mat_to_quat(R), fov_h[..., None], fov_w[..., None]], dim=-1)  # (..., 9)


def pose_encoding_to_extri_intri(pose_encoding, image_size_hw):
    """VGGT pose encoding (B, S, 9) -> (w2c extrinsics (B, S, 3, 4), intrinsics (B, S, 3, 3)).

    fy = (H/2) / tan(fov_h/2), fx = (W/2) / tan(fov_w/2), principal point (W/2, H/2).
    """
    _check_last_dims("pose_encoding", pose_encoding, (9,))
    H, W = _image_size(image_size_hw)
    t, quat, fov_h, fov_w = pose_encoding.split([3, 4, 1, 1], dim=-1)
    extrinsics = torch.cat([quat_to_mat(quat), t[..., None]], dim=-1)  # (..., 3, 4)
    fy = (H / 2) / torch.tan(fov_h[..., 0] / 2)
    fx = (W / 2) / torch.tan(fov_w[..., 0] / 2)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    intrinsics = torch.stack([
        fx, zero, zero + W / 2,
        zero, fy, zero + H / 2,
        zero, zero, one,
    ], dim=-1).reshape(*fx.shape, 3, 3)
    return extrinsics, intrinsics


# ----------------------------------------------------------------------------------------------
# Rigid poses

def to_homogeneous(P):
    """(..., 3, 4) [R|t] -> (..., 4, 4) with bottom row [0, 0, 0, 1]; a (..., 4, 4) passes through."""
    if not torch.is_tensor(P) or P.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"pose must have shape (..., 3, 4) or (..., 4, 4), got {tuple(getattr(P, 'shape', ()))}")
    if P.shape[-2] == 4:
        return P
    bottom = torch.zeros(*P.shape[:-2], 1, 4, dtype=P.dtype, device=P.device)
    bottom[..., 0, 3] = 1
    return torch.cat([P, bottom], dim=-2)


def invert_pose(T):
    """Rigid inverse of (..., 4, 4) (or (..., 3, 4)) [R|t]: [R^T | -R^T t], returned as (..., 4, 4).

    Turns w2c into c2w and back. Assumes R is a rotation (uses R^T, not a general inverse).
    """
    T = to_homogeneous(T)
    R_inv = T[..., :3, :3].transpose(-1, -2)
    t_inv = -(R_inv @ T[..., :3, 3:4])
    return to_homogeneous(torch.cat([R_inv, t_inv], dim=-1))


def relative_to_first(c2w):
    """c2w (..., F, 4, 4) -> inverse(c2w[..., 0]) @ c2w, so frame 0 becomes the identity.

    The result is independent of the world frame: relative_to_first(G @ c2w) == relative_to_first(c2w).
    """
    _check_last_dims("c2w", c2w, (4, 4))
    if c2w.dim() < 3:
        raise ValueError(f"c2w must have shape (..., F, 4, 4), got {tuple(c2w.shape)}")
    return invert_pose(c2w[..., :1, :, :]) @ c2w


def scaled_relative_c2w(w2c, scale):
    """w2c (B, F, 3|4, 4) -> c2w (B, F, 4, 4) relative to frame 0 (c2w_0 = I), camera centres divided by
    scale (B,): trajectories whose own unit is unknown, expressed in a unit the caller chooses."""
    c2w = relative_to_first(invert_pose(to_homogeneous(w2c)))
    centres = c2w[..., :3, 3:] / scale[:, None, None, None]
    return to_homogeneous(torch.cat([c2w[..., :3, :3], centres], dim=-1))


def normalize_translation(c2w):
    """c2w (..., F, 4, 4) -> same poses with translations divided by the trajectory's largest
    translation norm max_f |t_f|_2 (left unchanged if that is ~0). Scale-free camera positions."""
    _check_last_dims("c2w", c2w, (4, 4))
    if c2w.dim() < 3:
        raise ValueError(f"c2w must have shape (..., F, 4, 4), got {tuple(c2w.shape)}")
    t = c2w[..., :3, 3]  # (..., F, 3)
    scale = t.norm(dim=-1).amax(dim=-1)  # (...)
    scale = torch.where(scale > TRANSLATION_EPS, scale, torch.ones_like(scale))
    t = t / scale[..., None, None]
    return torch.cat([torch.cat([c2w[..., :3, :3], t[..., None]], dim=-1), c2w[..., 3:, :]], dim=-2)


def so3_exp(omega):
    """Axis-angle (..., 3) -> rotation matrices (..., 3, 3) (Rodrigues; exact, fine at zero)."""
    theta = omega.norm(dim=-1, keepdim=True)[..., None]  # (..., 1, 1)
    zero = torch.zeros_like(omega[..., 0])
    skew = torch.stack([torch.stack([zero, -omega[..., 2], omega[..., 1]], -1),
                        torch.stack([omega[..., 2], zero, -omega[..., 0]], -1),
                        torch.stack([-omega[..., 1], omega[..., 0], zero], -1)], -2)
    small = theta < 1e-8
    safe = torch.where(small, torch.ones_like(theta), theta)
    a = torch.where(small, torch.ones_like(theta), torch.sin(safe) / safe)
    b = torch.where(small, 0.5 * torch.ones_like(theta), (1 - torch.cos(safe)) / (safe * safe))
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(skew)
    return eye + a * skew + b * (skew @ skew)


# ----------------------------------------------------------------------------------------------
# Pixels, rays and Plücker embeddings

def pixel_centers(H, W, dtype=torch.float32, device=None):
    """(H, W, 2) pixel coordinates (u, v) = (j + 0.5, i + 0.5) of pixel (row i, column j)."""
    v = torch.arange(H, dtype=dtype, device=device) + 0.5
    u = torch.arange(W, dtype=dtype, device=device) + 0.5
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, vv], dim=-1)


def plucker_embedding(K, c2w, H, W):
    """Per-pixel Plücker rays (CameraCtrl's convention): K (..., 4) = [fx, fy, cx, cy] in pixels of
    the H x W image, c2w (..., 4, 4) -> (..., 6, H, W) with channels [o x d, d].

    d = R_c2w @ normalize(K^-1 [u, v, 1]) at pixel centres (u, v) = (j + 0.5, i + 0.5); o = t_c2w.
    The caller passes poses already relative to the first frame (relative_to_first), and K scaled
    to the resolution the denoiser sees.
    """
    _check_last_dims("K", K, (4,))
    _check_last_dims("c2w", c2w, (4, 4))
    fx, fy, cx, cy = (k[..., None, None] for k in K.unbind(-1))  # each (..., 1, 1)
    uv = pixel_centers(H, W, dtype=c2w.dtype, device=c2w.device)
    x = (uv[..., 0] - cx) / fx  # (..., H, W)
    y = (uv[..., 1] - cy) / fy
    directions = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # (..., H, W, 3) camera frame
    directions = directions / directions.norm(dim=-1, keepdim=True)
    R = c2w[..., :3, :3]
    directions = torch.einsum("...ij,...hwj->...hwi", R, directions)  # world frame
    origins = c2w[..., None, None, :3, 3].expand_as(directions)
    moments = torch.cross(origins, directions, dim=-1)
    return torch.cat([moments, directions], dim=-1).movedim(-1, -3)  # (..., 6, H, W)


# ----------------------------------------------------------------------------------------------
# Keyframe trajectory interpolation (Linear / SLERP baselines)

def _project_to_rotation(M):
    # Polar projection: the rotation nearest M in Frobenius norm, U diag(1, 1, det(U V^T)) V^T.
    U, _, Vh = torch.linalg.svd(M)
    det = torch.linalg.det(U @ Vh)
    sign = torch.ones(*M.shape[:-2], 3, dtype=M.dtype, device=M.device)
    sign[..., 2] = det
    return (U * sign[..., None, :]) @ Vh


def _slerp(q0, q1, t):
    # Shortest path: q and -q are the same rotation, so flip q1 to the hemisphere of q0.
    cos = (q0 * q1).sum(dim=-1, keepdim=True)
    q1 = torch.where(cos < 0, -q1, q1)
    cos = cos.abs()
    close = cos > SLERP_LERP_THRESHOLD
    theta = torch.acos(torch.where(close, torch.zeros_like(cos), cos))
    sin_theta = torch.where(close, torch.ones_like(theta), torch.sin(theta))
    w0 = torch.where(close, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    w1 = torch.where(close, t, torch.sin(t * theta) / sin_theta)
    q = w0 * q0 + w1 * q1
    return q / q.norm(dim=-1, keepdim=True)


def interpolate_trajectory(c2w_keyframes, keyframe_idx, num_frames, mode="slerp"):
    """Fill a whole trajectory from keyframe poses: c2w_keyframes (..., K, 4, 4) at frame indices
    keyframe_idx (K,) (strictly increasing, in [0, num_frames)) -> (..., num_frames, 4, 4).

    Between keyframes a < b, with s = (f - a) / (b - a): camera centre p = (1 - s) p_a + s p_b, and
    "linear": R = polar((1 - s) R_a + s R_b) (nearest rotation, via SVD; undefined for 180-degree
    steps); "slerp": R = quat_to_mat(slerp(q_a, q_b, s)) on the shortest arc.
    Keyframes are copied exactly; frames before the first / after the last hold that keyframe.
    """
    _check_last_dims("c2w_keyframes", c2w_keyframes, (4, 4))
    if mode not in ("linear", "slerp"):
        raise ValueError(f"mode must be 'linear' or 'slerp', got {mode!r}")
    if c2w_keyframes.dim() < 3:
        raise ValueError(f"c2w_keyframes must have shape (..., K, 4, 4), got {tuple(c2w_keyframes.shape)}")
    num_frames = int(num_frames)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    idx = torch.as_tensor(keyframe_idx, device=c2w_keyframes.device)
    if idx.dim() != 1 or idx.numel() < 1 or idx.is_floating_point():
        raise ValueError(f"keyframe_idx must be a 1-D integer tensor with at least one entry, got {keyframe_idx}")
    num_keys = idx.numel()
    if c2w_keyframes.shape[-3] != num_keys:
        raise ValueError(f"c2w_keyframes has {c2w_keyframes.shape[-3]} poses but keyframe_idx has {num_keys} entries")
    if num_keys > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"keyframe_idx must be strictly increasing, got {idx.tolist()}")
    if int(idx[0]) < 0 or int(idx[-1]) >= num_frames:
        raise ValueError(f"keyframe_idx must lie in [0, {num_frames}), got {idx.tolist()}")

    dtype = c2w_keyframes.dtype
    frames = torch.arange(num_frames, device=idx.device)
    # Segment [idx[j], idx[j+1]] each frame falls in; clamping s to [0, 1] holds the end poses.
    start = (torch.searchsorted(idx, frames, right=True) - 1).clamp(0, max(num_keys - 2, 0))
    end = (start + 1).clamp(max=num_keys - 1)
    span = (idx[end] - idx[start]).clamp(min=1).to(dtype)
    s = ((frames - idx[start]).to(dtype) / span).clamp(0, 1)  # (num_frames,)
    if num_keys == 1:
        s = torch.zeros_like(s)
    pose_a = c2w_keyframes[..., start, :, :]  # (..., num_frames, 4, 4)
    pose_b = c2w_keyframes[..., end, :, :]
    s_mat = s[:, None, None]

    if mode == "linear":
        R = _project_to_rotation((1 - s_mat) * pose_a[..., :3, :3] + s_mat * pose_b[..., :3, :3])
    else:
        q = _slerp(mat_to_quat(pose_a[..., :3, :3]), mat_to_quat(pose_b[..., :3, :3]), s[:, None])
        R = quat_to_mat(q)
    centre = (1 - s_mat) * pose_a[..., :3, 3:] + s_mat * pose_b[..., :3, 3:]
    poses = to_homogeneous(torch.cat([R, centre], dim=-1))
    # Keyframes and held frames are copied bit for bit rather than recomputed through SVD / quats.
    poses = torch.where(s_mat == 0, pose_a, poses)
    return torch.where(s_mat == 1, pose_b, poses)


# ----------------------------------------------------------------------------------------------
# Depth projection and warping

def unproject_pixels(uv, depth, K):
    """Pixels uv (..., 2) with depth (...) -> camera-frame points depth * K^-1 [u, v, 1], (..., 3).
    K (B, 3, 3) broadcasts over the pixel dims (..., H, W)."""
    K_inv = torch.linalg.inv(K)[..., None, None, :, :]  # (B, 1, 1, 3, 3)
    homogeneous = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)
    return depth[..., None] * (K_inv @ homogeneous[..., None])[..., 0]


def unproject_depth(depth, K):
    """Depth (B, H, W) along z, K (B, 3, 3) -> camera-frame points (B, H, W, 3) at pixel centres."""
    _check_last_dims("K", K, (3, 3))
    if depth.dim() < 2:
        raise ValueError(f"depth must have shape (B, H, W), got {tuple(depth.shape)}")
    H, W = depth.shape[-2:]
    uv = pixel_centers(H, W, dtype=depth.dtype, device=depth.device)
    return unproject_pixels(uv, depth, K)


def transform_points(T, points):
    """Apply a rigid (..., 4, 4) transform to points (..., H, W, 3): R p + t."""
    R = T[..., None, None, :3, :3]
    t = T[..., None, None, :3, 3]
    return (R @ points[..., None])[..., 0] + t


def project_points(points, K):
    """Camera-frame points (B, H, W, 3), K (B, 3, 3) -> (uv (B, H, W, 2), z (B, H, W)).

    uv = (K p)_{xy} / z. Points with z <= DEPTH_EPS get a finite placeholder uv (divide by
    DEPTH_EPS) so gradients stay finite; mask them out with z > DEPTH_EPS.
    """
    projected = (K[..., None, None, :, :] @ points[..., None])[..., 0]  # (B, H, W, 3)
    z = points[..., 2]
    z_safe = torch.where(z > DEPTH_EPS, z, torch.full_like(z, DEPTH_EPS))
    return projected[..., :2] / z_safe[..., None], z


def project_depth(depth, K, T, K_b=None):
    """Warp camera A's pixels into camera B: depth (B, H, W) of A, K (B, 3, 3) (shared, or A's when K_b
    gives B's), T (B, 4, 4) mapping A's camera frame to B's (T = w2c_B @ c2w_A) -> (uv (B, H, W, 2) in
    B's pixels, z (B, H, W) depth in B).   uv ~ K_b (R_T D_A(u) K^-1 [u, 1] + t_T),  u = A's pixel centres.
    """
    _check_last_dims("K", K, (3, 3))
    T = to_homogeneous(T)
    points_a = unproject_depth(depth, K)  # (B, H, W, 3)
    points_b = transform_points(T, points_a)
    return project_points(points_b, K if K_b is None else K_b)


def in_view(uv, H, W, margin=0.0):
    """Bool mask (...) of pixel coordinates uv (..., 2) inside [margin, W - margin] x [margin, H - margin].
    margin=0 is the image rectangle; margin=0.5 is the span of the pixel centres."""
    u, v = uv[..., 0], uv[..., 1]
    return (u >= margin) & (u <= W - margin) & (v >= margin) & (v <= H - margin)


def sample_at(image, uv):
    """Bilinear sample image (B, C, H, W) at pixel coordinates uv (B, H', W', 2) -> (B, C, H', W').

    grid_sample with align_corners=False, x_norm = 2u/W - 1, y_norm = 2v/H - 1 (so pixel centre
    j + 0.5 hits pixel j exactly); outside the image the border value is repeated. NaN and far-away
    coordinates are first moved to a bounded spot outside the image: grid_sample's backward indexes
    out of bounds on them (NaN gradients, or a crash), and such points are invalid anyway.
    """
    if image.dim() != 4 or uv.dim() != 4 or uv.shape[-1] != 2 or uv.shape[0] != image.shape[0]:
        raise ValueError(f"sample_at expects image (B, C, H, W) and uv (B, H', W', 2), got "
                         f"{tuple(image.shape)} and {tuple(uv.shape)}")
    H, W = image.shape[-2:]
    uv = torch.nan_to_num(uv, nan=-float(H + W)).clamp(-float(H + W), 2.0 * (H + W))
    grid = torch.stack([2 * uv[..., 0] / W - 1, 2 * uv[..., 1] / H - 1], dim=-1).to(image.dtype)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _masked_median(values, valid):
    # Median over the last two dims of the valid entries only -> (B,). Lower middle value for even
    # counts (torch.nanmedian), so it is always one of the inputs and its gradient goes there.
    masked = torch.where(valid, values, torch.full_like(values, float("nan")))
    return torch.nanmedian(masked.flatten(-2), dim=-1).values


def align_depth_scale(pred, target, valid, mode="median"):
    """Per-batch scale s (B,) so that s * pred ~ target over valid pixels; pred, target (B, H, W).

    "median": s = median(target) / median(pred);  "lstsq": s = sum(pred * target) / sum(pred^2)
    (the minimiser of sum |s pred - target|^2). s = 1 where no pixel is valid.
    Use as s[:, None, None] * pred.
    """
    if mode not in ("median", "lstsq"):
        raise ValueError(f"mode must be 'median' or 'lstsq', got {mode!r}")
    if pred.shape != target.shape or pred.shape != valid.shape:
        raise ValueError(f"pred, target, valid must share a shape, got {tuple(pred.shape)}, "
                         f"{tuple(target.shape)}, {tuple(valid.shape)}")
    any_valid = valid.flatten(-2).any(dim=-1)
    if mode == "median":
        numerator = _masked_median(target, valid)
        denominator = _masked_median(pred, valid)
    else:
        zero = torch.zeros_like(pred)
        numerator = torch.where(valid, pred * target, zero).flatten(-2).sum(-1)
        denominator = torch.where(valid, pred * pred, zero).flatten(-2).sum(-1)
    ok = any_valid & (denominator.abs() > DEPTH_EPS)
    one = torch.ones_like(denominator)
    # Both sides guarded, so a NaN median of an empty set stays out of the result and its gradient.
    return torch.where(ok, torch.where(ok, numerator, one) / torch.where(ok, denominator, one), one)


def depth_consistency_residual(depth_a, depth_b, K, T_a_to_b, scale_invariant=None, K_b=None):
    """Cross-frame depth consistency: warp A's depth into B and compare with B's own depth there.

    uv, z = project_depth(D_A, K, T_a_to_b);  D_B' = bilinear D_B at uv.
      None:       r = |D_B' - z|  (in the depth's own units).
      "median" / "lstsq": B's sampled depth is aligned to the warped depth, s = align(D_B' -> z),
                  and the result is divided by the median warped depth:  r = |s D_B' - z| / median(z).
    Why: a monocular teacher's depth and translation share one unknown global scale; z carries
    the scale of D_A and t, while D_B may drift in scale per frame. Aligning D_B' to z removes that
    drift, and dividing by median(z) makes r invariant to the global scale (D_A, D_B, t all * c).
    valid = uv within B's pixel centres (CONSISTENCY_VIEW_MARGIN) & z > DEPTH_EPS
            & D_A, D_B' > DEPTH_EPS & all finite.
    s and median(z) are computed over valid pixels per batch element, gradients flow through both.
    Inputs: depth_a, depth_b (B, H, W), K (B, 3, 3), T_a_to_b (B, 4, 4) (A camera -> B camera);
    K_b (B, 3, 3): B's intrinsics when they differ from A's (K is then A's); more leading dims are fine
    (K, K_b, T broadcast to them).
    Returns residual (B, H, W) (0 where invalid), valid (B, H, W) bool.
    """
    if scale_invariant not in (None, "median", "lstsq"):
        raise ValueError(f"scale_invariant must be None, 'median' or 'lstsq', got {scale_invariant!r}")
    if depth_a.dim() < 3 or depth_a.shape != depth_b.shape:
        raise ValueError(f"depth_a and depth_b must both be (B, H, W), got {tuple(depth_a.shape)} "
                         f"and {tuple(depth_b.shape)}")
    K_b = K if K_b is None else K_b
    _check_last_dims("K", K, (3, 3))
    _check_last_dims("K_b", K_b, (3, 3))
    T_a_to_b = to_homogeneous(T_a_to_b)
    # Extra leading dims (e.g. batch x frame pairs) are folded into one batch dim.
    lead, (H, W) = depth_a.shape[:-2], depth_a.shape[-2:]
    if any(torch.broadcast_shapes(x.shape[:-2], lead) != lead for x in (K, K_b, T_a_to_b)):
        raise ValueError(f"K {tuple(K.shape)}, K_b {tuple(K_b.shape)} and T_a_to_b {tuple(T_a_to_b.shape)} do not "
                         f"match the depth batch shape {tuple(lead)}")
    K, K_b = K.expand(*lead, 3, 3).reshape(-1, 3, 3), K_b.expand(*lead, 3, 3).reshape(-1, 3, 3)
    T_a_to_b = T_a_to_b.expand(*lead, 4, 4).reshape(-1, 4, 4)
    depth_a, depth_b = depth_a.reshape(-1, H, W), depth_b.reshape(-1, H, W)
    uv, z = project_depth(depth_a, K, T_a_to_b, K_b)  # (B, H, W, 2), (B, H, W)
    sampled_b = sample_at(depth_b[:, None], uv)[:, 0]  # (B, H, W)
    valid = (in_view(uv, H, W, CONSISTENCY_VIEW_MARGIN) & (z > DEPTH_EPS) & (depth_a > DEPTH_EPS)
             & (sampled_b > DEPTH_EPS) & torch.isfinite(z) & torch.isfinite(sampled_b)
             & torch.isfinite(uv).all(dim=-1))
    if scale_invariant is None:
        residual = (sampled_b - z).abs()
    else:
        scale = align_depth_scale(sampled_b, z, valid, scale_invariant)  # (B,)
        z_median = _masked_median(z, valid)
        usable = torch.isfinite(z_median) & (z_median > DEPTH_EPS)  # False when no pixel is valid
        z_median = torch.where(usable, z_median, torch.ones_like(z_median))
        residual = (scale[:, None, None] * sampled_b - z).abs() / z_median[:, None, None]
    residual = torch.where(valid, residual, torch.zeros_like(residual))
    return residual.reshape(*lead, H, W), valid.reshape(*lead, H, W)


def covisible_mask(depth_frame, depth_reference, K, frame_to_reference, tolerance=COVISIBLE_DEPTH_TOLERANCE):
    """Pixels of a frame that the reference frame also sees, from true depth (z) of both, (B, H, W) each; K
    (B, 3, 3); frame_to_reference (B, 4, 4) = w2c_reference @ c2w_frame. Each pixel is unprojected with its depth,
    moved into the reference camera and projected (project_depth -> uv, z). It is co-visible when uv lies in the
    reference image, z > 0, and the reference's depth there agrees: |D_ref(uv) - z| <= tolerance * z (a nearer
    D_ref(uv) is an occluder that hides the point from the reference). Returns (B, H, W) bool."""
    H, W = depth_frame.shape[-2:]
    uv, z = project_depth(depth_frame, K, frame_to_reference)
    seen = sample_at(depth_reference[:, None], uv)[:, 0]  # the reference's own depth at uv
    return (in_view(uv, H, W) & (z > DEPTH_EPS) & (depth_frame > DEPTH_EPS) & torch.isfinite(seen)
            & ((seen - z).abs() <= tolerance * z))


def reproject_reference(reference, depth_frame, K, frame_to_reference):
    """The reference image (B, C, H, W) seen from a frame through the frame's true depth (B, H, W): bilinear at the
    spots covisible_mask projects to (border repeated outside). On co-visible pixels, the best a video can do from
    the reference alone."""
    return sample_at(reference, project_depth(depth_frame, K, frame_to_reference)[0])


# ----------------------------------------------------------------------------------------------
# Camera metrics (CamI2V's definitions)

def camera_metrics(c2w_gt, c2w_gen):
    """RotErr, TransErr, CamMC between two c2w trajectories (F, 4, 4), as python floats.

    Both are made relative to frame 0, then each trajectory's translations are divided by its own
    largest translation norm. Sums over frames:
    RotErr = sum arccos((tr(R_gt^T R_gen) - 1) / 2) [radians, evaluated as an atan2], TransErr = sum |t_gt - t_gen|_2,
    CamMC = sum |[R|t]_gt - [R|t]_gen|_F over the 3x4 matrices. Computed in float64.
    """
    for name, c2w in (("c2w_gt", c2w_gt), ("c2w_gen", c2w_gen)):
        if not torch.is_tensor(c2w) or c2w.dim() != 3 or c2w.shape[-2:] not in ((4, 4), (3, 4)):
            raise ValueError(f"{name} must have shape (F, 4, 4), got {tuple(getattr(c2w, 'shape', ()))}")
    if c2w_gt.shape[0] != c2w_gen.shape[0]:
        raise ValueError(f"trajectories differ in length: {c2w_gt.shape[0]} vs {c2w_gen.shape[0]} frames")
    gt = normalize_translation(relative_to_first(to_homogeneous(c2w_gt.detach().double())))
    gen = normalize_translation(relative_to_first(to_homogeneous(c2w_gen.detach().double())))
    R_rel = gt[:, :3, :3].transpose(-1, -2) @ gen[:, :3, :3]  # (F, 3, 3)
    cos = (R_rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    # For a rotation, |vee(R - R^T)| / 2 = sin(angle), so atan2(sin, cos) is the same angle as
    # arccos(clamp(cos, -1, 1)); arccos alone turns float32 round-off near 0 into ~1e-4 rad.
    skew = R_rel - R_rel.transpose(-1, -2)
    sin = torch.stack([skew[:, 2, 1], skew[:, 0, 2], skew[:, 1, 0]], dim=-1).norm(dim=-1) / 2
    rot_err = torch.atan2(sin, cos.clamp(-1, 1)).sum()
    trans_err = (gt[:, :3, 3] - gen[:, :3, 3]).norm(dim=-1).sum()
    cam_mc = (gt[:, :3, :] - gen[:, :3, :]).flatten(-2).norm(dim=-1).sum()
    return {"RotErr": rot_err.item(), "TransErr": trans_err.item(), "CamMC": cam_mc.item()}


# ----------------------------------------------------------------------------------------------
# Image metrics

def _check_videos(a, b):
    if not torch.is_tensor(a) or not torch.is_tensor(b) or a.shape != b.shape or a.dim() < 3:
        raise ValueError(f"expected two videos of the same shape (..., C, H, W), got "
                         f"{tuple(getattr(a, 'shape', ()))} and {tuple(getattr(b, 'shape', ()))}")


def psnr(a, b):
    """PSNR in dB of videos in [0, 1], (..., 3, H, W): 10 log10(1 / MSE) per frame, averaged over
    all frames (scalar tensor). MSE is floored at PSNR_MIN_MSE, so identical frames give 100 dB."""
    _check_videos(a, b)
    mse = (a - b).pow(2).flatten(-3).mean(-1).clamp(min=PSNR_MIN_MSE)  # (...)
    return (10 * torch.log10(1 / mse)).mean()


def masked_psnr(a, b, mask):
    """PSNR in dB per frame over the pixels where mask is true: videos (..., C, H, W) in [0, 1], mask (..., H, W)
    -> (...): 10 log10(1 / MSE), the MSE over the frame's masked pixels and all channels; NaN for an empty mask."""
    _check_videos(a, b)
    weight = mask[..., None, :, :].to(a.dtype).expand_as(a).flatten(-3)
    mse = ((a - b).pow(2).flatten(-3) * weight).sum(-1) / weight.sum(-1)  # 0 / 0 = NaN where nothing is masked
    return 10 * torch.log10(1 / mse.clamp(min=PSNR_MIN_MSE))


def gaussian_blur(images, sigma):
    """(N, C, H, W) -> same shape, separable Gaussian with replicated borders; sigma 0 returns the input."""
    if sigma <= 0:
        return images
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-x * x / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    C = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def _gaussian_window(size, sigma, dtype, device):
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(a, b):
    """SSIM (Wang et al. 2004) of videos in [0, 1], (..., C, H, W), per frame then averaged (scalar).

    Gaussian window 11x11, sigma 1.5, 'valid' convolution per channel; C1 = 0.01^2, C2 = 0.03^2;
    SSIM = (2 mu_a mu_b + C1)(2 sigma_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(sigma_a^2 + sigma_b^2 + C2)).
    Frames smaller than 11 pixels use the largest odd window that fits (same sigma).
    """
    _check_videos(a, b)
    C, H, W = a.shape[-3:]
    size = min(SSIM_WINDOW, H, W)
    size = size if size % 2 == 1 else size - 1
    window = _gaussian_window(size, SSIM_SIGMA, a.dtype, a.device).expand(C, 1, size, size)
    a = a.reshape(-1, C, H, W)  # (N, C, H, W), N = all frames
    b = b.reshape(-1, C, H, W)

    def blur(x):
        return F.conv2d(x, window, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
                / ((mu_a * mu_a + mu_b * mu_b + SSIM_C1) * (var_a + var_b + SSIM_C2)))
    return ssim_map.flatten(1).mean(-1).mean()
