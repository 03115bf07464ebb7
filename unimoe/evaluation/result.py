"""The result of one metric on one run, in a form every writer (JSON, Markdown, MLflow)
reads the same way. A value is a finite float or None with a reason - never NaN."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import EvaluationError


@dataclass
class MetricResult:
    key: str  # column / MLflow metric name, e.g. "wer"
    metric: str  # scorer name, e.g. "wer"
    backend: str  # the backend spec as named in the suite
    backend_description: str  # which model/embedding produced the number
    higher_is_better: bool
    value: float | None = None
    n_items: int = 0  # items the metric applies to
    n_scored: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    per_item: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None  # why there is no value at all
    task: str | None = None  # set when a suite scores each task on its own (by_task)
    unavailable: str | None = None  # "unavailable" / "unavailable offline" when the backend could not load

    @property
    def name(self) -> str:
        """The result's unique name: ``key``, or ``<task>/<key>`` for a per-task result."""
        return self.key if self.task is None else f"{self.task}/{self.key}"

    def finalize(self) -> "MetricResult":
        """Check the invariants writers rely on: a finite value, or None with a reason."""
        if self.value is not None:
            if not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
                raise EvaluationError(f"metric {self.key!r} produced a non-finite value {self.value!r}")
            self.value = float(self.value)
        elif self.error is None:
            self.error = f"no item could be scored ({len(self.skipped)} skipped)" if self.skipped else "no applicable items"
        for name, v in list(self.details.items()):
            if isinstance(v, float) and not math.isfinite(v):
                raise EvaluationError(f"metric {self.key!r} detail {name!r} is not finite")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
