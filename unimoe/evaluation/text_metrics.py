"""WER and CER through torchmetrics, per item and over the corpus.

The corpus value is ``sum(edit operations) / sum(reference units)`` (words for WER,
characters for CER) - what torchmetrics computes over a list, and what ASR papers report.
The unweighted mean of per-utterance rates is given next to it, because some TTS evals
(Seed-TTS eval) average per utterance and the two differ when utterance lengths vary.
Inputs are expected to be normalised already (:mod:`unimoe.evaluation.normalize`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torchmetrics.text import CharErrorRate, WordErrorRate

from .errors import EvaluationError


@dataclass(frozen=True)
class ErrorCounts:
    """Edit operations and reference length of one utterance (or a corpus)."""

    errors: float
    total: float

    @property
    def rate(self) -> float:
        if self.total <= 0:
            raise EvaluationError("reference is empty: the error rate is undefined")
        return self.errors / self.total


def _counts(metric_cls, hypothesis: str, reference: str) -> ErrorCounts:
    metric = metric_cls()
    metric.update(hypothesis, reference)
    return ErrorCounts(errors=float(metric.errors), total=float(metric.total))


def word_errors(hypothesis: str, reference: str) -> ErrorCounts:
    """Word-level edit distance (whitespace tokens) and reference word count."""
    return _counts(WordErrorRate, hypothesis, reference)


def char_errors(hypothesis: str, reference: str) -> ErrorCounts:
    """Character-level edit distance (spaces count as characters) and reference length."""
    return _counts(CharErrorRate, hypothesis, reference)


def corpus_rate(counts: list[ErrorCounts]) -> float:
    """``sum(errors) / sum(total)`` over utterances."""
    return ErrorCounts(sum(c.errors for c in counts), sum(c.total for c in counts)).rate
