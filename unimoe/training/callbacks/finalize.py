"""Write a stage's final model when (and only when) training finished normally.

The curriculum considers a stage finished when its final model (``final/``) and its done
marker exist; ``last.ckpt`` (from ``ModelCheckpoint``) is what an interrupted stage resumes
from. The final model is a pickle-free model folder (``model.safetensors`` + ``config.json``
with the stage's ``checkpoint["unimoe"]`` metadata, see :mod:`unimoe.checkpoint`): the next
stage reads it through ``init_from``, generation and evaluation through ``--ckpt``, and it
is the file to share. A ``filename`` ending in ``.ckpt`` keeps a weights-only Lightning
checkpoint instead (as does any module that is not a unimoe stage: it has no unimoe metadata).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from unimoe.atomic import write_json_atomic

FINAL_CHECKPOINT = "final"
FINAL_METRICS = "final_metrics.json"
DONE_MARKER = "DONE.json"


class StageFinalizer(Callback):
    """On a normal end of training: ``<run dir>/final/`` (atomic) and ``final_metrics.json``.

    Args:
        filename: name of the final model inside the run directory: a model folder, or a
            Lightning checkpoint file when it ends in ``.ckpt``.
        weights_only: leave optimizer/loop state out of a ``.ckpt`` final checkpoint.
    """

    def __init__(self, filename: str = FINAL_CHECKPOINT, weights_only: bool = True) -> None:
        self.filename = filename
        self.weights_only = weights_only

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or trainer.sanity_checking:
            return
        run_dir = Path(trainer.default_root_dir)
        path = run_dir / self.filename
        as_folder = path.suffix != ".ckpt" and _is_unimoe_stage(pl_module)
        if path.suffix != ".ckpt" and not as_folder:  # a plain LightningModule has no unimoe metadata
            path = path.with_name(path.name + ".ckpt")
        if (run_dir / DONE_MARKER).exists() and path.exists():
            raise RuntimeError(
                f"{run_dir} holds a finished stage ({DONE_MARKER} and {path.name}); refusing to overwrite its "
                "final checkpoint. Train into another default_root_dir."
            )
        tmp = path.with_name(f".{path.name}.tmp.ckpt")
        # Lightning gathers the weights whatever the strategy (collective; rank 0 writes).
        trainer.save_checkpoint(str(tmp), weights_only=self.weights_only or as_folder)
        if trainer.is_global_zero:
            if as_folder:
                _checkpoint_to_folder(tmp, path)
            else:
                os.replace(tmp, path)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_number(v)}
            record = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                      "checkpoint": str(path), "metrics": metrics}
            write_status_json(run_dir / FINAL_METRICS, record)
        trainer.strategy.barrier("unimoe-final-checkpoint")


def _is_unimoe_stage(module: L.LightningModule) -> bool:
    from unimoe.training.stages import StageModule

    return isinstance(module, StageModule)


def _checkpoint_to_folder(tmp: Path, folder: Path) -> None:
    """The stage's just-written checkpoint -> a model folder (tensors streamed from the mmapped file).

    ``tmp`` is a ``.ckpt`` file, or a sharded checkpoint folder under ``MoEParallelStrategy``."""
    import shutil

    from unimoe.checkpoint import open_model_file, save_model_folder

    try:
        opened = open_model_file(tmp)
        save_model_folder(folder, opened.tensors, opened.metadata)
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def write_status_json(path: Path, data: dict) -> None:
    """A stage's status/metrics file: sorted, indented JSON, written atomically."""
    write_json_atomic(path, data, indent=2, sort_keys=True, default=str)


def _is_number(value) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return False
    return math.isfinite(number)
