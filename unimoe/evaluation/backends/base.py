"""What a metric backend promises, per kind of model.

A backend wraps one model (an ASR system, a speaker encoder, an audio embedding...) and
works on one clip at a time: mono float32 numpy audio at the backend's ``sample_rate``.
Per-clip calls keep the per-item skip report exact (one bad clip never hides a batch)
and let a plug-in implement a single method. Metric scorers check the kind with
``isinstance``, so a backend says what it can do by which base classes it inherits;
one class may implement several kinds (``mel_stats`` is both an embedder and a
classifier).

Register a backend with ``@METRICS.register("name")`` or an entry point in the group
``unimoe.metrics``; suites then name it by that name or by import path.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

from ..errors import BackendUnavailableError


class MetricBackend(ABC):
    """Base of every backend: a sample rate and a description for the results table."""

    sample_rate: int = 16000
    #: True when the backend's weights ship with an installed package (works offline).
    offline: bool = False

    def describe(self) -> str:
        """One line naming the model and where its weights came from (shown with each number)."""
        return type(self).__name__


class ASRBackend(MetricBackend):
    """Speech recognition for WER/CER."""

    @abstractmethod
    def transcribe(self, wav: np.ndarray, language: str | None = None) -> str:
        """The transcript of ``wav`` (raw text; scorers normalise it)."""


class SpeakerEmbedder(MetricBackend):
    """Speaker embedding for SIM (cosine of generated vs reference speaker)."""

    @abstractmethod
    def embed_speaker(self, wav: np.ndarray) -> np.ndarray:
        """A ``[D]`` speaker embedding of ``wav``."""


class AudioEmbedder(MetricBackend):
    """Audio embeddings for FAD. Frame-level models return several rows per clip."""

    @abstractmethod
    def embed_frames(self, wav: np.ndarray) -> np.ndarray:
        """Embeddings ``[T, D]`` of ``wav`` (``T = 1`` for clip-level models)."""


class AudioClassifier(MetricBackend):
    """Class logits for KL between generated and reference clips."""

    #: how logits become a distribution for KL ("softmax" or "sigmoid"); suites may override.
    kl_activation: str = "softmax"

    @abstractmethod
    def class_logits(self, wav: np.ndarray) -> np.ndarray:
        """Logits ``[C]`` of ``wav``."""


class TextAudioEmbedder(MetricBackend):
    """A joint text-audio space (CLAP) for the CLAP score."""

    @abstractmethod
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, D]`` embeddings of ``texts``."""

    @abstractmethod
    def embed_audio(self, wav: np.ndarray) -> np.ndarray:
        """A ``[D]`` embedding of ``wav`` in the same space."""


class QualityPredictor(MetricBackend):
    """A non-intrusive quality (MOS) predictor."""

    #: the key of :meth:`predict_quality` reported as the metric value.
    primary: str = "mos"

    @abstractmethod
    def predict_quality(self, wav: np.ndarray) -> dict[str, float]:
        """Named quality scores of ``wav``; must include :attr:`primary`."""


def require(module: str, backend: str, install: str) -> Any:
    """Import ``module`` for ``backend`` or raise a :class:`BackendUnavailableError` that
    says how to install it. Heavy or optional libraries are imported only here, when a
    suite actually builds the backend."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"metric backend {backend!r} needs the Python package {module!r}, which is not importable "
            f"here ({exc}). Install it with: {install}"
        ) from exc


def resolve_device(device: str | None) -> str:
    """``"auto"``/None -> cuda when available, else cpu."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
