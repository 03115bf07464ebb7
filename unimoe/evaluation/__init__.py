"""Evaluation: metric definitions, pluggable model backends, suites and the runner.

Public API (see docs/evaluation.md):

* :func:`run_suite` / :func:`evaluate_items` and the :class:`Generator` protocol
* backend kinds in :mod:`unimoe.evaluation.backends.base`, registered in ``METRICS``
* scorers (``wer cer sim mos fad clap kl``) in ``SCORERS``
* the math: :func:`frechet_distance`, :func:`paired_kl`, :func:`normalize_text`
"""

from .divergence import kl_divergence, paired_kl
from .errors import BackendUnavailableError, EvaluationError, ManifestError
from .frechet import frechet_distance, frechet_distance_from_embeddings, gaussian_stats
from .manifest import EvalItem, pair_with_references, read_eval_manifest
from .normalize import normalize_text
from .report import EvaluationReport
from .result import MetricResult
from .runner import Generator, evaluate_items, load_checkpoint_generator, run_suite
from .scorers import SCORERS, Scorer
from .suite import MetricSpec, Suite, load_suite

__all__ = [
    "BackendUnavailableError", "EvalItem", "EvaluationError", "EvaluationReport", "Generator", "ManifestError",
    "MetricResult", "MetricSpec", "SCORERS", "Scorer", "Suite", "evaluate_items", "frechet_distance",
    "frechet_distance_from_embeddings", "gaussian_stats", "kl_divergence", "load_checkpoint_generator",
    "load_suite", "normalize_text", "pair_with_references", "paired_kl", "read_eval_manifest", "run_suite",
]
