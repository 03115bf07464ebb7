"""Expert execution for a handful of rows (decoding), next to the sorted/grouped path.

:func:`unimoe.moe.dispatch.dispatch` is built for thousands of rows: it lists the (token,
expert) pairs, gathers rows, runs grouped GEMMs and scatters back, a dozen kernels and a
host sync whatever the row count. A decoding step has one row per request (two with CFG),
where all that bookkeeping costs more than the experts themselves. Two paths for that case:

* :func:`used_experts_dispatch` runs each expert that *some* row selected once, on all rows
  (a row that did not select it gets weight 0), and adds the weighted outputs in expert
  order. It reads exactly the weights the batch needs (the union of the rows' experts), so
  a lower router top-p still saves time, at the price of one host sync (which experts).
* :func:`all_experts_dispatch` runs every token-taking expert on every row as one batched
  GEMM per projection and masks the unselected ones. No host sync and fixed shapes, so it
  can be compiled and captured in a CUDA graph; it does the work of every expert, so lower
  top-p saves nothing on this path.

Both need expert groups that can run one expert (:meth:`ExpertGroup.expert_forward`) or all
of them (:meth:`ExpertGroup.all_experts_forward`); a group without them keeps the grouped
path (:func:`supports_small_batch`). ``MoELayer`` picks the path by row count.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from unimoe.moe.dispatch import GroupSlot


def supports_small_batch(slots: Sequence[GroupSlot]) -> bool:
    """Every token-taking group can run single experts and all experts at once."""
    return all(s.group.supports_small_batch for s in slots if s.group.takes_tokens)


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def used_experts_dispatch(x: Tensor, selected: Tensor, weights: Tensor, slots: Sequence[GroupSlot]) -> Tensor:
    """``sum_e w[:, e] * expert_e(x)`` over the experts any row selected: ``x [T, D]`` -> ``[T, D]``.

    ``selected [T, E]`` bool and ``weights [T, E]`` (zero where not selected) as for
    :func:`~unimoe.moe.dispatch.dispatch`; the sum runs in increasing expert order, as there.
    """
    t, d = x.shape
    acc = torch.zeros(t, d, dtype=_accumulation_dtype(x), device=x.device)
    compute = [s for s in slots if s.group.takes_tokens]
    if not compute:
        return acc.to(x.dtype)
    used = selected.any(dim=0).nonzero().flatten().tolist()  # host sync: which experts to run
    for slot in compute:
        for e in used:
            if slot.start <= e < slot.end:
                out = slot.group.expert_forward(x, e - slot.start).to(acc.dtype)  # [T, D]
                # where, not a product alone: a row that did not pick e must add exactly 0 even if out is inf
                acc += torch.where(selected[:, e : e + 1], out * weights[:, e : e + 1].to(acc.dtype), 0.0)
    return acc.to(x.dtype)


def all_experts_dispatch(x: Tensor, selected: Tensor, weights: Tensor, slots: Sequence[GroupSlot]) -> Tensor:
    """The same sum with every token-taking expert run on every row (sync-free, fixed shapes)."""
    t, d = x.shape
    acc = torch.zeros(t, d, dtype=_accumulation_dtype(x), device=x.device)
    for slot in slots:
        if not slot.group.takes_tokens:
            continue
        out = slot.group.all_experts_forward(x).to(acc.dtype)  # [E_g, T, D]
        sel = selected[:, slot.start : slot.end].t().unsqueeze(-1)  # [E_g, T, 1]
        w = weights[:, slot.start : slot.end].t().unsqueeze(-1).to(acc.dtype)
        acc = acc + torch.where(sel, out * w, 0.0).sum(dim=0)
    return acc.to(x.dtype)
