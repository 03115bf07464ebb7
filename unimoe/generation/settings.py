"""What a generation run is asked to do: sampling, guidance, limits, adaptive compute and speed.

A plain dataclass so the CLI, the evaluation seam (``build_generator(ckpt, **options)``)
and the training stage's sample callback all name the same fields. Defaults follow the
authors' release (temperature 1.2, top-k 45, top-p 0.95, their cfg 3.0), with guidance
written AudioCraft's way: ``logits = uncond + cfg_scale * (cond - uncond)``, so the
release's ``cond + 3 * (cond - uncond)`` is ``cfg_scale = 4.0`` here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Union

PerCodebook = Union[float, List[float]]
"""One value for every codebook, or one per codebook (coarse first)."""


class SettingsError(ValueError):
    """A generation setting is out of range; the message names the field."""


@dataclass
class GenerationSettings:
    """Sampling, CFG, duration limits and router top-p for one generation run."""

    temperature: PerCodebook = 1.2
    """Softmax temperature per codebook; 0 = greedy (argmax) for that codebook."""
    top_k: Union[int, List[int]] = 45
    """Keep the k most likely tokens per codebook before sampling; 0 = off."""
    top_p: PerCodebook = 0.95
    """Nucleus: keep the smallest set of tokens whose probability reaches p; 1.0 = off."""
    cfg_scale: float = 4.0
    """Classifier-free guidance ``uncond + s * (cond - uncond)``; 1.0 = off (no uncond rows)."""
    eos_logit_scale: float = 1.0
    """Multiplies the deciding codebook's EOS logit after guidance, before the EOS-only-as-argmax rule
    (the release's ``eos_prob_mul_factor``: 0.6 for music); 1.0 = unchanged."""
    max_seconds: float = 30.0
    """Hard cap on the generated duration: EOS is forced at this many seconds."""
    min_seconds: float = 0.0
    """EOS is not allowed before this many seconds (at least one frame is always generated)."""
    max_prompt_seconds: float = 10.0
    """Longer voice-cloning references are trimmed to this (with a message)."""
    router_top_p: Optional[float] = None
    """Override the MoE routers' top-p while generating (adaptive compute); None = trained value."""
    experts_per_token: Optional[float] = None
    """Hold this mean number of real routed experts per token (a PI controller on every router's
    threshold, :mod:`unimoe.moe.budget`) instead of a fixed top-p; None = off."""
    use_cache: bool = True
    """KV-cache decoding; False recomputes the whole sequence every step (reference / benchmark)."""
    cache: str = "static"
    """``static`` (fixed shapes, finished rows masked; needed by ``compile``) or ``dynamic`` (drops finished rows)."""
    compile: bool = False
    """Compile the decoding step with ``torch.compile`` (CUDA graphs on a GPU); same tokens as eager at temperature 0."""
    routing_stats: bool = True
    """Count activated experts per token for the sidecar (on a GPU: one host sync per MoE layer and step)."""
    seed: int = 0
    """Seed of the first request; request i of a run uses ``seed + i`` unless it names its own."""
    batch_size: int = 8
    """Requests decoded together (CFG doubles the rows)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "GenerationSettings":
        """Check every field; each problem raises :class:`SettingsError` naming it."""
        for name in ("temperature", "top_p"):
            for v in _as_list(getattr(self, name)):
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise SettingsError(f"GenerationSettings.{name} must be finite numbers, got {v!r}")
        if any(v < 0 for v in _as_list(self.temperature)):
            raise SettingsError(f"GenerationSettings.temperature must be >= 0, got {self.temperature}")
        if any(not 0 < v <= 1 for v in _as_list(self.top_p)):
            raise SettingsError(f"GenerationSettings.top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in _as_list(self.top_k)):
            raise SettingsError(f"GenerationSettings.top_k must be integers >= 0, got {self.top_k}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise SettingsError(f"GenerationSettings.cfg_scale must be >= 0, got {self.cfg_scale}")
        if not isinstance(self.eos_logit_scale, (int, float)) or not math.isfinite(self.eos_logit_scale) \
                or self.eos_logit_scale < 0:
            raise SettingsError(f"GenerationSettings.eos_logit_scale must be a finite number >= 0, got {self.eos_logit_scale!r}")
        if not self.max_seconds > 0 or not math.isfinite(self.max_seconds):
            raise SettingsError(f"GenerationSettings.max_seconds must be > 0, got {self.max_seconds}")
        if not 0 <= self.min_seconds <= self.max_seconds:
            raise SettingsError(f"GenerationSettings.min_seconds must be in [0, max_seconds={self.max_seconds}], "
                                f"got {self.min_seconds}")
        if not self.max_prompt_seconds > 0:
            raise SettingsError(f"GenerationSettings.max_prompt_seconds must be > 0, got {self.max_prompt_seconds}")
        if self.router_top_p is not None and not 0 < self.router_top_p <= 1:
            raise SettingsError(f"GenerationSettings.router_top_p must be in (0, 1], got {self.router_top_p}")
        if self.experts_per_token is not None:
            if not isinstance(self.experts_per_token, (int, float)) or not math.isfinite(self.experts_per_token) \
                    or self.experts_per_token <= 0:
                raise SettingsError(f"GenerationSettings.experts_per_token must be > 0, got {self.experts_per_token!r}")
            if self.router_top_p is not None:
                raise SettingsError("GenerationSettings.experts_per_token and router_top_p both set: a budget moves "
                                    "the top-p itself; give one of them")
        if self.cache not in ("static", "dynamic"):
            raise SettingsError(f"GenerationSettings.cache must be 'static' or 'dynamic', got {self.cache!r}")
        if self.compile and (not self.use_cache or self.cache != "static"):
            raise SettingsError("GenerationSettings.compile needs the static KV cache (use_cache=True, cache='static')")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SettingsError(f"GenerationSettings.batch_size must be a positive int, got {self.batch_size}")
        if not isinstance(self.seed, int):
            raise SettingsError(f"GenerationSettings.seed must be an int, got {self.seed!r}")
        return self

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    def per_codebook(self, name: str, num_codebooks: int) -> list:
        """``temperature`` / ``top_k`` / ``top_p`` expanded to one value per codebook."""
        values = _as_list(getattr(self, name))
        if len(values) == 1:
            return values * num_codebooks
        if len(values) != num_codebooks:
            raise SettingsError(f"GenerationSettings.{name} has {len(values)} values but the model has "
                                f"{num_codebooks} codebooks; give one value or one per codebook")
        return values

    def replace(self, **changes: Any) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_options(cls, options: dict[str, Any], preset: str | None = None) -> "GenerationSettings":
        """Build from a dict of field values (over the fields of ``preset``, a registered
        generation preset); unknown keys raise naming them and the known ones."""
        values = {**(preset_options(preset) if preset else {}), **options}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(f"unknown generation setting(s) {unknown}"
                                + (f" (from preset {preset!r})" if preset else "") + f"; known: {sorted(known)}")
        return cls(**values)


def preset_options(name: str) -> dict[str, Any]:
    """The settings of the generation preset ``name`` (entry-point group ``unimoe.generation_presets``)."""
    from unimoe.registry import GENERATION_PRESETS, RegistryError

    try:
        values = GENERATION_PRESETS.build(name)
    except RegistryError as exc:
        raise SettingsError(f"unknown generation preset {name!r}: {exc}") from exc
    if not isinstance(values, dict):
        raise SettingsError(f"generation preset {name!r} returned {type(values).__name__}, not a dict of settings")
    return dict(values)


def frames_for(seconds: float, frame_rate: float) -> int:
    """Whole codec frames in ``seconds`` (rounded, so 30 s at 50 Hz is exactly 1500)."""
    return int(round(seconds * frame_rate))


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
