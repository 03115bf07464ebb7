"""The release's top-p router: the same experts as unimoe's ``top_p``, the release's combine weights.

The release (``UniMoE_Audio_core.py``) picks ``k`` per token as unimoe's :class:`TopPRouter`
does (the smallest prefix of the sorted softmax that reaches ``top_p``), but it does not
weight the chosen experts by their renormalised probabilities. It runs a SparseMixer-style
loop over the ``k`` best logits ``s_1 >= ... >= s_k``: the weight of the i-th is its softmax
probability among the experts not chosen before it whose logit is within a relative band
of it, ``(s_i - s_j) / max(|s_i|, |s_j|) <= 2 * band`` (``band`` is the release's
``router_jitter_noise``, 0.01), and the weights are then divided by their sum plus 1e-6.
An expert with no near-tie therefore gets weight 1 before normalisation, so most tokens mix
their ``k`` experts almost uniformly. The release's config sets
``ignore_differentiable_router``, so there is no Gumbel noise in training either; the weights
stay differentiable through that banded softmax, as in the release.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unimoe.moe.routers import TopPRouter

RELEASE_EPS = 1e-6
"""The release adds this to the sum of the chosen weights before dividing."""


class ReleaseTopPRouter(TopPRouter):
    """Top-p selection with the release's banded-softmax weights (see the module docstring).

    ``band``: the release's ``router_jitter_noise`` (relative logit band of near-ties);
    ``jitter``: its ``input_jitter_noise`` (multiplicative router-input noise in training).
    """

    def __init__(
        self, hidden_size: int, num_experts: int, num_shared: int = 0, top_p: float = 0.7,
        jitter: float = 0.01, band: float = 0.01,
    ) -> None:
        super().__init__(hidden_size, num_experts, num_shared, top_p=top_p, jitter=jitter)
        if not (isinstance(band, (int, float)) and band >= 0):
            raise ValueError(f"ReleaseTopPRouter.band must be >= 0, got {band!r}")
        self.band = float(band)

    def select(self, logits: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        selected, _ = super().select(logits, probs)  # [T, E] bool: the release's k best experts
        k = selected.sum(dim=-1, keepdim=True)  # [T, 1]
        s, order = logits.sort(dim=-1, descending=True)  # [T, E]
        e = s.shape[-1]
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)  # [T, E, 1] the i-th pick, [T, 1, E] a candidate
        rank = torch.arange(e, device=s.device)
        not_before = rank.view(1, 1, e) >= rank.view(1, e, 1)  # candidate j was not chosen before pick i
        with torch.no_grad():  # the release computes the band without gradient
            factor = torch.maximum(sj.abs(), si.abs())
            far = (si - sj) / factor > 2 * self.band  # 0/0 (both logits 0) is NaN: not far, as in the release
        band = not_before & ~far  # [T, E, E]
        scores = sj.expand(-1, e, -1).masked_fill(~band, float("-inf"))
        multiplier = scores.softmax(dim=-1).diagonal(dim1=-2, dim2=-1)  # [T, E]: pick i's share of its band
        multiplier = multiplier * (rank.unsqueeze(0) < k)  # only the k picks
        weights = torch.zeros_like(multiplier).scatter(-1, order, multiplier)  # back to expert order
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RELEASE_EPS)
        return selected, weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, band={self.band}"
