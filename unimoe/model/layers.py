"""Building blocks shared by the language model and the vision tower: RMSNorm and rotary embeddings.

They live apart from :mod:`unimoe.model.transformer` so the vision encoder can use them
without importing the whole language model (and the model can import the encoder).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unimoe.model.rope import rope_inv_freq


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 so bf16 activations do not lose range."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


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
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device=positions.device)  # [hd/2]
    angles = positions.float().unsqueeze(-1) * inv_freq  # [B, L, hd/2]
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin
