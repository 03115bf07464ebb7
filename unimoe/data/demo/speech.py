"""Synthetic speakers and speech with espeak-ng.

A speaker is a fixed (language voice, voice variant, pitch, speed) combination, so every
utterance of one speaker sounds alike and differs from the others: enough for voice
cloning to have same-speaker prompts. Audio is trimmed of the synthesiser's leading and
trailing silence and resampled to the corpus sample rate.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from unimoe.audio import save_audio

BASE_VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = [
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
    "klatt4", "Alicia", "Andrea", "Annie", "aunty", "belinda", "linda", "steph", "anika", "david", "edward",
    "john", "paul", "rob", "robert", "max", "michel", "grandpa", "quincy", "Lee", "Mike", "Michael", "benjamin",
    "caleb", "Andy", "iven", "norbert", "shelby", "travis", "victor",
]
"""Natural-sounding variants only (no robots, whispers or novelty voices)."""


class ToolMissingError(RuntimeError):
    """A system program the demo corpus needs is not installed."""


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissingError(f"'{name}' not found; install it with: apt-get install {package} (or run scripts/setup.sh)")
    return path


@functools.lru_cache(maxsize=1)
def available_variants() -> tuple[str, ...]:
    """Variants from :data:`VARIANTS` that this espeak-ng installation actually has."""
    exe = require_tool("espeak-ng", "espeak-ng")
    out = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    files = {tok[3:].lower() for line in out.splitlines() for tok in line.split() if tok.startswith("!v/")}
    found = tuple(v for v in VARIANTS if v.lower() in files)
    if len(found) < 4:
        raise ToolMissingError(f"espeak-ng offers too few voice variants ({len(found)}); is espeak-ng-data complete?")
    return found


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: str
    variant: str
    pitch: int
    """espeak-ng pitch 0-99."""
    speed: int
    """Words per minute."""

    def to_meta(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "id"}


def make_speakers(count: int, seed: int) -> list[Speaker]:
    """``count`` distinct speakers: no two share a (voice, variant) pair."""
    rng = random.Random(f"speakers:{seed}")
    variants = list(available_variants())
    pairs = [(v, w) for v in BASE_VOICES for w in variants]
    rng.shuffle(pairs)
    if count > len(pairs):
        raise ValueError(f"at most {len(pairs)} distinct speakers are available, asked for {count}")
    # Pitch and speed on shuffled even grids, so speakers are spread out, not clustered.
    pitches = [round(25 + 50 * (i + rng.random()) / count) for i in range(count)]
    speeds = [round(135 + 50 * (i + rng.random()) / count) for i in range(count)]
    rng.shuffle(pitches)
    rng.shuffle(speeds)
    return [
        Speaker(f"spk{i:03d}", voice, variant, pitch=pitches[i], speed=speeds[i])
        for i, (voice, variant) in enumerate(pairs[:count])
    ]


def trim_silence(wav: np.ndarray, sr: int, threshold: float = 0.01, margin_s: float = 0.05) -> np.ndarray:
    """Cut leading/trailing samples quieter than ``threshold`` (keeping a short margin)."""
    loud = np.nonzero(np.abs(wav) > threshold)[0]
    if loud.size == 0:
        return wav
    margin = int(margin_s * sr)
    return wav[max(0, loud[0] - margin): loud[-1] + margin + 1]


def synthesize(speaker: Speaker, text: str, out: Path, sample_rate: int, pitch_jitter: int = 0) -> float:
    """Speak ``text`` as ``speaker`` into ``out`` (written atomically); returns seconds."""
    exe = require_tool("espeak-ng", "espeak-ng")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.espeak-{os.getpid()}.wav")
    cmd = [exe, "-v", f"{speaker.voice}+{speaker.variant}", "-p", str(max(0, min(99, speaker.pitch + pitch_jitter))),
           "-s", str(speaker.speed), "-w", str(tmp), "--stdin"]
    try:
        proc = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0 or not tmp.exists():
            raise RuntimeError(f"espeak-ng failed for {out.name} ({' '.join(cmd)}): {proc.stderr.strip()}")
        data, sr = sf.read(str(tmp), dtype="float32")
    finally:
        tmp.unlink(missing_ok=True)
    if data.ndim > 1:
        data = data.mean(axis=1)
    data = trim_silence(data, sr)
    wav = torch.from_numpy(np.ascontiguousarray(data)).unsqueeze(0)
    if sr != sample_rate:
        wav = AF.resample(wav, sr, sample_rate)
    peak = float(wav.abs().max())
    if peak > 0:
        wav = wav * (0.9 / peak)
    save_audio(out, wav, sample_rate)
    return wav.shape[-1] / sample_rate
