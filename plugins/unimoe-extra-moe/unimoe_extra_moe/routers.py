"""A router with learned per-expert probability thresholds (variable experts per token)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from unimoe.moe.routers import Router


class LearnedThresholdRouter(Router):
    """Token uses expert e iff p_e >= tau_e (and always its top expert).

    ``tau_e = sigmoid(theta_e)`` is learned. The hard selection is used forward; backward
    a straight-through soft gate ``sigmoid((p - tau) / temperature)`` lets gradients reach
    theta, so thresholds move with the task loss (and with the balance/entropy losses).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_shared: int = 0,
        init_threshold: float = 0.1,
        temperature: float = 0.05,
        jitter: float = 0.0,
    ) -> None:
        super().__init__(hidden_size, num_experts, num_shared, jitter)
        if not 0.0 < init_threshold < 1.0:
            raise ValueError(f"LearnedThresholdRouter.init_threshold must be in (0, 1), got {init_threshold}")
        if temperature <= 0:
            raise ValueError(f"LearnedThresholdRouter.temperature must be > 0, got {temperature}")
        self.temperature = temperature
        logit = math.log(init_threshold / (1 - init_threshold))
        self.threshold_logit = nn.Parameter(torch.full((num_experts,), logit))

    def select(self, logits: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        tau = torch.sigmoid(self.threshold_logit.float())  # [E]
        selected = probs >= tau
        selected[torch.arange(probs.shape[0], device=probs.device), probs.argmax(-1)] = True
        soft = torch.sigmoid((probs - tau) / self.temperature)  # [T, E]
        gate = selected.to(probs.dtype) + soft - soft.detach()  # hard forward, soft backward
        kept = probs * gate
        return selected, kept / kept.sum(-1, keepdim=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"
