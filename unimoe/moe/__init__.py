"""The Dynamic-Capacity Mixture-of-Experts layer (see docs/moe.md)."""

from unimoe.moe.config import MoEConfig
from unimoe.moe.dispatch import dispatch, group_slots
from unimoe.moe.experts import ExpertGroup, NullExperts, SharedExperts, SwiGLUExperts
from unimoe.moe.ffn import SwiGLU, split_swiglu, swiglu
from unimoe.moe.grouped import grouped_mm
from unimoe.moe.layer import MoELayer, build_moe_layer
from unimoe.moe.losses import AuxLossSchedule, load_balance_loss
from unimoe.moe.routers import Router, RouterOutput, TopKRouter, TopPRouter
from unimoe.moe.stats import LayerMeans, RoutingInfo, mean_over_layers

__all__ = [
    "AuxLossSchedule",
    "ExpertGroup",
    "LayerMeans",
    "MoEConfig",
    "MoELayer",
    "NullExperts",
    "Router",
    "RouterOutput",
    "RoutingInfo",
    "SharedExperts",
    "SwiGLU",
    "SwiGLUExperts",
    "TopKRouter",
    "TopPRouter",
    "build_moe_layer",
    "dispatch",
    "group_slots",
    "grouped_mm",
    "load_balance_loss",
    "mean_over_layers",
    "split_swiglu",
    "swiglu",
]
