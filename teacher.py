"""VGGT in plain torch: the frozen geometry teacher that CamGeo distils from.

VGGT (Wang et al., CVPR 2025) reads a set of frames and returns, per frame, a camera (pose encoding
absT_quaR_FoV), a depth map and a point map, each with a confidence. CamGeo only ever runs it frozen,
on the video its denoiser predicts, inside the training losses; how CamGeo reads it (cameras, depth at the
student's resolution) is distill.teacher_geometry. Sampling never imports this file.

Read top to bottom:
  1. `VGGTConfig` and the presets `VGGT_1B` (the released checkpoint) and `SMALL_TEACHER` (ours).
  2. The layers: attention with 2D RoPE and QK-norm, the transformer block, the two patch
     embeddings (a strided conv, or DINOv2 with registers).
  3. `Aggregator`: alternating frame-wise / global attention over all frames' tokens.
  4. `CameraHead` (iterative refinement of the pose encoding) and `DPTHead` (depth and points).
  5. `VGGT`, `freeze`, `teacher_input_size`, `load_vggt`, `save_teacher`.
The small teacher is trained and evaluated by train_teacher.py.

Module and parameter names follow the official implementation (facebookresearch/vggt) so that its
state_dict loads unchanged; tests/test_teacher.py proves the outputs equal the official ones.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# -----------------------------------------------------------------------------
# Config and presets


@dataclass
class VGGTConfig:
    img_size: int = 518                  # training resolution; sizes the DINOv2 positional embedding
    patch_size: int = 14
    embed_dim: int = 1024                # token width C; the heads see 2C (frame and global outputs)
    depth: int = 24                      # number of frame/global block pairs
    num_heads: int = 16
    num_register_tokens: int = 4
    patch_embed: str = "dinov2"          # "dinov2" (ViT with registers) or "conv" (one strided conv)
    dino_depth: int = 24                 # DINOv2 blocks (only for patch_embed="dinov2")
    dino_num_heads: int = 16
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    dpt_features: int = 256
    dpt_out_channels: list = field(default_factory=lambda: [256, 512, 1024, 1024])
    dpt_intermediate_layer_idx: list = field(default_factory=lambda: [4, 11, 17, 23])
    mlp_ratio: float = 4.0
    rope_freq: float = 100.0             # RoPE base frequency used by VGGT
    init_values: float = 0.01            # layer-scale init of aggregator and camera-trunk blocks
    camera_iterations: int = 4           # refinement steps of the camera head
    gradient_checkpointing: bool = False  # recompute aggregator blocks in backward (training only)

    def __post_init__(self):
        if self.patch_embed not in ("conv", "dinov2"):
            raise ValueError(f"patch_embed must be 'conv' or 'dinov2', got {self.patch_embed!r}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim / num_heads must be a multiple of 4 (2D RoPE), got "
                             f"{self.embed_dim} / {self.num_heads}")
        if len(self.dpt_out_channels) != 4 or len(self.dpt_intermediate_layer_idx) != 4:
            raise ValueError("the DPT heads read exactly 4 layers: dpt_out_channels and "
                             "dpt_intermediate_layer_idx need 4 entries each")
        if not all(0 <= i < self.depth for i in self.dpt_intermediate_layer_idx):
            raise ValueError(f"dpt_intermediate_layer_idx {self.dpt_intermediate_layer_idx} must lie in "
                             f"0..{self.depth - 1}")


# The released facebook/VGGT-1B: DINOv2 ViT-L/14 with 4 registers, 24 alternating block pairs.
VGGT_1B = VGGTConfig()

# Ours: trained from scratch on 32x32 synthetic frames; patch 4 gives an 8x8 token grid per frame.
SMALL_TEACHER = VGGTConfig(
    img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=4, num_register_tokens=4,
    patch_embed="conv", dino_depth=0, dino_num_heads=0, camera_trunk_depth=2, camera_num_heads=4,
    dpt_features=16, dpt_out_channels=[16, 32, 64, 64], dpt_intermediate_layer_idx=[0, 1, 2, 3],
)

# VGGT normalises [0, 1] images with the ImageNet statistics inside the model.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# Layers


def rope_2d(x, pos, base_frequency):
    """2D rotary embedding. x: (B, heads, N, d); pos: (B, N, 2) integer (row, col).

    The first half of each head's channels rotates with the row, the second half with the column;
    within a half, channel i pairs with channel i + d/4 (rotate-half convention).
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / base_frequency ** (torch.arange(0, half, 2, device=x.device).float() / half)
    rotated = []
    for axis, part in enumerate(x.split(half, dim=-1)):
        angles = pos[..., axis].float()[..., None] * inv_freq  # (B, N, half/2)
        angles = torch.cat([angles, angles], dim=-1).to(x.dtype)[:, None]  # (B, 1, N, half)
        first, second = part.chunk(2, dim=-1)
        rotated.append(part * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin())
    return torch.cat(rotated, dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False, rope_freq=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # QK-norm: LayerNorm over each head's channels (keeps attention logits bounded).
        self.q_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope_freq = rope_freq

    def forward(self, x, pos=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_freq is not None and pos is not None:
            q, k = rope_2d(q, pos, self.rope_freq), rope_2d(k, pos, self.rope_freq)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, out_features=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with layer scale on both residual branches."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_value=0.01, qk_norm=False, rope_freq=None,
                 norm_eps=1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope_freq=rope_freq)
        self.ls1 = LayerScale(dim, init_value)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_value)

    def forward(self, x, pos=None):
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """One strided convolution: (N, 3, H, W) -> (N, H/p * W/p, C)."""

    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2Encoder(nn.Module):
    """DINOv2 ViT with register tokens; returns its normalised patch tokens (N, h*w, C).

    Its positional embedding is learnt for an img_size square grid and is resized to the input's
    grid: bicubic with antialias, to an exact size (DINOv2's interpolate_offset = 0 in VGGT).
    """

    def __init__(self, config):
        super().__init__()
        C, grid = config.embed_dim, config.img_size // config.patch_size
        self.patch_size = config.patch_size
        self.patch_embed = PatchEmbed(config.patch_size, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, C))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, C))
        self.mask_token = nn.Parameter(torch.zeros(1, C), requires_grad=False)  # unused; kept for the key layout
        # DINOv2 blocks: LayerNorm eps 1e-6, layer scale initialised at 1, no QK-norm, no RoPE.
        self.blocks = nn.ModuleList(
            Block(C, config.dino_num_heads, config.mlp_ratio, init_value=1.0, norm_eps=1e-6)
            for _ in range(config.dino_depth))
        self.norm = nn.LayerNorm(C, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def interpolated_pos_embed(self, h, w):
        grid = math.isqrt(self.pos_embed.shape[1] - 1)
        if h == w == grid:
            return self.pos_embed
        pos = self.pos_embed.float()
        patch_pos = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, C, grid, grid)
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", antialias=True)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1).to(self.pos_embed.dtype)

    def forward(self, x):
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)  # (N, h*w, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolated_pos_embed(h, w)
        registers = self.register_tokens.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)  # [cls, registers, patches]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.register_tokens.shape[1]:]

# -----------------------------------------------------------------------------
# Aggregator: alternating frame-wise and global attention


def first_frame_distinct(token, B, S):
    """(1, 2, n, C) learnt tokens -> (B*S, n, C): slot 0 for frame 0 of each clip, slot 1 for the rest.

    Frame 0 gets its own camera and register tokens, which is how VGGT knows which frame
    defines the world coordinate system.
    """
    first = token[:, :1].expand(B, 1, *token.shape[2:])
    others = token[:, 1:].expand(B, S - 1, *token.shape[2:])
    return torch.cat([first, others], dim=1).reshape(B * S, *token.shape[2:])


class Aggregator(nn.Module):
    """Images (B, S, 3, H, W) in [0, 1] -> per-layer tokens (B, S, P, 2C).

    Each frame becomes [camera, registers, patches]; then `depth` times: a frame block (attention
    within each frame) and a global block (attention across all frames of the clip). The output of
    layer i is the frame block's and the global block's output concatenated on channels.
    """

    def __init__(self, config, keep_layers):
        super().__init__()
        C = config.embed_dim
        self.config = config
        self.patch_embed = (PatchEmbed(config.patch_size, C) if config.patch_embed == "conv"
                            else DinoV2Encoder(config))

        def make_block():
            return Block(C, config.num_heads, config.mlp_ratio, init_value=config.init_values, qk_norm=True,
                         rope_freq=config.rope_freq)

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(config.depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(config.depth))
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, C) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, config.num_register_tokens, C) * 1e-6)
        self.patch_start_idx = 1 + config.num_register_tokens
        # Only the layers some head reads are kept (saves memory for the 24-layer model).
        self.keep_layers = set(keep_layers)

    def run_block(self, block, tokens, pos):
        if self.training and self.config.gradient_checkpointing:
            return checkpoint(block, tokens, pos, use_reentrant=False)
        return block(tokens, pos=pos)

    def forward(self, images):
        B, S, _, H, W = images.shape
        h, w = H // self.config.patch_size, W // self.config.patch_size
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
        images = ((images - mean) / std).reshape(B * S, 3, H, W)
        patch_tokens = self.patch_embed(images)  # (B*S, h*w, C)
        tokens = torch.cat([first_frame_distinct(self.camera_token, B, S),
                            first_frame_distinct(self.register_token, B, S), patch_tokens], dim=1)
        _, P, C = tokens.shape  # P = 1 + registers + h*w

        # RoPE positions: patches at (row + 1, col + 1); camera and register tokens all at (0, 0).
        rows, cols = torch.meshgrid(torch.arange(h, device=images.device), torch.arange(w, device=images.device),
                                    indexing="ij")
        patch_pos = torch.stack([rows.flatten(), cols.flatten()], dim=-1) + 1  # (h*w, 2)
        pos = torch.cat([patch_pos.new_zeros(self.patch_start_idx, 2), patch_pos])  # (P, 2)
        frame_pos = pos.expand(B * S, P, 2)
        global_pos = pos.expand(B, S, P, 2).reshape(B, S * P, 2)

        outputs = [None] * self.config.depth
        for i in range(self.config.depth):
            tokens = self.run_block(self.frame_blocks[i], tokens.reshape(B * S, P, C), frame_pos)
            frame_out = tokens.reshape(B, S, P, C)
            tokens = self.run_block(self.global_blocks[i], tokens.reshape(B, S * P, C), global_pos)
            if i in self.keep_layers:
                outputs[i] = torch.cat([frame_out, tokens.reshape(B, S, P, C)], dim=-1)  # (B, S, P, 2C)
        return outputs, self.patch_start_idx


# -----------------------------------------------------------------------------
# Camera head


class CameraHead(nn.Module):
    """Camera tokens of the last layer -> pose encodings, refined `iterations` times.

    Each iteration embeds the current estimate (a learnt "empty" pose at the start), uses it to
    modulate the normalised camera tokens (adaLN: shift, scale, gate), runs the trunk and adds the
    predicted delta. The estimate is detached between iterations, as in VGGT, so the gradient of
    iteration i's output flows through its own delta only.
    """

    def __init__(self, config):
        super().__init__()
        dim = 2 * config.embed_dim
        self.iterations = config.camera_iterations
        self.token_norm = nn.LayerNorm(dim)
        self.trunk = nn.Sequential(*[Block(dim, config.camera_num_heads, config.mlp_ratio,
                                           init_value=config.init_values)
                                     for _ in range(config.camera_trunk_depth)])
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, 9))
        self.embed_pose = nn.Linear(9, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim, dim // 2, 9)

    def forward(self, last_tokens):
        camera_tokens = self.token_norm(last_tokens[:, :, 0])  # (B, S, 2C)
        B, S, _ = camera_tokens.shape
        raw = None  # the estimate before activation, (B, S, 9)
        pose_enc_list = []
        for _ in range(self.iterations):
            if raw is not None:
                # VGGT detaches the running estimate itself, not only the copy fed to the modulation:
                # each iteration's output carries the gradient of its own delta alone.
                raw = raw.detach()
            estimate = self.empty_pose_tokens.expand(B, S, -1) if raw is None else raw
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(estimate)).chunk(3, dim=-1)
            x = camera_tokens + gate * (self.adaln_norm(camera_tokens) * (1 + scale) + shift)
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            raw = delta if raw is None else raw + delta
            # Translation and quaternion are linear; the two fields of view go through ReLU (> 0).
            pose_enc_list.append(torch.cat([raw[..., :7], F.relu(raw[..., 7:])], dim=-1))
        return pose_enc_list


# -----------------------------------------------------------------------------
# DPT head (dense prediction from four aggregator layers)


def uv_sincos_embedding(h, w, channels, aspect_ratio, dtype, device):
    """Sin-cos embedding of a (h, w) grid in aspect-aware, diagonal-normalised coordinates -> (channels, h, w).

    Coordinates span [-a, a] x [-b, b] with (a, b) = (ratio, 1) / sqrt(ratio^2 + 1), sampled at
    cell centres; half the channels encode x, half y, each as [sin, cos] with base frequency 100.
    """
    diagonal = (aspect_ratio ** 2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diagonal, 1.0 / diagonal
    xs = torch.linspace(-span_x * (w - 1) / w, span_x * (w - 1) / w, w, dtype=dtype, device=device)
    ys = torch.linspace(-span_y * (h - 1) / h, span_y * (h - 1) / h, h, dtype=dtype, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    quarter = channels // 4
    # Computed in float64, as the official code does, then cast back.
    omega = 1.0 / 100.0 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    parts = []
    for coord in (grid_x, grid_y):
        angles = coord.double()[..., None] * omega  # (h, w, channels/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1).to(dtype).permute(2, 0, 1)


class ResidualConvUnit(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x):
        # The official unit applies an in-place ReLU to its input, so the skip connection carries
        # relu(x), not x. Reproduced here on purpose: the released weights were trained that way.
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FeatureFusionBlock(nn.Module):
    """Add the skip feature (refined), refine the sum, upsample (bilinear, align_corners), 1x1 conv."""

    def __init__(self, features, has_residual=True):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x, skip=None, size=None):
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = size if size is not None else (2 * x.shape[-2], 2 * x.shape[-1])
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Tokens of four layers -> dense map with `output_dim - 1` channels and a confidence.

    Each tapped layer's patch tokens become a feature map at 4x, 2x, 1x and 1/2x the patch grid;
    fusion blocks merge them coarse to fine; the result is resized to the image and predicted.
    activation: "exp" (depth) or "inv_log" (points, sign(y) * (exp|y| - 1)); confidence 1 + exp.
    """

    FRAMES_PER_CHUNK = 8  # frames decoded at once: bounds memory at 518 pixels, no effect on values
    HEAD_HIDDEN = 32      # channels of the last 3x3 conv, fixed in VGGT
    POS_EMBED_RATIO = 0.1  # weight of the uv embedding added to feature maps

    def __init__(self, config, output_dim, activation):
        super().__init__()
        dim, features, out_channels = 2 * config.embed_dim, config.dpt_features, config.dpt_out_channels
        self.patch_size = config.patch_size
        self.layer_idx = list(config.dpt_intermediate_layer_idx)
        self.activation = activation
        self.norm = nn.LayerNorm(dim)
        self.projects = nn.ModuleList(nn.Conv2d(dim, oc, 1) for oc in out_channels)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
        ])
        # `scratch` is only a namespace, kept so parameter names match the released checkpoint.
        self.scratch = nn.Module()
        for i, oc in enumerate(out_channels):
            setattr(self.scratch, f"layer{i + 1}_rn", nn.Conv2d(oc, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, self.HEAD_HIDDEN, 3, padding=1), nn.ReLU(),
            nn.Conv2d(self.HEAD_HIDDEN, output_dim, 1))

    def add_pos_embed(self, x, aspect_ratio):
        embed = uv_sincos_embedding(x.shape[-2], x.shape[-1], x.shape[1], aspect_ratio, x.dtype, x.device)
        return x + self.POS_EMBED_RATIO * embed

    def decode(self, layers, H, W):
        """layers: four (N, h*w, 2C) patch-token tensors -> (N, output_dim, H, W) before activation."""
        h, w = H // self.patch_size, W // self.patch_size
        maps = []
        for i, x in enumerate(layers):
            x = self.norm(x).transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (N, 2C, h, w)
            x = self.add_pos_embed(self.projects[i](x), W / H)
            maps.append(self.resize_layers[i](x))  # (N, out_channels[i], 4h | 2h | h | h/2, ...)
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i + 1}_rn")(m) for i, m in enumerate(maps))
        x = s.refinenet4(l4, size=l3.shape[-2:])
        x = s.refinenet3(x, l3, size=l2.shape[-2:])
        x = s.refinenet2(x, l2, size=l1.shape[-2:])
        x = s.output_conv1(s.refinenet1(x, l1))  # (N, features/2, 8h, 8w)
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=True)
        return s.output_conv2(self.add_pos_embed(x, W / H))

    def forward(self, aggregated, patch_start_idx, H, W):
        B, S = aggregated[-1].shape[:2]
        chunks = []
        for start in range(0, S, self.FRAMES_PER_CHUNK):
            frames = slice(start, min(start + self.FRAMES_PER_CHUNK, S))
            layers = [aggregated[i][:, frames, patch_start_idx:].flatten(0, 1) for i in self.layer_idx]
            chunks.append(self.decode(layers, H, W).unflatten(0, (B, -1)))
        out = torch.cat(chunks, dim=1).permute(0, 1, 3, 4, 2)  # (B, S, H, W, output_dim)
        values, conf = out[..., :-1], 1 + out[..., -1].exp()
        if self.activation == "exp":
            values = values.exp()
        else:  # "inv_log"
            values = values.sign() * values.abs().expm1()
        return values, conf


# -----------------------------------------------------------------------------
# The model


class VGGT(nn.Module):
    """Frames -> cameras, depth maps and point maps (all relative to the first frame).

    forward(images (B, S, 3, H, W) or (S, 3, H, W) in [0, 1], H and W multiples of patch_size) -> dict:
      pose_enc (B, S, 9)            absT_quaR_FoV of the last refinement iteration
      pose_enc_list [(B, S, 9)] * camera_iterations
      depth (B, S, H, W, 1), depth_conf (B, S, H, W)
      world_points (B, S, H, W, 3), world_points_conf (B, S, H, W)   in frame 0's camera coordinates
    point_maps=False skips the point head (a fifth of the small teacher's forward pass), which distillation
    never reads; the dict then has no world_points keys.
    """

    def __init__(self, config=VGGT_1B):
        super().__init__()
        self.config = config
        keep = set(config.dpt_intermediate_layer_idx) | {config.depth - 1}
        self.aggregator = Aggregator(config, keep_layers=keep)
        self.camera_head = CameraHead(config)
        self.point_head = DPTHead(config, output_dim=4, activation="inv_log")
        self.depth_head = DPTHead(config, output_dim=2, activation="exp")

    def forward(self, images, point_maps=True):
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"VGGT expects images (B, S, 3, H, W) or (S, 3, H, W), got {tuple(images.shape)}")
        B, S, _, H, W = images.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"VGGT needs H and W divisible by the patch size {p}, got {H}x{W}")
        aggregated, patch_start_idx = self.aggregator(images)
        pose_enc_list = self.camera_head(aggregated[-1])
        depth, depth_conf = self.depth_head(aggregated, patch_start_idx, H, W)
        out = {"pose_enc": pose_enc_list[-1], "pose_enc_list": pose_enc_list, "depth": depth, "depth_conf": depth_conf}
        if point_maps:
            out["world_points"], out["world_points_conf"] = self.point_head(aggregated, patch_start_idx, H, W)
        return out


def freeze(model):
    """Teacher mode: eval (no checkpointing), no parameter gradients; gradients still reach the input."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def teacher_input_size(config, height, width):
    """Frames are stretched to width = img_size and the height that keeps the aspect ratio,
    rounded to a patch multiple (VGGT's own preprocessing keeps the width at 518)."""
    p = config.patch_size
    teacher_height = max(p, round(height * config.img_size / width / p) * p)
    return teacher_height, (config.img_size // p) * p


# -----------------------------------------------------------------------------
# Loading and saving checkpoints


def _name_keys(keys, shown=5):
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _read_checkpoint(path):
    """-> (state_dict, config dict or None). Any unreadable file becomes a ValueError naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as error:
            raise ValueError(f"{path} is not a readable safetensors checkpoint (truncated or not one): "
                             f"{str(error).splitlines()[0][:200]}") from None
        return state, json.loads(metadata["config"]) if "config" in metadata else None
    if path.endswith((".pt", ".pth")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path} is not a readable torch checkpoint (truncated or not one): "
                             f"{str(error).splitlines()[0][:200]}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} holds no state_dict (expected a dict of tensors or {{'model': ...}})")
        return state, None
    raise ValueError(f"{path}: unknown checkpoint format (expected .safetensors or .pt)")


def load_vggt(path, config=None):
    """Load a VGGT checkpoint in the official key layout (facebook/VGGT-1B or one saved here).

    Config: the file's metadata if it has one, else `config`, else the VGGT_1B preset.
    """
    state, file_config = _read_checkpoint(path)
    if file_config is not None:
        unknown = file_config.keys() - VGGTConfig.__dataclass_fields__.keys()
        if unknown:
            raise ValueError(f"{path}: config in metadata has unknown fields {sorted(unknown)}")
        config = VGGTConfig(**file_config)
    config = config or VGGT_1B
    # Build without allocating (the 1B model is 5 GB in float32), then adopt the file's tensors.
    with torch.device("meta"):
        model = VGGT(config)
    ours = model.state_dict()
    # The released checkpoint also holds the point-tracking head, which CamGeo does not use.
    track_keys = [k for k in state if k.startswith("track_head.")]
    if track_keys:
        print(f"load_vggt: skipping {len(track_keys)} track_head.* tensors (point tracking is not used)")
    theirs = {k: v for k, v in state.items() if not k.startswith("track_head.")}
    missing, unexpected = ours.keys() - theirs.keys(), theirs.keys() - ours.keys()
    if missing:
        raise ValueError(f"{path}: {len(missing)} missing keys: {_name_keys(missing)}")
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} unexpected keys: {_name_keys(unexpected)}")
    mismatched = [f"{k} {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}"
                  for k in ours if theirs[k].shape != ours[k].shape]
    if mismatched:
        raise ValueError(f"{path}: {len(mismatched)} shape mismatches (file vs model): {_name_keys(mismatched)}")
    # The teacher runs in float32; half-precision files are upcast.
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in theirs.items()},
                          assign=True)
    return model


def save_teacher(model, path, dtype=None):
    """Weights in the official key layout, with the config as JSON in the file's metadata.
    dtype (e.g. torch.float16) casts the stored weights; load_vggt upcasts them to float32 again."""
    from safetensors.torch import save_file
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"config": json.dumps(asdict(model.config))})
