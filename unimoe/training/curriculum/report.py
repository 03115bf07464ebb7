"""What ``unimoe curriculum`` prints: the plan before it starts and the summary at the end."""

from __future__ import annotations

from typing import Any, Optional

from unimoe.training.curriculum.schema import Curriculum, Stage

STATUS_LABELS = {"done": "[green]done (skip)[/]", "final": "[green]finished (mark done)[/]",
                 "resume": "[yellow]interrupted: resume[/]", "pending": "pending"}


def print_plan(console, cur: Curriculum, rows: list[tuple[Stage, str, Optional[dict]]]) -> None:
    """One row per selected stage: what it is, where it starts from, its steps and its status."""
    from rich.table import Table

    table = Table(title=f"curriculum {cur.name}  ({cur.root})", title_justify="left")
    for col in ("#", "stage", "kind", "starts from", "steps", "status"):
        table.add_column(col)
    for stage, status, cfg in rows:
        kind = stage.kind if cfg is None else short_class(cfg["model"]["class_path"])
        source = "-"
        if stage.kind == "upcycle":
            source = ", ".join(str(s) for s in stage.upcycle["specialists"])
        elif stage.init_from is not None:
            source = stage.init_from if isinstance(stage.init_from, str) else str(stage.init_from.get("stage") or stage.init_from.get("path"))
        steps = "-" if cfg is None else str(stage_steps(cfg) or "epochs")
        table.add_row(str(stage.index + 1), stage.name, kind, source, steps, STATUS_LABELS[status])
    console.print(table)


def print_summary(console, cur: Curriculum, stages: list[Stage], status: dict[str, dict[str, Any]]) -> None:
    """Steps, time and final losses of every selected stage, and where MLflow has the rest."""
    from rich.table import Table

    table = Table(title="stages", title_justify="left")
    for col in ("stage", "steps", "time", "train/loss", "val/loss", "resumed"):
        table.add_column(col)
    for stage in stages:
        rec = status.get(stage.name, {})
        metrics = rec.get("metrics") or {}
        table.add_row(stage.name, str(rec.get("global_step", "-")),
                      "-" if rec.get("seconds") is None else duration(rec["seconds"]),
                      _fmt(metrics.get("train/loss")), _fmt(metrics.get("val/loss")),
                      "-" if not rec.get("resumed_from") else f"step {rec['resumed_from'].get('step')}")
    console.print(table)
    console.print(f"MLflow: mlflow ui --backend-store-uri sqlite:///{cur.root / 'mlflow.db'}")


def stage_steps(cfg: dict[str, Any]) -> Optional[int]:
    steps = (cfg.get("trainer") or {}).get("max_steps")
    return int(steps) if isinstance(steps, int) and steps > 0 else None


def short_class(class_path: str) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def loss_text(record: dict[str, Any]) -> str:
    metrics = record.get("metrics") or {}
    parts = [f"{k} {v:.3f}" for k, v in metrics.items() if k in ("train/loss", "val/loss")]
    return (": " + ", ".join(parts)) if parts else ""


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
