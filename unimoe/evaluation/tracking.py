"""Logging an evaluation report to MLflow.

MLflow >= 3.7 refuses a plain file store by default, so the default tracking URI is a
sqlite database inside the output folder with artifacts next to it. A ``MlflowClient`` is
used instead of the fluent API so evaluating never changes the process-wide active run
or tracking URI (training code in the same process may be using them).
"""

from __future__ import annotations

import time
from pathlib import Path

from .report import EvaluationReport

DEFAULT_EXPERIMENT = "unimoe-eval"


def default_tracking_uri(out_dir: str | Path) -> str:
    from unimoe.mlflow_store import sqlite_tracking_uri

    return sqlite_tracking_uri(out_dir)


def log_report(
    report: EvaluationReport,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    artifacts: list[Path] | None = None,
) -> dict[str, str]:
    """Log metric values, which backend produced each (as params) and the report files.

    Returns ``{"tracking_uri", "experiment_id", "run_id"}``.
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    out_dir = Path(out_dir).resolve()
    uri = tracking_uri or default_tracking_uri(out_dir)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=(out_dir / "mlflow-artifacts").as_uri())
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name or f"eval-{report.suite}",
                            tags={"unimoe.suite": report.suite, "unimoe.kind": "evaluation"})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics, params = [], [Param("suite", report.suite), Param("n_items", str(report.n_items))]
    logged_backends = set()
    for m in report.metrics:
        if m.key not in logged_backends:  # per-task results of one entry share its backend
            params.append(Param(f"backend.{m.key}", f"{m.backend}: {m.backend_description}"[:500]))
            logged_backends.add(m.key)
        if m.value is not None:
            metrics.append(Metric(m.name, m.value, now, 0))
            metrics.append(Metric(f"{m.name}.n_scored", float(m.n_scored), now, 0))
        for name, value in m.details.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.append(Metric(f"{m.name}.{name}", float(value), now, 0))
    for key, value in report.inputs.items():
        if value is not None:
            params.append(Param(f"input.{key}", str(value)[:500]))
    client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("mlflow.note.content", report.description)])
    for path in artifacts or []:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return {"tracking_uri": uri, "experiment_id": str(exp_id), "run_id": run_id}
