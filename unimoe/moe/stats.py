"""Routing statistics and aux-loss sufficient statistics of one MoE layer's forward.

Everything is a sum over real (unpadded) tokens, so statistics of micro-batches and ranks
add up exactly (the expert-load callback sums them between logs; a global-batch balance loss
uses summed ``tokens_per_expert`` with :func:`unimoe.moe.losses.load_balance_loss`), and
per-layer losses average into the model's aux losses (:func:`mean_over_layers`). No host
sync is needed to build a :class:`RoutingInfo`; callbacks convert to Python numbers when they log.
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

    def detach(self) -> "RoutingInfo":
        """A copy without autograd history (to keep for logging after backward)."""
        return RoutingInfo(**{k: (v.detach() if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()})


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

