"""A rich progress bar over a stage's optimizer steps (``global_step / max_steps``).

Lightning's bar counts batches of the current epoch, which says little for a stage defined
by ``max_steps`` over a resampled mix (and restarts at every epoch); this one shows how far
the stage is, resumes at the restored step, and names the stage (its run folder).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training bar is ``global_step`` of ``trainer.max_steps``."""

    def _by_steps(self) -> bool:
        return self._trainer is not None and (self.trainer.max_steps or -1) > 0

    @property
    def total_train_batches(self):
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        return f"{Path(self.trainer.default_root_dir).name} · epoch {current_epoch}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._by_steps() and self.train_progress_bar_id is not None and self.progress is not None:
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch))
            self.refresh()
            return
        super().on_train_epoch_start(trainer, pl_module)
        if self._by_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)  # a resumed stage starts where it was

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
