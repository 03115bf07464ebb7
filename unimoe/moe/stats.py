"""Routing statistics and aux-loss sufficient statistics of one MoE layer's forward.

Everything is a sum over real (unpadded) tokens, so two micro-batches merge exactly into
the statistics of the combined batch (:func:`merge_micro_batches`), and per-layer values
average into the model's aux losses (:func:`mean_over_layers`). No host sync is needed to
build a :class:`RoutingInfo`; callbacks convert to Python numbers when they log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from unimoe.moe.losses import load_balance_loss

StatsMode = Literal["full", "counts"]
"""What an MoE layer reports: ``"full"`` a :class:`RoutingInfo`, ``"counts"`` an :class:`ExpertCounts`."""


@dataclass
class ExpertCounts:
    """The routing report decoding asks for: how many real experts each token used.

    Cheaper than a :class:`RoutingInfo` (no aux-loss sums, no histograms, no host sync), and
    exact per row because decoding runs one token per row.
    """

    real_per_token: Tensor  # [T] long, 0 for tokens outside the token mask


@dataclass
class RoutingInfo:
    """What one MoE layer did in one forward.

    Loss fields are unweighted scalar tensors WITH grad; everything else is detached.
    ``E`` = dynamic experts (routed + plug-in + null, in layer order), ``R`` = real ones.
    """

    # aux losses (means over real tokens), with grad
    load_balance: Tensor  # []
    z_loss: Tensor  # []
    entropy: Tensor  # []
    # statistics, detached
    tokens_per_expert: Tensor  # [E] long, tokens routed to each dynamic expert (null included)
    active_real_hist: Tensor  # [R + 1] long, tokens by number of real experts used
    mean_active_real: Tensor  # [] float, mean real experts per token
    router_entropy: Tensor  # [] float, mean router entropy (nats)
    tokens_per_expert_by_task: Tensor | None  # [num_tasks, E] long, or None without task ids
    real_experts: Tensor  # [E] bool, which dynamic experts compute (False: null)
    # sufficient statistics (sums over real tokens) for exact merging
    num_tokens: Tensor  # [] long
    prob_sum: Tensor  # [E] fp32 with grad
    z_sum: Tensor  # [] fp32 with grad
    entropy_sum: Tensor  # [] fp32 with grad

    @classmethod
    def from_sums(
        cls,
        *,
        tokens_per_expert: Tensor,
        active_real_hist: Tensor,
        tokens_per_expert_by_task: Tensor | None,
        real_experts: Tensor,
        num_tokens: Tensor,
        prob_sum: Tensor,
        z_sum: Tensor,
        entropy_sum: Tensor,
    ) -> "RoutingInfo":
        """Derive the losses and means from the sums (the one place they are defined)."""
        n = num_tokens.clamp_min(1).float()
        entropy = entropy_sum / n
        hist = active_real_hist.detach()
        k = torch.arange(hist.shape[0], device=hist.device, dtype=torch.float32)
        return cls(
            load_balance=load_balance_loss(tokens_per_expert, prob_sum, num_tokens),
            z_loss=z_sum / n,
            entropy=entropy,
            tokens_per_expert=tokens_per_expert.detach(),
            active_real_hist=hist,
            mean_active_real=(hist.float() * k).sum() / hist.sum().clamp_min(1).float(),
            router_entropy=entropy.detach(),
            tokens_per_expert_by_task=None if tokens_per_expert_by_task is None else tokens_per_expert_by_task.detach(),
            real_experts=real_experts,
            num_tokens=num_tokens.detach(),
            prob_sum=prob_sum,
            z_sum=z_sum,
            entropy_sum=entropy_sum,
        )

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.shape[0]

    def load_balance_with_counts(self, counts: Tensor) -> Tensor:
        """The load-balance loss with externally accumulated ``counts`` [E] as f.

        For global-batch balancing with gradient accumulation: sum ``tokens_per_expert``
        over the micro-batches seen so far (and all-reduce it over ranks), then use it
        here; the gradient still flows through this micro-batch's probabilities.
        """
        return load_balance_loss(counts, self.prob_sum, self.num_tokens)

    def detach(self) -> "RoutingInfo":
        """A copy without autograd history (to keep for logging after backward)."""
        return RoutingInfo(**{k: (v.detach() if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()})


def merge_micro_batches(infos: Sequence[RoutingInfo]) -> RoutingInfo:
    """Merge one layer's infos from several micro-batches (or ranks' gathered infos).

    Sums the sufficient statistics, so the result equals the info of one forward on the
    concatenated batch: same losses (and gradients, while the graphs are alive) and
    statistics. Per-task tables with different task counts are zero-padded.
    """
    if not infos:
        raise ValueError("merge_micro_batches needs at least one RoutingInfo")
    first = infos[0]
    for i, info in enumerate(infos[1:], start=1):
        if info.tokens_per_expert.shape != first.tokens_per_expert.shape:
            raise ValueError(
                f"merge_micro_batches: info {i} has {info.num_experts} experts, info 0 has {first.num_experts}; "
                "merge infos of the same layer only"
            )
    by_task = [i.tokens_per_expert_by_task for i in infos if i.tokens_per_expert_by_task is not None]
    merged_by_task = None
    if by_task:
        rows = max(t.shape[0] for t in by_task)
        merged_by_task = torch.zeros(rows, first.num_experts, dtype=by_task[0].dtype, device=by_task[0].device)
        for t in by_task:
            merged_by_task[: t.shape[0]] += t
    return RoutingInfo.from_sums(
        tokens_per_expert=sum(i.tokens_per_expert for i in infos),
        active_real_hist=sum(i.active_real_hist for i in infos),
        tokens_per_expert_by_task=merged_by_task,
        real_experts=first.real_experts,
        num_tokens=sum(i.num_tokens for i in infos),
        prob_sum=sum(i.prob_sum for i in infos),
        z_sum=sum(i.z_sum for i in infos),
        entropy_sum=sum(i.entropy_sum for i in infos),
    )


@dataclass
class LayerMeans:
    """Aux losses averaged over a model's MoE layers (what the training loss adds)."""

    load_balance: Tensor
    z_loss: Tensor
    entropy: Tensor
    mean_active_real: Tensor  # detached


def mean_over_layers(infos: Sequence[RoutingInfo | None]) -> LayerMeans:
    """Average the per-layer losses (the paper averages the balance loss over layers).

    ``None`` entries (dense FFN layers) are skipped; with no MoE layer at all the losses
    are zeros, so a dense model can share the training code.
    """
    moe = [i for i in infos if i is not None]
    if not moe:
        zero = torch.zeros(())
        return LayerMeans(zero, zero, zero, zero)
    n = len(moe)
    return LayerMeans(
        load_balance=sum(i.load_balance for i in moe) / n,
        z_loss=sum(i.z_loss for i in moe) / n,
        entropy=sum(i.entropy for i in moe) / n,
        mean_active_real=sum(i.mean_active_real for i in moe) / n,
    )


def summarize(infos: Sequence[RoutingInfo | None], prefix: str = "moe") -> dict[str, float]:
    """Flat ``{name: float}`` metrics per MoE layer for loggers (syncs with the device).

    Keys: ``{prefix}/layer_{i}/{mean_active_real,router_entropy,load_balance,z_loss,
    null_fraction,max_load}`` where ``max_load`` is the busiest expert's share of pairs
    divided by the balanced share 1/E, and ``null_fraction`` the share of real tokens
    that used no real expert.
    """
    out: dict[str, float] = {}
    for layer, info in enumerate(infos):
        if info is None:
            continue
        key = f"{prefix}/layer_{layer}"
        counts = info.tokens_per_expert.float()
        hist = info.active_real_hist.float()
        out[f"{key}/mean_active_real"] = float(info.mean_active_real)
        out[f"{key}/router_entropy"] = float(info.router_entropy)
        out[f"{key}/load_balance"] = float(info.load_balance.detach())
        out[f"{key}/z_loss"] = float(info.z_loss.detach())
        out[f"{key}/null_fraction"] = float(hist[0] / hist.sum().clamp_min(1))
        out[f"{key}/max_load"] = float(counts.max() / counts.sum().clamp_min(1) * counts.numel())
    return out
