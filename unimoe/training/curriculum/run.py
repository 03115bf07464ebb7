"""Running a curriculum: stage by stage, resumable, with its state on disk.

A stage is finished when ``<root>/<stage>/DONE.json`` and its final checkpoint exist (both
written atomically, the marker last): it is skipped. A fit stage with
``checkpoints/last.ckpt`` but no marker was interrupted: it resumes from it with
``--ckpt_path`` (and without ``init_from``). ``<root>/curriculum.json`` is the status of
every stage, rewritten as they progress.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from unimoe.atomic import write_text_atomic
from unimoe.sharded_checkpoint import checkpoint_exists
from unimoe.training.callbacks.finalize import DONE_MARKER, FINAL_CHECKPOINT, FINAL_METRICS, write_status_json
from unimoe.training.curriculum.compose import (
    check_data_paths, check_launcher, compose_stage, upcycle_options, validate_stage_config,
)
from unimoe.training.curriculum.report import duration, loss_text, print_plan, print_summary, short_class, stage_steps
from unimoe.training.curriculum.schema import Curriculum, Stage

from unimoe.training.recipe_vars import RecipeError

STATUS_FILE = "curriculum.json"
STAGE_CONFIG = "stage.yaml"


def stage_status(cur: Curriculum, stage: Stage) -> str:
    """``done`` / ``final`` (final checkpoint, marker missing) / ``resume`` / ``pending``."""
    d = stage.directory(cur.root)
    final = stage.final_checkpoint(cur.root)
    if (d / DONE_MARKER).is_file() and checkpoint_exists(final):
        return "done"
    if checkpoint_exists(final):
        return "final"
    if stage.kind == "fit" and checkpoint_exists(d / "checkpoints" / "last.ckpt"):
        return "resume"
    return "pending"


def _checkpoint_step(path: Path) -> Optional[int]:
    from unimoe.checkpoint import CheckpointError, read_checkpoint
    from unimoe.sharded_checkpoint import is_sharded_checkpoint, read_header

    try:
        # weights_only: a resume checkpoint holds tensors and plain data only (or is a sharded folder)
        ckpt = read_header(path) if is_sharded_checkpoint(path) else read_checkpoint(path)
    except (CheckpointError, OSError, ValueError):  # unreadable counts as absent
        return None
    return int(ckpt.get("global_step", 0))


class CurriculumRunner:
    """Runs (or resumes) a curriculum; prints which stage runs and how far each got."""

    def __init__(self, cur: Curriculum, console=None, until: Optional[str] = None) -> None:
        from rich.console import Console

        self.cur = cur
        self.console = console or Console(stderr=True)
        self.until = until
        if until is not None and all(s.name != until for s in cur.stages):
            raise RecipeError(f"--until {until!r}: no such stage; stages: {[s.name for s in cur.stages]}")
        self.status: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ plan
    def selected(self) -> list[Stage]:
        out = []
        for stage in self.cur.stages:
            out.append(stage)
            if stage.name == self.until:
                break
        return out

    def plan(self) -> list[tuple[Stage, str, Optional[dict]]]:
        rows = []
        for stage in self.selected():
            cfg = compose_stage(self.cur, stage) if stage.kind == "fit" else None
            rows.append((stage, stage_status(self.cur, stage), cfg))
        return rows

    # ------------------------------------------------------------------ run
    def run(self, dry_run: bool = False) -> int:
        rows = self.plan()
        self.cur.root.mkdir(parents=True, exist_ok=True)
        print_plan(self.console, self.cur, rows)
        for stage, status, cfg in rows:
            if cfg is not None:
                check_launcher(self.cur, stage, cfg)
                if status not in ("done", "final"):
                    check_data_paths(self.cur, stage, cfg)
                    validate_stage_config(cfg, stage)
            elif status not in ("done", "final"):
                upcycle_options(self.cur, stage)  # builds the MoEConfig: field errors before any training
        if dry_run:
            self.console.print("[bold]dry run[/]: every stage config parsed; nothing was trained")
            return 0
        total = len(rows)
        start_all = time.time()
        for stage, status, cfg in rows:
            header = f"stage {stage.index + 1}/{len(self.cur.stages)}: {stage.name}"
            if status == "done":
                self.console.print(f"[green]✓[/] {header} already finished, skipped")
                self._record(stage, "done", self._read_done(stage))
                continue
            if status == "final":
                self.console.print(f"[green]✓[/] {header}: final checkpoint present, marking it done")
                self._mark_done(stage, seconds=None, resumed_from=None)
                continue
            started = time.time()
            try:
                if stage.kind == "upcycle":
                    self.console.rule(f"{header} (upcycle)")
                    self._run_upcycle(stage)
                    resumed = None
                else:
                    resumed = self._run_fit(stage, status, cfg, header)
            except BaseException as exc:  # noqa: BLE001 - report which stage failed, then re-raise / fail
                self._record(stage, "failed", {"error": f"{type(exc).__name__}: {exc}"})
                self.console.print(f"[red]✗ {header} failed[/]: {type(exc).__name__}: {exc}")
                self.console.print("  re-run the same command to resume: finished stages are skipped, "
                                   "an interrupted stage continues from its last checkpoint")
                if isinstance(exc, KeyboardInterrupt):
                    raise
                return 1
            record = self._mark_done(stage, seconds=time.time() - started, resumed_from=resumed)
            self.console.print(f"[green]✓[/] {header} finished in {duration(time.time() - started)}"
                               f"{loss_text(record)}")
        self.console.rule(f"curriculum {self.cur.name}: {total} stage(s) ready in {duration(time.time() - start_all)}")
        self.print_summary()
        return 0

    def _run_fit(self, stage: Stage, status: str, cfg: dict[str, Any], header: str) -> Optional[dict]:
        run_dir = stage.directory(self.cur.root)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / STAGE_CONFIG
        write_text_atomic(config_path, yaml.safe_dump(cfg, sort_keys=False))
        argv = ["fit", "--config", str(config_path), "--experiment_name", self.cur.name,
                "--mlflow_dir", str(self.cur.root), "--run_name", stage.name]
        resumed = None
        steps = stage_steps(cfg)
        if status == "resume":
            last = run_dir / "checkpoints" / "last.ckpt"
            step = _checkpoint_step(last)
            resumed = {"checkpoint": str(last), "step": step}
            if stage.init_from is not None:
                argv += ["--model.init_args.init_from", "null"]
            argv += ["--ckpt_path", str(last)]
            self.console.rule(f"{header}: resuming at step {step}/{steps or '?'} from {last.name}")
        else:
            source = f" from {stage.init_from if isinstance(stage.init_from, str) else stage.init_from}" if stage.init_from else ""
            self.console.rule(f"{header}: {short_class(cfg['model']['class_path'])}{source}, {steps or '?'} steps")
        self._record(stage, "running", {"resumed_from": resumed})
        if self.cur.launcher == "subprocess":
            proc = subprocess.run([sys.executable, "-m", "unimoe", *argv], env=os.environ.copy())
            if proc.returncode != 0:
                raise RuntimeError(f"`unimoe {' '.join(argv)}` exited with status {proc.returncode}")
        else:
            from unimoe.training.cli import run_lightning_cli

            code = run_lightning_cli(argv)
            gc.collect()
            if code != 0:
                raise RuntimeError(f"`unimoe {' '.join(argv)}` failed (status {code})")
        if not checkpoint_exists(stage.final_checkpoint(self.cur.root)):
            raise RuntimeError(f"training of {stage.name} ended without {FINAL_CHECKPOINT} (stopped early?)")
        return resumed

    def _run_upcycle(self, stage: Stage) -> None:
        from unimoe.training.upcycle import upcycle_checkpoints

        spec = upcycle_options(self.cur, stage)
        missing = [p for p in spec["specialists"] if not checkpoint_exists(p)]
        if missing:
            raise RuntimeError(f"upcycle {stage.name}: specialist checkpoint(s) missing: {missing}")
        out = stage.final_checkpoint(self.cur.root)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.console.print(f"  merging {len(spec['specialists'])} specialists x {spec.get('pieces', 2)} pieces -> {out}")
        upcycle_checkpoints(out=str(out), overwrite=True, **spec)

    # ------------------------------------------------------------------ records
    def _mark_done(self, stage: Stage, seconds: Optional[float], resumed_from: Optional[dict]) -> dict[str, Any]:
        d = stage.directory(self.cur.root)
        final = stage.final_checkpoint(self.cur.root)
        from unimoe.checkpoint import open_model_file

        meta = open_model_file(final).metadata  # a finished stage must hold a readable model
        record: dict[str, Any] = {"stage": stage.name, "kind": stage.kind, "final_checkpoint": str(final),
                                  "model_stage": meta.stage, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "seconds": None if seconds is None else round(seconds, 1),
                                  "resumed_from": resumed_from}
        metrics_file = d / FINAL_METRICS
        if metrics_file.is_file():
            final_metrics = json.loads(metrics_file.read_text())
            record["global_step"] = final_metrics.get("global_step")
            record["metrics"] = {k: v for k, v in final_metrics.get("metrics", {}).items()
                                 if k in ("train/loss", "val/loss") or k.startswith("val/loss/") and k.count("/") == 2}
        write_status_json(d / DONE_MARKER, record)
        self._record(stage, "done", record)
        return record

    def _read_done(self, stage: Stage) -> dict[str, Any]:
        try:
            return json.loads((stage.directory(self.cur.root) / DONE_MARKER).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _record(self, stage: Stage, status: str, info: dict[str, Any] | None) -> None:
        self.status[stage.name] = {"status": status, **(info or {})}
        write_status_json(self.cur.root / STATUS_FILE, {
            "name": self.cur.name, "source": str(self.cur.source), "root": str(self.cur.root),
            "data_root": None if self.cur.data_root is None else str(self.cur.data_root),
            "mlflow": f"sqlite:///{self.cur.root / 'mlflow.db'}",
            "stages": [{"name": s.name, **self.status.get(s.name, {"status": "pending"})} for s in self.cur.stages],
        })

    def print_summary(self) -> None:
        print_summary(self.console, self.cur, self.selected(), self.status)
