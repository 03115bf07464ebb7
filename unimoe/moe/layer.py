"""The Dynamic-Capacity MoE layer: router + dynamic expert groups + shared experts.

``y = sum_{e in selected(x)} w_e(x) * E_e(x) + sum_s v_s(x) * S_s(x)``

* ``selected`` and the normalised weights come from the router (top-p in the paper);
  null experts in the selected set contribute zero and cost nothing.
* shared gating ``"weighted"`` (the authors' release): a softmax over the logits of
  {selected dynamic experts} U {shared experts} gives each shared expert its weight
  ``v_s`` and the total mass of the dynamic part, which is spread over the selected
  experts by the router's normalised weights: ``w_e = mass * w_router_e``.
  ``"unweighted"``: ``w_e = w_router_e`` and ``v_s = 1``.

How the routed experts run is a separate choice (:data:`DISPATCH_PATHS`): the sorted,
grouped-GEMM path of :mod:`unimoe.moe.dispatch` for training-sized batches, and for a few
rows (decoding) the paths of :mod:`unimoe.moe.small_batch`. ``dispatch="auto"`` picks by
row count: ``grouped`` above ``small_batch_rows`` rows, else ``small_batch`` (eager) or
``dense`` (while ``torch.compile`` traces: no host sync, fixed shapes). All paths compute the
same sum; only the kernels differ.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from unimoe.moe.config import DEFAULT_SMALL_BATCH_ROWS, DISPATCH_CHOICES, MoEConfig
from unimoe.moe.dispatch import dispatch, group_slots
from unimoe.moe.experts import ExpertGroup, NullExperts, SharedExperts
from unimoe.moe.losses import entropy_sum, z_loss_sum
from unimoe.moe.routers import Router, RouterOutput
from unimoe.moe.small_batch import all_experts_dispatch, supports_small_batch, used_experts_dispatch
from unimoe.moe.stats import ExpertCounts, RoutingInfo, StatsMode
from unimoe.registry import EXPERTS, ROUTERS, ComponentSpec, Registry, RegistryError

SharedGating = Literal["weighted", "unweighted"]
DispatchPath = Literal["auto", "grouped", "small_batch", "dense"]
Dispatcher = Callable[..., Tensor]
"""``(x [T, D], selected [T, E], weights [T, E], slots) -> [T, D]``: how routed experts are run."""
DISPATCH_PATHS: dict[str, Dispatcher] = {
    "grouped": dispatch,  # sort / gather / grouped GEMM / scatter: thousands of rows
    "small_batch": used_experts_dispatch,  # each expert some row picked, on all rows: a few rows, eager
    "dense": all_experts_dispatch,  # every expert on every row, masked: a few rows, compiled / CUDA graphs
}


class MoELayer(nn.Module):
    """A Dynamic-Capacity MoE FFN. Components are injected, not chosen by name here.

    router:         a :class:`Router` over all dynamic experts (``router.num_experts`` =
                    sum of the groups' experts; ``router.num_shared`` = number of shared
                    experts when gating is weighted, else 0)
    experts:        expert groups covering consecutive dynamic-expert indices
    shared_experts: always-on experts, or None
    """

    def __init__(
        self,
        *,
        router: Router,
        experts: Sequence[ExpertGroup],
        shared_experts: SharedExperts | None = None,
        shared_gating: SharedGating = "weighted",
        dispatch: DispatchPath = "auto",
        small_batch_rows: int = DEFAULT_SMALL_BATCH_ROWS,
    ) -> None:
        super().__init__()
        if shared_gating not in ("weighted", "unweighted"):
            raise ValueError(f"MoELayer.shared_gating must be 'weighted' or 'unweighted', got {shared_gating!r}")
        if dispatch not in DISPATCH_CHOICES:
            raise ValueError(f"MoELayer.dispatch must be one of {DISPATCH_CHOICES}, got {dispatch!r}")
        if not isinstance(small_batch_rows, int) or small_batch_rows < 0:
            raise ValueError(f"MoELayer.small_batch_rows must be an int >= 0, got {small_batch_rows!r}")
        num_dynamic = sum(g.num_experts for g in experts)
        if num_dynamic != router.num_experts:
            raise ValueError(
                f"MoELayer: the expert groups hold {num_dynamic} experts but the router scores "
                f"{router.num_experts}; they must match"
            )
        num_shared = shared_experts.num_experts if shared_experts is not None else 0
        gated = num_shared if shared_gating == "weighted" else 0
        if router.num_shared != gated:
            raise ValueError(
                f"MoELayer: with shared_gating={shared_gating!r} and {num_shared} shared experts the router "
                f"must produce {gated} shared logits, it produces {router.num_shared}"
            )
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.shared_experts = shared_experts
        self.shared_gating = shared_gating
        self.num_experts = num_dynamic
        real = torch.cat([torch.full((g.num_experts,), g.takes_tokens, dtype=torch.bool) for g in experts])
        self.register_buffer("real_experts", real, persistent=False)  # [E] bool
        self.num_real_experts = int(real.sum())
        router.set_counted_experts(real)  # what an expert budget counts: real experts, not null ones
        self.slots = group_slots(self.experts)
        self.small_batch_capable = supports_small_batch(self.slots)
        self.dispatch = dispatch
        self.small_batch_rows = small_batch_rows
        # The grouped (many-row) dispatcher; expert parallelism injects an
        # unimoe.moe.expert_parallel.ExpertParallelDispatcher here (unimoe.training.parallel),
        # and then every forward takes it (the small-batch paths need all experts' weights locally).
        self.dispatcher: Dispatcher = DISPATCH_PATHS["grouped"]

    # ------------------------------------------------------------------ adaptive compute
    @property
    def top_p(self) -> float | None:
        """The router's top-p in effect (None for routers without one)."""
        return self.router.top_p

    @top_p.setter
    def top_p(self, value: float | None) -> None:
        """Override top-p at inference (fewer/more experts per token); None restores it."""
        self.router.override_top_p(value)

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, task_ids: Tensor | None = None, *, stats: StatsMode = "full"
    ) -> tuple[Tensor, RoutingInfo | ExpertCounts]:
        """x [B, L, D], token_mask [B, L] bool (True = real), task_ids [B, L] long -> (y [B, L, D], info).

        ``stats="counts"`` reports only the real experts per token (decoding), not a RoutingInfo.
        """
        b, l, d = x.shape
        flat = x.reshape(b * l, d)  # [T, D]
        mask = None if token_mask is None else token_mask.reshape(b * l).to(torch.bool)  # [T]
        route = self.router(flat, mask)

        routed_w, shared_w = self.combine_weights(route)
        path = self.dispatch_path(b * l)
        run = self.dispatcher if path == "grouped" else DISPATCH_PATHS[path]
        y = run(flat, route.selected, routed_w, self.slots)  # [T, D]
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat, shared_w)
        if stats == "counts":
            info = ExpertCounts((route.selected & self.real_experts).sum(dim=-1))
        else:
            info = self._routing_info(route, mask, None if task_ids is None else task_ids.reshape(b * l))
        return y.view(b, l, d), info

    def dispatch_path(self, rows: int) -> str:
        """The expert path for a forward of ``rows`` tokens (see the module doc)."""
        if self.dispatcher is not DISPATCH_PATHS["grouped"]:  # expert parallel: only the injected dispatcher sees all experts
            if self.dispatch in ("small_batch", "dense"):
                raise ValueError(
                    f"MoELayer.dispatch={self.dispatch!r} needs every expert on this rank; "
                    "under expert parallelism use 'auto' or 'grouped'"
                )
            return "grouped"
        if self.dispatch != "auto":
            return self.dispatch
        if rows > self.small_batch_rows or not self.small_batch_capable:
            return "grouped"
        return "dense" if torch.compiler.is_compiling() else "small_batch"

    def combine_weights(self, route: RouterOutput) -> tuple[Tensor, Tensor | None]:
        """Routed weights [T, E] and shared-expert weights [T, S] (None = unweighted) of a routing."""
        if route.shared_logits is None:
            return route.weights, None
        e = self.num_experts
        # Softmax over {selected dynamic} U {shared}; unselected dynamic logits drop out.
        joint = torch.cat([route.logits.masked_fill(~route.selected, float("-inf")), route.shared_logits], dim=-1)
        joint = joint.softmax(dim=-1)  # [T, E + S]
        dynamic_mass = joint[:, :e].sum(dim=-1, keepdim=True)  # [T, 1]
        return route.weights * dynamic_mass, joint[:, e:]

    def _routing_info(self, route: RouterOutput, mask: Tensor | None, task_ids: Tensor | None) -> RoutingInfo:
        t = route.selected.shape[0]
        real_tok = torch.ones(t, dtype=torch.bool, device=route.selected.device) if mask is None else mask
        selected = route.selected  # padding rows are already empty
        real_per_token = (selected & self.real_experts).sum(dim=-1)  # [T] long
        hist = torch.zeros(self.num_real_experts + 1, dtype=torch.long, device=selected.device)
        hist.scatter_add_(0, real_per_token, real_tok.long())  # bincount over real tokens, no sync
        all_logits = route.logits if route.shared_logits is None else torch.cat([route.logits, route.shared_logits], -1)
        return RoutingInfo.from_sums(
            tokens_per_expert=selected.sum(dim=0),
            active_real_hist=hist,
            tokens_per_expert_by_task=None if task_ids is None else _counts_by_task(selected, task_ids, real_tok),
            real_experts=self.real_experts,
            num_tokens=real_tok.sum(),
            prob_sum=(route.probs * real_tok.unsqueeze(-1)).sum(dim=0),
            z_sum=z_loss_sum(all_logits, real_tok),
            entropy_sum=entropy_sum(route.probs, real_tok),
        )

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, real={self.num_real_experts}, shared_gating={self.shared_gating!r}, "
                f"dispatch={self.dispatch!r}")


def _counts_by_task(selected: Tensor, task_ids: Tensor, real_tok: Tensor) -> Tensor:
    """[num_tasks, E] tokens per expert split by task id (ids < 0 are ignored)."""
    num_tasks = max(int(task_ids.max()) + 1, 0) if task_ids.numel() else 0  # host sync
    table = torch.zeros(num_tasks, selected.shape[1], dtype=torch.long, device=selected.device)
    if num_tasks:
        rows = (selected & (real_tok & (task_ids >= 0)).unsqueeze(-1)).long()  # [T, E]
        table.index_add_(0, task_ids.clamp_min(0), rows)
    return table


def build_moe_layer(hidden_size: int, cfg: MoEConfig) -> MoELayer:
    """Build an :class:`MoELayer` from a config; a bad field raises an error naming it.

    Dynamic experts, in index order: ``cfg.expert`` x ``num_routed_experts``, then each
    ``cfg.extra_experts`` group (its spec gives ``num_experts``), then the null experts.
    """
    if hidden_size <= 0:
        raise ValueError(f"build_moe_layer: hidden_size must be positive, got {hidden_size}")
    groups: list[ExpertGroup] = []
    if cfg.num_routed_experts:
        context = dict(hidden_size=hidden_size, intermediate_size=cfg.routed_intermediate_size, grouped_mm=cfg.grouped_mm)
        groups.append(_build("MoEConfig.expert", EXPERTS, cfg.expert, num_experts=cfg.num_routed_experts, **context))
    for i, spec in enumerate(cfg.extra_experts):
        context = dict(hidden_size=hidden_size, intermediate_size=cfg.routed_intermediate_size, grouped_mm=cfg.grouped_mm)
        groups.append(_build(f"MoEConfig.extra_experts[{i}]", EXPERTS, spec, **context))
    if cfg.num_null_experts:
        groups.append(NullExperts(cfg.num_null_experts))
    num_dynamic = sum(g.num_experts for g in groups)
    weighted = cfg.shared_gating == "weighted" and cfg.num_shared_experts > 0
    router = _build(
        "MoEConfig.router",
        ROUTERS,
        cfg.router,
        hidden_size=hidden_size,
        num_experts=num_dynamic,
        num_shared=cfg.num_shared_experts if weighted else 0,
    )
    shared = (
        SharedExperts(hidden_size, cfg.shared_intermediate_size, cfg.num_shared_experts)
        if cfg.num_shared_experts
        else None
    )
    return MoELayer(router=router, experts=groups, shared_experts=shared, shared_gating=cfg.shared_gating,
                    dispatch=cfg.dispatch, small_batch_rows=cfg.small_batch_rows)


def _build(field: str, registry: Registry, spec: ComponentSpec, **context):
    """Build one component, prefixing any error with the config field it came from."""
    try:
        obj = registry.build(spec, **context)
    except (RegistryError, ValueError, TypeError) as exc:
        raise ValueError(f"{field}: {exc}") from exc
    if registry.base is not None and not isinstance(obj, registry.base):
        raise ValueError(f"{field}: built a {type(obj).__name__}, expected a subclass of {registry.base.__name__}")
    expected = context.get("num_experts")
    if registry is EXPERTS and expected is not None and obj.num_experts != expected:
        raise ValueError(f"{field}: built {obj.num_experts} experts, expected {expected}")
    return obj
