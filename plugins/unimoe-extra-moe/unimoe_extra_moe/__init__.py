"""Example unimoe plug-in: ``lowrank`` experts and the ``learned_threshold`` router."""

from unimoe_extra_moe.experts import LowRankExperts
from unimoe_extra_moe.routers import LearnedThresholdRouter

__all__ = ["LearnedThresholdRouter", "LowRankExperts"]
