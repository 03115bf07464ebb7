"""Building blocks shared by the language model and the vision tower: RMSNorm and rotary embeddings.

They live apart from :mod:`unimoe.model.transformer` so the vision encoder can use them
without importing the whole language model (and the model can import the encoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unimoe.model.rope import rope_inv_freq


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 so bf16 activations do not lose range."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # no casts to dispatch
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotate_half(x: Tensor, groups: int = 1) -> Tensor:
    """Within each of ``groups`` equal chunks of the last dim: ``(a, b) -> (-b, a)``.

    The "split halves" rotary convention of GPT-NeoX/LLaMA/Qwen (not interleaved pairs), so
    weights from those models keep their meaning. ``groups=2`` serves 2-D (row, column) rotary.
    """
    x = x.unflatten(-1, (groups, 2, x.shape[-1] // (2 * groups)))
    return torch.cat([-x[..., 1, :], x[..., 0, :]], dim=-1).flatten(-2)


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """``positions [B, L]`` -> ``cos, sin [B, 1, L, head_dim]`` (computed per call: no length limit).

    ``scaling``: a pretrained LM's RoPE scaling (:func:`unimoe.model.rope.rope_inv_freq`).
    ``sin`` carries the sign of the rotation (``-sin`` on the first half, ``+sin`` on the second),
    so :func:`apply_rope` is ``x * cos + roll(x) * sin``: one roll instead of two slices, a
    negation and a cat, with the same values as ``x * cos + rotate_half(x) * |sin|``.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device=positions.device)  # [hd/2]
    angles = positions.float().unsqueeze(-1) * inv_freq  # [B, L, hd/2]
    sin = angles.sin()
    cos = torch.cat([angles.cos()] * 2, dim=-1).unsqueeze(1)
    return cos.to(dtype), torch.cat([-sin, sin], dim=-1).unsqueeze(1).to(dtype)


def rope_table(
    length: int, head_dim: int, theta: float, *, dtype: torch.dtype, device=None, scaling: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """``cos, sin [length, head_dim]`` of positions ``0 .. length - 1`` (the values :func:`rope_cos_sin` gives),
    for a fixed-shape decoding cache to look up."""
    cos, sin = rope_cos_sin(torch.arange(length, device=device).unsqueeze(0), head_dim, theta, dtype, scaling)
    return cos[0, 0], sin[0, 0]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [..., hd]`` by the angles of :func:`rope_cos_sin` (``sin`` signed)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
