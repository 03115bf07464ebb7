"""The dense SwiGLU feed-forward block and its weight layout.

Layout (shared by the dense FFN, every routed expert and every shared expert, so that
upcycling a dense FFN into experts is a slice, not a reshuffle):

* ``gate_up_proj``: [2, F, D] -- ``[0]`` is the gate projection, ``[1]`` the up projection,
  each in ``nn.Linear`` orientation (out x in).
* ``down_proj``:    [D, F]    -- ``nn.Linear`` orientation.
* ``y = down_proj @ (silu(gate_up_proj[0] @ x) * (gate_up_proj[1] @ x))``.

Expert stacks add a leading expert dim: ``gate_up_proj`` [E, 2, F, D], ``down_proj``
[E, D, F]. Because SwiGLU is a sum over independent intermediate units, splitting F into
k pieces ``[j*F/k, (j+1)*F/k)`` -- ``gate_up_proj[:, piece]`` keeps each piece's gate and up
rows together, ``down_proj[:, piece]`` the matching columns -- gives k experts whose
outputs add up exactly to the dense output (:func:`split_swiglu`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def swiglu(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """x [..., D], gate_up_proj [2, F, D], down_proj [D, F] -> [..., D]."""
    two, f, d = gate_up_proj.shape
    h = F.linear(x, gate_up_proj.reshape(two * f, d))  # [..., 2F]: gate units then up units
    gate, up = h.split(f, dim=-1)
    return F.linear(F.silu(gate) * up, down_proj)


def init_swiglu_(gate_up_proj: Tensor, down_proj: Tensor) -> None:
    """nn.Linear's default init per matrix: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    d, f = down_proj.shape[-2], down_proj.shape[-1]
    with torch.no_grad():
        gate_up_proj.uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d))
        down_proj.uniform_(-1 / math.sqrt(f), 1 / math.sqrt(f))


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN (the dense specialists' FFN), same layout as one routed expert.

    ``forward`` returns ``(y, None)`` so a transformer block treats a dense FFN and an
    :class:`~unimoe.moe.layer.MoELayer` (which returns ``(y, RoutingInfo)``) the same way.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        if hidden_size <= 0 or intermediate_size <= 0:
            raise ValueError(f"SwiGLU sizes must be positive, got hidden={hidden_size}, intermediate={intermediate_size}")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(2, intermediate_size, hidden_size))  # [2, F, D]
        self.down_proj = nn.Parameter(torch.empty(hidden_size, intermediate_size))  # [D, F]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_swiglu_(self.gate_up_proj, self.down_proj)

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, task_ids: Tensor | None = None, *, stats: str = "full"
    ) -> tuple[Tensor, None]:
        """x [B, L, D] -> ([B, L, D], None); mask, task ids and stats mode are accepted and unused."""
        w1, w2 = self.gate_up_proj, self.down_proj
        if w1.dtype != x.dtype:
            w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
        return swiglu(x, w1, w2), None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"


def split_swiglu(gate_up_proj: Tensor, down_proj: Tensor, pieces: int) -> list[tuple[Tensor, Tensor]]:
    """Split one SwiGLU [2, F, D] / [D, F] into ``pieces`` experts along F (upcycling).

    Returns ``[(gate_up [2, F/k, D], down [D, F/k]), ...]``; the pieces' outputs sum to the
    dense output. Weight rescaling for a router's weights is the caller's choice.
    """
    f = gate_up_proj.shape[1]
    if pieces <= 0 or f % pieces:
        raise ValueError(f"cannot split intermediate size {f} into {pieces} equal pieces")
    size = f // pieces
    return [
        (gate_up_proj[:, j * size : (j + 1) * size].clone(), down_proj[:, j * size : (j + 1) * size].clone())
        for j in range(pieces)
    ]
