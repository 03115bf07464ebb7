"""KL divergence between paired class distributions (the KL of AudioLDM / MusicGen evals).

For each generated clip and its paired reference clip a classifier (PaSST, PANNs...) gives
logits; both are turned into distributions with a softmax and we compute

``KL(p_ref || p_gen) = sum_c p_ref[c] * (log p_ref[c] - log p_gen'[c])``

i.e. the reference is the target distribution and the generated clip the approximation,
the direction of ``torch.nn.functional.kl_div(log(p_gen + eps), p_ref)`` used by
audioldm_eval and audiocraft (eps = 1e-6). Here ``p_gen' = (p_gen + eps) / sum(p_gen + eps)``
is renormalised after smoothing, which keeps the value a true divergence (>= 0, exactly 0
for identical clips); it differs from the unnormalised form by at most log(1 + C eps)
(5e-4 for 527 classes). The reported value is the mean over pairs.
``activation="sigmoid"`` gives the multi-label variant (independent Bernoulli per class,
summed), which AudioLDM reports as ``KL_sigmoid``.
"""

from __future__ import annotations

import numpy as np

from .errors import EvaluationError

EPS = 1e-6


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def kl_divergence(p_ref: np.ndarray, p_gen: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Row-wise ``KL(p_ref || p_gen)`` for distributions ``[N, C]`` (0 log 0 = 0)."""
    p, q = np.asarray(p_ref, np.float64), np.asarray(p_gen, np.float64)
    if p.shape != q.shape:
        raise EvaluationError(f"distribution shapes differ: {p.shape} vs {q.shape}")
    if (p < 0).any() or (q < 0).any():
        raise EvaluationError("probabilities must be non-negative")
    # Smooth q so log q is finite, then renormalise: q stays a distribution, so by Gibbs'
    # inequality the result is >= 0 (without renormalising, identical inputs give -1e-5).
    q = (q + eps) / (q + eps).sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)
    return np.maximum(terms.sum(axis=-1), 0.0)


def paired_kl(ref_logits: np.ndarray, gen_logits: np.ndarray, activation: str = "softmax") -> np.ndarray:
    """Per-pair KL(ref || gen) from logits ``[N, C]``; ``activation`` is softmax or sigmoid."""
    ref, gen = np.atleast_2d(ref_logits), np.atleast_2d(gen_logits)
    if activation == "softmax":
        return kl_divergence(softmax(ref), softmax(gen))
    if activation == "sigmoid":
        pr, pg = 1.0 / (1.0 + np.exp(-np.asarray(ref, np.float64))), 1.0 / (1.0 + np.exp(-np.asarray(gen, np.float64)))
        # Each class is a Bernoulli: KL = sum_c KL(Bern(pr_c) || Bern(pg_c)).
        bern_ref = np.stack([pr, 1.0 - pr], axis=-1)  # [N, C, 2]
        bern_gen = np.stack([pg, 1.0 - pg], axis=-1)
        return kl_divergence(bern_ref, bern_gen).sum(axis=-1)
    raise EvaluationError(f"unknown KL activation {activation!r}; use 'softmax' or 'sigmoid'")
