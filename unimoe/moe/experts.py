"""Expert groups: contiguous blocks of a layer's dynamic experts, and the shared experts.

A layer's dynamic experts are a list of groups, e.g. ``SwiGLUExperts(num_experts=8)``
then ``NullExperts(num_experts=1)``: experts 0-7 then 8. The dispatcher sorts
(token, expert) pairs by expert and hands each group its contiguous slice of rows with
the per-expert counts, so a new expert type is one registered :class:`ExpertGroup`, not
an edit of the dispatcher. A group with ``takes_tokens = False`` (null experts) is never
given rows: it outputs zero by definition and costs nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unimoe.moe.ffn import init_swiglu_, swiglu
from unimoe.moe.grouped import GROUPED_IMPLS, GroupedImpl, grouped_mm
from unimoe.registry import EXPERTS


class ExpertGroup(nn.Module):
    """Base class of expert groups (register subclasses in ``unimoe.registry.EXPERTS``).

    Subclasses set ``num_experts`` and implement :meth:`forward`. ``takes_tokens = False``
    declares zero-output experts that the dispatcher skips entirely.
    """

    takes_tokens: bool = True
    supports_small_batch: bool = False
    """True when :meth:`expert_forward` and :meth:`all_experts_forward` are implemented (the
    decoding paths of :mod:`unimoe.moe.small_batch`); otherwise the grouped path is always used."""
    expert_parallel: bool = False
    """True: every parameter stacks the experts on dim 0 and forward reads it through
    :func:`local_experts`, so the group can be split over EP ranks (unimoe.moe.expert_parallel)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        if num_experts <= 0:
            raise ValueError(f"{type(self).__name__}: num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """x [N, D] rows sorted by local expert, counts [E_g] long (sums to N) -> [N, D].

        Rows of expert ``e`` are ``x[counts[:e].sum() : counts[:e+1].sum()]``. Every
        parameter must take part even when all counts are zero, so that DDP sees a
        gradient (possibly zero) for it every step.
        """
        raise NotImplementedError

    def expert_forward(self, x: Tensor, expert: int) -> Tensor:
        """Local expert ``expert`` on every row: ``x [T, D]`` -> ``[T, D]``."""
        raise NotImplementedError(f"{type(self).__name__} has no single-expert path")

    def all_experts_forward(self, x: Tensor) -> Tensor:
        """Every expert on every row: ``x [T, D]`` -> ``[E_g, T, D]``."""
        raise NotImplementedError(f"{type(self).__name__} has no all-experts path")


def local_experts(param: Tensor) -> Tensor:
    """This rank's experts of a stacked expert parameter: the local shard of a DTensor, else itself.

    Under expert parallelism the parameter is a DTensor sharded on dim 0 over the EP ranks and
    the grouped GEMM runs on the rows this rank received, so it reads the local shard
    (``to_local`` is differentiable: the gradient lands on the DTensor). Without EP: a no-op.
    """
    to_local = getattr(param, "to_local", None)
    return to_local() if callable(to_local) else param


class SwiGLUExperts(ExpertGroup):
    """``num_experts`` SwiGLU experts with stacked weights, run as two grouped GEMMs.

    Weights (layout of :mod:`unimoe.moe.ffn`, plus a leading expert dim):
    ``gate_up_proj`` [E, 2, F, D], ``down_proj`` [E, D, F]. Gate and up are one GEMM.
    Under expert parallelism the weights are sharded on dim 0 and ``forward`` gets rows of
    this rank's experts only.
    """

    supports_small_batch = True
    expert_parallel = True

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, grouped_mm: GroupedImpl = "auto"
    ) -> None:
        super().__init__(num_experts)
        if hidden_size <= 0 or intermediate_size <= 0:
            raise ValueError(f"SwiGLUExperts sizes must be positive, got hidden={hidden_size}, intermediate={intermediate_size}")
        if grouped_mm not in GROUPED_IMPLS:
            raise ValueError(f"SwiGLUExperts.grouped_mm must be one of {GROUPED_IMPLS}, got {grouped_mm!r}")
        self.hidden_size, self.intermediate_size, self.impl = hidden_size, intermediate_size, grouped_mm
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_swiglu_(self.gate_up_proj, self.down_proj)

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        gate_up_proj, down_proj = local_experts(self.gate_up_proj), local_experts(self.down_proj)
        e, _, f, d = gate_up_proj.shape
        offsets = counts.cumsum(0).to(torch.int32)  # [E] row ends
        # [E, 2F, D] -> [E, D, 2F] views: the kernel accepts transposed (column-major) weights.
        w_gate_up = gate_up_proj.to(x.dtype).reshape(e, 2 * f, d).transpose(1, 2)
        w_down = down_proj.to(x.dtype).transpose(1, 2)  # [E, F, D]
        h = grouped_mm(x, w_gate_up, offsets, impl=self.impl, exact_rows=True)  # [N, 2F]
        gate, up = h.split(f, dim=-1)
        return grouped_mm(torch.nn.functional.silu(gate) * up, w_down, offsets, impl=self.impl, exact_rows=True)

    def expert_forward(self, x: Tensor, expert: int) -> Tensor:
        return swiglu(x, self.gate_up_proj[expert].to(x.dtype), self.down_proj[expert].to(x.dtype))

    def all_experts_forward(self, x: Tensor) -> Tensor:
        e, _, f, d = self.gate_up_proj.shape
        w_gate_up = self.gate_up_proj.to(x.dtype).reshape(e, 2 * f, d).transpose(1, 2)  # [E, D, 2F]
        h = torch.matmul(x.unsqueeze(0), w_gate_up)  # [E, T, 2F]
        gate, up = h.split(f, dim=-1)
        return torch.matmul(torch.nn.functional.silu(gate) * up, self.down_proj.to(x.dtype).transpose(1, 2))  # [E, T, D]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, grouped_mm={self.impl!r}"
        )


class NullExperts(ExpertGroup):
    """Parameter-free experts that output zero (adaptive compute: AdaMoE / UniMoE-Audio).

    The dispatcher never gathers rows for them, so a token routed only to null experts
    skips all routed-expert compute; choosing a null expert just moves gate mass to zero.
    """

    takes_tokens = False

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        return torch.zeros_like(x)


class SharedExperts(nn.Module):
    """``num_experts`` always-on SwiGLU experts, each optionally scaled per token.

    Weights: ``gate_up_proj`` [S, 2, F, D], ``down_proj`` [S, D, F] (the layout of
    :mod:`unimoe.moe.ffn` with a leading expert dim). S is small (the paper: 2), so a plain
    loop of dense SwiGLUs is as fast as one wide matmul and copies no weights.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int) -> None:
        super().__init__()
        if num_experts <= 0 or hidden_size <= 0 or intermediate_size <= 0:
            raise ValueError(
                f"SharedExperts sizes must be positive, got num_experts={num_experts}, "
                f"hidden={hidden_size}, intermediate={intermediate_size}"
            )
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_swiglu_(self.gate_up_proj, self.down_proj)

    def forward(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """x [T, D], weights [T, S] or None (unweighted: every weight is 1) -> [T, D]."""
        gate_up, down = self.gate_up_proj.to(x.dtype), self.down_proj.to(x.dtype)
        out = None
        for s in range(self.num_experts):
            y = swiglu(x, gate_up[s], down[s])  # [T, D]
            if weights is not None:
                y = y * weights[:, s : s + 1].to(y.dtype)
            out = y if out is None else out + y
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"


EXPERTS.base = ExpertGroup
