"""Compute you can budget: a PI controller that holds a router's mean experts per token.

Top-p routing spends a variable number of experts per token, so its cost drifts with the
data and with training. DTop-p (Jin et al. 2025, arXiv 2512.13996) closes the loop: a
proportional-integral controller moves the top-p threshold so that the running number of
activated experts follows a target. Here each MoE layer's router has its own controller
(the paper drives one global threshold with per-layer logit normalisation instead), and
what it counts is real experts per real token: null experts and padding cost nothing, so
they do not count, which is also what generation's sidecar reports.

One update per model-level forward (the layer measures, the model's next forward applies
it: :meth:`ThresholdController.observe` stages, :meth:`ThresholdController.commit`
applies), so a gradient-checkpointed block recomputed in backward sees exactly the
threshold its forward used. In the positional PI form with the measurement ``m`` and the
error ``e = target - m`` (in experts)::

    I <- I + e
    p <- clamp(p0 + kp * e + ki * I, p_min, p_max)         (kp, ki = gains / E)

with back-calculation anti-windup (when ``p`` saturates, ``I`` is set to the value that
gives the clamped ``p``). All state is 0-dim tensors updated in place: no host sync, and it
runs inside a compiled decoding step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ThresholdController(nn.Module):
    """PI control of a routing threshold toward ``target`` experts per token (see the module doc).

    ``proportional_gain`` / ``integral_gain`` are in threshold units per expert of error,
    times the number of experts (so the same gains suit 4 or 64 experts). ``persistent``
    buffers go into checkpoints (a trained budget router); an inference-time budget sets it
    False so saving a model mid-generation does not add keys.
    """

    def __init__(
        self,
        target: float,
        initial: float,
        *,
        num_experts: int,
        proportional_gain: float = 0.2,
        integral_gain: float = 0.5,
        min_threshold: float = 0.0,
        max_threshold: float = 1.0,
        persistent: bool = True,
    ) -> None:
        super().__init__()
        check_target(target, num_experts)
        if not 0.0 <= min_threshold < max_threshold <= 1.0:
            raise ValueError(f"ThresholdController: need 0 <= min_threshold < max_threshold <= 1, "
                             f"got {min_threshold}, {max_threshold}")
        if not proportional_gain >= 0 or not integral_gain > 0:
            raise ValueError(f"ThresholdController: gains must be proportional_gain >= 0, integral_gain > 0, "
                             f"got {proportional_gain}, {integral_gain}")
        self.num_experts = num_experts
        self.kp = proportional_gain / num_experts
        self.ki = integral_gain / num_experts
        self.min_threshold, self.max_threshold = float(min_threshold), float(max_threshold)
        initial = min(max(float(initial), self.min_threshold), self.max_threshold)
        scalar = lambda v, dtype=torch.float32: torch.tensor(v, dtype=dtype)  # noqa: E731
        for name, value in (("target", float(target)), ("initial", initial), ("threshold", initial), ("integral", 0.0),
                            ("pending_threshold", initial), ("pending_integral", 0.0),
                            ("observed_experts", 0.0), ("observed_tokens", 0.0)):
            self.register_buffer(name, scalar(value), persistent=persistent)

    def set_target(self, target: float) -> None:
        check_target(target, self.num_experts)
        self.target.fill_(float(target))

    def commit(self) -> None:
        """Apply the update staged by the last :meth:`observe` (idempotent until the next one)."""
        self.threshold.copy_(self.pending_threshold)
        self.integral.copy_(self.pending_integral)

    @torch.no_grad()
    def observe(self, experts: Tensor, tokens: Tensor) -> None:
        """Stage the update for a forward in which ``tokens`` tokens used ``experts`` counted experts in total."""
        experts, tokens = experts.float(), tokens.float()
        seen = tokens > 0
        error = self.target - experts / tokens.clamp_min(1.0)
        integral = self.integral + error
        raw = self.initial + self.kp * error + self.ki * integral
        threshold = raw.clamp(self.min_threshold, self.max_threshold)
        integral = torch.where(raw == threshold, integral, (threshold - self.initial - self.kp * error) / self.ki)
        self.pending_threshold.copy_(torch.where(seen, threshold, self.threshold))
        self.pending_integral.copy_(torch.where(seen, integral, self.integral))
        self.observed_experts.add_(experts)
        self.observed_tokens.add_(tokens)

    def reset_observed(self) -> None:
        self.observed_experts.zero_()
        self.observed_tokens.zero_()

    def achieved(self) -> float | None:
        """Mean counted experts per token since :meth:`reset_observed` (host sync), None before any token."""
        tokens = float(self.observed_tokens)
        return None if tokens == 0 else float(self.observed_experts) / tokens

    def extra_repr(self) -> str:
        return (f"target={float(self.target):.3g}, threshold={float(self.threshold):.3g}, "
                f"kp={self.kp:.3g}, ki={self.ki:.3g}")


def check_target(target: float, num_experts: int) -> None:
    if not isinstance(target, (int, float)) or not 0 < target <= num_experts:
        raise ValueError(f"expert budget must be in (0, {num_experts}] experts per token, got {target!r}")
