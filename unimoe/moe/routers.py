"""Routers: score every token against the dynamic experts and pick a set per token.

The :class:`Router` base owns the gate (one fp32 linear map over the dynamic experts,
plus the shared experts' logits when those are gate-weighted) and the optional input
jitter; a subclass only decides *which* experts a token uses and with what weights
(:meth:`Router.select`). Register new routers in ``unimoe.registry.ROUTERS``.

Top-p routers can hold an expert budget (:mod:`unimoe.moe.budget`): ``budget`` is the
router plug-in that trains with one, and :meth:`Router.set_budget` puts one on any top-p
router at inference (``unimoe generate --experts-per-token``). Without a controller top-p
is exactly the paper's rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from unimoe.moe.budget import ThresholdController
from unimoe.registry import ROUTERS


@dataclass
class RouterOutput:
    """One router decision for T tokens over E dynamic experts (all fp32)."""

    logits: Tensor  # [T, E] gate logits of the dynamic experts
    probs: Tensor  # [T, E] softmax(logits)
    selected: Tensor  # [T, E] bool, the experts each token uses (padding tokens: none)
    weights: Tensor  # [T, E] combine weights, zero where not selected
    shared_logits: Tensor | None  # [T, S] gate logits of the shared experts, or None


class Router(nn.Module):
    """Base router: fp32 gate over ``num_experts`` dynamic (+ ``num_shared``) experts.

    ``jitter`` multiplies the router input by U(1 - jitter, 1 + jitter) in training
    (Switch-style input jitter; the paper uses 0.01). Subclasses implement :meth:`select`.
    """

    def __init__(self, hidden_size: int, num_experts: int, num_shared: int = 0, jitter: float = 0.0) -> None:
        super().__init__()
        if num_experts <= 0:
            raise ValueError(f"{type(self).__name__}: num_experts must be >= 1, got {num_experts}")
        if num_shared < 0:
            raise ValueError(f"{type(self).__name__}: num_shared must be >= 0, got {num_shared}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"{type(self).__name__}: jitter must be in [0, 1), got {jitter}")
        self.hidden_size, self.num_experts, self.num_shared, self.jitter = hidden_size, num_experts, num_shared, jitter
        # One matrix, as in the paper: rows [0, E) dynamic experts, rows [E, E+S) shared experts.
        self.gate = nn.Linear(hidden_size, num_experts + num_shared, bias=False)
        # Which experts an expert budget counts (the layer marks null experts out).
        self.register_buffer("counted_experts", torch.ones(num_experts, dtype=torch.bool), persistent=False)

    def compute_logits(self, x: Tensor) -> Tensor:
        """x [T, D] -> fp32 gate logits [T, E + S], never autocast to low precision."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float()
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(h, self.gate.weight.float())

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> RouterOutput:
        """x [T, D], token_mask [T] bool (True = real token) -> :class:`RouterOutput`."""
        all_logits = self.compute_logits(x)  # [T, E + S]
        logits, shared_logits = all_logits.split([self.num_experts, self.num_shared], dim=-1)
        probs = logits.softmax(dim=-1)  # [T, E]
        selected, weights = self.select(logits, probs)
        if token_mask is not None:  # padding tokens are not routed: no compute, no statistics
            selected = selected & token_mask.unsqueeze(-1)
            weights = weights.masked_fill(~selected, 0.0)
        self.observe(selected, token_mask)
        return RouterOutput(logits, probs, selected, weights, shared_logits if self.num_shared else None)

    def select(self, logits: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """logits, probs [T, E] fp32 -> (selected [T, E] bool, weights [T, E] fp32)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ expert budget hooks
    def set_counted_experts(self, counted: Tensor) -> None:
        """``counted [E]`` bool: the experts a budget counts (the layer passes its real experts)."""
        if counted.shape != (self.num_experts,):
            raise ValueError(f"{type(self).__name__}: counted experts must be [{self.num_experts}], got {tuple(counted.shape)}")
        self.counted_experts = counted.to(device=self.counted_experts.device, dtype=torch.bool).clone()

    def begin_forward(self) -> None:
        """Once per model-level forward (see :meth:`unimoe.model.transformer.AudioLM.begin_forward`)."""

    def observe(self, selected: Tensor, token_mask: Tensor | None) -> None:
        """After a selection: routers with a budget measure it here."""

    def set_budget(self, experts_per_token: float | None) -> None:
        """Hold ``experts_per_token`` real experts per token at inference (None: back to the trained rule)."""
        raise TypeError(f"{type(self).__name__} has no threshold to control; an expert budget needs a top-p router")

    @property
    def top_p(self) -> float | None:
        """The top-p in effect, for routers that have one (else None)."""
        return None

    def override_top_p(self, top_p: float | None) -> None:
        """Change the top-p at inference (adaptive compute); None restores the configured one."""
        raise TypeError(f"{type(self).__name__} has no top-p to override")

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_shared={self.num_shared}, jitter={self.jitter}"


def _renormalise(probs: Tensor, selected: Tensor) -> Tensor:
    """Probabilities restricted to the selected set, rescaled to sum to 1 per token."""
    kept = probs * selected
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


class TopPRouter(Router):
    """Top-p (dynamic-capacity) routing, the paper's rule.

    Per token: sort the probabilities, keep the smallest prefix whose sum reaches ``top_p``,
    renormalise the weights over it. k varies per token between 1 and ceil(top_p * E).
    With an expert budget (:meth:`set_budget`) the threshold is a controller's instead, and
    k is capped at ``max_experts`` (default: all experts).
    """

    def __init__(
        self, hidden_size: int, num_experts: int, num_shared: int = 0, top_p: float = 0.7, jitter: float = 0.01
    ) -> None:
        super().__init__(hidden_size, num_experts, num_shared, jitter)
        _check_top_p(top_p, "top_p")
        self.configured_top_p = float(top_p)
        self._override: float | None = None
        self.controller: ThresholdController | None = None
        self.adapt_in_eval = False
        """Whether the controller keeps adapting in eval mode (an inference budget) or is frozen there."""
        self.max_experts = num_experts

    @property
    def top_p(self) -> float:
        if self.controller is not None:
            return float(self.controller.threshold)  # host sync: for reports, not the hot path
        return self.configured_top_p if self._override is None else self._override

    def override_top_p(self, top_p: float | None) -> None:
        if top_p is not None:
            _check_top_p(top_p, "top_p override")
        if top_p is not None and self.controller is not None:
            raise ValueError(f"{type(self).__name__}: the threshold is held by an expert budget; remove the budget "
                             "(set_budget(None)) before overriding top-p")
        self._override = None if top_p is None else float(top_p)

    def max_selected(self) -> int:
        """The most experts one token can get under the rule in effect."""
        if self.controller is not None:
            return self.max_experts
        return max_experts_for(self.top_p, self.num_experts)

    def select(self, logits: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        controlled = self.controller is not None
        p = self.controller.threshold if controlled else self.top_p  # a 0-dim tensor under a budget
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [T, E]
        mass_before = F.pad(sorted_probs.cumsum(dim=-1)[:, :-1], (1, 0))  # exclusive prefix sums
        keep = mass_before < p  # position i is needed iff the prefix before it is short of p
        keep[:, 0] = True
        # Without a budget: in exact arithmetic k <= ceil(p * E) always (the sorted prefix beats
        # the uniform one); the cap only stops float rounding of near-uniform rows from adding
        # one more. With a budget the threshold moves, and the cap is the budget's hard limit.
        keep[:, self.max_experts if controlled else max_experts_for(p, probs.shape[-1]) :] = False
        selected = torch.zeros_like(keep).scatter(-1, order, keep)
        return selected, _renormalise(probs, selected)

    # ------------------------------------------------------------------ expert budget
    def begin_forward(self) -> None:
        if self.controller is not None and self._adapting():
            self.controller.commit()

    def _adapting(self) -> bool:
        return self.training or self.adapt_in_eval

    def observe(self, selected: Tensor, token_mask: Tensor | None) -> None:
        if self.controller is None or not self._adapting():
            return
        experts = (selected & self.counted_experts).sum()
        tokens = torch.tensor(selected.shape[0], device=selected.device) if token_mask is None else token_mask.sum()
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.stack([experts.float(), tokens.float()])
            dist.all_reduce(both)  # one threshold for all ranks, driven by the global batch
            experts, tokens = both[0], both[1]
        self.controller.observe(experts, tokens)

    def set_budget(self, experts_per_token: float | None) -> None:
        """Start (from the current top-p) or stop an inference-time budget; the trained rule is untouched."""
        if experts_per_token is None:
            self.controller, self.adapt_in_eval = None, False
            return
        device = self.gate.weight.device
        self.controller = ThresholdController(experts_per_token, self.top_p, num_experts=self.num_experts,
                                              persistent=False).to(device)
        self.adapt_in_eval = True

    def extra_repr(self) -> str:
        budget = f", budget={float(self.controller.target):.3g}" if self.controller is not None else ""
        return f"{super().extra_repr()}, top_p={self.top_p}{budget}"


class BudgetRouter(TopPRouter):
    """Top-p routing whose threshold a PI controller moves to hold ``target_experts`` real experts
    per token (DTop-p): the alternative router for training with a compute budget.

    ``top_p`` is the starting threshold; ``max_experts`` caps any token's experts (default:
    all). The controller adapts while training and is frozen in eval mode (the learned
    threshold is in the checkpoint); :meth:`set_budget` makes it adapt to a new target at
    inference and ``set_budget(None)`` restores the trained state.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_shared: int = 0,
        target_experts: float = 2.0,
        top_p: float = 0.7,
        max_experts: int | None = None,
        proportional_gain: float = 0.2,
        integral_gain: float = 0.5,
        jitter: float = 0.01,
    ) -> None:
        super().__init__(hidden_size, num_experts, num_shared, top_p=top_p, jitter=jitter)
        if max_experts is not None and not (isinstance(max_experts, int) and 1 <= max_experts <= num_experts):
            raise ValueError(f"BudgetRouter.max_experts must be an int in [1, {num_experts}], got {max_experts!r}")
        self.max_experts = num_experts if max_experts is None else max_experts
        try:
            self.controller = ThresholdController(target_experts, top_p, num_experts=num_experts,
                                                  proportional_gain=proportional_gain, integral_gain=integral_gain)
        except ValueError as exc:
            raise ValueError(f"BudgetRouter: {exc}") from exc
        self._trained: dict[str, Tensor] | None = None

    def set_budget(self, experts_per_token: float | None) -> None:
        if experts_per_token is None:
            if self._trained is not None:
                for name, value in self._trained.items():
                    getattr(self.controller, name).copy_(value)
                self._trained = None
            self.adapt_in_eval = False
            return
        if self._trained is None:
            self._trained = {name: t.clone() for name, t in self.controller.named_buffers()}
        self.controller.set_target(experts_per_token)
        self.adapt_in_eval = True

    def override_top_p(self, top_p: float | None) -> None:
        if top_p is not None:
            raise ValueError("BudgetRouter: its threshold is held by its controller; change the budget "
                             "(set_budget / --experts-per-token) instead of overriding top-p")


class TopKRouter(Router):
    """Fixed top-k routing (the baseline), weights renormalised over the k unless told not to."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_shared: int = 0,
        top_k: int = 2,
        normalize: bool = True,
        jitter: float = 0.01,
    ) -> None:
        super().__init__(hidden_size, num_experts, num_shared, jitter)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"TopKRouter.top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.top_k, self.normalize = int(top_k), bool(normalize)

    def select(self, logits: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        index = probs.topk(self.top_k, dim=-1).indices  # [T, k]
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, True)
        weights = _renormalise(probs, selected) if self.normalize else probs * selected
        return selected, weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, normalize={self.normalize}"


def max_experts_for(top_p: float, num_experts: int) -> int:
    """ceil(top_p * E): the most experts top-p can need (uniform probabilities)."""
    return min(num_experts, max(1, math.ceil(top_p * num_experts - 1e-6)))


def _check_top_p(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"TopPRouter.{name} must be in (0, 1], got {value!r}")


ROUTERS.base = Router
