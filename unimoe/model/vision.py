"""Video frames -> visual soft tokens in the language model's hidden space (for v2m).

Follows the shape of Qwen2.5-VL's vision tower, which the paper inherits: frames are cut
into ``temporal_patch x patch x patch`` tubelets, a pre-norm transformer with 2-D rotary
positions runs over the patches of each tubelet slice, and a projector merges each
``merge x merge`` block of neighbouring patches into one token of the LM's width. Qwen's
window attention is replaced by full attention inside each slice (same parameters, simpler).
At the paper's size (width 1280, depth 32, 16 heads, SwiGLU 3420, patch 14, merge 2) the
tower has the ~669M parameters the paper's 7.1B total counts.

Any module following :class:`VisionEncoder` can replace it through ``VISION_ENCODERS``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unimoe.model.layers import RMSNorm, rotate_half
from unimoe.registry import VISION_ENCODERS

# CLIP's pixel statistics, which Qwen2.5-VL's processor also uses.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionEncoder(nn.Module, ABC):
    """Base of pluggable frame encoders.

    ``forward(video [N, F, 3, H, W] float in [0, 1]) -> tokens [N, T_v, hidden_size]`` with
    ``T_v = num_tokens(F, H, W)``; ``num_tokens`` must depend on shapes only, because task
    builders lay out sequences without running the encoder. ``input_frames`` / ``input_size``
    (or None) say which frame count and ``(H, W)`` the builders resample videos to.
    """

    hidden_size: int
    input_frames: int | None = None
    input_size: tuple[int, int] | None = None

    @abstractmethod
    def num_tokens(self, num_frames: int, height: int, width: int) -> int: ...

    @abstractmethod
    def forward(self, video: Tensor) -> Tensor: ...


class _VisionAttention(nn.Module):
    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width, bias=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        n, s, w = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [n, h, s, hd]
        q, k = q * cos + rotate_half(q, 2) * sin, k * cos + rotate_half(k, 2) * sin
        y = F.scaled_dot_product_attention(q, k, v)  # full attention within a tubelet slice
        return self.proj(y.transpose(1, 2).reshape(n, s, w))


class _VisionMLP(nn.Module):
    """SwiGLU with biases, as in Qwen2.5-VL's vision blocks."""

    def __init__(self, width: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, intermediate, bias=True)
        self.up_proj = nn.Linear(width, intermediate, bias=True)
        self.down_proj = nn.Linear(intermediate, width, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _VisionBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.norm1 = RMSNorm(width, eps)
        self.attn = _VisionAttention(width, num_heads)
        self.norm2 = RMSNorm(width, eps)
        self.mlp = _VisionMLP(width, intermediate)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class FrameViT(VisionEncoder):
    """Tubelet ViT + patch-merging projector (defaults: a small CPU-friendly tower).

    ``hidden_size`` is the LM width (given by the model). ``F`` is padded to a multiple of
    ``temporal_patch_size`` by repeating the last frame; ``H`` and ``W`` must be multiples of
    ``patch_size * merge_size``. Tokens: ``ceil(F / tp) * (H / (p m)) * (W / (p m))``.
    """

    def __init__(
        self,
        hidden_size: int,
        width: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 256,
        patch_size: int = 8,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_size: int = 32,
        num_frames: int = 4,
        eps: float = 1e-6,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"vit: width {width} must be divisible by num_heads {num_heads}")
        head_dim = width // num_heads
        if head_dim % 4:
            raise ValueError(f"vit: head dim {head_dim} must be a multiple of 4 (2-D rotary: rows and columns)")
        if image_size % (patch_size * merge_size):
            raise ValueError(f"vit: image_size {image_size} must be a multiple of patch_size*merge_size={patch_size * merge_size}")
        self.hidden_size = hidden_size
        self.width, self.patch_size, self.temporal_patch_size, self.merge_size = width, patch_size, temporal_patch_size, merge_size
        self.input_frames, self.input_size = num_frames, (image_size, image_size)
        self.patch_embed = nn.Linear(3 * temporal_patch_size * patch_size * patch_size, width, bias=False)
        self.blocks = nn.ModuleList(_VisionBlock(width, num_heads, intermediate_size, eps) for _ in range(depth))
        merged = width * merge_size * merge_size
        self.merger_norm = RMSNorm(width, eps)
        self.merger = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, hidden_size))
        quarter = head_dim // 4
        inv_freq = 1.0 / rope_theta ** (torch.arange(quarter, dtype=torch.float32) / quarter)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 1, 3, 1, 1), persistent=False)

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        unit = self.patch_size * self.merge_size
        if height % unit or width % unit:
            raise ValueError(f"vit: frame size {height}x{width} must be a multiple of patch_size*merge_size={unit}")
        return math.ceil(num_frames / self.temporal_patch_size) * (height // unit) * (width // unit)

    def _rope(self, hp: int, wp: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos/sin ``[hp*wp, head_dim]``: first half of each head rotates by row, second by column."""
        rows = torch.arange(hp, device=device).repeat_interleave(wp).float()
        cols = torch.arange(wp, device=device).repeat(hp).float()
        fr = rows[:, None] * self.inv_freq  # [S, hd/4]
        fc = cols[:, None] * self.inv_freq
        angles = torch.cat([fr, fr, fc, fc], dim=-1)  # rotate_half(.., 2) pairs i with i + hd/4 in each half
        return angles.cos(), angles.sin()

    def forward(self, video: Tensor) -> Tensor:
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"vit: expected video [N, F, 3, H, W], got shape {tuple(video.shape)}")
        n, f, _, h, w = video.shape
        self.num_tokens(f, h, w)  # validates the frame size
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if f % tp:
            video = torch.cat([video, video[:, -1:].expand(n, tp - f % tp, 3, h, w)], dim=1)
        g, hp, wp = video.shape[1] // tp, h // p, w // p
        x = (video.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        x = x.view(n, g, tp, 3, hp, p, wp, p).permute(0, 1, 4, 6, 3, 2, 5, 7)  # [n, g, hp, wp, 3, tp, p, p]
        x = self.patch_embed(x.reshape(n * g, hp * wp, 3 * tp * p * p).to(self.patch_embed.weight.dtype))
        cos, sin = self._rope(hp, wp, x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)  # [n*g, hp*wp, width]
        x = self.merger_norm(x).view(n * g, hp // m, m, wp // m, m, self.width).transpose(2, 3)
        x = self.merger(x.reshape(n * g, (hp // m) * (wp // m), m * m * self.width))
        return x.reshape(n, g * (hp // m) * (wp // m), self.hidden_size)


def build_vision_encoder(spec, hidden_size: int) -> VisionEncoder:
    """Build a registered encoder (``"vit"``, ``{"name": "vit", "depth": 32, ...}``)."""
    enc = VISION_ENCODERS.build(spec, hidden_size=hidden_size)
    if not isinstance(enc, nn.Module) or not hasattr(enc, "num_tokens"):
        raise TypeError(f"vision encoder {type(enc).__name__} must be an nn.Module with num_tokens(); subclass VisionEncoder")
    return enc
