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

import logging
import math
import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from unimoe.atomic import write_json_atomic

log = logging.getLogger("unimoe.training")

FINAL_CHECKPOINT = "final"
FINAL_METRICS = "final_metrics.json"
DONE_MARKER = "DONE.json"


class StageFinalizer(Callback):
    """On a normal end of training: ``<run dir>/final/`` (atomic) and ``final_metrics.json``.

    A run killed after its last ``last.ckpt`` (written at ``max_steps``) but before
    ``final/`` resumes with nothing left to train: Lightning then skips the training loop
    and never calls ``on_train_end``. :meth:`finish_resumed` (called by ``unimoe fit`` after
    ``fit`` returns) then runs the final validation again on the restored weights and writes
    the final checkpoint, with the training metrics kept in this callback's checkpoint state:
    the same files the uninterrupted run wrote.

    Args:
        filename: name of the final model inside the run directory: a model folder, or a
            Lightning checkpoint file when it ends in ``.ckpt``.
        weights_only: leave optimizer/loop state out of a ``.ckpt`` final checkpoint.
    """

    def __init__(self, filename: str = FINAL_CHECKPOINT, weights_only: bool = True) -> None:
        self.filename = filename
        self.weights_only = weights_only
        self._trainer: L.Trainer | None = None
        self._restored_metrics: dict[str, float] = {}
        self._finalized = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self._finalized = False

    def state_dict(self) -> dict:
        return {"metrics": _numbers(self._trainer.callback_metrics) if self._trainer is not None else {}}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_metrics = dict(state_dict.get("metrics") or {})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or trainer.sanity_checking:
            return
        self._finalize(trainer, pl_module, _numbers(trainer.callback_metrics))

    def needs_finishing(self, trainer: L.Trainer) -> bool:
        """True after a fit resumed from a checkpoint of the finished training (no ``on_train_end``)."""
        return (not self._finalized and not trainer.interrupted and trainer.fit_loop.done
                and not (Path(trainer.default_root_dir) / DONE_MARKER).exists())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.needs_finishing(trainer):
            log.warning("%s: the checkpoint had finished training; the final model is written after fit returns "
                        "(unimoe fit does it; from Python call StageFinalizer.finish_resumed)", trainer.default_root_dir)

    def finish_resumed(self, trainer: L.Trainer, model: L.LightningModule, datamodule=None) -> None:
        """Validate the restored weights once more (the metrics of the last validation are not in
        the checkpoint) and write the final checkpoint and metrics."""
        if not self.needs_finishing(trainer):
            return
        metrics = dict(self._restored_metrics)
        if trainer.limit_val_batches != 0:
            trainer.validate(model, datamodule=datamodule, verbose=False)
            metrics.update(_numbers(trainer.callback_metrics))
        self._finalize(trainer, model, metrics)

    def _finalize(self, trainer: L.Trainer, pl_module: L.LightningModule, metrics: dict[str, float]) -> None:
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
            # the metrics first, the final model last: its presence is what marks the stage finished,
            # so a kill between the two must not leave a final model without its metrics
            record = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                      "checkpoint": str(path), "metrics": metrics}
            write_status_json(run_dir / FINAL_METRICS, record)
            if as_folder:
                _checkpoint_to_folder(tmp, path)
            else:
                os.replace(tmp, path)
        trainer.strategy.barrier("unimoe-final-checkpoint")
        self._finalized = True


def _numbers(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if _is_number(v)}


def _is_unimoe_stage(module: L.LightningModule) -> bool:
    from unimoe.training.stages import StageModule

    return isinstance(module, StageModule)


def _checkpoint_to_folder(tmp: Path, folder: Path) -> None:
    """The stage's just-written checkpoint -> a model folder (tensors streamed from the mmapped file).

    ``tmp`` is a ``.ckpt`` file, or a sharded checkpoint folder under ``MoEParallelStrategy``."""
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
