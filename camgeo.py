"""The CamGeo student: a small video diffusion transformer conditioned on an image, a prompt and sparse cameras.

Read top to bottom: config and presets, prompt -> tokens, the embedders, the DiT-style blocks, the
full-resolution heads (the reference's depth, the per-pixel copy), the model, then the diffusion (rectified flow)
training loss and the Euler sampler with classifier-free guidance, and finally the checkpoint loader used by
sample.py. What the model is told about the cameras (keyframes, Plücker maps, the plane sweep) is
conditioning.py; the CamGeo distillation, which trains this model with a teacher's reading of its predictions,
is distill.py.

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

from conditioning import (CAMERA_CHANNELS, GRID_CHANNELS, NUM_PLANES, PLANE_DEPTH_CHANNELS,
                          reference_candidates)

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
    # the full-resolution heads: channels per pixel the transformer hands them, the widths of CopyHead and DepthHead
    pixel_features: int = 16
    pixel_head_width: int = 32
    depth_head_width: int = 64
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
# A share of the times is drawn uniformly so the last steps of the sampler (t = 0.04, 0.08, ...), which
# logit-normal(0, 1) almost never draws (1.4% of its draws fall below t = 0.1), are trained too.
UNIFORM_TIME_FRACTION = 0.3
# Weight of the depth head's L1 error (inverse depth in the poses' unit, typically 0.1-2) beside the clean-video
# loss (a mean square error near 0.02 in [-1, 1] units once trained): large enough that depth is learnt early.
DEPTH_LOSS_WEIGHT = 0.1
# The network outputs the clean video x0_hat and the velocity is derived from it, v_hat = (x_t - x0_hat) / t
# ("x-prediction", as in Li & He's JiT): in pixel space a 4x4x3 patch of pure noise is hard to pass through the
# transformer, a clean patch is not. The loss is on the clean video, |x0_hat - x0|^2, which is the velocity
# loss |v_hat - v|^2 weighted by t^2: the plain velocity loss weighs a sample by 1/t^2, so near-clean samples,
# where the camera hardly matters, would outweigh the noisy ones, where it decides the layout, by 100 to 1.
TIMESTEP_FREQUENCY_SCALE = 1000.0  # t in [0, 1] is scaled like DiT's integer steps before the sinusoid
# CopyHead's starting logit for the rotation-only warp (every other choice starts at 0): softmax weight 0.69
# among the NUM_PLANES + 2 choices, so a new model starts near that warp yet every choice gets gradient.
COPY_START_LOGIT = 3.0

# -----------------------------------------------------------------------------
# prompts


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
        # shift, scale and gate for each of the three sub-layers
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * 3 * width))

    def forward(self, x, c):  # x (B, F, N, D), c (B, D)
        B, num_frames, N, D = x.shape
        mod = self.adaLN_modulation(c)[:, None, None, :].chunk(3 * 3, dim=-1)  # 9 x (B, 1, 1, D)
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


class DepthHead(nn.Module):
    """The reference's inverse depth, in the unit of the poses (translation_scale), from the transformer's
    per-pixel features of frame 0 and the reference image: four 3x3 convolutions, the middle two dilated (2, 4) so
    that each pixel sees 15 pixels around it, and a softplus (inverse depth is never negative). Trained against the
    true depth where the data has it (training_losses); at sampling it is the student's own reading of the image
    and poses, never the teacher's or a true depth."""

    def __init__(self, feature_channels, width):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(feature_channels + 3, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.SiLU(),
                                 nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, features, reference):  # (B, C, H, W), (B, 3, H, W) -> (B, H, W)
        return F.softplus(self.net(torch.cat([features, reference], dim=1)))[:, 0]


def depth_test(inverse_depth, camera, camera_drop=None):
    """Where each plane of the sweep lies against the depth the student reads in the reference: for each pixel of
    each frame and each plane, the inverse depth read at the point where the plane meets the reference image minus
    the plane's own inverse depth seen from the reference. Negative: the plane's point is in front of the surface
    the reference sees there; positive: behind it; 0 on the plane holding that surface (the backward-warping
    depth test). inverse_depth (B, H, W); camera from camera_conditioning -> (B, F, NUM_PLANES, H, W), 0 where
    the camera is dropped."""
    B, num_frames, _, H, W = camera.shape
    grids = camera[:, :, GRID_CHANNELS].reshape(B * num_frames * NUM_PLANES, 2, H, W).permute(0, 2, 3, 1)
    depths = inverse_depth[:, None, None, None].expand(-1, num_frames, NUM_PLANES, 1, H, W).reshape(-1, 1, H, W)
    read = F.grid_sample(depths, grids, mode="bilinear", padding_mode="border", align_corners=False)
    signed = read.view(B, num_frames, NUM_PLANES, H, W) - camera[:, :, PLANE_DEPTH_CHANNELS]
    if camera_drop is None:
        return signed
    return signed * ~camera_drop[:, None, None, None, None]


def reference_on_surface(reference, camera, depth_tests, camera_drop=None):
    """The reference seen from each frame through the depth the student reads in it: a backward warp by ray
    marching over the sweep. Along each pixel's ray, from the nearest plane towards infinity, the first pair of
    planes where depth_test turns from in front (<= 0) to behind (> 0) brackets the surface the ray meets first;
    the point where depth_test is 0, interpolated linearly between the two planes' grids, is where that surface
    lies in the reference. A ray with no such pair takes the plane that agrees best.

    Why: the planes alone quantise depth to NUM_PLANES steps, which costs 2 dB on co-visible pixels even when the
    true depth chooses among them; marching through the true depth comes within 1.5 dB of the reprojection through
    it (RESULTS.md). The marched point moves with the depth read, so the depth head also learns from the video loss.
    reference (B, 3, H, W); camera from camera_conditioning; depth_tests (B, F, NUM_PLANES, H, W) from depth_test
    (the model computes it once for this and for CopyHead) -> (the moved reference (B, F, 3, H, W), the reference
    itself where the camera is dropped; seen (B, F, H, W) bool: the ray met the surface at a point inside the
    reference's view, so that by this depth the reference shows the pixel; False where the camera is dropped)."""
    B, num_frames, _, H, W = camera.shape
    grids = camera[:, :, GRID_CHANNELS].unflatten(2, (NUM_PLANES, 2))  # (B, F, NUM_PLANES, 2, H, W)
    # planes are ordered from infinity (0) inwards
    best = depth_tests.abs().argmin(dim=2)  # (B, F, H, W)
    grid = grids.gather(2, best[:, :, None, None].expand(-1, -1, 1, 2, -1, -1))[:, :, 0]  # (B, F, 2, H, W)
    found = torch.zeros_like(best, dtype=torch.bool)
    for near in range(NUM_PLANES - 1, 0, -1):  # the nearer plane of each pair, nearest pair first
        in_front, behind = depth_tests[:, :, near], depth_tests[:, :, near - 1]
        crossing = (in_front <= 0) & (behind > 0) & ~found
        # the gap is < 0 at a crossing; clamped elsewhere so the unused branch has a finite gradient
        fraction = (in_front / (in_front - behind).clamp(max=-1e-6)).clamp(0, 1)[:, :, None]
        between = grids[:, :, near] + fraction * (grids[:, :, near - 1] - grids[:, :, near])
        grid = torch.where(crossing[:, :, None], between, grid)
        found = found | crossing
    references = reference[:, None].expand(-1, num_frames, -1, -1, -1).reshape(-1, 3, H, W)
    moved = F.grid_sample(references, grid.flatten(0, 1).permute(0, 2, 3, 1), mode="bilinear",
                          padding_mode="border", align_corners=False).view(B, num_frames, 3, H, W)
    seen = found & (grid.abs() <= 1).all(dim=2)
    if camera_drop is None:
        return moved, seen
    dropped = camera_drop[:, None, None, None, None]
    return torch.where(dropped, reference[:, None], moved), seen & ~dropped[:, :, 0]


class CopyHead(nn.Module):
    """The denoiser's output at full resolution where the reference does not show the pixel (by the depth the
    model reads; elsewhere CamGeo.forward copies the marched reference): per pixel, a choice among what can be
    copied, and a colour of its own for what cannot.

    Candidates (all (N, 3, H, W)): the reference on each plane of the sweep (reference_candidates), the reference
    through the depth the model reads in it (reference_on_surface) and a generated colour (the rotation-only warp
    plus a change). Three 3x3 convolutions over the transformer's per-pixel features, x_t, the copies, how well
    each copy matches x_t, how well each plane agrees with the depth the model reads in the reference
    (|depth_test|), and t give one logit per candidate and the change; x0_hat is the softmax-weighted sum of the
    candidates.

    Why a choice and not a colour: a copy from the right depth shows the reference's texture exactly, which a
    network of this size trained for minutes cannot paint; choosing is a per-pixel decision it can learn. How well
    each copy matches x_t (the mean of |x_t - (1 - t) copy| over a 3x3 window) is the plane-sweep stereo cost: once
    x_t holds the layout, the right copy is the one it agrees with. x_t itself is not a candidate: copying it
    carries its noise into every later step of the sampler (RESULTS.md: noisy samples).
    The last convolution starts at zero with the warp's logit ahead (COPY_START_LOGIT): a new model, whose depth
    head has learnt nothing yet, copies the rotation-only warp, and learns where another copy or its own colour
    does better.
    """

    def __init__(self, feature_channels, width):
        super().__init__()
        self.num_copies = NUM_PLANES + 1  # the planes and the reference through the depth read in it
        self.num_choices = self.num_copies + 1  # and the generated colour
        # features, x_t, copies, how well each copy matches x_t, how well each plane agrees with the depth, t
        in_channels = feature_channels + 3 + 4 * self.num_copies + NUM_PLANES + 1
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, self.num_choices + 3, 3, padding=1))

    def forward(self, features, x_t, copies, depth_costs, t):
        """features (N, C, H, W), x_t (N, 3, H, W), copies (N, NUM_PLANES + 1, 3, H, W): the planes, then the
        reference through the depth read in it; depth_costs (N, NUM_PLANES, H, W) = |depth_test|, t (N,) ->
        x0_hat (N, 3, H, W)."""
        N, _, H, W = x_t.shape
        t_map = t[:, None, None, None].to(x_t.dtype)  # (N, 1, 1, 1)
        costs = F.avg_pool2d((x_t[:, None] - (1 - t_map[:, None]) * copies).abs().mean(2), 3, stride=1, padding=1,
                             count_include_pad=False)  # (N, NUM_PLANES + 1, H, W)
        out = self.net(torch.cat([features, x_t, copies.flatten(1, 2), costs, depth_costs, t_map.expand(-1, 1, H, W)],
                                 dim=1))
        weights = out[:, :self.num_choices].softmax(dim=1)  # (N, NUM_PLANES + 2, H, W)
        generated = copies[:, 0] + out[:, self.num_choices:]
        candidates = torch.cat([copies, generated[:, None]], dim=1)  # (N, NUM_PLANES + 2, 3, H, W)
        return (weights[:, :, None] * candidates).sum(dim=1)


class CamGeo(nn.Module):
    """Denoiser x0_hat(x_t, t | reference image, prompt, cameras) on videos in [-1, 1]; training_losses and
    sample turn it into the rectified-flow velocity.

    Inputs per frame: the noisy frame, the clean reference image (SVD-style: every frame sees the reference at
    every pixel, so copying its content is a local operation) and the reference on each plane of the sweep
    (reference_candidates), concatenated channel-wise and patchified to tokens; camera tokens from the Plücker
    maps and the sweep's grids are added on top; fixed sin-cos position embeddings for the patch (2D) and the frame
    (1D). Diffusion time + prompt form the adaLN condition c. The tokens are unpatchified to per-pixel features;
    DepthHead reads the reference's inverse depth from frame 0's. Where, by that depth, the reference shows the
    pixel, x0_hat is the reference marched through it; elsewhere CopyHead chooses per pixel among the planes and
    that marched reference (helped by how well each matches x_t and agrees with the depth) or paints a colour of
    its own.

    Why copy: most of each frame of a static scene under a moving camera is the reference seen from elsewhere,
    and turning a ray map into "move this content by so many pixels" is a warp a 2 M-parameter network trained
    for minutes does not discover (RESULTS.md: with Plücker maps alone the samples ignore the camera). The sweep
    hands it that warp at every depth it may need; which depth, per pixel, is what it learns, and its capacity
    goes to what the reference cannot show. The Plücker maps stay the paper's camera input, and the distillation
    reads x0_hat as before.

    Why copy without a choice where the reference shows the pixel: a learned choice reads x_t, and during sampling
    x_t holds the sampler's own guesses, which the choice then keeps: with the choice at every pixel, the marched
    reference alone scores 26.7-27.0 dB on co-visible pixels at every step of the sampler while the mixture falls
    from 26.8 to 25.8 (RESULTS.md). The depth still learns from the video loss through the march.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        D, p = config.width, config.patch_size
        if config.image_size % p:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {p}")
        self.grid_size = config.image_size // p
        # RGB of the noisy frame, the reference and the reference on each plane of the sweep
        self.frame_embedder = nn.Conv2d(3 * (2 + NUM_PLANES), D, kernel_size=p, stride=p)
        self.camera_embedder = CameraEmbedder(p, D, config.camera_drop_prob)
        self.t_embedder = TimestepEmbedder(D)
        self.text_embedder = TextEmbedder(config.text_vocab_size, D, config.text_drop_prob)
        # fixed, not learned: extends to other clip lengths without new weights, and keeps checkpoints small
        self.register_buffer("spatial_pos", sincos_2d(self.grid_size, D), persistent=False)  # (h*w, D)
        self.blocks = nn.ModuleList([Block(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.final_layer = FinalLayer(D, p, config.pixel_features)
        self.depth_head = DepthHead(config.pixel_features, config.depth_head_width)
        self.copy_head = CopyHead(config.pixel_features, config.pixel_head_width)
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
        # (a new block cannot disturb the signal until it has learnt something); the copy head's last convolution
        # starts at zero (with the warp's logit ahead) so the first prediction is near the rotation-only warp.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.copy_head.net[-1].weight)
        nn.init.zeros_(self.copy_head.net[-1].bias)
        with torch.no_grad():
            self.copy_head.net[-1].bias[0] = COPY_START_LOGIT

    def forward(self, x_t, t, reference, prompts, camera, force_drop=None, camera_drop=None, with_depth=False):
        """x_t (B, F, 3, H, W) and reference (B, 3, H, W) in [-1, 1]; t (B,); prompts list of B strings;
        camera (B, F, CAMERA_CHANNELS, H, W) from camera_conditioning; force_drop (B,) bool drops text and camera
        together; camera_drop (B,) bool: which cameras are dropped, if the caller has drawn it (training_losses
        does, so that the distillation knows which clips had no camera), else drawn here.
        Returns the predicted clean video x0_hat (B, F, 3, H, W) in [-1, 1] units, and with with_depth the
        reference's inverse depth the model read (B, H, W) too."""
        B, num_frames, _, H, W = x_t.shape
        p, D = self.config.patch_size, self.config.width
        if camera_drop is None:
            camera_drop = drop_decisions(B, self.camera_embedder.drop_prob, self.training, force_drop, x_t.device)
        references = reference[:, None].expand(-1, num_frames, -1, -1, -1)  # (B, F, 3, H, W)
        planes = reference_candidates(reference, camera, camera_drop)  # (B, F, NUM_PLANES, 3, H, W)
        frames = torch.cat([x_t, references, planes.flatten(2, 3)], dim=2)  # (B, F, 3 * (2 + NUM_PLANES), H, W)
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
        inverse_depth = self.depth_head(features.view(B, num_frames, C, H, W)[:, 0], reference)  # (B, H, W)
        depth_tests = depth_test(inverse_depth, camera, camera_drop)  # (B, F, NUM_PLANES, H, W)
        surface, seen = reference_on_surface(reference, camera, depth_tests, camera_drop)  # (B, F, 3, H, W)
        copies = torch.cat([planes, surface[:, :, None]], dim=2)  # (B, F, NUM_PLANES + 1, 3, H, W)
        x0_hat = self.copy_head(features, x_t.flatten(0, 1), copies.flatten(0, 1), depth_tests.abs().flatten(0, 1),
                                t.repeat_interleave(num_frames)).view(B, num_frames, 3, H, W)
        x0_hat = torch.where(seen[:, :, None], surface, x0_hat)  # copy what the reference shows, as it shows it
        return (x0_hat, inverse_depth) if with_depth else x0_hat

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# diffusion: rectified flow


def sample_time(batch_size, generator=None):
    """(B,) training times: logit-normal, except a UNIFORM_TIME_FRACTION of them drawn uniformly in (0, 1)."""
    normal = torch.randn(batch_size, generator=generator)
    uniform = torch.rand(batch_size, generator=generator)
    pick_uniform = torch.rand(batch_size, generator=generator) < UNIFORM_TIME_FRACTION
    return torch.where(pick_uniform, uniform, torch.sigmoid(LOGIT_NORMAL_MEAN + LOGIT_NORMAL_STD * normal))


def training_losses(model, video, prompts, camera, generator=None, reference_depth_target=None):
    """Rectified flow (flow matching) on video (B, F, 3, H, W) in [0, 1], frame 0 being the reference image.

    x_t = (1 - t) x0 + t eps,  target velocity v = eps - x0,  v_hat = (x_t - x0_hat) / t from the network's
    clean video x0_hat (so x0_hat = x_t - t v_hat exactly),  loss = t^2 |v_hat - v|^2 = |x0_hat - x0|^2 (mean).
    x0_hat is returned with gradients (in [0, 1] units, unclamped) because the geometry distillation looks at it,
    and camera_drop (B,) bool marks the clips whose camera was dropped for guidance (nothing for the distillation
    to follow there).
    Returns dict(loss, x0_pred, t, x_t, v_pred, camera_drop).
    """
    x0 = video * 2 - 1
    reference = x0[:, 0]
    B = x0.shape[0]
    t = sample_time(B, generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t_ = t.view(B, 1, 1, 1, 1)
    x_t = (1 - t_) * x0 + t_ * noise
    force_drop = None
    config = getattr(model, "module", model).config  # the model itself, or the one DistributedDataParallel wraps
    if model.training and config.joint_drop_prob > 0:
        force_drop = torch.rand(B, generator=generator).to(x0.device) < config.joint_drop_prob
    camera_drop = drop_decisions(B, config.camera_drop_prob, model.training, force_drop, x0.device)
    x0_pred, inverse_depth = model(x_t, t, reference, prompts, camera, force_drop, camera_drop, with_depth=True)
    v_pred = (x_t - x0_pred) / t_
    loss = (x0_pred - x0).pow(2).mean()  # = mean of t^2 |v_pred - (eps - x0)|^2
    loss_depth = loss.new_zeros(())
    if reference_depth_target is not None:
        loss_depth = (inverse_depth - reference_depth_target).abs().mean()
    return {"loss": loss + DEPTH_LOSS_WEIGHT * loss_depth, "loss_flow": loss, "loss_depth": loss_depth,
            "x0_pred": (x0_pred + 1) / 2, "t": t, "x_t": x_t, "v_pred": v_pred, "camera_drop": camera_drop}


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
