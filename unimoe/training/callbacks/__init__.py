"""Training callbacks: routing monitoring, audio samples (and their metrics), the final checkpoint of a
stage, and the non-finite guard."""

from unimoe.training.callbacks.audio_metrics import AudioMetrics, ValidationScorer
from unimoe.training.callbacks.audio_samples import AudioSamples
from unimoe.training.callbacks.expert_load import ExpertLoadMonitor, RoutingTotals, expert_labels_for
from unimoe.training.callbacks.finalize import DONE_MARKER, FINAL_CHECKPOINT, FINAL_METRICS, StageFinalizer
from unimoe.training.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from unimoe.training.callbacks.progress import StepProgressBar
from unimoe.training.callbacks.budget import TrainingBudget

__all__ = [
    "AudioMetrics",
    "AudioSamples",
    "ExpertLoadMonitor",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "RoutingTotals",
    "StageFinalizer",
    "StepProgressBar",
    "TrainingBudget",
    "ValidationScorer",
    "expert_labels_for",
    "DONE_MARKER",
    "FINAL_CHECKPOINT",
    "FINAL_METRICS",
]
