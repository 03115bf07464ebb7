"""Loading one clip for a backend, with the checks that turn bad audio into a skip reason.

A generated clip can be missing, unreadable, silent (a collapsed model often emits
zeros) or too short for the embedding model. Each is reported per item with a reason
instead of flowing into a metric as NaN or as a meaningless number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unimoe.audio import AudioFileError, load_audio


class ClipSkip(Exception):
    """This clip cannot be scored; ``reason`` goes into the per-item skip report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ClipPolicy:
    """Thresholds for usable audio.

    ``min_duration_s``: shorter clips are skipped (ASR and speaker models need context).
    ``silence_dbfs``: a clip whose peak is below this level is treated as silent.
    """

    min_duration_s: float = 0.3
    silence_dbfs: float = -60.0


def load_clip(path: str | Path | None, sample_rate: int, policy: ClipPolicy, role: str = "generated") -> np.ndarray:
    """Load ``path`` as mono float32 at ``sample_rate`` or raise :class:`ClipSkip`."""
    if path is None:
        raise ClipSkip(f"no {role} audio given")
    try:
        wav, _ = load_audio(path, sample_rate=sample_rate, mono=True)
    except AudioFileError as exc:
        raise ClipSkip(f"{role} audio unusable: {exc}") from None
    x = wav[0].numpy().astype(np.float32, copy=False)
    duration = x.shape[0] / sample_rate
    if duration < policy.min_duration_s:
        raise ClipSkip(f"{role} audio too short: {duration:.3f} s < {policy.min_duration_s} s ({path})")
    peak = float(np.abs(x).max())
    if peak <= 10 ** (policy.silence_dbfs / 20.0):
        level = "-inf" if peak == 0 else f"{20 * np.log10(peak):.1f}"
        raise ClipSkip(f"{role} audio is silent: peak {level} dBFS <= {policy.silence_dbfs} dBFS ({path})")
    return x
