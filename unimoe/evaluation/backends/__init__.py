"""Metric backends: the kinds (base classes) here, the in-tree backends in the submodules.

Backends are declared as entry points in ``unimoe.metrics`` (pyproject.toml) and imported
when a suite first names them. Heavy libraries (faster-whisper, transformers, openl3...)
are imported only when a backend is built, so a missing one only affects the suites that
name it.
"""

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
