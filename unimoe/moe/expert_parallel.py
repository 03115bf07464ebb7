"""Expert parallelism: the routed experts split over the ranks of an expert-parallel group.

A drop-in replacement for :func:`unimoe.moe.dispatch.dispatch` that an
:class:`~unimoe.moe.layer.MoELayer` is given (its ``dispatcher`` attribute) when its
token-taking expert groups are sharded over ``ep`` ranks, each rank holding
``num_experts / ep`` experts of every group (the first ``num_experts / ep`` on EP rank 0,
and so on). Per layer and step, as torchtitan and Megatron-Core do it:

1. list this rank's (token, real expert) pairs ordered by destination rank, then group,
   then local expert, and gather their rows (null experts take no rows, so a token routed
   only to null experts is never sent anywhere; nothing is padded or dropped);
2. exchange the per-expert row counts with every EP peer first (one small all-to-all and
   one host sync: the data all-to-all needs its split sizes on the host);
3. ``all_to_all_single_autograd`` the rows to the ranks that hold their experts;
4. permute the received rows from (source rank, local expert) to (local expert, source
   rank) order and run each local group's grouped GEMM on its contiguous slice;
5. undo the permutation, all-to-all the outputs back (the same splits, swapped), then
   weight each pair and scatter-add to token order exactly as the local dispatcher does.

The routing weights never travel: they multiply the returned rows locally, so their
gradient (which trains the router) stays on the token's own rank. Backward runs the two
all-to-alls in reverse. Every rank must call every layer the same number of times (all
ranks of a step run the same layers), which training guarantees.

Expert groups opt in with ``expert_parallel = True``: their parameters stack the experts
on dim 0 and their forward reads them through :func:`unimoe.moe.experts.local_experts`, so under EP it sees
only this rank's experts (a :class:`~torch.distributed.tensor.DTensor` sharded on dim 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from unimoe.moe.dispatch import GroupSlot, _compute_columns, gather_rows, group_slots, scatter_add_rows
from unimoe.moe.experts import local_experts  # noqa: F401  (re-exported: the EP contract of expert groups)


class ExpertParallelError(ValueError):
    """A layer cannot be split over the expert-parallel ranks (the message names field and numbers)."""


def check_expert_parallel(slots: Sequence[GroupSlot], ep_size: int, where: str = "MoE layer") -> None:
    """Every token-taking group must support EP and hold a multiple of ``ep_size`` experts."""
    for slot in slots:
        group = slot.group
        if not group.takes_tokens:
            continue
        name = type(group).__name__
        if not getattr(group, "expert_parallel", False):
            raise ExpertParallelError(
                f"{where}: expert group {name} ({group.num_experts} experts) does not support expert parallelism "
                f"(expert_parallel_size={ep_size}); its class must stack experts on dim 0 of every parameter, read "
                "them with unimoe.moe.experts.local_experts() and set expert_parallel = True"
            )
        if group.num_experts % ep_size:
            raise ExpertParallelError(
                f"{where}: {name} has {group.num_experts} experts, not divisible by expert_parallel_size={ep_size} "
                f"(MoEConfig.num_routed_experts / extra_experts num_experts must be a multiple of it)"
            )


def shard_experts(layer, ep_mesh) -> "ExpertParallelDispatcher":
    """Split ``layer``'s token-taking expert groups over the 1-D EP mesh and install the EP dispatcher.

    Each stacked parameter becomes a DTensor sharded on dim 0 (this rank keeps its slice, no
    communication: every rank holds the same full weights beforehand). Returns the dispatcher.
    """
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor

    ep = ep_mesh.size()
    check_expert_parallel(group_slots(layer.experts), ep)
    for group in layer.experts:
        if not group.takes_tokens:
            continue
        for name, param in list(group.named_parameters(recurse=False)):
            shard = distribute_tensor(param.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(group, name, nn.Parameter(shard, requires_grad=param.requires_grad))
    layer.dispatcher = ExpertParallelDispatcher(ep_mesh.get_group())
    return layer.dispatcher


@dataclass
class DispatchTrace:
    """Row counts of the latest call on this rank (host ints; for tests, logs and benchmarks)."""

    sent_rows: int = 0  # (token, real expert) pairs this rank sent (itself included)
    received_rows: int = 0  # rows this rank's experts computed
    sent_token_ids: Tensor | None = None  # [sent_rows] token index of each sent row (kept only when asked)
    seconds_all_to_all: float = 0.0  # wall time inside the forward exchanges (counts + rows + outputs)
    record_tokens: bool = False
    timing: bool = False


@dataclass
class ExpertParallelDispatcher:
    """Dispatch over an expert-parallel process group (see the module docstring).

    group: the EP process group (its size is the EP size; its rank picks the local experts).
    """

    group: dist.ProcessGroup
    trace: DispatchTrace = field(default_factory=DispatchTrace)

    @property
    def ep_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.group)

    def __call__(self, x: Tensor, selected: Tensor, weights: Tensor, slots: Sequence[GroupSlot]) -> Tensor:
        """x [T, D], selected/weights [T, E] over all dynamic experts -> [T, D] (as :func:`dispatch`)."""
        compute = [s for s in slots if s.group.takes_tokens]
        t, d = x.shape
        if not compute:  # every dynamic expert is null: nothing to send on any rank
            return x.new_zeros(t, d)
        ep = self.ep_size
        sel, w = _compute_columns(selected, weights, compute)  # [T, E_c]
        order = _destination_order(compute, ep, sel.device)  # columns by (rank, group, local expert)
        if order is not None:
            sel, w = sel.index_select(1, order), w.index_select(1, order)
        local_per_group = [(s.end - s.start) // ep for s in compute]
        e_local = sum(local_per_group)

        expert_idx, token_idx = sel.t().nonzero(as_tuple=True)  # [N], sorted by (rank, group, expert)
        send_counts = sel.sum(dim=0)  # [ep * e_local] rows per (destination rank, local expert)
        rows = gather_rows(x, token_idx)  # [N, D]

        clock = _Clock(self.trace.timing)
        recv_counts = torch.empty_like(send_counts)
        with clock:
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # counts first: sizes the exchange
        recv_matrix = recv_counts.view(ep, e_local)  # [source rank, local expert]
        splits = torch.cat([send_counts.view(ep, e_local).sum(1), recv_matrix.sum(1)]).tolist()  # one host sync
        send_splits, recv_splits = splits[:ep], splits[ep:]
        with clock:
            received = _all_to_all(rows, recv_splits, send_splits, self.group)  # [M, D] by (source, expert)

        perm = _source_to_expert_major(recv_matrix, sum(recv_splits))  # [M]
        expert_rows = gather_rows(received, perm)  # [M, D] by (local expert, source)
        local_counts = recv_matrix.sum(0)  # [e_local]
        out_rows = _run_groups(compute, expert_rows, local_counts, local_per_group)
        back_rows = gather_rows(out_rows, _inverse(perm))  # [M, D] by (source, expert) again
        with clock:
            returned = _all_to_all(back_rows, send_splits, recv_splits, self.group)  # [N, D] in send order

        self.trace.sent_rows, self.trace.received_rows = int(token_idx.numel()), int(received.shape[0])
        self.trace.sent_token_ids = token_idx.detach().clone() if self.trace.record_tokens else None
        self.trace.seconds_all_to_all = clock.seconds
        pair_w = w[token_idx, expert_idx]  # [N] fp32, the router's gradient path (never sent)
        acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        weighted = returned.to(acc_dtype) * pair_w.to(acc_dtype).unsqueeze(-1)
        return scatter_add_rows(weighted, token_idx, t).to(x.dtype)


def _destination_order(compute: Sequence[GroupSlot], ep: int, device: torch.device) -> Tensor | None:
    """Column permutation of the compute experts into (EP rank, group, local expert) order.

    Expert ``i`` of a group of ``E_g`` experts lives on EP rank ``i // (E_g / ep)``. With one
    group the columns are already in that order (None: no permutation needed).
    """
    if len(compute) == 1:
        return None
    columns, offset = [], 0
    blocks = []
    for s in compute:
        n = s.end - s.start
        blocks.append((offset, n // ep))
        offset += n
    for r in range(ep):
        for start, per_rank in blocks:
            columns.extend(range(start + r * per_rank, start + (r + 1) * per_rank))
    return torch.tensor(columns, dtype=torch.long, device=device)


def _source_to_expert_major(counts: Tensor, total: int) -> Tensor:
    """Row permutation from blocks ordered (source, expert) to (expert, source).

    counts [S, E]: rows from source s for local expert e, laid out source-major. Returns
    ``perm`` [M] with ``expert_major_rows = rows[perm]``; ``total`` = M (known on the host already).
    """
    flat = counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat  # [S * E] first row of each (s, e) block
    target_counts = counts.t().reshape(-1)  # blocks visited in (e, s) order
    target_starts = starts.view_as(counts).t().reshape(-1)
    block_of_row = torch.repeat_interleave(torch.arange(target_counts.numel(), device=counts.device), target_counts,
                                           output_size=total)
    first_out = torch.cumsum(target_counts, 0) - target_counts  # where each block starts in the output
    within = torch.arange(total, device=counts.device) - first_out[block_of_row]
    return target_starts[block_of_row] + within


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _run_groups(compute: Sequence[GroupSlot], rows: Tensor, counts: Tensor, local_per_group: list[int]) -> Tensor:
    """Each group's grouped GEMM on its contiguous rows (every group runs, even on zero rows)."""
    if len(compute) == 1:
        return compute[0].group(rows, counts)
    per_group_counts = counts.split(local_per_group)
    rows_per_group = torch.stack([c.sum() for c in per_group_counts]).tolist()  # host sync
    return torch.cat([s.group(r, c) for s, r, c in zip(compute, rows.split(rows_per_group), per_group_counts)])


def _all_to_all(rows: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Differentiable uneven all-to-all of rows (backward sends the gradients the reverse way)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor, all_to_all_single_autograd

    out = all_to_all_single_autograd(rows.contiguous(), output_splits, input_splits, group)
    if isinstance(out, AsyncCollectiveTensor):  # complete the exchange here; the wrapper keeps the autograd graph
        with torch.no_grad():
            torch.ops._c10d_functional.wait_tensor(out.elem)
    return out


class _Clock:
    """Accumulates wall time of the ``with`` blocks when enabled (the benchmark's all-to-all share)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.seconds = enabled, 0.0

    def __enter__(self) -> "_Clock":
        if self.enabled:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.seconds += time.perf_counter() - self._t0
