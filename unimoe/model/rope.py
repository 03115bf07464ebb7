"""Rotary frequencies, with the RoPE scalings of pretrained LMs unimoe can start from.

``rope_inv_freq(head_dim, theta, scaling)`` is the ``[head_dim / 2]`` inverse-frequency
vector every rotary position is multiplied by. ``scaling`` (``AudioLMConfig.rope_scaling``)
is None (plain RoPE) or one of the kinds below, as Hugging Face configs write them
(``rope_scaling`` / ``rope_parameters``):

* ``linear``: positions divided by ``factor`` (= frequencies divided by it);
* ``llama3``: Llama 3.1's frequency-dependent rescaling (``factor``, ``low_freq_factor``,
  ``high_freq_factor``, ``original_max_position_embeddings``): long wavelengths are divided
  by ``factor``, short ones kept, the band in between interpolated.

Kinds that change attention magnitudes or depend on the sequence length (``yarn``,
``dynamic``, ``longrope``...) are refused by :func:`check_rope_scaling` rather than
approximated.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: Optional[dict[str, Any]], where: str = "rope_scaling") -> Optional[dict[str, Any]]:
    """Validate and normalise a scaling spec -> ``{"rope_type": kind, **its numbers}`` or None."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"{where} must be a mapping or null, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"{where}: RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_SCALING_KEYS)}, or none); "
            "unimoe does not approximate other kinds"
        )
    out: dict[str, Any] = {"rope_type": kind}
    for key in ROPE_SCALING_KEYS[kind]:
        value = scaling.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{where}: {kind} scaling needs a positive number {key!r}, got {value!r}")
        out[key] = float(value) if key != "original_max_position_embeddings" else int(value)
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"{where}: llama3 scaling needs high_freq_factor > low_freq_factor, got {scaling}")
    return out


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict[str, Any]] = None,
                  device: torch.device | None = None) -> Tensor:
    """``[head_dim / 2]`` float32 inverse frequencies ``theta^(-2i/d)``, rescaled per ``scaling``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    factor = scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    # llama3: wavelengths longer than the low-frequency cutoff are slowed by `factor`, shorter
    # than the high-frequency cutoff kept; in between, a linear blend in (context / wavelength).
    context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)
    smoothed = (1 - blend) * scaled / factor + blend * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, smoothed, scaled)
