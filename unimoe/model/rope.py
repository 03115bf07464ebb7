"""Rotary position embeddings (RoPE), "split halves" convention.

``rope_cos_sin`` computes the angles of any positions; ``rope_table`` the same values for
``0 .. length - 1`` once, for a fixed-shape decoding cache to look up.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor, groups: int = 1) -> Tensor:
    """Within each of ``groups`` equal chunks of the last dim: ``(a, b) -> (-b, a)``.

    The "split halves" rotary convention of GPT-NeoX/LLaMA/Qwen (not interleaved pairs), so
    weights from those models keep their meaning. ``groups=2`` serves 2-D (row, column) rotary.
    """
    x = x.unflatten(-1, (groups, 2, x.shape[-1] // (2 * groups)))
    return torch.cat([-x[..., 1, :], x[..., 0, :]], dim=-1).flatten(-2)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``positions [B, L]`` -> ``cos, sin [B, 1, L, head_dim]`` (computed per call: no length limit).

    ``sin`` carries the sign of the rotation (``-sin`` on the first half, ``+sin`` on the second),
    so :func:`apply_rope` is ``x * cos + roll(x) * sin``: one roll instead of two slices, a
    negation and a cat, with the same values as ``x * cos + rotate_half(x) * |sin|``.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq  # [B, L, hd/2]
    sin = angles.sin()
    cos = torch.cat([angles.cos()] * 2, dim=-1).unsqueeze(1)
    return cos.to(dtype), torch.cat([-sin, sin], dim=-1).unsqueeze(1).to(dtype)


def rope_table(length: int, head_dim: int, theta: float, *, dtype: torch.dtype, device=None) -> tuple[Tensor, Tensor]:
    """``cos, sin [length, head_dim]`` of positions ``0 .. length - 1`` (the values :func:`rope_cos_sin` gives)."""
    cos, sin = rope_cos_sin(torch.arange(length, device=device).unsqueeze(0), head_dim, theta, dtype)
    return cos[0, 0], sin[0, 0]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [..., hd]`` by the angles of :func:`rope_cos_sin` (``sin`` signed)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
