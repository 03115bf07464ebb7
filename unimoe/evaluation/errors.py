"""Exceptions of the evaluation package, so callers can tell bad input from bugs."""

from __future__ import annotations


class EvaluationError(RuntimeError):
    """Evaluation cannot proceed; the message says which input to fix."""


class ManifestError(EvaluationError):
    """An evaluation or reference manifest is missing, malformed or does not match the audio."""


class BackendUnavailableError(EvaluationError):
    """A metric backend needs a package or weights that are not present here.

    Raised when the backend is built (not at import), so suites naming other backends
    still run and the message can say what to install or where to put the weights.
    """
