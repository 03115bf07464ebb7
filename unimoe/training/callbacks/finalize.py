"""Write a stage's final checkpoint when (and only when) training finished normally.

The curriculum considers a stage finished when ``final.ckpt`` and its done marker exist;
``last.ckpt`` (from ``ModelCheckpoint``) is what an interrupted stage resumes from. The
final checkpoint is weights-only (model state + ``checkpoint["unimoe"]`` + hparams): the
next stage reads it through ``init_from`` and needs no optimizer state.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from unimoe.atomic import write_json_atomic

FINAL_CHECKPOINT = "final.ckpt"
FINAL_METRICS = "final_metrics.json"
DONE_MARKER = "DONE.json"


class StageFinalizer(Callback):
    """On a normal end of training: ``<run dir>/final.ckpt`` (atomic) and ``final_metrics.json``.

    Args:
        filename: name of the final checkpoint inside the run directory.
        weights_only: leave optimizer/loop state out of the final checkpoint.
    """

    def __init__(self, filename: str = FINAL_CHECKPOINT, weights_only: bool = True) -> None:
        self.filename = filename
        self.weights_only = weights_only

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or trainer.sanity_checking:
            return
        run_dir = Path(trainer.default_root_dir)
        path = run_dir / self.filename
        if (run_dir / DONE_MARKER).exists() and path.exists():
            raise RuntimeError(
                f"{run_dir} holds a finished stage ({DONE_MARKER} and {self.filename}); refusing to overwrite its "
                "final checkpoint. Train into another default_root_dir."
            )
        tmp = path.with_name(f".{path.name}.tmp")
        trainer.save_checkpoint(str(tmp), weights_only=self.weights_only)  # collective; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, path)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_number(v)}
            record = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                      "checkpoint": str(path), "metrics": metrics}
            write_status_json(run_dir / FINAL_METRICS, record)
        trainer.strategy.barrier("unimoe-final-checkpoint")


def write_status_json(path: Path, data: dict) -> None:
    """A stage's status/metrics file: sorted, indented JSON, written atomically."""
    write_json_atomic(path, data, indent=2, sort_keys=True, default=str)


def _is_number(value) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return False
    return math.isfinite(number)
