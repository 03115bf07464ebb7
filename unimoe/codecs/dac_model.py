"""The DAC network (Descript Audio Codec, Kumar et al. 2023), inference only, written plainly.

Encoder: a 7-tap convolution, then one block per stride (three dilated residual units with
Snake activations, then a strided convolution that doubles the channels), then a 3-tap
convolution to the latent. Residual vector quantiser: each codebook projects the residual to
a few dimensions, picks the codeword of highest cosine similarity (factorised, L2-normalised
codes), and projects back. Decoder: the mirror image with transposed convolutions and a tanh.

Module names follow the transformers ``DacModel`` state dict (``encoder.block.0.res_unit1.
conv1.weight``...), so a Hugging Face folder loads as is; the original ``weights.pth`` layout
is renamed in :mod:`unimoe.codecs.dac_weights`. Convolution weights are plain tensors: weight
norm is folded in when a file is loaded (nothing here trains the codec).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DacArchitecture", "DAC_VARIANTS", "DacNetwork"]


@dataclass(frozen=True)
class DacArchitecture:
    """The hyper-parameters a DAC checkpoint is built from (the original ``metadata.kwargs``)."""

    sample_rate: int
    encoder_rates: tuple[int, ...] = (2, 4, 5, 8)
    decoder_rates: tuple[int, ...] = (8, 5, 4, 2)
    n_codebooks: int = 12
    codebook_size: int = 1024
    codebook_dim: int | tuple[int, ...] = 8
    encoder_dim: int = 64
    decoder_dim: int = 1536
    latent_dim: int | None = None
    """Latent channels; ``None`` means ``encoder_dim * 2 ** len(encoder_rates)`` (every release)."""

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_codebooks", "codebook_size", "encoder_dim", "decoder_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DAC architecture: {name} must be a positive integer, got {value!r}")
        for name in ("encoder_rates", "decoder_rates"):
            rates = getattr(self, name)
            if not rates or not all(isinstance(r, int) and r >= 1 for r in rates):
                raise ValueError(f"DAC architecture: {name} must be a non-empty list of positive integers, got {rates!r}")
        if math.prod(self.encoder_rates) != math.prod(self.decoder_rates):
            raise ValueError(
                f"DAC architecture: encoder_rates {list(self.encoder_rates)} and decoder_rates "
                f"{list(self.decoder_rates)} must have the same product (the hop length)"
            )
        if self.decoder_dim % 2 ** len(self.decoder_rates):
            raise ValueError(
                f"DAC architecture: decoder_dim {self.decoder_dim} must be divisible by 2 ** {len(self.decoder_rates)} "
                "(each decoder block halves the channels)"
            )
        dims = self.codebook_dims
        if len(dims) != self.n_codebooks or not all(isinstance(d, int) and d >= 1 for d in dims):
            raise ValueError(
                f"DAC architecture: codebook_dim must be a positive integer or one per codebook "
                f"({self.n_codebooks}), got {self.codebook_dim!r}"
            )

    @property
    def hop_length(self) -> int:
        return math.prod(self.encoder_rates)

    @property
    def latent_channels(self) -> int:
        return self.latent_dim if self.latent_dim is not None else self.encoder_dim * 2 ** len(self.encoder_rates)

    @property
    def codebook_dims(self) -> tuple[int, ...]:
        if isinstance(self.codebook_dim, int):
            return (self.codebook_dim,) * self.n_codebooks
        return tuple(self.codebook_dim)


DAC_VARIANTS: dict[str, DacArchitecture] = {
    "16khz": DacArchitecture(sample_rate=16_000, n_codebooks=12),
    "24khz": DacArchitecture(sample_rate=24_000, n_codebooks=32),
    "44khz": DacArchitecture(
        sample_rate=44_100, encoder_rates=(2, 4, 8, 8), decoder_rates=(8, 8, 4, 2), n_codebooks=9
    ),
}
"""The released models (``conf/final/*.yml`` upstream; ``descript/dac_{16,24,44}khz`` on the hub)."""


class Snake1d(nn.Module):
    """``x + sin(alpha x)^2 / alpha`` per channel: a periodic activation suited to audio."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, L]
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """Snake, dilated 7-tap conv, Snake, 1x1 conv, plus the input; length preserving."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.snake1 = Snake1d(channels)
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, L]
        return x + self.conv2(self.snake2(self.conv1(self.snake1(x))))


class EncoderBlock(nn.Module):
    """Three residual units at ``channels // 2``, then a strided conv to ``channels``: L -> L / stride."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        half = channels // 2
        self.res_unit1 = ResidualUnit(half, dilation=1)
        self.res_unit2 = ResidualUnit(half, dilation=3)
        self.res_unit3 = ResidualUnit(half, dilation=9)
        self.snake1 = Snake1d(half)
        self.conv1 = nn.Conv1d(half, channels, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_unit3(self.res_unit2(self.res_unit1(x)))
        return self.conv1(self.snake1(x))


class DecoderBlock(nn.Module):
    """Snake, transposed conv ``in_channels -> out_channels`` (L -> ~L * stride), three residual units."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.snake1 = Snake1d(in_channels)
        self.conv_t1 = nn.ConvTranspose1d(
            in_channels, out_channels, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)
        )
        self.res_unit1 = ResidualUnit(out_channels, dilation=1)
        self.res_unit2 = ResidualUnit(out_channels, dilation=3)
        self.res_unit3 = ResidualUnit(out_channels, dilation=9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_t1(self.snake1(x))
        return self.res_unit3(self.res_unit2(self.res_unit1(x)))


class Encoder(nn.Module):
    """``wav [B, 1, S]`` (S a multiple of the hop) -> ``latent [B, D, S / hop]``."""

    def __init__(self, arch: DacArchitecture) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, arch.encoder_dim, kernel_size=7, padding=3)
        channels = [arch.encoder_dim * 2**i for i in range(1, len(arch.encoder_rates) + 1)]
        self.block = nn.ModuleList(EncoderBlock(c, s) for c, s in zip(channels, arch.encoder_rates))
        self.snake1 = Snake1d(channels[-1])
        self.conv2 = nn.Conv1d(channels[-1], arch.latent_channels, kernel_size=3, padding=1)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = self.conv1(wav)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))


class Decoder(nn.Module):
    """``latent [B, D, T]`` -> ``wav [B, 1, ~T * hop]`` in [-1, 1] (an odd stride drops a sample per step)."""

    def __init__(self, arch: DacArchitecture) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(arch.latent_channels, arch.decoder_dim, kernel_size=7, padding=3)
        channels = [arch.decoder_dim // 2**i for i in range(len(arch.decoder_rates) + 1)]
        self.block = nn.ModuleList(
            DecoderBlock(channels[i], channels[i + 1], s) for i, s in enumerate(arch.decoder_rates)
        )
        self.snake1 = Snake1d(channels[-1])
        self.conv2 = nn.Conv1d(channels[-1], 1, kernel_size=7, padding=3)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.conv1(latent)
        for block in self.block:
            x = block(x)
        return torch.tanh(self.conv2(self.snake1(x)))


class VectorQuantizer(nn.Module):
    """One factorised codebook: project to ``dim``, nearest codeword by cosine, project back."""

    def __init__(self, latent_channels: int, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.in_proj = nn.Conv1d(latent_channels, dim, kernel_size=1)
        self.out_proj = nn.Conv1d(dim, latent_channels, kernel_size=1)
        self.codebook = nn.Embedding(codebook_size, dim)

    def nearest(self, residual: torch.Tensor) -> torch.Tensor:
        """``residual [B, D, T]`` -> ``codes [B, T]``: highest cosine similarity in the projected space."""
        projected = F.normalize(self.in_proj(residual).transpose(1, 2), dim=-1)  # [B, T, d]
        codewords = F.normalize(self.codebook.weight, dim=-1)  # [K, d]
        return (projected @ codewords.T).argmax(dim=-1)  # [B, T]

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, T]`` -> this codebook's contribution to the latent ``[B, D, T]``."""
        return self.out_proj(self.codebook(codes).transpose(1, 2))


class ResidualVectorQuantizer(nn.Module):
    """``n_codebooks`` quantisers in turn, each coding what the previous ones left."""

    def __init__(self, arch: DacArchitecture) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(
            VectorQuantizer(arch.latent_channels, arch.codebook_size, dim) for dim in arch.codebook_dims
        )

    def encode(self, latent: torch.Tensor, n_quantizers: int) -> torch.Tensor:
        """``latent [B, D, T]`` -> ``codes [B, n_quantizers, T]``."""
        residual = latent
        codes = []
        for quantizer in self.quantizers[:n_quantizers]:
            index = quantizer.nearest(residual)  # [B, T]
            residual = residual - quantizer.dequantize(index)
            codes.append(index)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, N, T]`` (the first N codebooks) -> ``latent [B, D, T]``."""
        return sum(q.dequantize(codes[:, i]) for i, q in enumerate(self.quantizers[: codes.shape[1]]))


class DacNetwork(nn.Module):
    """Encoder + residual VQ + decoder of one DAC architecture."""

    def __init__(self, arch: DacArchitecture) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.quantizer = ResidualVectorQuantizer(arch)
        self.decoder = Decoder(arch)

    def encode(self, wav: torch.Tensor, n_quantizers: int) -> torch.Tensor:
        """``wav [B, 1, S]``, S a multiple of the hop -> ``codes [B, n_quantizers, S / hop]``."""
        return self.quantizer.encode(self.encoder(wav), n_quantizers)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, N, T]`` -> ``wav [B, 1, ~T * hop]``."""
        return self.decoder(self.quantizer.decode(codes))
