"""Dropless, padding-free execution of the routed experts.

Given which experts each token uses (a boolean map, Megatron-style, which handles a
variable number of experts per token) and the combine weights:

1. keep only the columns of experts that take tokens (null experts cost nothing);
2. list the (token, expert) pairs in expert-major order -- ``selected.T.nonzero()`` is
   already sorted by expert, so no argsort is needed -- and count rows per expert;
3. gather the token rows (``index_select``), hand each expert group its contiguous slice
   of rows with its per-expert counts (grouped GEMMs inside), multiply by the pair's
   weight, and scatter-add back to token order.

Exactly one row per routed (token, real expert) pair exists: nothing is padded, dropped
or left uninitialised. The pair count is data dependent, so this costs one host sync
(two with several token-taking groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from unimoe.moe.experts import ExpertGroup


@dataclass(frozen=True)
class GroupSlot:
    """An expert group and its column range ``[start, end)`` among the dynamic experts."""

    group: ExpertGroup
    start: int
    end: int


def group_slots(groups: Sequence[ExpertGroup]) -> list[GroupSlot]:
    """Assign contiguous dynamic-expert index ranges to the groups, in order."""
    slots, start = [], 0
    for g in groups:
        slots.append(GroupSlot(g, start, start + g.num_experts))
        start += g.num_experts
    return slots


def dispatch(x: Tensor, selected: Tensor, weights: Tensor, slots: Sequence[GroupSlot]) -> Tensor:
    """Sum over each token's selected experts of weight * expert(x).

    x:        [T, D]
    selected: [T, E] bool over all dynamic experts
    weights:  [T, E] combine weights (fp32), zero where not selected
    slots:    the groups covering [0, E) (see :func:`group_slots`)
    returns   [T, D] in x's dtype (accumulated in fp32 for low-precision inputs)
    """
    compute = [s for s in slots if s.group.takes_tokens]
    t, d = x.shape
    if not compute:  # every dynamic expert is null: routed output is zero
        return x.new_zeros(t, d)
    sel, w = _compute_columns(selected, weights, compute)  # [T, E_c] each

    expert_idx, token_idx = sel.t().nonzero(as_tuple=True)  # [N] each, sorted by expert (host sync)
    counts = sel.sum(dim=0)  # [E_c] rows per expert
    rows = gather_rows(x, token_idx)  # [N, D], expert-major

    if len(compute) == 1:
        out_rows = compute[0].group(rows, counts)  # [N, D]
    else:
        sizes = [s.end - s.start for s in compute]
        rows_per_group = torch.stack([c.sum() for c in counts.split(sizes)]).tolist()  # host sync
        out_rows = torch.cat(
            [
                s.group(r, c)
                for s, r, c in zip(compute, rows.split(rows_per_group), counts.split(sizes))
            ]
        )
    pair_w = w[token_idx, expert_idx]  # [N] fp32, carries the gradient to the router
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    weighted = out_rows.to(acc_dtype) * pair_w.to(acc_dtype).unsqueeze(-1)  # [N, D]
    return scatter_add_rows(weighted, token_idx, t).to(x.dtype)


# Row gather / scatter-add written as gather / scatter_add with an index expanded along the
# feature dim: on CPU these hit a sorted, parallel, deterministic kernel, several times
# faster than index_select's backward and index_add_ (which take a slow path for unsorted
# indices); each one's backward is the other. On CUDA both are atomics-based like
# index_add_ (deterministic under torch.use_deterministic_algorithms).
def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [T, D], index [N] -> x[index] [N, D]."""
    return x.gather(0, index.unsqueeze(-1).expand(-1, x.shape[-1]))


def scatter_add_rows(rows: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """rows [N, D], index [N] -> out [num_rows, D] with out[index[i]] += rows[i]."""
    out = torch.zeros(num_rows, rows.shape[-1], dtype=rows.dtype, device=rows.device)
    return out.scatter_add_(0, index.unsqueeze(-1).expand_as(rows), rows)


def _compute_columns(selected: Tensor, weights: Tensor, compute: Sequence[GroupSlot]) -> tuple[Tensor, Tensor]:
    """The columns of the token-taking experts (a view when they are contiguous)."""
    if all(a.end == b.start for a, b in zip(compute, compute[1:])):
        start, end = compute[0].start, compute[-1].end
        return selected[:, start:end], weights[:, start:end]
    columns = torch.cat([torch.arange(s.start, s.end, device=selected.device) for s in compute])
    return selected.index_select(1, columns), weights.index_select(1, columns)
