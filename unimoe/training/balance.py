"""Global-batch load balancing: the balance loss over every rank and every accumulated micro-batch.

Each MoE layer's :class:`~unimoe.moe.stats.RoutingInfo` holds sums over this rank's real
tokens (routed pairs per expert ``c``, tokens ``n``, router probability sums ``s``). A
micro-batch balance loss ``E * sum_e f_e P_e`` computed from them alone pushes every rank's
every micro-batch towards uniform routing, which fights domain specialisation (a speech
micro-batch *should* prefer the speech experts); Megatron-Core and "Demons in the Detail"
(Qiu et al. 2025) compute ``f`` over the global batch instead. Here, per micro-batch:

1. one all-reduce (sum over all ranks: data- and expert-parallel) of every layer's
   ``c, n, s, histogram`` (a few hundred numbers per step);
2. the global counts are accumulated over the micro-batches of the current optimizer step
   (reset when ``trainer.global_step`` moves on);
3. ``f = C_acc / sum(C_acc)``, ``P = S_acc / N_acc``: the loss *value* is exactly the balance
   loss of the concatenated global batch seen so far (at the last micro-batch: the whole
   optimizer step's batch);
4. its *gradient* flows through this rank's own probabilities: ``E * sum_e f_e s_e / N * W``
   with ``N`` this micro-batch's global token count and ``W`` the world size, because
   FSDP/DDP average gradients over ``W`` ranks. Over the ranks of one micro-batch this is
   the exact gradient of the global-batch loss; across accumulated micro-batches ``f`` is the
   running global count (Megatron's ``global_aux_loss``): exact at the last micro-batch.

With one process and no accumulation nothing changes (the layer's own loss is used, no
collective runs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from unimoe.moe.stats import RoutingInfo


@dataclass
class BalancedRouting:
    """A forward's routing with global-batch balance losses, plus global statistics for logging."""

    routing: list[Optional[RoutingInfo]]
    mean_active_real: Tensor  # [] real experts per token over the global batch (layer mean), detached


class GlobalLoadBalance:
    """Replaces each MoE layer's ``load_balance`` with the global-batch version (see the module docstring)."""

    def __init__(self) -> None:
        self._step: int | None = None
        self._acc: Tensor | None = None

    def __call__(self, routing: Sequence[Optional[RoutingInfo]], *, step: int, accumulate: int = 1,
                 world_size: int | None = None, group=None) -> BalancedRouting:
        routing = list(routing)
        moe = [info for info in routing if info is not None]
        world = world_size if world_size is not None else _world_size(group)
        if not moe:
            return BalancedRouting(routing, torch.zeros(()))
        if world == 1 and accumulate == 1:  # nothing to globalise: the layer's own loss, bit for bit
            return BalancedRouting(routing, sum(i.mean_active_real for i in moe) / len(moe))
        stats = torch.cat([_pack(info) for info in moe])  # [sum_l (2E + 2 + R)] float64
        if world > 1:
            dist.all_reduce(stats, group=group)
        if step != self._step or self._acc is None or self._acc.shape != stats.shape:
            self._step, self._acc = step, torch.zeros_like(stats)
        self._acc += stats
        out, active, offset = [], [], 0
        for info in routing:
            if info is None:
                out.append(None)
                continue
            size = _packed_size(info)
            micro, acc = _unpack(stats[offset: offset + size], info), _unpack(self._acc[offset: offset + size], info)
            offset += size
            out.append(dataclasses.replace(info, load_balance=_global_loss(info, micro, acc, world)))
            hist = micro["hist"]
            k = torch.arange(hist.shape[0], dtype=hist.dtype, device=hist.device)
            active.append((hist * k).sum() / hist.sum().clamp_min(1))
        return BalancedRouting(out, (sum(active) / len(active)).float())


def _global_loss(info: RoutingInfo, micro: dict[str, Tensor], acc: dict[str, Tensor], world: int) -> Tensor:
    e = info.prob_sum.shape[0]
    f = acc["counts"] / acc["counts"].sum().clamp_min(1)  # [E] global routed-pair fraction so far
    value = e * (f * acc["prob_sum"] / acc["tokens"].clamp_min(1)).sum()  # loss of the concatenated batch
    f32 = f.to(info.prob_sum.dtype)
    grad_term = e * (f32 * info.prob_sum).sum() / micro["tokens"].clamp_min(1).to(info.prob_sum.dtype) * world
    return value.to(info.prob_sum.dtype) + (grad_term - grad_term.detach())


def _pack(info: RoutingInfo) -> Tensor:
    return torch.cat([info.tokens_per_expert.double(), info.num_tokens.double().view(1),
                      info.prob_sum.detach().double(), info.active_real_hist.double()])


def _packed_size(info: RoutingInfo) -> int:
    return 2 * info.prob_sum.shape[0] + 1 + info.active_real_hist.shape[0]


def _unpack(flat: Tensor, info: RoutingInfo) -> dict[str, Tensor]:
    e = info.prob_sum.shape[0]
    return {"counts": flat[:e], "tokens": flat[e], "prob_sum": flat[e + 1: 2 * e + 1], "hist": flat[2 * e + 1:]}


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)
