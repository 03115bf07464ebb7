"""Frechet distance between two Gaussians fitted to embedding sets (the core of FAD).

``d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr( (S_a S_b)^{1/2} )``

The trace of the matrix square root is computed from eigenvalues, as torchmetrics' FID
does: ``tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i(S_a S_b))``. ``S_a S_b`` is a product of
two PSD matrices, so its eigenvalues are real and non-negative in exact arithmetic; we take
the real part and clip tiny negative round-off to zero. This avoids ``scipy.linalg.sqrtm``,
whose iterative square root can return complex or inaccurate results for the near-singular
covariances that small evaluation sets produce. Everything runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EvaluationError


@dataclass(frozen=True)
class GaussianStats:
    """Mean and (unbiased, N-1) covariance of an embedding set, plus its size."""

    mean: np.ndarray  # [D]
    cov: np.ndarray  # [D, D]
    count: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def gaussian_stats(embeddings: np.ndarray, min_samples: int = 2) -> GaussianStats:
    """Fit mean and covariance to ``embeddings [N, D]``; needs at least ``min_samples`` rows."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise EvaluationError(f"embeddings must be [N, D], got shape {x.shape}")
    if x.shape[0] < max(2, min_samples):
        raise EvaluationError(
            f"need at least {max(2, min_samples)} embeddings to fit a covariance, got {x.shape[0]}"
        )
    if not np.isfinite(x).all():
        raise EvaluationError("embeddings contain NaN or infinite values")
    return GaussianStats(mean=x.mean(axis=0), cov=np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], -1), count=x.shape[0])


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Squared Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b) (eigenvalue method)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.shape[0],) * 2:
        raise EvaluationError(
            f"shape mismatch: means {mu_a.shape} vs {mu_b.shape}, covariances {cov_a.shape} vs {cov_b.shape}"
        )
    mean_term = float(np.sum((mu_a - mu_b) ** 2))
    eig = np.linalg.eigvals(cov_a @ cov_b).real
    sqrt_trace = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    value = mean_term + float(np.trace(cov_a)) + float(np.trace(cov_b)) - 2.0 * sqrt_trace
    # Round-off can leave -1e-12 for identical sets; a distance is never negative.
    return max(value, 0.0)


def frechet_distance_from_embeddings(a: np.ndarray, b: np.ndarray, min_samples: int = 2) -> float:
    """Frechet distance between the Gaussians fitted to ``a [N, D]`` and ``b [M, D]``."""
    sa, sb = gaussian_stats(a, min_samples), gaussian_stats(b, min_samples)
    if sa.dim != sb.dim:
        raise EvaluationError(f"embedding sizes differ: {sa.dim} vs {sb.dim}")
    return frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov)


def small_sample_warning(count: int, dim: int, label: str) -> str | None:
    """A warning when ``count`` embeddings cannot give a full-rank ``dim``-sized covariance.

    FAD is biased upwards for small sets (the bias shrinks roughly as 1/N); with fewer
    samples than dimensions the covariance is singular and values are not comparable
    across set sizes. Compare FAD only between runs with the same set sizes.
    """
    if count <= dim:
        return (
            f"{label}: {count} embeddings for a {dim}-dim covariance (rank-deficient); FAD is biased "
            f"upwards for small sets - compare only at equal set sizes"
        )
    return None
