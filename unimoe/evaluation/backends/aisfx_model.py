"""The aiSFX audio CNN (Ma & Lerch, ISMIR 2022), re-implemented to load its packaged weights.

The PyPI package ``aisfx`` 0.1.2 ships a trained sound-effects model in
``aisfx/models/checkpoint.pth`` (CC BY 4.0, A.B. Ma and A. Lerch): the DCASE 9-layer CNN
(4 blocks of two 3x3 conv + batch norm + ReLU, 64-128-256-512 channels) that maps a 96-band
log-mel block of 100 frames (~2.3 s at 44.1 kHz) to a 512-d embedding, plus one
classification head per training dataset (``prosfx`` 78 classes, ``soundlyTrain`` 79, ...;
the class names are not shipped). The package's metadata pins numpy 1.23 / librosa 0.9.2
and its loader needs torch.load's unsafe full unpickling, so unimoe installs it with
``--no-deps`` for the file only and re-implements the few pieces it needs here:

* :func:`load_checkpoint` - the file is a ``(state_dict, {dataset: (head index, classes)})``
  tuple whose head indices are numpy int64 scalars. ``torch.load(weights_only=True)``
  refuses those, so we allow-list exactly numpy's scalar constructor and the int64 dtype
  (:func:`numpy_scalar_globals`) for this one call; every other global (functions,
  arbitrary classes) is still refused by torch's weights-only unpickler, so loading can
  not run code from the file.
* :class:`AisfxMel` - aiSFX's librosa front end (``aisfx.spectrogram.spectrogram_librosa``):
  peak-normalised audio, |STFT|^2 (2048-point Hann, hop 1024, centred, zero padding),
  96 HTK mel bands 0-22050 Hz with unit-sum filters, ``log10(1e4 x + 1)``, divided by
  the package's "original" maximum 9.4578. Output ``[frames, 96]`` (librosa returns
  ``[96, frames]``; the package forgets to transpose, the model wants frames first).
* :func:`blocks` - 100-frame blocks every ``hop`` x 100 frames, the last partial block
  dropped (``aisfx.preprocessing.blocking``); a clip shorter than a block is zero padded.
* :class:`AisfxNet` - the CNN and heads with the checkpoint's parameter names.

The ISMIR paper computed its spectrograms with Essentia, which differs slightly (see
docs/evaluation.md); unimoe uses the librosa front end that the package itself offers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackendUnavailableError

SAMPLE_RATE = 44100
N_FFT = 2048
HOP_LENGTH = 1024
N_MELS = 96
BLOCK_FRAMES = 100  # ~2.32 s of audio per embedding
SPEC_MAX = 9.457798957824707  # aisfx.preprocessing.spectrogram_normalize(spec_norm="original")
INSTALL = "pip install --no-deps aisfx==0.1.2 (scripts/setup.sh does this)"


def numpy_scalar_globals() -> list[Any]:
    """What the aiSFX checkpoint needs beyond tensors: numpy int64 scalars (its head indices).

    The aiSFX pickle names the constructor ``numpy.core.multiarray.scalar``; numpy 2 moved it
    to ``numpy._core`` (the name files written today use), so it is allow-listed under both.
    """
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar  # a file written under numpy 2 names it numpy._core.multiarray.scalar
    return [(scalar, "numpy.core.multiarray.scalar"), scalar, np.dtype, type(np.dtype(np.int64))]


def packaged_checkpoint() -> Path:
    """``aisfx/models/checkpoint.pth`` of the installed package, found without importing it
    (importing ``aisfx`` runs its inference module, which needs tqdm and prints)."""
    spec = importlib.util.find_spec("aisfx")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(f"metric backend 'aisfx' needs the package 'aisfx' (weights only). Install: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "checkpoint.pth"
    if not path.is_file():
        raise BackendUnavailableError(f"the installed aisfx package has no weights file {path}; reinstall: {INSTALL}")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """``(state_dict, {dataset: (head index, num classes)})`` of an aiSFX checkpoint, loaded
    with ``weights_only=True`` (see the module docstring for the three allow-listed globals)."""
    path = Path(path)
    if not path.is_file():
        raise BackendUnavailableError(f"aiSFX checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(numpy_scalar_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a global outside the allow-list
        raise BackendUnavailableError(f"could not load the aiSFX checkpoint {path}: {exc}") from exc
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], dict) and isinstance(obj[1], dict)):
        raise BackendUnavailableError(f"{path} is not an aiSFX checkpoint: expected a (state_dict, datasets) pair, "
                                      f"got {type(obj).__name__}")
    weights, datasets = obj
    try:
        heads = {str(name): (int(idx), int(classes)) for name, (idx, classes) in datasets.items()}
    except (TypeError, ValueError) as exc:
        raise BackendUnavailableError(f"{path}: bad dataset table {datasets!r}: {exc}") from exc
    return dict(weights), heads


class AisfxMel(nn.Module):
    """aiSFX's librosa log-mel front end in torch: ``wav [S] (44.1 kHz) -> [frames, 96]``."""

    def __init__(self) -> None:
        super().__init__()
        import torchaudio

        fbank = torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE,
                                                      norm=None, mel_scale="htk")  # [1025, 96], triangles in Hz
        # librosa's norm=1.0: every filter's weights sum to one (Essentia's "unit_sum").
        fbank = fbank / fbank.sum(dim=0, keepdim=True).clamp_min(1e-10)
        self.register_buffer("fbank", fbank, persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        peak = wav.abs().max()
        wav = wav / peak if peak > 0 else wav
        spec = torch.stft(wav, N_FFT, HOP_LENGTH, window=self.window, center=True, pad_mode="constant",
                          return_complex=True).abs().pow(2)  # [1025, frames]
        mel = spec.transpose(0, 1) @ self.fbank  # [frames, 96]
        return torch.log10(mel * 1e4 + 1.0) / SPEC_MAX


def blocks(spec: torch.Tensor, hop: float = 0.5) -> torch.Tensor:
    """``[frames, 96] -> [num_blocks, 100, 96]`` exactly as ``aisfx.preprocessing.blocking``
    with ``drop_partial_block=True``: blocks every ``round(100 hop)`` frames, a trailing
    partial block dropped, at least one block (zero padded)."""
    frames = spec.shape[0]
    step = max(1, int(round(BLOCK_FRAMES * hop)))
    count = int(np.ceil((frames - BLOCK_FRAMES) / step + 1))
    if (frames - BLOCK_FRAMES) % step != 0:
        count -= 1
    count = max(count, 1)
    padded = torch.cat([spec, spec.new_zeros(BLOCK_FRAMES, spec.shape[1])])
    return padded.unfold(0, BLOCK_FRAMES, step)[:count].transpose(1, 2).contiguous()


class ConvBlock(nn.Module):
    """Two 3x3 conv -> batch norm -> ReLU, then max pooling."""

    def __init__(self, in_channels: int, out_channels: int, pool: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool2d(x, self.pool) if self.pool > 1 else x


class EmbeddingNet(nn.Module):
    """``[B, 100, 96]`` log-mel blocks -> ``[B, 512]``: four conv blocks, mean over mel
    bands, max over time."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.conv_block1 = ConvBlock(1, width, pool=2)
        self.conv_block2 = ConvBlock(width, 2 * width, pool=2)
        self.conv_block3 = ConvBlock(2 * width, 4 * width, pool=2)
        self.conv_block4 = ConvBlock(4 * width, 8 * width, pool=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)  # [B, 1, T, F]
        for block in (self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4):
            x = block(x)  # -> [B, 512, T/8, F/8]
        return x.mean(dim=3).amax(dim=2)  # [B, 512]


class AisfxNet(nn.Module):
    """The embedding network plus one MLP head (512 -> 256 -> 128 -> classes) per dataset."""

    def __init__(self, heads: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.heads = dict(heads)
        self.embedding_net = EmbeddingNet()
        order = sorted(self.heads.values())
        if [idx for idx, _ in order] != list(range(len(order))):
            raise ValueError(f"aiSFX head indices must be 0..{len(order) - 1}, got {sorted(i for i, _ in order)}")
        self.fc = nn.ModuleList(
            nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, classes))
            for _, classes in order
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_net(x)

    def head_logits(self, embedding: torch.Tensor, head: str) -> torch.Tensor:
        return self.fc[self.heads[head][0]](embedding)
