"""Writing an evaluation report as JSON and as a Markdown table.

Every number is printed next to the backend that produced it, because a WER from
pocketsphinx and one from Whisper-large-v3 must never be confused."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unimoe.atomic import write_text_atomic
from .result import MetricResult

LABELS = {"wer": "WER", "cer": "CER", "sim": "SIM", "mos": "MOS", "fad": "FAD", "clap": "CLAP", "kl": "KL"}


@dataclass
class EvaluationReport:
    suite: str
    description: str
    created: str
    inputs: dict[str, Any]
    n_items: int
    metrics: list[MetricResult]
    skipped_before_scoring: list[dict[str, str]] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        """``{name: value}`` (name = key, or ``<task>/<key>`` per task) of the metrics that produced a value."""
        return {m.name: m.value for m in self.metrics if m.value is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "description": self.description,
            "created": self.created,
            "inputs": self.inputs,
            "n_items": self.n_items,
            "values": self.values(),
            "metrics": [m.to_dict() for m in self.metrics],
            "skipped_before_scoring": self.skipped_before_scoring,
            "unreferenced_generated_files": self.unreferenced,
            "outputs": self.outputs,
        }


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _notes(m: MetricResult) -> str:
    parts = []
    if m.error:
        parts.append(m.error)
    d = m.details
    if m.metric in ("wer", "cer") and "mean_utterance_rate" in d:
        parts.append(f"corpus rate; mean per utterance {_fmt(d['mean_utterance_rate'])}")
    if m.metric == "mos":
        parts.append(" / ".join(f"{k[5:].upper()} {_fmt(v)}" for k, v in d.items() if k.startswith("mean_")))
    if m.metric == "fad" and "generated_embeddings" in d:
        parts.append(f"{d['generated_embeddings']} vs {d['reference_embeddings']} embeddings ({d['pooling']}), "
                     f"dim {d['embedding_dim']}")
    if m.metric == "kl" and "direction" in d:
        parts.append(f"{d['direction']}, {d['activation']}")
    if m.warnings:
        parts.append(f"{len(m.warnings)} warning(s)")
    return "; ".join(parts)


def to_markdown(report: EvaluationReport) -> str:
    lines = [f"# Evaluation: {report.suite}", ""]
    if report.description:
        lines += [report.description.strip(), ""]
    for k, v in report.inputs.items():
        if v is not None:
            lines.append(f"- {k}: `{v}`")
    lines += [f"- items: {report.n_items}", f"- created: {report.created}", ""]
    by_task = any(m.task is not None for m in report.metrics)
    task_head, task_rule = ("task | ", "---|") if by_task else ("", "")
    lines += [f"| metric | {task_head}value | model / embedding that produced it | scored | skipped | notes |",
              f"|---|{task_rule}---|---|---|---|---|"]
    for m in report.metrics:
        arrow = "↑" if m.higher_is_better else "↓"
        label = LABELS.get(m.metric, m.metric.upper())
        name = label if m.key == m.metric else f"{label} (`{m.key}`)"
        task = f"{m.task or 'all'} | " if by_task else ""
        value = m.unavailable if m.unavailable else _fmt(m.value)
        lines.append(
            f"| {name} {arrow} | {task}{value} | `{_cell(m.backend)}`: {_cell(m.backend_description)} | "
            f"{m.n_scored}/{m.n_items} | {len(m.skipped)} | {_cell(_notes(m))} |"
        )
    skipped = report.skipped_before_scoring + [s for m in report.metrics for s in m.skipped]
    if skipped:
        lines += ["", "## Skipped items", "", "| id | metric | reason |", "|---|---|---|"]
        lines += [f"| {_cell(s['id'])} | {_cell(s['metric'])} | {_cell(s['reason'])} |" for s in skipped]
    warnings = [(m.name, w) for m in report.metrics for w in m.warnings]
    if report.unreferenced:
        warnings.append(("*", f"{len(report.unreferenced)} generated file(s) not in the manifest, not scored: "
                              + ", ".join(report.unreferenced[:10])))
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- `{k}`: {_cell(w)}" for k, w in warnings]
    return "\n".join(lines) + "\n"


def write_report(report: EvaluationReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    report.outputs.update({"json": str(json_path), "markdown": str(md_path)})
    # allow_nan=False: a NaN reaching the file is a bug, not a result.
    write_text_atomic(json_path, json.dumps(report.to_dict(), indent=2, allow_nan=False, default=str) + "\n")
    write_text_atomic(md_path, to_markdown(report))
    return json_path, md_path
