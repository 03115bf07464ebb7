"""Auxiliary router losses and the load-balance weight schedule.

All three losses are computed from per-layer *sums* over real (unpadded) tokens, kept in
:class:`~unimoe.moe.stats.RoutingInfo`, so they can be merged across micro-batches exactly.
This module holds the formulas only; :meth:`unimoe.moe.config.MoEConfig.aux_loss` is the one
place that weights them (with the stage's load-balance schedule).

* load balance (Switch style, generalised to a variable number of experts per token):
  ``E * sum_e f_e * P_e`` with ``f_e`` = share of the routed (token, expert) pairs that went
  to dynamic expert ``e`` (null experts included, so their usage is balanced too) and
  ``P_e`` = mean router probability of ``e``. Balanced routing gives exactly 1.
* z-loss: mean over tokens of ``logsumexp(all gate logits)^2`` (keeps logits small).
* entropy: mean over tokens of the router entropy ``-sum_e p_e log p_e`` (Huang et al.
  2024: stops top-p from drifting to flat routers that activate many experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def load_balance_loss(counts: Tensor, prob_sum: Tensor, num_tokens: Tensor) -> Tensor:
    """counts [E] (routed pairs per expert), prob_sum [E] (sum of probs), num_tokens [] -> [].

    ``counts`` is where a *global-batch* balance comes in: sum ``tokens_per_expert`` over
    the micro-batches of an optimizer step (and all-reduce it over ranks), then call this
    with each micro-batch's own ``prob_sum`` / ``num_tokens``; weighting each micro-batch's
    loss by its share of tokens gives exactly the loss of the whole global batch, with the
    gradient flowing through that micro-batch's probabilities (MOE_NOTES: the fix Megatron
    adopted against micro-batch balancing).
    """
    num_experts = counts.shape[-1]
    f = counts.float() / counts.sum().clamp_min(1).float()  # fraction of routed pairs, [E]
    p = prob_sum / num_tokens.clamp_min(1).to(prob_sum.dtype)  # mean probability, [E]
    return num_experts * (f * p).sum()


def z_loss_sum(all_logits: Tensor, token_mask: Tensor) -> Tensor:
    """all_logits [T, E+S] fp32, token_mask [T] bool -> sum over real tokens of lse^2."""
    return (torch.logsumexp(all_logits, dim=-1).square() * token_mask).sum()


def entropy_sum(probs: Tensor, token_mask: Tensor) -> Tensor:
    """probs [T, E] -> sum over real tokens of -sum_e p log p (0 log 0 = 0)."""
    plogp = torch.special.xlogy(probs, probs)  # [T, E], exact 0 where p == 0
    return (-plogp.sum(dim=-1) * token_mask).sum()


@dataclass
class AuxLossSchedule:
    """Load-balance weight annealed linearly from ``start`` to ``end`` over ``steps``.

    A pure function of the global step, so a resumed run gets the same weight (paper:
    0.025 -> 0.001 over 10k steps); constant ``end`` afterwards.
    """

    start: float = 0.025
    end: float = 0.001
    steps: int = 10_000

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"AuxLossSchedule.start must be >= 0, got {self.start}")
        if self.end < 0:
            raise ValueError(f"AuxLossSchedule.end must be >= 0, got {self.end}")
        if self.steps < 0:
            raise ValueError(f"AuxLossSchedule.steps must be >= 0, got {self.steps}")

    def weight(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"AuxLossSchedule.weight: step must be >= 0, got {step}")
        if self.steps == 0 or step >= self.steps:
            return float(self.end)
        return float(self.start + (self.end - self.start) * step / self.steps)

