"""Shared helpers for the evaluation tests: real speech from espeak-ng, simple music-like
signals, and manifest writing. (Imported by the other test_eval_* modules.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SENTENCES = {
    "s1": "The quick brown fox jumps over the lazy dog.",
    "s2": "She sells sea shells by the sea shore every morning.",
    "s3": "Please call me tomorrow before the meeting starts.",
}


def espeak(path: Path, text: str, voice: str = "en+m3") -> Path:
    """Synthesise ``text`` with espeak-ng (real speech, 22.05 kHz)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    return path


def tone_mix(path: Path, freqs: list[float], seconds: float = 2.0, sr: int = 16000, seed: int = 0) -> Path:
    """A chord of decaying harmonic notes plus a little noise: a stand-in for music clips."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = np.zeros_like(t)
    for f in freqs:
        for h in (1, 2, 3):
            x += np.sin(2 * np.pi * f * h * t + rng.uniform(0, 2 * np.pi)) / h
    x *= np.exp(-t * 0.8)
    x += 0.01 * rng.standard_normal(t.shape)
    x = 0.5 * x / np.abs(x).max()
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.astype(np.float32), sr)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
