"""Running a study: cell by cell (seed-major), resumable, one MLflow parent run with a nested run per cell.

A cell (arm x seed) is its arm's curriculum run by :class:`~unimoe.training.curriculum.CurriculumRunner`
(finished stages are skipped, an interrupted one resumes from ``last.ckpt``), then the offline
evaluation of its final models, then ``cells/<arm>/seed<s>/cell.json``, written last: a cell
with that file is finished. Stages shared by several cells live in one folder
(:mod:`unimoe.study.schema`), so the second cell finds them done. MLflow: the study's run in
``<root>/mlflow.db``, one nested run per cell (its summary metrics), and every stage's training
run nested under the cell that trained it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from unimoe.atomic import write_json_atomic
from unimoe.study.schema import Cell, Study
from unimoe.training.curriculum.run import stage_status

CELL_FILE = "cell.json"
RUN_ID_FILE = "mlflow_run_id.txt"
EVAL_DIR = "eval"


def cell_finished(cell: Cell) -> bool:
    return (cell.folder / CELL_FILE).is_file() and all(
        stage_status(cell.curriculum, s) == "done" for s in cell.stages())


def cell_progress(cell: Cell) -> str:
    """``done`` / ``k/n stages`` (+ ``resume``) / ``pending``: what a rerun would do with this cell."""
    if cell_finished(cell):
        return "done"
    status = [stage_status(cell.curriculum, s) for s in cell.stages()]
    done = sum(s in ("done", "final") for s in status)
    if done == len(status):
        return "trained, evaluation pending"
    text = f"{done}/{len(status)} stages"
    return text + (", resume" if "resume" in status else "") if done or "resume" in status else "pending"


class StudyRunner:
    """Runs (or resumes) every cell of a study, then writes its report."""

    def __init__(self, study: Study, console=None) -> None:
        from rich.console import Console

        self.study = study
        self.console = console or Console(stderr=True)

    # ------------------------------------------------------------------ progress
    def print_grid(self, running: Optional[Cell] = None) -> None:
        from rich.table import Table

        table = Table(title=f"study {self.study.name}  ({self.study.root}, scale {self.study.scale:g})",
                      title_justify="left")
        table.add_column("arm")
        for seed in self.study.seeds:
            table.add_column(f"seed {seed}")
        for arm in self.study.arms:
            row = []
            for seed in self.study.seeds:
                cell = self.cell(arm.name, seed)
                text = cell_progress(cell)
                if running is cell:
                    text = f"[yellow]running ({text})[/]"
                elif text == "done":
                    text = "[green]done[/]"
                row.append(text)
            table.add_row(arm.name, *row)
        self.console.print(table)

    def cell(self, arm: str, seed: int) -> Cell:
        return next(c for c in self.study.cells if c.arm.name == arm and c.seed == seed)

    # ------------------------------------------------------------------ run
    def run(self, dry_run: bool = False, report_only: bool = False) -> int:
        from unimoe.study.report import write_report
        from unimoe.training.curriculum import CurriculumRunner

        study = self.study
        study.root.mkdir(parents=True, exist_ok=True)
        self.print_grid()
        if dry_run:
            for cell in study.cells:
                CurriculumRunner(cell.curriculum, console=self.console).run(dry_run=True)
            return 0
        started = time.time()
        if not report_only:
            parent = self._parent_run()
            for cell in study.cells:
                if cell_finished(cell):
                    continue
                self.console.rule(f"[bold]cell {cell.name}[/]")
                self.print_grid(running=cell)
                cell_run = self._cell_run(cell, parent)
                cell_started = time.time()
                runner = CurriculumRunner(cell.curriculum, console=self.console, mlflow_dir=study.root,
                                          mlflow_parent=cell_run)
                if runner.run() != 0:
                    self.console.print(f"[red]cell {cell.name} failed[/]; re-run the same command to resume it")
                    return 1
                evaluations = self._evaluate(cell)
                record = self._write_cell(cell, evaluations, time.time() - cell_started)
                self._log_cell(cell, cell_run, record)
            self.print_grid()
        report = write_report(study, console=self.console)
        if not report_only:
            self._finish_parent(report)
        self.console.rule(f"study {study.name}: report in {study.root / 'report.md'} "
                          f"({time.time() - started:.0f} s this run)")
        return 0

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, cell: Cell) -> dict[str, Any]:
        """Offline evaluation of each final model on each task it serves; results cached in the stage folder."""
        spec = self.study.evaluate
        if spec is None:
            return {}
        out: dict[str, Any] = {}
        for task, stage in cell.final_stages().items():
            tasks = [task] if task != "*" else model_tasks(stage.final_checkpoint(cell.curriculum.root))
            for name in tasks:
                folder = evaluation_folder(stage.directory(cell.curriculum.root), spec, name)
                if not (folder / "results.json").is_file():
                    self._evaluate_one(stage.final_checkpoint(cell.curriculum.root), spec, name, folder)
                out[name] = str(folder / "results.json")
        return out

    def _evaluate_one(self, model: Path, spec: dict[str, Any], task: str, folder: Path) -> None:
        from unimoe.evaluation.runner import load_checkpoint_generator, run_suite
        from unimoe.evaluation.suite import load_suite

        suite = load_suite(spec["suite"])
        if spec.get("skip_unavailable", True):
            suite.on_unavailable = "skip"
        manifest = str(spec["manifest"]).format(task=task)
        self.console.print(f"  evaluating {model} on {task} ({spec.get('split') or 'all'} split of {manifest})")
        run_suite(suite, manifest=manifest, generator=load_checkpoint_generator(str(model), **(spec.get("generation") or {})), out_dir=folder,
                  split=spec.get("split"), limit=spec.get("limit"), mlflow=False,
                  log=lambda msg: print(msg, file=sys.stderr))

    # ------------------------------------------------------------------ records
    def _write_cell(self, cell: Cell, evaluations: dict[str, Any], seconds: float) -> dict[str, Any]:
        from unimoe.study.report import cell_summary

        record = {"arm": cell.arm.name, "seed": cell.seed, "seconds_this_run": round(seconds, 1),
                  "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "stages": {s.name: str(s.directory(cell.curriculum.root)) for s in cell.stages()},
                  "final": {t: s.name for t, s in cell.final_stages().items()}, "evaluation": evaluations,
                  "summary": cell_summary(cell, self.study)}
        write_json_atomic(cell.folder / CELL_FILE, record, indent=2, sort_keys=True, default=str)
        return record

    def _client(self):
        from mlflow.tracking import MlflowClient

        from unimoe.training.run_logging import tracking_uri_for

        return MlflowClient(tracking_uri_for(self.study.root))

    def _experiment(self, client) -> str:
        exp = client.get_experiment_by_name(self.study.name)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(self.study.name, artifact_location=(self.study.root / "mlartifacts").as_uri())

    def _parent_run(self) -> str:
        id_file = self.study.root / RUN_ID_FILE
        if id_file.is_file():
            return id_file.read_text().strip()
        client = self._client()
        run = client.create_run(self._experiment(client), run_name=f"study {self.study.name}",
                                tags={"unimoe.kind": "study", "unimoe.study_file": str(self.study.source)})
        client.log_batch(run.info.run_id, params=_params({"seeds": self.study.seeds, "scale": self.study.scale,
                                                          "arms": [a.name for a in self.study.arms]}))
        id_file.write_text(run.info.run_id)
        return run.info.run_id

    def _cell_run(self, cell: Cell, parent: str) -> str:
        cell.folder.mkdir(parents=True, exist_ok=True)
        id_file = cell.folder / RUN_ID_FILE
        if id_file.is_file():
            return id_file.read_text().strip()
        client = self._client()
        run = client.create_run(self._experiment(client), run_name=cell.name,
                                tags={"mlflow.parentRunId": parent, "unimoe.kind": "study-cell",
                                      "unimoe.arm": cell.arm.name, "unimoe.seed": str(cell.seed)})
        id_file.write_text(run.info.run_id)
        return run.info.run_id

    def _log_cell(self, cell: Cell, run_id: str, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        client = self._client()
        now = int(time.time() * 1000)
        metrics = [Metric(key=k.replace(" ", "_"), value=float(v), timestamp=now, step=0)
                   for k, v in record["summary"]["metrics"].items() if isinstance(v, (int, float))]
        for i in range(0, len(metrics), 100):
            client.log_batch(run_id, metrics=metrics[i:i + 100])
        for name, folder in record["stages"].items():
            client.set_tag(run_id, f"stage.{name}", folder)
        client.log_artifact(run_id, str(cell.folder / CELL_FILE))
        client.set_terminated(run_id)

    def _finish_parent(self, report: dict[str, Any]) -> None:
        client = self._client()
        run_id = (self.study.root / RUN_ID_FILE).read_text().strip()
        for name in ("report.md", "report.json"):
            client.log_artifact(run_id, str(self.study.root / name))
        for png in sorted((self.study.root / "plots").glob("*.png")):
            client.log_artifact(run_id, str(png), artifact_path="plots")
        if all(cell_finished(c) for c in self.study.cells):
            client.set_terminated(run_id)


def evaluation_folder(stage_dir: Path, spec: dict[str, Any], task: str) -> Path:
    suite = Path(str(spec["suite"])).stem
    limit = f"-n{spec['limit']}" if spec.get("limit") else ""
    return stage_dir / EVAL_DIR / f"{suite}-{spec.get('split') or 'all'}{limit}-{task}"


def model_tasks(model: Path) -> list[str]:
    """The tasks a final model serves: its task table (every task its data named), else its lineage's data tasks."""
    from unimoe.checkpoint import open_model_file

    meta = open_model_file(model).metadata
    return list(meta.task_ids or meta.extra.get("data_tasks") or [])


def _params(values: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(key=k, value=json.dumps(v)[:250]) for k, v in values.items()]
