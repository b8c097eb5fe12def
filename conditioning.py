"""What the CamGeo student is told about the cameras: keyframes, Plücker maps and the plane sweep.

Read top to bottom: which frames get a pose (keyframes) and how the baselines fill the others, the poses'
normalisation (relative to frame 0, translations in units of the largest given one), the plane sweep (where each
pixel's ray meets the reference image at a few inverse depths, and what the reference shows there), and
camera_inputs, which turns a batch's true cameras into what each method's student is conditioned on. Pure
functions on tensors; the model that reads them is camgeo.py.
"""
import torch
import torch.nn.functional as F

import geometry

# The given poses are divided by their largest keyframe translation norm; this floor keeps a camera that barely
# moves (pure rotation, hand-shake only) from having its jitter blown up to unit length.
TRANSLATION_SCALE_FLOOR = 1e-3


def keyframe_count(num_frames, ratio):
    """How many frames get a pose at sparsity `ratio`: max(2, round(ratio * F)), at most F (two, so that every
    clip has a start and an end pose)."""
    if num_frames < 2:
        raise ValueError(f"need at least 2 frames for keyframes, got {num_frames}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keyframe ratio must be in (0, 1], got {ratio}")
    return min(num_frames, max(2, round(ratio * num_frames)))


def keyframe_indices(num_frames, ratio):
    """Frames that get a pose at sparsity `ratio`: frame 0 always, the rest evenly spaced with the last frame
    included; count = max(2, round(ratio * num_frames)) (two, so that every clip has a start and an end pose).
    Returns a sorted LongTensor of unique indices."""
    count = keyframe_count(num_frames, ratio)
    # evenly spaced positions from 0 to F-1, rounded; distinct because count <= num_frames
    positions = torch.linspace(0, num_frames - 1, count).round().long()
    return torch.unique(positions)


def random_keyframe_mask(batch_size, num_frames, ratio, generator=None):
    """(B, F) float mask: frame 0 plus (count - 1) other frames drawn at random per sample."""
    count = keyframe_count(num_frames, ratio)
    mask = torch.zeros(batch_size, num_frames)
    mask[:, 0] = 1
    for b in range(batch_size):
        others = torch.randperm(num_frames - 1, generator=generator)[: count - 1] + 1
        mask[b, others] = 1
    return mask


def fill_missing_poses(w2c, keyframe_mask, mode):
    """Linear / SLERP baselines: (B, F, 4, 4) w2c whose non-keyframe poses are replaced by interpolating the
    keyframe poses (geometry.interpolate_trajectory on c2w, mode "linear" or "slerp"); keyframes are kept."""
    filled = []
    for poses, mask in zip(w2c, keyframe_mask):  # keyframes may differ per sample
        index = mask.nonzero().flatten()
        c2w_keyframes = geometry.invert_pose(poses[index])
        c2w = geometry.interpolate_trajectory(c2w_keyframes, index, poses.shape[0], mode)
        filled.append(geometry.invert_pose(c2w))
    return torch.stack(filled)


def intrinsics_vector(K):
    """(..., 3, 3) pixel intrinsics -> (..., 4) [fx, fy, cx, cy], the layout plucker_embedding takes."""
    return torch.stack([K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2]], dim=-1)


def keyframe_relative_c2w(w2c, keyframe_mask):
    """w2c (B, F, 3|4, 4) -> c2w (B, F, 4, 4) relative to frame 0 (c2w_0 = I), translations divided by the
    largest camera-centre norm among the keyframes (keyframe_mask (B, F)), floored at TRANSLATION_SCALE_FLOOR:
    the normalisation of the poses the student is given (only given poses may set the scale)."""
    return geometry.scaled_relative_c2w(w2c, translation_scale(w2c, keyframe_mask))


def translation_scale(w2c, keyframe_mask):
    """(B,) the unit of the student's poses: the largest camera-centre distance from frame 0 among the given poses
    (keyframe_mask (B, F)), floored at TRANSLATION_SCALE_FLOOR, in the units of w2c."""
    centres = geometry.relative_to_first(geometry.invert_pose(geometry.to_homogeneous(w2c)))[..., :3, 3]
    return (centres.norm(dim=-1) * keyframe_mask).amax(dim=-1).clamp_min(TRANSLATION_SCALE_FLOOR)


def reference_inverse_depth(depth, w2c, keyframe_mask):
    """The depth head's target: the reference's true depth (B, H, W) as inverse depth in the poses' unit
    (translation_scale), the unit the plane sweep's inverse depths are in. -> (B, H, W)."""
    return translation_scale(w2c, keyframe_mask)[:, None, None] / depth.clamp_min(1e-3)


# The plane sweep: the reference is resampled along each frame's rays as if the scene were a sphere around the
# frame's camera at each of these inverse distances, in units of the clip's largest given translation (the poses'
# normalisation, so a clip's scale never matters). 0 is the plane at infinity (rotation only, no depth needed).
# In that unit the synthetic world's reference pixels have inverse depth 0.22 at the median and 1.06 at the 99th
# percentile, so the planes span [0, 1], closer together near 0 where most pixels are: with the true depth
# picking the nearest plane per pixel they come within 3 dB of the reprojection through true depth on co-visible
# pixels, where 8 planes evenly spaced to 4 lose 8 dB (RESULTS.md).
PLANE_INVERSE_DEPTHS = (0.0, 0.08, 0.16, 0.25, 0.35, 0.5, 0.7, 1.0)
NUM_PLANES = len(PLANE_INVERSE_DEPTHS)
# Channels of the camera input (camera_conditioning): Plücker [o x d, d] (0-5), where each ray meets the
# reference image on each plane of the sweep (reference_grids, grid_sample coordinates, plane by plane), the
# inverse depth at which the reference sees each plane's point there, and the keyframe mask.
GRID_CHANNELS = slice(6, 6 + 2 * NUM_PLANES)
PLANE_DEPTH_CHANNELS = slice(GRID_CHANNELS.stop, GRID_CHANNELS.stop + NUM_PLANES)
MASK_CHANNELS = slice(PLANE_DEPTH_CHANNELS.stop, PLANE_DEPTH_CHANNELS.stop + 1)
CAMERA_CHANNELS = MASK_CHANNELS.stop


def reference_grids(origins, directions, K_reference):
    """Where each pixel's ray meets the reference image, for each plane of the sweep.

    origins (B, F, 3) camera centres and directions (B, F, 3, H, W) unit ray directions, both in frame 0's camera
    coordinates with translations normalised (camera_conditioning); K_reference (B, 4) [fx, fy, cx, cy] of frame 0.
    The point at inverse distance rho along a ray is o + d / rho, so it projects like d + rho o: at rho = 0 only the
    rotation moves pixels (a homography K R K^-1). Returns (grids (B, F, NUM_PLANES, 2, H, W) in grid_sample's
    [-1, 1] coordinates (align_corners=False), inverse depths (B, F, NUM_PLANES, H, W) of those points seen from the
    reference, rho / z with z the reference's depth of d + rho o; 0 at infinity and behind the reference camera).
    Coordinates are clamped to [-2, 2] and points behind the reference camera get -2: both fall outside the image
    (reference_candidates repeats the edge pixel there), and the clamp keeps rays grazing the image plane from
    blowing up.
    """
    H, W = directions.shape[-2:]
    rho = torch.tensor(PLANE_INVERSE_DEPTHS, dtype=directions.dtype, device=directions.device)
    points = directions[:, :, None] + rho[:, None, None, None] * origins[:, :, None, :, None, None]  # (B,F,D,3,H,W)
    fx, fy, cx, cy = (k[:, None, None, None, None] for k in K_reference.unbind(-1))  # each (B, 1, 1, 1, 1)
    x, y, z = points.unbind(dim=3)  # each (B, F, D, H, W)
    in_front = z > 1e-3
    z = torch.where(in_front, z, torch.ones_like(z))
    u = (fx * x / z + cx) / W * 2 - 1
    v = (fy * y / z + cy) / H * 2 - 1
    grid = torch.stack([u, v], dim=3).clamp(-2.0, 2.0)
    # clamped like the grid: rays grazing the reference's image plane would give unbounded values
    inverse_depth = torch.where(in_front, (rho[:, None, None] / z).clamp(max=4.0), torch.zeros_like(z))
    return torch.where(in_front[:, :, :, None], grid, torch.full_like(grid, -2.0)), inverse_depth


def camera_conditioning(w2c, K, keyframe_mask, height, width):
    """Camera input of the denoiser: Plücker maps at keyframes, zeros elsewhere, the plane sweep, and the mask.

    w2c (B, F, 4, 4) world->camera; K (B, F, 4) [fx, fy, cx, cy] in pixels of the (height, width) frames the
    denoiser sees; keyframe_mask (B, F) with 1 where the pose is given (frame 0 must be given).
    Poses are made relative to frame 0 (c2w_0 = I) and translations are divided by the largest translation
    norm among the *given* poses, so only known poses set the scale (with full poses this is exactly
    geometry.normalize_translation). The mask channel makes "no pose given" differ from "identity pose".
    Between them, 3 * NUM_PLANES channels say where each ray meets the reference image on each plane of the sweep
    and at which inverse depth the reference sees that point (reference_grids); the model resamples the reference
    there (reference_candidates) and compares with its own reading of the reference's depth (camgeo.depth_test).
    At a frame without a pose the sweep follows the pose SLERP-interpolated between the given ones, while its
    Plücker channels stay zero and the mask says the pose is not given: a guess to copy from, the smooth-motion
    prior a pretrained video model would bring, never a pose the model is told (RESULTS.md measures that guess).
    Returns (B, F, CAMERA_CHANNELS, H, W): channels [o x d, d] * mask, plane grids, plane inverse depths, mask.
    """
    mask = keyframe_mask.to(w2c.dtype)
    if not torch.all(mask[:, 0] == 1):
        raise ValueError("frame 0 must be a keyframe: poses are expressed relative to it")
    # poses that are not given may hold anything (zeros, garbage): replace them by identity so nothing
    # below sees a singular matrix, then mask their embedding out anyway
    eye = torch.eye(4, dtype=w2c.dtype, device=w2c.device).expand_as(w2c)
    w2c = torch.where(mask[..., None, None] > 0, w2c, eye)
    if not bool(mask.all()):
        w2c = fill_missing_poses(w2c, mask, "slerp")
    c2w = keyframe_relative_c2w(w2c, mask)
    plucker = geometry.plucker_embedding(K, c2w, height, width)  # (B, F, 6, H, W)
    grids, plane_depths = reference_grids(c2w[..., :3, 3], plucker[:, :, 3:], K[:, 0])  # (B,F,D,2|1..,H,W)
    mask_map = mask[..., None, None, None].expand(-1, -1, 1, height, width)  # (B, F, 1, H, W)
    return torch.cat([plucker * mask_map, grids.flatten(2, 3), plane_depths, mask_map], dim=2)


def reference_candidates(reference, camera, camera_drop=None):
    """The reference moved along each frame's rays, one video per plane of the sweep: what the student copies from.

    reference (B, 3, H, W); camera (B, F, CAMERA_CHANNELS, H, W) from camera_conditioning; camera_drop (B,) bool
    (guidance's unconditional branch) or None. Returns (B, F, NUM_PLANES, 3, H, W): the reference sampled at
    reference_grids, or the reference itself where the camera is dropped. Border padding: where a ray leaves the
    reference, its nearest edge pixel is repeated (a wall usually goes on); the grid channels still tell the network
    which pixels those are.
    """
    B, num_frames, _, H, W = camera.shape
    grids = camera[:, :, GRID_CHANNELS].reshape(B * num_frames * NUM_PLANES, 2, H, W).permute(0, 2, 3, 1)
    references = reference[:, None, None].expand(-1, num_frames, NUM_PLANES, -1, -1, -1)  # (B, F, D, 3, H, W)
    resampled = F.grid_sample(references.reshape(-1, 3, H, W), grids, mode="bilinear", padding_mode="border",
                              align_corners=False).view(B, num_frames, NUM_PLANES, 3, H, W)
    if camera_drop is None:
        return resampled
    return torch.where(camera_drop[:, None, None, None, None, None], references, resampled)


def reference_guess(reference, camera, camera_drop=None):
    """The rotation-only warp: the reference resampled on the plane at infinity (B, F, 3, H, W), along the
    interpolated pose where none is given; the arguments are reference_candidates'."""
    return reference_candidates(reference, camera, camera_drop)[:, :, 0]


def keyframe_camera(w2c, K, keyframe_mask, method, height, width):
    """What a checkpoint of `method` is conditioned on, given poses at the keyframes only.

    w2c (B, F, 4, 4) (anything at frames without a pose), K (B, F, 4) [fx, fy, cx, cy] pixels, keyframe_mask
    (B, F). Sparse / CamGeo see the keyframes and the mask; Linear / SLERP (and Full, which was trained with every
    pose) see the missing poses filled by interpolation, given as if known. Returns (camera (B, F,
    CAMERA_CHANNELS, H, W), w2c_conditioned (B, F, 4, 4), the poses actually used)."""
    if method in ("linear", "slerp", "full") and not bool(keyframe_mask.all()):
        w2c = fill_missing_poses(w2c, keyframe_mask, "slerp" if method == "full" else method)
        keyframe_mask = torch.ones_like(keyframe_mask)
    return camera_conditioning(w2c, K, keyframe_mask, height, width), w2c


def camera_inputs(w2c, K, method, ratio, random_keyframes=False, generator=None, height=32, width=32):
    """Ground-truth cameras of a batch -> what the denoiser is conditioned on for `method`.

    w2c (B, F, 4, 4), K (B, 3, 3) pixels. Returns (camera (B, F, CAMERA_CHANNELS, H, W) for the model,
    keyframe_mask (B, F) marking the frames whose true pose was given, w2c_conditioned (B, F, 4, 4) the poses
    actually used)."""
    B, num_frames = w2c.shape[:2]
    if method == "full":
        keyframe_mask = torch.ones(B, num_frames)
    elif random_keyframes:
        keyframe_mask = random_keyframe_mask(B, num_frames, ratio, generator)
    else:
        keyframe_mask = torch.zeros(B, num_frames)
        keyframe_mask[:, keyframe_indices(num_frames, ratio)] = 1
    keyframe_mask = keyframe_mask.to(w2c.device)
    K_frames = intrinsics_vector(K)[:, None].expand(B, num_frames, 4)
    camera, w2c = keyframe_camera(w2c, K_frames, keyframe_mask, method, height, width)
    return camera, keyframe_mask, w2c
