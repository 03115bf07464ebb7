"""The codec tokenizer interface (learned from AudioCraft's ``CompressionModel``).

A codec turns a mono waveform into ``C`` parallel streams of discrete tokens at
``frame_rate`` frames per second and back. The language model only needs the numbers
below; everything codec-specific stays behind this interface.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torchaudio.functional as AF
from torch import nn

from unimoe.audio import AudioFileError, load_audio


def exact_length(wav: torch.Tensor, length: int) -> torch.Tensor:
    """Trim or zero-pad ``wav [..., S]`` to ``length``: decoders whose convolutions lose or add a
    few edge samples still honour ``decode``'s ``T * hop_length`` contract."""
    if wav.shape[-1] >= length:
        return wav[..., :length]
    return torch.nn.functional.pad(wav, (0, length - wav.shape[-1]))


class AudioCodec(nn.Module, ABC):
    """Waveform ``[B, 1, S]`` <-> codes ``[B, C, T]`` with ``T = ceil(S / hop_length)``."""

    sample_rate: int
    """Samples per second the codec works at; inputs are resampled to it."""
    hop_length: int
    """Samples per frame."""
    num_codebooks: int
    """Parallel token streams per frame (C)."""
    cardinality: int
    """Tokens per codebook (K); the model adds eos/pad/bos specials after these."""

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.hop_length)

    @abstractmethod
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav [B, 1, S]`` float at ``sample_rate`` -> ``codes [B, C, T]`` int64 in ``[0, K)``."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, C, T]`` -> ``wav [B, 1, T * hop_length]`` float at ``sample_rate``."""

    @property
    def device(self) -> torch.device:
        """Where the codec's weights live (parameters, else buffers, else CPU)."""
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @torch.no_grad()
    def encode_file(self, path: str | Path) -> torch.Tensor:
        """Read, mix down, resample and encode one file -> ``codes [C, T]``.

        Every failure (missing, corrupt, empty, unencodable) raises ``AudioFileError``
        naming the file.
        """
        wav, _ = load_audio(path, sample_rate=self.sample_rate, mono=True)  # [1, S]
        try:
            return self.encode(wav.unsqueeze(0).to(self.device))[0].cpu()
        except ValueError as exc:
            raise AudioFileError(f"cannot encode audio file {path}: {exc}") from exc

    @torch.no_grad()
    def encode_audio(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Encode an in-memory clip at any rate: ``wav [S]`` or ``[channels, S]`` -> ``codes [C, T]``.

        Channels are averaged and the clip resampled to ``self.sample_rate`` first, the same
        path ``encode_file`` takes, so callers holding audio in memory get identical codes.
        """
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)
        if wav.dim() != 2:
            raise ValueError(f"encode_audio expects [samples] or [channels, samples], got {tuple(wav.shape)}")
        wav = wav.float().mean(dim=0, keepdim=True)  # [1, S]
        if sample_rate != self.sample_rate:
            wav = AF.resample(wav, orig_freq=sample_rate, new_freq=self.sample_rate)
        return self.encode(wav.unsqueeze(0).to(self.device))[0].cpu()

    def check_waveform(self, wav: torch.Tensor) -> torch.Tensor:
        """Validate ``wav [B, 1, S]`` for ``encode``: a clear ``ValueError`` beats a shape error deep inside."""
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"{type(self).__name__}.encode expects a mono batch [B, 1, S], got {tuple(wav.shape)}")
        if wav.shape[-1] == 0:
            raise ValueError("cannot encode an empty waveform (0 samples)")
        if not torch.is_floating_point(wav):
            raise ValueError(f"waveform must be floating point in [-1, 1], got dtype {wav.dtype}")
        if not torch.isfinite(wav).all():
            raise ValueError("waveform contains NaN or infinite samples")
        return wav

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Validate ``codes [B, C, T]`` for ``decode``: right codebook count, integer, in ``[0, K)``."""
        if codes.dim() != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(
                f"{type(self).__name__}.decode expects codes [B, {self.num_codebooks}, T], got {tuple(codes.shape)}"
            )
        if torch.is_floating_point(codes) or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cardinality):
            raise ValueError(
                f"codes must lie in [0, {self.cardinality}); got values in [{int(codes.min())}, {int(codes.max())}] "
                "(strip eos/pad/bos specials before decoding)"
            )
        return codes.long()

    def describe(self) -> dict:
        """Numbers recorded next to every shard so a mismatched codec is detected on load."""
        return {
            "codec": type(self).__name__,
            "sample_rate": self.sample_rate,
            "hop_length": self.hop_length,
            "frame_rate": self.frame_rate,
            "num_codebooks": self.num_codebooks,
            "cardinality": self.cardinality,
        }
