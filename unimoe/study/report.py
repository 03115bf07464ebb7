"""A study's report: per-cell numbers read from the stages' own files, mean/std over seeds per arm.

Every number comes from a file a stage or an evaluation wrote: ``final_metrics.json`` (the
validation losses at the end of training, ``train/tokens`` and ``train/flops`` from
:class:`~unimoe.training.callbacks.TrainingBudget`, ``val/audio/...`` when the audio-metrics
callback ran) and the evaluation's ``results.json``. Per cell (:func:`cell_summary`):

* ``val_loss/<task>``: the validation loss of the final model that serves the task (a
  specialist arm has one model per task); ``val_loss/<domain>``: the unweighted mean of its
  tasks' losses (the same definition for every arm, so a specialist arm has one too);
* ``eval/<task>/<metric>``: the offline suite on the test split; ``audio/<task>/<metric>``;
* ``train_tokens`` / ``train_flops``: summed over every stage the cell ran or reused (the
  specialists of a curriculum count: its final model is made of them);
* ``params_total`` (summed over distinct final models), ``params_active`` (parameters one
  token touches, measured: ``train_flops / (6 train_tokens)`` of the final stage plus the
  embeddings, averaged over final models) and ``params_active_max``.

Per arm: mean and sample standard deviation (ddof 1; 0 for one seed) of each over its seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from unimoe.study.schema import Cell, Study
from unimoe.training.callbacks.finalize import FINAL_METRICS

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def stage_metrics(stage_dir: Path) -> dict[str, float]:
    return read_json(stage_dir / FINAL_METRICS).get("metrics", {})


def cell_summary(cell: Cell, study: Study) -> dict[str, Any]:
    """The cell's numbers (see the module docstring), from its stages' files."""
    from unimoe.study.run import evaluation_folder, model_tasks
    from unimoe.training.metrics import declared_domains

    root = cell.curriculum.root
    metrics: dict[str, float] = {}
    tokens = flops = 0.0
    for stage in cell.stages():
        if stage.kind == "fit":
            m = stage_metrics(stage.directory(root))
            tokens += m.get("train/tokens", 0.0)
            flops += m.get("train/flops", 0.0)
    metrics["train_tokens"], metrics["train_flops"] = tokens, flops
    serving: dict[str, Any] = {}
    for task, stage in cell.final_stages().items():
        for name in ([task] if task != "*" else model_tasks(stage.final_checkpoint(root))):
            serving[name] = stage
    for task, stage in sorted(serving.items()):
        m = stage_metrics(stage.directory(root))
        if f"val/loss/{task}" in m:
            metrics[f"val_loss/{task}"] = m[f"val/loss/{task}"]
        prefix = f"val/audio/{task}/"
        metrics.update({f"audio/{task}/{k[len(prefix):]}": v for k, v in m.items() if k.startswith(prefix)})
        if study.evaluate is not None:
            values = read_json(evaluation_folder(stage.directory(root), study.evaluate, task) / "results.json")
            metrics.update({f"eval/{task}/{k}": float(v) for k, v in (values.get("values") or {}).items()
                            if isinstance(v, (int, float))})
    by_domain: dict[str, list[float]] = {}
    for task, domain in declared_domains(serving).items():
        if f"val_loss/{task}" in metrics:
            by_domain.setdefault(domain, []).append(metrics[f"val_loss/{task}"])
    metrics.update({f"val_loss/{d}": sum(v) / len(v) for d, v in sorted(by_domain.items())})
    models = {stage.name: stage for stage in serving.values()}
    sizes = [model_size(s.final_checkpoint(root), stage_metrics(s.directory(root))) for s in models.values()]
    if sizes:
        metrics["params_total"] = float(sum(s["total"] for s in sizes))
        metrics["params_active"] = sum(s["active"] for s in sizes) / len(sizes)
        metrics["params_active_max"] = float(max(s["active_max"] for s in sizes))
    detail = {"codebook_losses": {}, "routing": {}}
    for task, stage in sorted(serving.items()):
        m = stage_metrics(stage.directory(root))
        cbs = sorted((int(k.rsplit("cb", 1)[1]), v) for k, v in m.items() if k.startswith(f"val/loss/{task}/cb"))
        if cbs:
            detail["codebook_losses"][task] = [v for _, v in cbs]
        shares = routing_shares(stage.directory(root)).get(task)
        if shares:
            detail["routing"][task] = shares
    return {"tasks": {t: s.name for t, s in sorted(serving.items())}, "metrics": metrics, "detail": detail}


def routing_shares(stage_dir: Path) -> dict[str, dict[str, float]]:
    """Task -> share of its routed (token, expert) pairs per expert group, at the stage's last validation.

    Groups are the expert labels before the dot (``tts.0``, ``tts.1`` -> ``tts``: the experts cut
    from the tts specialist; ``null``; ``e3`` of a fresh MoE stays itself), summed over layers;
    from the routing JSON that ``ExpertLoadMonitor`` writes (empty when it did not run).
    """
    files = sorted((stage_dir / "plots").glob("routing_val_step*.json"))
    if not files:
        return {}
    data = read_json(files[-1])
    labels = [str(x).split(".")[0] for x in data.get("experts", [])]
    out: dict[str, dict[str, float]] = {}
    for task, table in (data.get("tokens_per_expert_by_task") or {}).items():
        sums: dict[str, float] = {}
        for layer in table:
            for label, count in zip(labels, layer):
                sums[label] = sums.get(label, 0.0) + float(count)
        total = sum(sums.values()) or 1.0
        out[task] = {k: v / total for k, v in sums.items()}
    return out


def model_size(model: Path, metrics: dict[str, float]) -> dict[str, float]:
    """Total, measured activated and maximal activated parameters of a final model."""
    from unimoe.checkpoint import open_model_file
    from unimoe.model.params import count_parameters, parameter_breakdown
    from unimoe.model.transformer import meta_model

    net = meta_model(open_model_file(model).metadata.config)
    parts = parameter_breakdown(net)
    embeds = parts["text_embed"] + parts["audio_embed"]
    total = count_parameters(net)
    tokens = metrics.get("train/tokens") or 0.0
    active = metrics["train/flops"] / (6 * tokens) + embeds if tokens and "train/flops" in metrics \
        else count_parameters(net, active="max")
    return {"total": float(total), "active": float(active), "active_max": float(count_parameters(net, active="max"))}


def aggregate(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def build_report(study: Study) -> dict[str, Any]:
    """Per cell (from ``cell.json`` when the cell finished) and per arm (mean/std over seeds)."""
    from unimoe.study.run import CELL_FILE

    cells, arms = [], {}
    for arm in study.arms:
        per_key: dict[str, list[float]] = {}
        seeds = []
        for cell in (c for c in study.cells if c.arm.name == arm.name):
            record = read_json(cell.folder / CELL_FILE)
            if not record:
                continue
            summary = cell_summary(cell, study)  # re-read from the stage files: the report is never stale
            seeds.append(cell.seed)
            cells.append({"arm": arm.name, "seed": cell.seed, **summary})
            for key, value in summary["metrics"].items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    per_key.setdefault(key, []).append(float(value))
        arms[arm.name] = {"description": arm.description, "seeds": seeds,
                          "metrics": {k: aggregate(v) for k, v in sorted(per_key.items())}}
    return {"study": study.name, "description": study.description, "source": str(study.source),
            "scale": study.scale, "seeds": study.seeds, "arms": arms, "cells": cells}


def _fmt(value: float, key: str) -> str:
    if key in ("train_tokens", "train_flops") or key.startswith("params"):
        return f"{value:.3g}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def to_markdown(report: dict[str, Any]) -> str:
    arms = report["arms"]
    keys = sorted({k for a in arms.values() for k in a["metrics"]}, key=_key_order)
    lines = [f"# Study {report['study']}", "", report["description"].strip(), "",
             f"Scale {report['scale']:g}; seeds {report['seeds']}. Mean ± standard deviation over seeds "
             "(sample std, ddof 1); `n` seeds per arm. Losses: sum over codebooks of per-codebook mean "
             "token cross entropy (lower is better); `val_loss/<domain>` is the mean of its tasks.", ""]
    names = list(arms)
    lines += ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        row = []
        for name in names:
            m = arms[name]["metrics"].get(key)
            row.append("-" if m is None else f"{_fmt(m['mean'], key)} ± {_fmt(m['std'], key)}")
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    lines.append("| n | " + " | ".join(str(len(arms[n]["seeds"])) for n in names) + " |")
    lines += ["", "Arms:", ""] + [f"* **{n}**: {a['description'].strip()}" for n, a in arms.items()]
    lines += _detail_tables(report)
    return "\n".join(lines) + "\n"


def _seed_mean(rows: list) -> Any:
    """Element-wise mean of equally shaped lists / dicts of numbers over seeds."""
    if isinstance(rows[0], dict):
        return {k: _seed_mean([r[k] for r in rows if k in r]) for k in rows[0]}
    if isinstance(rows[0], list):
        return [_seed_mean([r[i] for r in rows]) for i in range(min(len(r) for r in rows))]
    return statistics.fmean(rows)


def _detail_tables(report: dict[str, Any]) -> list[str]:
    """Routing share per task (MoE arms) and per-codebook validation losses, seed means."""
    lines: list[str] = []
    by_arm: dict[str, list[dict]] = {}
    for cell in report["cells"]:
        by_arm.setdefault(cell["arm"], []).append(cell.get("detail") or {})
    routing = {arm: _seed_mean([d["routing"] for d in rows]) for arm, rows in by_arm.items()
               if rows and all(d.get("routing") for d in rows)}
    for arm, tasks in routing.items():  # one table per arm: its expert groups are its own
        groups = sorted({g for t in tasks.values() for g in t}, key=lambda g: (g == "null", g))
        lines += ["", f"Routing of the `{arm}` final model at its last validation (share of each task's routed "
                  "(token, expert) pairs per expert group, summed over layers; seed mean):", "",
                  "| task | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
        lines += [f"| {task} | " + " | ".join(f"{shares.get(g, 0.0):.2f}" for g in groups) + " |"
                  for task, shares in tasks.items()]
    codebooks = {arm: _seed_mean([d["codebook_losses"] for d in rows]) for arm, rows in by_arm.items()
                 if rows and all(d.get("codebook_losses") for d in rows)}
    if codebooks:
        width = max(len(v) for c in codebooks.values() for v in c.values())
        lines += ["", "Validation loss per codebook (seed mean):", "",
                  "| arm | task | " + " | ".join(f"cb{k}" for k in range(width)) + " |", "|---" * (width + 2) + "|"]
        for arm, tasks in codebooks.items():
            for task, values in tasks.items():
                lines.append(f"| {arm} | {task} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return lines


def _key_order(key: str) -> tuple:
    order = ("val_loss/", "eval/", "audio/", "train_", "params")
    return next((i for i, p in enumerate(order) if key.startswith(p)), len(order)), key


def write_report(study: Study, console=None) -> dict[str, Any]:
    from unimoe.atomic import write_json_atomic, write_text_atomic
    from unimoe.study.plots import plot_curves, plot_finals

    report = build_report(study)
    plots = study.root / PLOTS_DIR
    report["plots"] = [str(p) for p in (plot_curves(study, plots), plot_finals(report, plots)) if p is not None]
    write_json_atomic(study.root / REPORT_JSON, report, indent=2, sort_keys=True, default=str)
    markdown = to_markdown(report)
    if report["plots"]:
        markdown += "\n" + "\n".join(f"![{Path(p).stem}]({Path(p).relative_to(study.root)})" for p in report["plots"]) + "\n"
    write_text_atomic(study.root / REPORT_MD, markdown)
    if console is not None:
        console.print(markdown)
    return report
