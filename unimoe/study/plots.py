"""A study's plots: validation-loss curves per task with seed bands, and final metrics per arm.

Curves come from each stage's MLflow history (``val/loss/<task>`` by step, mapped to training
tokens through the stage's ``train/tokens`` history). A curve follows the final model back
through the stages it continued from (``joint`` <- ``warmup``); its x axis starts at the tokens
of everything that model was built from (a curriculum's specialists), so every arm is drawn
against the training tokens its final model cost. Seeds are averaged at each validation; the
band is ± one standard deviation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from unimoe.study.schema import Cell, Study
from unimoe.training.curriculum.schema import Stage

RUN_ID_FILE = "mlflow_run_id.txt"


def _sources(stage: Stage) -> list[str]:
    if stage.kind == "upcycle":
        return [s for s in stage.upcycle["specialists"] if isinstance(s, str)]
    spec = stage.init_from
    ref = spec if isinstance(spec, str) else (spec.get("stage") if isinstance(spec, dict) else None)
    return [ref] if ref else []


def _ancestors(cell: Cell, stage: Stage) -> set[str]:
    names = {s.name for s in cell.stages()}
    out: set[str] = set()
    todo = [r for r in _sources(stage) if r in names]
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += [r for r in _sources(cell.curriculum.stage(name)) if r in names]
    return out


def _chain(cell: Cell, stage: Stage) -> list[Stage]:
    """The fit stages the final model continued from, oldest first (stops at an upcycle or a fresh start)."""
    chain = [stage]
    while True:
        refs = _sources(chain[0])
        if len(refs) != 1 or refs[0] not in {s.name for s in cell.stages()}:
            break
        parent = cell.curriculum.stage(refs[0])
        if parent.kind != "fit":
            break
        chain.insert(0, parent)
    return chain


def task_curve(client, cell: Cell, stage: Stage, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, val/loss/<task>) of the final model's lineage."""
    from unimoe.study.report import read_json, stage_metrics
    from unimoe.training.callbacks.finalize import FINAL_METRICS

    root = cell.curriculum.root
    chain = _chain(cell, stage)
    offset = sum(stage_metrics(cell.curriculum.stage(n).directory(root)).get("train/tokens", 0.0)
                 for n in _ancestors(cell, chain[0]) if cell.curriculum.stage(n).kind == "fit")
    xs, ys = [], []
    for part in chain:
        id_file = part.directory(root) / RUN_ID_FILE
        if not id_file.is_file():
            continue
        run_id = id_file.read_text().strip()
        val = client.get_metric_history(run_id, f"val/loss/{task}")
        final = read_json(part.directory(root) / FINAL_METRICS)
        ends = {0: 0.0, int(final.get("global_step", 0)): final.get("metrics", {}).get("train/tokens", 0.0)}
        # the logged history (every log_every_n_steps) plus both ends of the stage
        seen = sorted({**ends, **{m.step: m.value for m in client.get_metric_history(run_id, "train/tokens")}}.items())
        if not val or len(seen) < 2:
            continue
        steps, tokens = np.array([s for s, _ in seen], float), np.array([v for _, v in seen], float)
        for m in sorted(val, key=lambda m: m.step):
            xs.append(offset + float(np.interp(m.step, steps, tokens)))
            ys.append(m.value)
        offset += stage_metrics(part.directory(root)).get("train/tokens", 0.0)
    return np.array(xs), np.array(ys)


def plot_curves(study: Study, out: Path) -> Optional[Path]:
    """One panel per task: val loss against training tokens, one line per arm, seed band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    from unimoe.study.run import cell_finished, model_tasks
    from unimoe.training.metrics import declared_domains
    from unimoe.training.run_logging import tracking_uri_for

    client = MlflowClient(tracking_uri_for(study.root))
    curves: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = {}
    for cell in (c for c in study.cells if cell_finished(c)):
        for task, stage in cell.final_stages().items():
            for name in ([task] if task != "*" else model_tasks(stage.final_checkpoint(cell.curriculum.root))):
                x, y = task_curve(client, cell, stage, name)
                if len(x):
                    curves.setdefault(name, {}).setdefault(cell.arm.name, []).append((x, y))
    if not curves:
        return None
    tasks = sorted(curves)
    domains = declared_domains(tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    colors = {arm.name: f"C{i}" for i, arm in enumerate(study.arms)}
    for ax, task in zip(axes[0], tasks):
        for arm, runs in curves[task].items():
            n = min(len(x) for x, _ in runs)
            xs = np.mean([x[:n] for x, _ in runs], axis=0)
            ys = np.array([y[:n] for _, y in runs])
            mean, std = ys.mean(0), ys.std(0, ddof=1) if len(runs) > 1 else np.zeros(n)
            ax.plot(xs, mean, marker="o", ms=3, color=colors[arm], label=f"{arm} (n={len(runs)})")
            ax.fill_between(xs, mean - std, mean + std, color=colors[arm], alpha=0.2)
        ax.set_title(f"{domains.get(task, '?')}: {task}")
        ax.set_xlabel("training tokens of the final model")
        ax.set_ylabel(f"val/loss/{task}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out / "val_loss_curves.png")


def plot_finals(report: dict[str, Any], out: Path) -> Optional[Path]:
    """Bar chart of the final per-task/per-domain val losses and evaluation metrics, mean ± std per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["arms"]
    keys = sorted({k for a in arms.values() for k in a["metrics"] if k.startswith(("val_loss/", "eval/", "audio/"))})
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    names = list(arms)
    for ax, key in zip(axes.flat, keys):
        means = [arms[n]["metrics"].get(key, {}).get("mean", np.nan) for n in names]
        stds = [arms[n]["metrics"].get(key, {}).get("std", 0.0) for n in names]
        ax.bar(range(len(names)), means, yerr=stds, color=[f"C{i}" for i in range(len(names))], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(key, fontsize=9)
        finite = [m for m in means if np.isfinite(m)]
        if finite and key.startswith("val_loss/"):
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - 0.6 * (hi - lo + 0.5), hi + 0.6 * (hi - lo + 0.5))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, out / "final_metrics.png")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from unimoe.training.callbacks.plots import save_figure

    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path
