"""Cosine similarity, the score behind SIM (speaker) and CLAP (text-audio)."""

from __future__ import annotations

import numpy as np

from .errors import EvaluationError


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of ``a [N, D]`` and ``b [N, D]`` (or two vectors -> scalar array)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise EvaluationError(f"embedding shapes differ: {x.shape} vs {y.shape}")
    nx, ny = np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1)
    if (nx == 0).any() or (ny == 0).any():
        raise EvaluationError("an embedding is all zeros; cosine similarity is undefined")
    return (x * y).sum(axis=-1) / (nx * ny)
