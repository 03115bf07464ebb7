"""Reading and writing audio files with clear errors.

torchaudio >= 2.9 routes file I/O through torchcodec, so files are read and written with
soundfile; resampling uses torchaudio.functional (pure tensor ops). Every failure names the
file, because a user with 100k clips needs to know which one is broken.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from unimoe.atomic import atomic_path


class AudioFileError(RuntimeError):
    """An audio file is missing, unreadable, empty or otherwise unusable."""


def load_audio(path: str | Path, sample_rate: int | None = None, mono: bool = True) -> tuple[torch.Tensor, int]:
    """Load ``path`` as float32 ``[channels, samples]`` in [-1, 1].

    With ``sample_rate`` the audio is resampled to it; with ``mono`` channels are averaged
    (``[1, samples]``). Returns the waveform and its (possibly new) sample rate.
    """
    path = Path(path)
    if not path.exists():
        raise AudioFileError(f"audio file not found: {path}")
    try:
        data, file_sr = sf.read(str(path), dtype="float32", always_2d=True)  # [samples, channels]
    except Exception as exc:  # soundfile raises several types for corrupt files
        raise AudioFileError(f"cannot read audio file {path}: {exc}") from exc
    if data.shape[0] == 0:
        raise AudioFileError(f"audio file {path} contains no samples")
    if not np.isfinite(data).all():
        raise AudioFileError(f"audio file {path} contains NaN or infinite samples")
    wav = torch.from_numpy(np.ascontiguousarray(data.T))  # [channels, samples]
    if mono and wav.shape[0] > 1:
        wav = wav.mean(dim=0, keepdim=True)
    if sample_rate is not None and sample_rate != file_sr:
        wav = AF.resample(wav, orig_freq=file_sr, new_freq=sample_rate)
        file_sr = sample_rate
    return wav, file_sr


def save_audio(path: str | Path, wav: torch.Tensor, sample_rate: int) -> Path:
    """Write ``wav`` (``[samples]`` or ``[channels, samples]``) as 16-bit PCM WAV atomically.

    The file is written under a temporary name and renamed, so a crash never leaves a
    half-written file where a finished one is expected.
    """
    path = Path(path)
    wav = wav.detach().float().cpu()
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise ValueError(f"save_audio expects [samples] or [channels, samples], got shape {tuple(wav.shape)}")
    data = wav.clamp(-1.0, 1.0).T.numpy()  # [samples, channels]
    with atomic_path(path) as tmp:
        sf.write(str(tmp), data, sample_rate, subtype="PCM_16", format="WAV")
    return path
