"""Low-rank experts: many cheap experts beside the full SwiGLU ones (an expert group)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from unimoe.moe.experts import ExpertGroup
from unimoe.moe.grouped import grouped_mm


class LowRankExperts(ExpertGroup):
    """``num_experts`` experts ``y = up_e @ silu(down_e @ x)`` of rank ``rank``.

    Weights are stacked like unimoe's SwiGLU experts (nn.Linear orientation):
    ``down_proj`` [E, r, D], ``up_proj`` [E, D, r]. Rows arrive sorted by expert with
    per-expert counts, so each projection is one grouped GEMM.
    """

    def __init__(self, hidden_size: int, num_experts: int, rank: int = 16, grouped_mm: str = "auto") -> None:
        super().__init__(num_experts)
        if rank <= 0:
            raise ValueError(f"LowRankExperts.rank must be >= 1, got {rank}")
        self.rank, self.impl = rank, grouped_mm
        self.down_proj = nn.Parameter(torch.empty(num_experts, rank, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, rank))
        with torch.no_grad():
            self.down_proj.uniform_(-1 / math.sqrt(hidden_size), 1 / math.sqrt(hidden_size))
            self.up_proj.uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank))

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        h = grouped_mm(x, self.down_proj.to(x.dtype).transpose(1, 2), offsets, impl=self.impl, exact_rows=True)  # [N, r]
        return grouped_mm(torch.nn.functional.silu(h), self.up_proj.to(x.dtype).transpose(1, 2), offsets,
                          impl=self.impl, exact_rows=True)  # [N, D]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, rank={self.rank}"
