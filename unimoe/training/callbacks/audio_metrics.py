"""Score the clips generated at validation with an evaluation suite, while training.

:class:`AudioSamples` (``metrics={suite: demo, every_n_validations: 1}``) hands each
validation's generated clips to a :class:`ValidationScorer`: every metric of the suite
(``evaluation/demo.yaml`` by default: WER and SIM on speech, FAD and KL on music) is computed
per task by the evaluation runner's own code path (:func:`unimoe.evaluation.evaluate_items`),
so a training curve and ``unimoe evaluate`` give the same number for the same clips. Values
are logged as ``val/audio/<task>/<key>`` (the suite key names the backend, e.g.
``val/audio/tts/wer_whisper_base``), and the full report (backends, per-clip values, skips) is
written next to the clips as ``results.json`` / ``results.md``.

A backend that cannot load (package or weights missing) never stops training: the metric is
reported as unavailable once (a warning, and in the report), then no longer attempted; a
suite ``fallback`` takes its place.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from unimoe.evaluation.manifest import EvalItem
from unimoe.evaluation.report import EvaluationReport, write_report
from unimoe.evaluation.result import MetricResult
from unimoe.evaluation.runner import evaluate_items
from unimoe.evaluation.scorers import build_scorer
from unimoe.evaluation.suite import MetricSpec, Suite, load_suite

log = logging.getLogger("unimoe.training")

METRIC_PREFIX = "val/audio"
#: (key, backend) pairs already reported unavailable in this process: the stages of an
#: in-process curriculum each have their own scorer, but a missing backend is warned about once.
_REPORTED: set[tuple[str, str]] = set()


@dataclass
class AudioMetrics:
    """What to score while training.

    Args:
        suite: a suite YAML path or a name from ``evaluation/`` (default ``demo``).
        every_n_validations: score at every n-th validation end; a multiple of the
            ``AudioSamples`` cadence, since only validations that generate clips can be scored.
    """

    suite: str = "demo"
    every_n_validations: int = 1

    def __post_init__(self) -> None:
        if self.every_n_validations < 1:
            raise ValueError(f"AudioMetrics.every_n_validations must be >= 1, got {self.every_n_validations}")


def metric_name(result: MetricResult) -> str:
    """``val/audio/<task>/<key>`` (``all`` for items without a task)."""
    return f"{METRIC_PREFIX}/{result.task or 'all'}/{result.key}"


class ValidationScorer:
    """Scores validation clips with a suite; remembers unavailable backends so each is
    reported once and never retried."""

    def __init__(self, suite: str | Path | Suite, log_fn: Callable[[str], None] | None = None) -> None:
        base = suite if isinstance(suite, Suite) else load_suite(suite)
        for spec in base.metrics:  # a typo in a metric name or option fails at fit start, not hours later
            build_scorer(spec.metric, spec.options)
        self.suite = _never_raising(base)
        self.unavailable: dict[str, str] = {}
        self._unavailable_results: list[MetricResult] = []
        self._log = log_fn or (lambda msg: log.debug(msg))

    def score(self, items: list[EvalItem], out_dir: Path | None = None, step: int | None = None) -> list[MetricResult]:
        """Every metric per task on ``items``; writes ``results.json/.md`` into ``out_dir``."""
        start = time.perf_counter()
        results = evaluate_items(self.suite, items, log=self._log, by_task=True)
        self._retire_unavailable(results)
        results = results + [r for r in self._unavailable_results if r not in results]  # still listed, not retried
        if out_dir is not None:
            report = EvaluationReport(
                suite=self.suite.name, description=self.suite.description,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                inputs={"suite_file": str(self.suite.source) if self.suite.source else None, "step": step,
                        "clips": str(out_dir), "references": "codec reconstructions of the ground truth",
                        "elapsed_s": round(time.perf_counter() - start, 3)},
                n_items=len(items), metrics=results)
            write_report(report, out_dir)
        return results

    @staticmethod
    def values(results: list[MetricResult]) -> dict[str, float]:
        """``{val/audio/<task>/<key>: value}`` of the results that have a value."""
        return {metric_name(r): r.value for r in results if r.value is not None}

    def _retire_unavailable(self, results: list[MetricResult]) -> None:
        for result in results:
            if result.unavailable is None:
                continue
            self._unavailable_results.append(result)
            if result.key in self.unavailable:  # another task of the same entry
                continue
            self.unavailable[result.key] = result.error or result.unavailable
            spec = next((m for m in self.suite.metrics if m.key == result.key), None)
            replacement = spec.fallback if spec is not None else None
            if (result.key, result.backend) not in _REPORTED:
                _REPORTED.add((result.key, result.backend))
                log.warning("audio metric %s (backend %s) is %s: %s. Training continues without it%s; "
                            "this is reported once.", result.key, result.backend, result.unavailable, result.error,
                            f", scoring the fallback {replacement.key} instead" if replacement else "")
            if spec is not None:
                index = self.suite.metrics.index(spec)
                self.suite.metrics[index: index + 1] = [replacement] if replacement else []


def _never_raising(suite: Suite) -> Suite:
    """A copy of ``suite`` in which no unavailable backend raises (training must go on)."""
    out = copy.deepcopy(suite)
    out.on_unavailable = "skip"

    def relax(spec: MetricSpec | None) -> None:
        if spec is not None:
            spec.on_unavailable = "skip"
            relax(spec.fallback)

    for spec in out.metrics:
        relax(spec)
    return out
