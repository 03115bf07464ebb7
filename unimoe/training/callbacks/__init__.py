"""Training callbacks: routing monitoring, audio samples, and the final checkpoint of a stage."""

from unimoe.training.callbacks.audio_samples import AudioSamples
from unimoe.training.callbacks.expert_load import ExpertLoadMonitor, RoutingTotals, expert_labels_for
from unimoe.training.callbacks.finalize import DONE_MARKER, FINAL_CHECKPOINT, FINAL_METRICS, StageFinalizer
from unimoe.training.callbacks.progress import StepProgressBar
from unimoe.training.callbacks.budget import TrainingBudget

__all__ = [
    "AudioSamples",
    "ExpertLoadMonitor",
    "RoutingTotals",
    "StageFinalizer",
    "StepProgressBar",
    "TrainingBudget",
    "expert_labels_for",
    "DONE_MARKER",
    "FINAL_CHECKPOINT",
    "FINAL_METRICS",
]
