"""The CamGeo student: a small video diffusion transformer conditioned on an image, a prompt and sparse cameras.

Read top to bottom: config and presets, the conditioning (keyframes, camera -> Plücker maps and where each ray
meets the reference image, prompt -> tokens), the embedders, the DiT-style blocks, the full-resolution output
head, the model, then the diffusion (rectified flow) training loss and the Euler sampler with classifier-free
guidance, the CamGeo distillation (teacher gate, L_traj, the fused L_geo, the curriculum), and finally the
checkpoint loader used by sample.py.

Pixel space, no latent autoencoder: frames are tiny (32x32 by default), a 4x4 patch is only 48 numbers, and no
pretrained VAE exists on these machines; training one would double the code for no gain at this size.

train.py owns the loop and the checkpoint writer; sample.py turns an image + poses into a video. The teacher
(teacher.py) is never imported here: sampling costs exactly what this file costs.
"""
import json
import math
import re
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import geometry

# -----------------------------------------------------------------------------
# config and presets


@dataclass
class CamGeoConfig:
    num_frames: int = 8
    image_size: int = 32  # square frames, H = W
    patch_size: int = 4
    width: int = 128  # transformer hidden size D
    depth: int = 4  # number of blocks
    num_heads: int = 4
    mlp_ratio: float = 4.0
    # the full-resolution output head (PixelHead): channels per pixel the transformer hands it, and its width
    pixel_features: int = 16
    pixel_head_width: int = 32
    text_vocab_size: int = 1024  # words are hashed into this many buckets (no pretrained text model here)
    # classifier-free guidance dropout during training. The joint drop (text and camera together) is what the
    # sampler's unconditional branch uses, so it gets its own probability instead of relying on the rare
    # coincidence of two independent drops; the single drops let each signal also be learnt alone.
    joint_drop_prob: float = 0.1
    text_drop_prob: float = 0.05
    camera_drop_prob: float = 0.05


PRESETS = {
    # seconds on CPU: for tests only
    "smoke": CamGeoConfig(num_frames=4, image_size=16, patch_size=4, width=32, depth=2, num_heads=2,
                          text_vocab_size=64),
    # the default: trains in < 20 minutes on 2 CPU cores (see train.py)
    "cpu": CamGeoConfig(num_frames=8, image_size=32, patch_size=4, width=128, depth=4, num_heads=4),
    # one GPU: longer clips, larger frames, wider and deeper
    "gpu": CamGeoConfig(num_frames=16, image_size=64, patch_size=4, width=384, depth=12, num_heads=6,
                        text_vocab_size=4096),
}

# Rectified-flow time t is drawn logit-normal (as in SD3): sigmoid of a standard normal puts most samples at
# mid t, where predicting the velocity is hardest, and few at the ends, where it is nearly trivial.
LOGIT_NORMAL_MEAN = 0.0
LOGIT_NORMAL_STD = 1.0
# The network outputs the clean video x0_hat and the velocity is derived from it, v_hat = (x_t - x0_hat) / t
# ("x-prediction", as in Li & He's JiT): in pixel space a 4x4x3 patch of pure noise is hard to pass through the
# transformer, a clean patch is not. A first version predicting v directly still left visible noise in its
# samples after 500 steps.
# The loss is on the clean video, |x0_hat - x0|^2, which is the velocity loss |v_hat - v|^2 weighted by t^2.
# The plain velocity loss weighs a sample by 1/t^2: the near-clean samples, where the camera hardly matters,
# outweigh the noisy ones, where it decides the layout, by 100 to 1. Measured on the cpu preset (with the
# resampled reference of CamGeo.forward, 600 steps, 64 test clips; clean-video error at t = 0.98 with the true
# cameras / another clip's cameras): velocity loss 0.099 / 0.100, clean-video loss 0.081 / 0.083.
# Translations are divided by the largest keyframe translation norm; this floor keeps a camera that barely
# moves (pure rotation, hand-shake only) from having its jitter blown up to unit length.
TRANSLATION_SCALE_FLOOR = 1e-3
TIMESTEP_FREQUENCY_SCALE = 1000.0  # t in [0, 1] is scaled like DiT's integer steps before the sinusoid

# -----------------------------------------------------------------------------
# conditioning inputs: keyframes, cameras, prompts


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
    largest camera-centre norm among the keyframes (keyframe_mask (B, F)), floored at TRANSLATION_SCALE_FLOOR.
    The one normalisation of the poses the student is given and of the trajectories L_traj compares."""
    c2w = geometry.relative_to_first(geometry.invert_pose(geometry.to_homogeneous(w2c)))
    translation = c2w[..., :3, 3]  # (B, F, 3)
    scale = (translation.norm(dim=-1) * keyframe_mask).amax(dim=-1).clamp_min(TRANSLATION_SCALE_FLOOR)  # (B,)
    return torch.cat([torch.cat([c2w[..., :3, :3], (translation / scale[:, None, None])[..., None]], -1),
                      c2w[..., 3:, :]], dim=-2)


# Channels of the camera input: Plücker [o x d, d] (6), where each ray meets the reference image (2), the mask (1).
CAMERA_CHANNELS = 9


def reference_grid(directions, K_reference):
    """Where each pixel's ray meets the reference image if the scene were infinitely far away.

    directions (B, F, 3, H, W): the Plücker ray directions, in frame 0's camera coordinates; K_reference (B, 4)
    [fx, fy, cx, cy] of frame 0. Returns (B, F, 2, H, W) in grid_sample's [-1, 1] coordinates
    (align_corners=False). At infinity only the rotation moves pixels (a homography K R K^-1), so no depth is
    needed. Coordinates are clamped to [-2, 2] and rays that point behind the reference camera get -2: both fall
    outside the image (reference_guess repeats the edge pixel there), and the clamp keeps rays grazing the image
    plane from blowing up.
    """
    H, W = directions.shape[-2:]
    fx, fy, cx, cy = (k[:, None, None, None] for k in K_reference.unbind(-1))  # each (B, 1, 1, 1)
    x, y, z = directions.unbind(dim=2)  # each (B, F, H, W)
    in_front = z > 1e-3
    z = torch.where(in_front, z, torch.ones_like(z))
    u = (fx * x / z + cx) / W * 2 - 1
    v = (fy * y / z + cy) / H * 2 - 1
    grid = torch.stack([u, v], dim=2).clamp(-2.0, 2.0)
    return torch.where(in_front[:, :, None], grid, torch.full_like(grid, -2.0))


def camera_conditioning(w2c, K, keyframe_mask, height, width):
    """Camera input of the denoiser: Plücker maps at keyframes, zeros elsewhere, plus the mask as a channel.

    w2c (B, F, 4, 4) world->camera; K (B, F, 4) [fx, fy, cx, cy] in pixels of the (height, width) frames the
    denoiser sees; keyframe_mask (B, F) with 1 where the pose is given (frame 0 must be given).
    Poses are made relative to frame 0 (c2w_0 = I) and translations are divided by the largest translation
    norm among the *given* poses, so only known poses set the scale (with full poses this is exactly
    geometry.normalize_translation). The mask channel makes "no pose given" differ from "identity pose".
    Two more channels say where each ray meets the reference image at infinity (reference_grid); the model
    resamples the reference there (CamGeo.forward).
    Returns (B, F, CAMERA_CHANNELS, H, W): channels [o x d, d, reference grid] * mask, mask.
    """
    mask = keyframe_mask.to(w2c.dtype)
    if not torch.all(mask[:, 0] == 1):
        raise ValueError("frame 0 must be a keyframe: poses are expressed relative to it")
    # poses that are not given may hold anything (zeros, garbage): replace them by identity so nothing
    # below sees a singular matrix, then mask their embedding out anyway
    eye = torch.eye(4, dtype=w2c.dtype, device=w2c.device).expand_as(w2c)
    w2c = torch.where(mask[..., None, None] > 0, w2c, eye)
    c2w = keyframe_relative_c2w(w2c, mask)
    plucker = geometry.plucker_embedding(K, c2w, height, width)  # (B, F, 6, H, W)
    grid = reference_grid(plucker[:, :, 3:], K[:, 0])  # (B, F, 2, H, W)
    mask_map = mask[..., None, None, None].expand(-1, -1, 1, height, width)  # (B, F, 1, H, W)
    return torch.cat([plucker * mask_map, grid * mask_map, mask_map], dim=2)


def reference_guess(reference, camera, camera_drop=None):
    """The video a new model predicts, and the input it reads for it: the reference moved along each frame's rays.

    reference (B, 3, H, W); camera (B, F, CAMERA_CHANNELS, H, W) from camera_conditioning; camera_drop (B,) bool
    (guidance's unconditional branch) or None. Returns (resampled, guess), both (B, F, 3, H, W): resampled is the
    reference sampled at reference_grid where the pose is given (and the camera not dropped), zeros elsewhere;
    guess is resampled there and the reference itself elsewhere. Border padding: where a ray leaves the reference,
    its nearest edge pixel is repeated (a wall usually goes on); the grid channels still tell the network which
    pixels those are. With every pose given this guess alone scores 19.4 dB PSNR on 64 test clips (frames 1-7),
    repeating the reference 17.4 dB.
    """
    B, num_frames, _, H, W = camera.shape
    mask = camera[:, :, 8:9]  # (B, F, 1, H, W), 1 where the pose is given
    if camera_drop is not None:
        mask = mask * ~camera_drop[:, None, None, None, None]
    references = reference[:, None].expand(-1, num_frames, -1, -1, -1)
    grid = camera[:, :, 6:8].flatten(0, 1).permute(0, 2, 3, 1)  # (B*F, H, W, 2)
    resampled = F.grid_sample(references.flatten(0, 1), grid, mode="bilinear", padding_mode="border",
                              align_corners=False).view(B, num_frames, 3, H, W) * mask
    return resampled, resampled + references * (1 - mask)


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
    conditioning_mask = keyframe_mask
    if method in ("linear", "slerp"):
        w2c = fill_missing_poses(w2c, keyframe_mask, method)
        conditioning_mask = torch.ones_like(keyframe_mask)  # interpolated poses are given as if known
    K_frames = intrinsics_vector(K)[:, None].expand(B, num_frames, 4)
    camera = camera_conditioning(w2c, K_frames, conditioning_mask, height, width)
    return camera, keyframe_mask, w2c


def tokenize(prompts, vocab_size):
    """Lower-cased words hashed (crc32: stable across runs, unlike Python's hash) into vocab_size buckets.
    Returns (ids, offsets) in torch.nn.EmbeddingBag's flat layout; an empty prompt is an empty bag."""
    ids, offsets = [], []
    for prompt in prompts:
        offsets.append(len(ids))
        ids.extend(zlib.crc32(word.encode()) % vocab_size for word in re.findall(r"[a-z0-9]+", prompt.lower()))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


# -----------------------------------------------------------------------------
# embedders (each holds the classifier-free-guidance dropout of the signal it embeds, as DiT's LabelEmbedder)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def sincos_1d(positions, dim):
    """(N,) positions -> (N, dim) fixed sinusoidal embedding (first half sin, second half cos)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    angles = positions.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def sincos_2d(grid_size, dim):
    """(grid_size**2, dim): half the channels encode the row, half the column (as DiT's 2D sin-cos)."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(rows.flatten(), dim // 2), sincos_1d(cols.flatten(), dim // 2)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Diffusion time t in [0, 1] -> (B, D): sinusoid then a two-layer MLP."""

    def __init__(self, width, frequency_dim=256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(sincos_1d(t * TIMESTEP_FREQUENCY_SCALE, self.frequency_dim).to(t.device))


class TextEmbedder(nn.Module):
    """Prompt -> (B, D): mean of learned embeddings of its hashed words; a learned null embedding replaces it
    when dropped (classifier-free guidance) and for an empty prompt (no text is the unconditional case)."""

    def __init__(self, vocab_size, width, drop_prob):
        super().__init__()
        self.vocab_size = vocab_size
        self.drop_prob = drop_prob
        self.words = nn.EmbeddingBag(vocab_size, width, mode="mean")
        self.null_embedding = nn.Parameter(torch.zeros(width))

    def forward(self, prompts, force_drop=None):
        ids, offsets = tokenize(prompts, self.vocab_size)
        embedding = self.words(ids.to(self.null_embedding.device), offsets.to(self.null_embedding.device))
        drop = drop_decisions(len(prompts), self.drop_prob, self.training, force_drop, embedding.device)
        num_words = torch.diff(offsets, append=torch.tensor([len(ids)])).to(embedding.device)
        drop = drop | (num_words == 0)
        return torch.where(drop[:, None], self.null_embedding.to(embedding.dtype), embedding)


class CameraEmbedder(nn.Module):
    """Camera maps (B, F, CAMERA_CHANNELS, H, W) from camera_conditioning -> tokens (B, F, h*w, D), patchified
    exactly like the frames so each camera token sits on its frame token; dropped -> a learned null token
    everywhere. The caller draws the drop decisions (drop_decisions with self.drop_prob) because CamGeo.forward
    must also blank the reference it resampled along a dropped camera's rays."""

    def __init__(self, patch_size, width, drop_prob, in_channels=CAMERA_CHANNELS):
        super().__init__()
        self.drop_prob = drop_prob
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.null_embedding = nn.Parameter(torch.zeros(width))

    def forward(self, camera, drop):
        B, num_frames = camera.shape[:2]
        tokens = self.proj(camera.flatten(0, 1))  # (B*F, D, h, w)
        tokens = tokens.flatten(2).transpose(1, 2).reshape(B, num_frames, -1, tokens.shape[1])  # (B, F, h*w, D)
        return torch.where(drop[:, None, None, None], self.null_embedding.to(tokens.dtype), tokens)


def drop_decisions(batch_size, drop_prob, training, force_drop, device):
    """(B,) bool: which samples lose this condition. Random only in training; force_drop is OR-ed in (it carries
    the joint text+camera drop in training and the unconditional branch of guidance in sampling)."""
    drop = torch.zeros(batch_size, dtype=torch.bool, device=device)
    if training and drop_prob > 0:
        drop = torch.rand(batch_size, device=device) < drop_prob
    if force_drop is not None:
        drop = drop | force_drop.to(device)
    return drop


# -----------------------------------------------------------------------------
# the transformer


class Attention(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # (batch, tokens, D) -> same
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Factorised space-time block: spatial attention within each frame, then temporal attention across frames
    at each spatial location, then an MLP, each wrapped in adaLN-Zero modulation by the condition c.
    Factorised because full attention over all F*h*w tokens costs (F*h*w)^2 while this costs
    F*(h*w)^2 + h*w*F^2: at 8 frames of 8x8 tokens, 36,864 + 4,096 pairs instead of 262,144 (6x less)."""

    def __init__(self, width, num_heads, mlp_ratio):
        super().__init__()
        self.norm_spatial = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.spatial_attn = Attention(width, num_heads)
        self.norm_temporal = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.temporal_attn = Attention(width, num_heads)
        self.norm_mlp = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))
        # shift, scale, gate for each of the three sub-layers
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 9 * width))

    def forward(self, x, c):  # x (B, F, N, D), c (B, D)
        B, num_frames, N, D = x.shape
        mod = self.adaLN_modulation(c)[:, None, None, :].chunk(9, dim=-1)  # 9 x (B, 1, 1, D)
        shift_s, scale_s, gate_s, shift_t, scale_t, gate_t, shift_m, scale_m, gate_m = mod
        h = modulate(self.norm_spatial(x), shift_s, scale_s).reshape(B * num_frames, N, D)
        x = x + gate_s * self.spatial_attn(h).view(B, num_frames, N, D)
        h = modulate(self.norm_temporal(x), shift_t, scale_t).transpose(1, 2).reshape(B * N, num_frames, D)
        x = x + gate_t * self.temporal_attn(h).view(B, N, num_frames, D).transpose(1, 2)
        return x + gate_m * self.mlp(modulate(self.norm_mlp(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, width, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class PixelHead(nn.Module):
    """The denoiser's output at full resolution: three 3x3 convolutions over the transformer's per-pixel features,
    the noisy frame x_t, the guess and the time t, giving the change to the guess.

    Why: with the output taken straight from the tokens (a linear layer per 4x4 patch, as in DiT) each patch was
    painted on its own, and samples were covered in 4x4 blocks that grew frame by frame. The convolutions reach
    across patch borders and see x_t and the guess pixel by pixel. Measured on the SLERP baseline, cpu preset,
    1000 steps (evaluate.py --check: 16 held-out clips, frames 1-7): samples 18.24 -> 18.59 dB PSNR, SSIM 0.445
    -> 0.456, and the blocks are gone from the frames. Both still score below the guess they start from (19.29
    dB) at that length; from the true x_t at t = 0.04 (itself 33.2 dB) both return an x0_hat of about 25.5 dB.
    Tried and measured worse or no better, same probe: EDM's preconditioning (x0_hat = guess + c_skip(t) (x_t -
    (1-t) guess) + c_out(t) F) without this head, which hands x_t through by a fixed rule but leaves the noise
    for the patches to cancel, 15.98 dB (16.74 with EDM's loss weighting); with this head, half the training
    times drawn uniformly instead of logit-normal (ten times more practice below t = 0.1), 18.52 dB.
    """

    def __init__(self, feature_channels, width):
        super().__init__()
        in_channels = feature_channels + 3 + 3 + 1  # features, x_t, guess, t
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, features, x_t, guess, t):  # (N, C, H, W), (N, 3, H, W), (N, 3, H, W), (N,) -> (N, 3, H, W)
        t_map = t[:, None, None, None].expand(-1, 1, *x_t.shape[-2:]).to(x_t.dtype)
        return self.net(torch.cat([features, x_t, guess, t_map], dim=1))


class CamGeo(nn.Module):
    """Denoiser x0_hat(x_t, t | reference image, prompt, cameras) on videos in [-1, 1]; training_losses and
    sample turn it into the rectified-flow velocity.

    Inputs per frame: the noisy frame, the clean reference image (SVD-style: every frame sees the reference at
    every pixel, so copying its content is a local operation) and, where the frame's pose is given, the reference
    resampled along the frame's rays at infinity (reference_grid), concatenated channel-wise and patchified to
    tokens; camera tokens from the Plücker maps are added on top; fixed sin-cos position embeddings for the patch
    (2D) and the frame (1D). Diffusion time + prompt form the adaLN condition c. The tokens are unpatchified to
    per-pixel features and PixelHead turns them, with x_t and the guess at full resolution, into the output: a
    residual on reference_guess (the resampled reference where the pose is given, the reference elsewhere). With
    the head's last convolution zero-initialised a new model predicts that guess, and learns what it gets wrong:
    parallax, what comes into view, and the frames without a pose.

    Why the resampled reference: with Plücker maps alone, this model (cpu preset) learnt nothing from the camera
    in the CPU budget. Its clean-video error at every noise level was the same with the true cameras as with
    another clip's cameras (1500 steps), because turning a ray map into "move this content by so many pixels"
    is a warp the network has to discover. The resampled reference hands it the rotational part of that warp
    as a local copy, as cheap to learn as copying the reference itself; the parallax of translation (needs
    depth) and the frames without a pose are still the network's job, and those are what CamGeo's distillation
    is about.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        D, p = config.width, config.patch_size
        if config.image_size % p:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {p}")
        self.grid_size = config.image_size // p
        # noisy frame (3) + reference (3) + reference resampled along the frame's rays (3)
        self.frame_embedder = nn.Conv2d(9, D, kernel_size=p, stride=p)
        self.camera_embedder = CameraEmbedder(p, D, config.camera_drop_prob)
        self.t_embedder = TimestepEmbedder(D)
        self.text_embedder = TextEmbedder(config.text_vocab_size, D, config.text_drop_prob)
        # fixed, not learned: extends to other clip lengths without new weights, and keeps checkpoints small
        self.register_buffer("spatial_pos", sincos_2d(self.grid_size, D), persistent=False)  # (h*w, D)
        self.blocks = nn.ModuleList([Block(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.final_layer = FinalLayer(D, p, config.pixel_features)
        self.pixel_head = PixelHead(config.pixel_features, config.pixel_head_width)
        self.initialize_weights()

    def initialize_weights(self):
        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(basic_init)
        for patchify in (self.frame_embedder, self.camera_embedder.proj):  # as a linear layer, like DiT
            nn.init.xavier_uniform_(patchify.weight.view(patchify.weight.shape[0], -1))
            nn.init.zeros_(patchify.bias)
        nn.init.normal_(self.text_embedder.words.weight, std=0.02)
        nn.init.normal_(self.text_embedder.null_embedding, std=0.02)
        nn.init.normal_(self.camera_embedder.null_embedding, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: modulation outputs start at zero, so every gate is 0 and each block starts as the identity
        # (a new block cannot disturb the signal until it has learnt something); the pixel head's last convolution
        # starts at zero so the first prediction is reference_guess.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.pixel_head.net[-1].weight)
        nn.init.zeros_(self.pixel_head.net[-1].bias)

    def forward(self, x_t, t, reference, prompts, camera, force_drop=None):
        """x_t (B, F, 3, H, W) and reference (B, 3, H, W) in [-1, 1]; t (B,); prompts list of B strings;
        camera (B, F, CAMERA_CHANNELS, H, W) from camera_conditioning; force_drop (B,) bool drops text and camera
        together.
        Returns the predicted clean video x0_hat (B, F, 3, H, W) in [-1, 1] units."""
        B, num_frames, _, H, W = x_t.shape
        p, D = self.config.patch_size, self.config.width
        camera_drop = drop_decisions(B, self.camera_embedder.drop_prob, self.training, force_drop, x_t.device)
        references = reference[:, None].expand(-1, num_frames, -1, -1, -1)  # (B, F, 3, H, W)
        resampled, guess = reference_guess(reference, camera, camera_drop)
        frames = torch.cat([x_t, references, resampled], dim=2)  # (B, F, 9, H, W)
        tokens = self.frame_embedder(frames.flatten(0, 1))  # (B*F, D, h, w)
        tokens = tokens.flatten(2).transpose(1, 2).reshape(B, num_frames, -1, D)  # (B, F, h*w, D)
        tokens = tokens + self.camera_embedder(camera, camera_drop)
        frame_pos = sincos_1d(torch.arange(num_frames), D).to(tokens.device)  # (F, D)
        tokens = tokens + self.spatial_pos[None, None] + frame_pos[None, :, None]
        c = self.t_embedder(t) + self.text_embedder(prompts, force_drop)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        C = self.config.pixel_features
        patches = self.final_layer(tokens, c)  # (B, F, h*w, p*p*C)
        h, w = H // p, W // p
        features = patches.view(B * num_frames, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(-1, C, H, W)
        change = self.pixel_head(features, x_t.flatten(0, 1), guess.flatten(0, 1), t.repeat_interleave(num_frames))
        return guess + change.view(B, num_frames, 3, H, W)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# diffusion: rectified flow


def training_losses(model, video, prompts, camera, generator=None):
    """Rectified flow (flow matching) on video (B, F, 3, H, W) in [0, 1], frame 0 being the reference image.

    x_t = (1 - t) x0 + t eps,  target velocity v = eps - x0,  v_hat = (x_t - x0_hat) / t from the network's
    clean video x0_hat (so x0_hat = x_t - t v_hat exactly),  loss = t^2 |v_hat - v|^2 = |x0_hat - x0|^2 (mean).
    x0_hat is returned with gradients (in [0, 1] units, unclamped) because the geometry distillation looks at it.
    Returns dict(loss, x0_pred, t, x_t, v_pred).
    """
    x0 = video * 2 - 1
    reference = x0[:, 0]
    B = x0.shape[0]
    normal = torch.randn(B, generator=generator).to(x0.device)
    t = torch.sigmoid(LOGIT_NORMAL_MEAN + LOGIT_NORMAL_STD * normal)  # (B,) logit-normal
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t_ = t.view(B, 1, 1, 1, 1)
    x_t = (1 - t_) * x0 + t_ * noise
    force_drop = None
    config = getattr(model, "module", model).config  # the model itself, or the one DistributedDataParallel wraps
    if model.training and config.joint_drop_prob > 0:
        force_drop = torch.rand(B, generator=generator).to(x0.device) < config.joint_drop_prob
    x0_pred = model(x_t, t, reference, prompts, camera, force_drop)
    v_pred = (x_t - x0_pred) / t_
    loss = (x0_pred - x0).pow(2).mean()  # = mean of t^2 |v_pred - (eps - x0)|^2
    return {"loss": loss, "x0_pred": (x0_pred + 1) / 2, "t": t, "x_t": x_t, "v_pred": v_pred}


@torch.no_grad()
def sample(model, reference, prompts, camera, num_steps=25, cfg_scale=2.0, seed=0):
    """Euler ODE from noise (t = 1) to data (t = 0). reference (B, 3, H, W) in [0, 1]; camera from
    camera_conditioning. Classifier-free guidance on text and camera jointly, the reference image always kept:
    v = v_uncond + cfg_scale * (v_cond - v_uncond). Deterministic in seed. Returns (B, F, 3, H, W) in [0, 1]."""
    model.eval()
    device = reference.device
    B, num_frames = camera.shape[:2]
    H, W = reference.shape[-2:]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((B, num_frames, 3, H, W), generator=generator).to(device)
    reference = reference * 2 - 1
    guided = cfg_scale != 1.0
    if guided:  # one batch of 2B: first half conditional, second half with text and camera dropped
        reference, camera, prompts = torch.cat([reference, reference]), torch.cat([camera, camera]), prompts * 2
        force_drop = torch.arange(2 * B, device=device) >= B
    else:
        force_drop = None
    times = torch.linspace(1.0, 0.0, num_steps + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        x_in = torch.cat([x, x]) if guided else x
        x0_hat = model(x_in, torch.full((x_in.shape[0],), float(t), device=device), reference, prompts, camera,
                       force_drop)
        v = (x_in - x0_hat) / t  # t >= 1 / num_steps here: the loop never evaluates t = 0
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        x = x + (t_next - t) * v
    return ((x + 1) / 2).clamp(0, 1)


# -----------------------------------------------------------------------------
# CamGeo distillation
#
# train.py runs the frozen teacher (teacher.py) on the student's predicted video; everything here works on the
# tensors it returns, so this file never imports the teacher. One function per equation: teacher_weight (the gate
# on the noise level), trajectory_loss (L_traj), geometry_loss (L_geo, all frame pairs fused in one function that
# train.py compiles), curriculum_weights (alpha, beta) and total_loss (L_total).
#
# Choices the paper leaves open (each is an option of train.py):
# The teacher reads the student's clean-video prediction x0_hat. Past SNR = 1 (t = 0.5 in rectified flow, where
# noise and signal weigh the same in x_t) x0_hat is a blurred guess that no geometry model can read; below it the
# weight ramps linearly to 1 at t = 0, so the teacher's word counts most where the frames are legible.
TEACHER_T_MAX = 0.5
# At most this fraction of each batch goes through the teacher (rounded up, so at least one clip): one teacher
# forward + backward of a clip costs ~20% of a whole Sparse step of 8 clips on CPU (bench.py), so an eighth keeps
# a CamGeo step within 1.3x of a Sparse step; the distillation loss is a mean over the clips shown either way.
TEACHER_BATCH_FRACTION = 0.125
# The teacher's fields of view are clamped to this range before its cameras are used: its FoV output has a ReLU
# floor, and a FoV of 0 is an infinite focal length that turns every projection into NaN (early in training the
# student's blurry frames do get such readings). The range is far wider than any real camera's.
TEACHER_FOV_RANGE_DEG = (10.0, 150.0)
# Frame spans k of the pairs (f, f + k) in L_geo; spans >= the clip length are dropped. Span 1 keeps
# neighbours consistent, span 4 (half the default 8-frame clip) ties distant frames together against drift.
GEO_SPANS = (1, 2, 4)
# w = exp(gamma k): a mild extra tilt toward long spans (x1.25 for k = 4 vs k = 1) on top of lambda(k).
GEO_GAMMA = 0.075
# w = exp(-eta |grad I|_1), |grad I|_1 in [0, 1] image units (mean over RGB of |dI/dx| + |dI/dy|): a strong
# edge (0.3) gets weight 0.22, a flat region 1. Edges are where depth is discontinuous and occlusions begin.
GEO_ETA = 5.0
# Scale alignment of the sampled depth to the warped depth: least squares (gradient reaches every valid
# pixel, and it is two sums, which fuse) rather than a median (gradient to a single pixel, a sort).
GEO_SCALE_MODE = "lstsq"
# Weight of the trajectory-smoothness term inside L_geo (0: the "w/o smoothness" ablation).
GEO_SMOOTHNESS_WEIGHT = 1.0
# Curriculum, as fractions of the run. Phase 1 (warm-up, diffusion only) ends at 10%; alpha (distillation
# on) is centred at 20%, beta (trajectory -> depth) at 50%; each sigmoid rises over about +-3 widths.
CURRICULUM_WARMUP = 0.1
CURRICULUM_ALPHA_MID = 0.2
CURRICULUM_BETA_MID = 0.5
CURRICULUM_WIDTH = 0.03


def teacher_weight(t, t_max=TEACHER_T_MAX):
    """Per-clip weight of the distillation losses at flow time t (B,): w(t) = max(0, 1 - t / t_max).

    The teacher gate: at t >= t_max the predicted frames are too blurred for the teacher to read, and a loss on
    its reading would teach the student the teacher's guesses; such clips are not shown to the teacher at all.
    Below t_max the weight grows linearly as the frames sharpen (a soft gate: no jump in the loss at t_max).
    """
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"teacher t_max must be in (0, 1], got {t_max}")
    return (1 - t / t_max).clamp(min=0)


def select_teacher_clips(weights, fraction=TEACHER_BATCH_FRACTION):
    """Indices (n,) of the clips the teacher looks at this step: those of positive weight, at most
    ceil(fraction * B) of them, in batch order (the batch order is already random)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"teacher batch fraction must be in (0, 1], got {fraction}")
    open_clips = (weights > 0).nonzero().flatten()
    return open_clips[: math.ceil(fraction * weights.shape[0])]


def teacher_cameras(pose_enc, image_size_hw):
    """The teacher's pose encodings (B, F, 9) -> (w2c (B, F, 3, 4), K (B, F, 3, 3) in pixels of image_size_hw),
    geometry.pose_encoding_to_extri_intri with both fields of view clamped to TEACHER_FOV_RANGE_DEG."""
    low, high = (math.radians(d) for d in TEACHER_FOV_RANGE_DEG)
    fov = pose_enc[..., 7:].clamp(low, high)
    return geometry.pose_encoding_to_extri_intri(torch.cat([pose_enc[..., :7], fov], dim=-1), image_size_hw)


def trajectory_loss(pred_w2c, pred_K, gt_w2c, gt_K, keyframe_mask, image_size_hw):
    """Keyframe trajectory distillation, per clip (B,):

        L_traj = mean_{s in S, s != 0} |phi(R_hat_s) - phi(R_s)|_1 + |T_hat_s - T_s|_1 + |K_hat_s - K_s|_1

    pred_w2c (B, F, 3|4, 4), pred_K (B, F, 3, 3): the teacher's cameras of the predicted video;
    gt_w2c (B, F, 4, 4), gt_K (B, 3, 3) or (B, F, 3, 3): the true ones; keyframe_mask (B, F), frame 0 set.
    Both trajectories get the same treatment (VGGT's world is its first frame and its scale is its own):
    made relative to frame 0, translations divided by the trajectory's largest keyframe camera-centre norm
    (keyframe_relative_c2w: the scale camera_conditioning gives the student), then encoded as VGGT does
    (geometry.extri_intri_to_pose_encoding): T = w2c translation, phi = XYZW unit quaternion with w >= 0, K
    compared as the two fields of view in radians (resolution-free).
    The predicted quaternion is also flipped onto the ground truth's hemisphere: near 180 degrees w ~ 0 and
    standardisation alone can pick opposite signs for the same rotation. Frame 0 is identity on both sides.
    """
    if keyframe_mask.shape != gt_w2c.shape[:2] or pred_w2c.shape[:2] != gt_w2c.shape[:2]:
        raise ValueError(f"trajectory_loss: keyframe_mask {tuple(keyframe_mask.shape)}, predicted "
                         f"{tuple(pred_w2c.shape)} and true {tuple(gt_w2c.shape)} poses disagree on (B, F)")
    mask = keyframe_mask.to(pred_w2c.dtype)
    if gt_K.dim() == 3:
        gt_K = gt_K[:, None].expand(-1, gt_w2c.shape[1], 3, 3)
    pred_w2c = geometry.invert_pose(keyframe_relative_c2w(pred_w2c, mask))
    gt_w2c = geometry.invert_pose(keyframe_relative_c2w(gt_w2c, mask))
    pred = geometry.extri_intri_to_pose_encoding(pred_w2c, pred_K, image_size_hw)  # (B, F, 9)
    gt = geometry.extri_intri_to_pose_encoding(gt_w2c, gt_K, image_size_hw)
    q_pred, q_gt = pred[..., 3:7], gt[..., 3:7]
    q_pred = torch.where((q_pred * q_gt).sum(-1, keepdim=True) < 0, -q_pred, q_pred)
    error = ((pred[..., :3] - gt[..., :3]).abs().sum(-1) + (q_pred - q_gt).abs().sum(-1)
             + (pred[..., 7:] - gt[..., 7:]).abs().sum(-1))  # (B, F)
    weight = mask.clone()
    weight[:, 0] = 0
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
    dx = torch.nn.functional.pad((frames[..., :, 1:] - frames[..., :, :-1]).abs(), (0, 1))
    dy = torch.nn.functional.pad((frames[..., 1:, :] - frames[..., :-1, :]).abs(), (0, 0, 0, 1))
    return (dx + dy).mean(dim=-3)


def geometry_loss(depth, w2c, K, frames, spans=GEO_SPANS, gamma=GEO_GAMMA, eta=GEO_ETA,
                  scale_mode=GEO_SCALE_MODE, smoothness_weight=GEO_SMOOTHNESS_WEIGHT):
    """Cross-frame consistency distillation for all pairs of a batch at once, per clip (B,):

        L_geo = sum_{f,k} lambda(k) w_{f,f+k} ( |D_hat_{f+k} - W(D_hat_f, dE_{f,f+k}, K_hat)|_1
                                               + |Delta(C_hat_{f+k}, C_hat_f)|_1 )
        w_{f,f+k} = exp(gamma k) exp(-eta |grad I_f|_1),   lambda(k) = k / sum_{k' in spans} k'.

    depth (B, F, H, W), w2c (B, F, 3|4, 4), K (B, F, 3, 3): the teacher's depth and cameras of the predicted
    video frames (B, F, 3, H, W) in [0, 1]. Returns (L_geo, depth term, smoothness term), each (B,).

    Depth term, per pair: W unprojects frame f's pixels with D_hat_f and K_f, moves them by
    dE = w2c_{f+k} c2w_f and projects with K_{f+k}, giving uv and the warped depth z; D_hat_{f+k} is sampled
    bilinearly at uv, aligned in scale to z (scale_mode: "lstsq" or "median"), and the residual is divided
    by median(z): r = |s D'_{f+k} - z| / median(z), scale-free like geometry.depth_consistency_residual
    (which this equals for a shared K and w = 1). Per pair: sum of w r over valid pixels / number of valid
    pixels; pairs are averaged within a span, then summed over spans with lambda(k) exp(gamma k).
    The edge weight exp(-eta |grad I_f|_1) is detached: otherwise the network could lower the loss by
    painting edges where the depths disagree.

    Smoothness term, our reading: |Delta(C_{f+k}, C_f)|_1 taken literally is the size of the relative
    motion and would fight every camera move the student is asked for. We penalise its *change* instead
    (second order): |dE_{f+k,f+2k} - dE_{f,f+k}|_1 over the 3x4 [R|t] entries, with translations divided by
    the trajectory's largest camera-centre norm (the teacher's scale is its own). A constant-velocity
    camera (in its own frame) costs nothing. Weighted by lambda(k) exp(gamma k), averaged within a span.

    One function with no Python loop over pairs (index tensors gather all pairs at once), so that
    torch.compile can fuse it; train.py compiles it.
    """
    if scale_mode not in ("lstsq", "median"):
        raise ValueError(f"scale_mode must be 'lstsq' or 'median', got {scale_mode!r}")
    B, num_frames, H, W = depth.shape
    first, second, following, depth_weight, smooth_weight = (
        x.to(depth.device) for x in span_pairs(num_frames, spans, gamma))
    depth_weight, smooth_weight = depth_weight.to(depth.dtype), smooth_weight.to(depth.dtype)
    num_pairs = first.shape[0]
    w2c = geometry.to_homogeneous(w2c)  # (B, F, 4, 4)
    c2w = geometry.invert_pose(w2c)

    # depth term: every pair of every clip as one batch of N = B * P warps
    relative = w2c[:, second] @ c2w[:, first]  # (B, P, 4, 4) camera f -> camera f + k
    # W(D_f)(u) = K_{f+k} (R D_f(u) K_f^-1 [u, 1] + t): compose the per-pair part once, (B, P, 3, 4)
    # [K_{f+k} R K_f^-1 | K_{f+k} t], then each pixel costs 12 multiply-adds on (N, H, W) planes, a layout
    # that vectorises along image rows (a trailing xyz dim of size 3 does not). Equals geometry.project_depth.
    pixel_map = K[:, second] @ torch.cat([relative[..., :3, :3] @ torch.linalg.inv(K[:, first]),
                                         relative[..., :3, 3:]], dim=-1)
    pixel_map = pixel_map.flatten(0, 1)[:, :, :, None, None]  # (N, 3, 4, 1, 1)
    u, v = geometry.pixel_centers(H, W, dtype=depth.dtype, device=depth.device).unbind(-1)  # (H, W) each
    # pairs of one span are two slices of the clip; slices (not an index gather) keep the backward a plain add
    usable_spans = sorted({int(k) for k in spans if 0 < int(k) < num_frames})
    depth_a = torch.cat([depth[:, :num_frames - k] for k in usable_spans], dim=1).flatten(0, 1)  # (N, H, W)
    depth_b = torch.cat([depth[:, k:] for k in usable_spans], dim=1).flatten(0, 1)
    x, y, z = (depth_a * (row[:, 0] * u + row[:, 1] * v + row[:, 2]) + row[:, 3] for row in pixel_map.unbind(1))
    z_safe = torch.where(z > geometry.DEPTH_EPS, z, torch.full_like(z, geometry.DEPTH_EPS))
    uv = torch.stack([x / z_safe, y / z_safe], dim=-1)  # (N, H, W, 2) pixels of frame f + k
    sampled_b = geometry.sample_at(depth_b[:, None], uv)[:, 0]  # (N, H, W)
    valid = (geometry.in_view(uv, H, W, geometry.CONSISTENCY_VIEW_MARGIN) & (z > geometry.DEPTH_EPS)
             & (depth_a > geometry.DEPTH_EPS) & (sampled_b > geometry.DEPTH_EPS) & torch.isfinite(z)
             & torch.isfinite(sampled_b))
    scale = geometry.align_depth_scale(sampled_b, z, valid, scale_mode)  # (N,)
    z_median = geometry._masked_median(z, valid)
    usable = torch.isfinite(z_median) & (z_median > geometry.DEPTH_EPS)
    z_median = torch.where(usable, z_median, torch.ones_like(z_median))
    residual = (scale[:, None, None] * sampled_b - z).abs() / z_median[:, None, None]
    edge_weight = torch.exp(-eta * image_gradient_l1(frames.detach()))  # (B, F, H, W)
    edge_weight = torch.cat([edge_weight[:, :num_frames - k] for k in usable_spans], dim=1).flatten(0, 1)
    weighted = torch.where(valid, edge_weight * residual, torch.zeros_like(residual))
    per_pair = weighted.flatten(1).sum(-1) / valid.flatten(1).sum(-1).clamp(min=1)  # (N,)
    depth_term = (per_pair.view(B, num_pairs) * depth_weight).sum(-1)  # (B,)

    # smoothness term: change of relative motion between consecutive pairs of the same span
    centres = geometry.relative_to_first(c2w)[..., :3, 3]
    motion_scale = centres.norm(dim=-1).amax(dim=-1).clamp_min(1e-3)  # (B,)
    motion = torch.cat([relative[..., :3, :3], relative[..., :3, 3:] / motion_scale[:, None, None, None]], -1)
    change = (motion[:, following.clamp(min=0)] - motion).abs().flatten(2).sum(-1)  # (B, P)
    smooth_term = (change * smooth_weight).sum(-1)  # (B,)
    return depth_term + smoothness_weight * smooth_term, depth_term, smooth_term


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


def total_loss(loss_diff, loss_traj, loss_geo, alpha, beta, geo_gate="beta"):
    """L_total = L_diff + alpha [(1 - beta) L_traj + beta L_geo]   (geo_gate="beta", the default: L_geo waits
    for phase 3 as the paper's phases describe), or the printed L_diff + alpha [(1 - beta) L_traj + L_geo]
    (geo_gate="printed", L_geo on as soon as alpha is)."""
    if geo_gate not in ("beta", "printed"):
        raise ValueError(f"geo_gate must be 'beta' or 'printed', got {geo_gate!r}")
    geo_factor = beta if geo_gate == "beta" else 1.0
    return loss_diff + alpha * ((1 - beta) * loss_traj + geo_factor * loss_geo)


# -----------------------------------------------------------------------------
# checkpoints (written by train.py: safetensors with "model." and "ema." prefixes, config JSON in metadata)


def load_checkpoint(path, weights="ema", device="cpu"):
    """Build the model a checkpoint describes and load its `weights` ("ema" or "model") into it.
    Returns (model, metadata dict with "config", "method", "step", "options"). Raises ValueError naming any missing or
    unexpected keys."""
    from safetensors import safe_open
    with safe_open(path, framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        if "config" not in metadata:
            raise ValueError(f"{path}: no 'config' in the safetensors metadata (not a CamGeo checkpoint)")
        config = config_from_json(metadata["config"], path)
        prefix = weights + "."
        state = {key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}
    model = CamGeo(config).to(device)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} (prefix '{prefix}')")
    model_state = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} (model: {tuple(model_state[k].shape)})" for k, v in state.items()
                  if v.shape != model_state[k].shape]
    if mismatched:
        raise ValueError(f"{path}: checkpoint shapes do not match the model: {', '.join(mismatched[:4])}"
                         f"{' ...' if len(mismatched) > 4 else ''} (made by an older version of camgeo.py?)")
    model.load_state_dict(state)
    model.eval()
    info = {"config": config, "method": metadata.get("method", "sparse"), "step": int(metadata.get("step", 0)),
            "options": json.loads(metadata.get("options", "{}"))}
    return model, info


def config_to_json(config):
    return json.dumps(asdict(config))


def config_from_json(text, path):
    """CamGeoConfig from a checkpoint's metadata; a field missing or unknown is named, never silently defaulted
    or passed to the dataclass (whose TypeError would not say which checkpoint, or what to do)."""
    saved = json.loads(text)
    fields = set(CamGeoConfig.__dataclass_fields__)
    missing, unexpected = sorted(fields - set(saved)), sorted(set(saved) - fields)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint config does not match this camgeo.py: missing fields {missing}, "
                         f"unexpected fields {unexpected} (made by another version of camgeo.py? retrain it)")
    return CamGeoConfig(**saved)
