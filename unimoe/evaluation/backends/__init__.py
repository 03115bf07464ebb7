"""Metric backends; importing this package registers the in-tree ones in ``METRICS``.

Heavy libraries (faster-whisper, transformers, openl3...) are imported only when a
backend is built, so registering them costs nothing and a missing one only affects the
suites that name it.
"""

from . import asr, classifiers, clap, embeddings, quality, speaker  # noqa: F401  (registration)
from .base import (
    ASRBackend,
    AudioClassifier,
    AudioEmbedder,
    MetricBackend,
    QualityPredictor,
    SpeakerEmbedder,
    TextAudioEmbedder,
)

__all__ = [
    "ASRBackend",
    "AudioClassifier",
    "AudioEmbedder",
    "MetricBackend",
    "QualityPredictor",
    "SpeakerEmbedder",
    "TextAudioEmbedder",
]
