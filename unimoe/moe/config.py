"""MoEConfig: the Dynamic-Capacity MoE layer's configuration (a plain dataclass).

jsonargparse reads it from YAML; fields naming components are :data:`ComponentSpec`
(a registered name, an import path, ``{class_path, init_args}`` or ``{name, **kwargs}``)
and are resolved by the registry in :func:`unimoe.moe.layer.build_moe_layer`. Defaults
are the paper's (UniMoE-Audio: 8 routed + 1 null + 2 shared experts, top-p 0.7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Literal, Optional, Sequence

from unimoe.moe.grouped import GROUPED_IMPLS
from unimoe.moe.losses import AuxLossSchedule
from unimoe.moe.stats import mean_over_layers
from unimoe.registry import ComponentField, plain_spec

DISPATCH_CHOICES: tuple[str, ...] = ("auto", "grouped", "small_batch", "dense")
"""How an MoE layer runs its routed experts (see :mod:`unimoe.moe.layer`)."""
DEFAULT_SMALL_BATCH_ROWS = 8
"""With ``dispatch="auto"``: forwards of at most this many tokens take a small-batch path
(measured crossover on CPU: ``unimoe bench generate``, section ``moe_dispatch``)."""

if TYPE_CHECKING:
    from torch import Tensor

    from unimoe.moe.stats import RoutingInfo


@dataclass
class MoEConfig:
    """Dynamic-Capacity MoE layer settings.

    num_routed_experts:       SwiGLU (or ``expert``) routed experts
    routed_intermediate_size: FFN width of each routed expert (paper: 2752)
    num_null_experts:         zero-output, zero-cost experts (paper: 1)
    num_shared_experts:       always-on experts (paper: 2)
    shared_intermediate_size: FFN width of each shared expert (paper: 1376)
    router:                   router spec, e.g. ``top_p`` or ``{name: top_p, top_p: 0.7, jitter: 0.01}``
    expert:                   expert type of the routed experts (``swiglu``)
    extra_experts:            more expert groups (plug-in types), each spec with ``num_experts``
    shared_gating:            ``weighted`` (authors' release) or ``unweighted``
    z_loss_coef:              weight of the router z-loss (0 = off; ~1e-3 is common)
    entropy_loss_coef:        weight of the routing-entropy loss (0 = off)
    load_balance:             schedule of the load-balance loss weight (paper: 0.025 -> 0.001 / 10k steps)
    grouped_mm:               expert GEMMs: ``auto`` (grouped kernel where native), ``grouped``, ``loop``
    dispatch:                 how routed experts run: ``auto`` (by row count), ``grouped``, ``small_batch``, ``dense``
    small_batch_rows:         with ``auto``, forwards of at most this many tokens use a small-batch path (decoding)
    """

    num_routed_experts: int = 8
    routed_intermediate_size: int = 2752
    num_null_experts: int = 1
    num_shared_experts: int = 2
    shared_intermediate_size: int = 1376
    router: ComponentField = "top_p"
    expert: ComponentField = "swiglu"
    extra_experts: List[ComponentField] = field(default_factory=list)
    shared_gating: Literal["weighted", "unweighted"] = "weighted"
    z_loss_coef: float = 0.0
    entropy_loss_coef: float = 0.0
    load_balance: AuxLossSchedule = field(default_factory=AuxLossSchedule)
    grouped_mm: Literal["auto", "grouped", "loop"] = "auto"
    dispatch: Literal["auto", "grouped", "small_batch", "dense"] = "auto"
    small_batch_rows: int = DEFAULT_SMALL_BATCH_ROWS

    def __post_init__(self) -> None:
        self.router, self.expert = plain_spec(self.router), plain_spec(self.expert)
        self.extra_experts = plain_spec(self.extra_experts)
        _non_negative("num_routed_experts", self.num_routed_experts)
        _non_negative("num_null_experts", self.num_null_experts)
        _non_negative("num_shared_experts", self.num_shared_experts)
        if self.num_routed_experts and self.routed_intermediate_size <= 0:
            raise ValueError(f"MoEConfig.routed_intermediate_size must be positive, got {self.routed_intermediate_size}")
        if self.num_shared_experts and self.shared_intermediate_size <= 0:
            raise ValueError(f"MoEConfig.shared_intermediate_size must be positive, got {self.shared_intermediate_size}")
        if self.num_routed_experts == 0 and not self.extra_experts:
            raise ValueError("MoEConfig.num_routed_experts must be >= 1 unless extra_experts provides real experts")
        if self.shared_gating not in ("weighted", "unweighted"):
            raise ValueError(f"MoEConfig.shared_gating must be 'weighted' or 'unweighted', got {self.shared_gating!r}")
        if self.grouped_mm not in GROUPED_IMPLS:
            raise ValueError(f"MoEConfig.grouped_mm must be one of {GROUPED_IMPLS}, got {self.grouped_mm!r}")
        if self.dispatch not in DISPATCH_CHOICES:
            raise ValueError(f"MoEConfig.dispatch must be one of {DISPATCH_CHOICES}, got {self.dispatch!r}")
        _non_negative("small_batch_rows", self.small_batch_rows)
        for name in ("z_loss_coef", "entropy_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.extra_experts, (list, tuple)):
            raise ValueError(f"MoEConfig.extra_experts must be a list of expert specs, got {self.extra_experts!r}")
        if isinstance(self.load_balance, dict):  # plain-Python construction from a dict
            self.load_balance = AuxLossSchedule(**self.load_balance)

    def aux_loss(
        self, infos: Sequence[Optional["RoutingInfo"]], step: int, schedule: Optional[AuxLossSchedule] = None
    ) -> "Tensor":
        """The weighted aux loss of one forward at global ``step`` (layer-averaged; dense layers are None).

        The one place the aux losses are weighted: load balance by ``schedule`` (a training
        stage's own anneal; default ``self.load_balance``) at ``step``, z-loss and entropy by
        their coefficients.
        """
        mean = mean_over_layers(infos)
        weight = (schedule or self.load_balance).weight(step)
        return weight * mean.load_balance + self.z_loss_coef * mean.z_loss + self.entropy_loss_coef * mean.entropy


def _non_negative(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"MoEConfig.{name} must be an integer >= 0, got {value!r}")
