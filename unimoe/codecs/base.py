"""The codec tokenizer interface (learned from AudioCraft's ``CompressionModel``).

A codec turns a mono waveform into ``C`` parallel streams of discrete tokens at
``frame_rate`` frames per second and back. The language model only needs the numbers
below; everything codec-specific stays behind this interface.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from unimoe.audio import load_audio


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

    @torch.no_grad()
    def encode_file(self, path: str | Path) -> torch.Tensor:
        """Read, mix down, resample and encode one file -> ``codes [C, T]``."""
        wav, _ = load_audio(path, sample_rate=self.sample_rate, mono=True)  # [1, S]
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        return self.encode(wav.unsqueeze(0).to(device))[0].cpu()

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
