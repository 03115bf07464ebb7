"""Callbacks that simulate failures in curriculum tests (imported by class path from stage YAML)."""

import json
import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class KillOnce(Callback):
    """SIGKILL this process once, after ``at_step`` optimizer steps and a saved ``last.ckpt``.

    ``marker`` is created just before the kill, so a re-run (the resume) trains through. The
    kill is a real one: no exception handling, no cleanup, no final checkpoint.
    """

    def __init__(self, at_step: int, marker: str) -> None:
        self.at_step, self.marker = at_step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        if self.marker.exists() or trainer.global_step < self.at_step or not last.exists():
            return
        self.marker.write_text(json.dumps({"killed_at_step": trainer.global_step}))
        os.kill(os.getpid(), signal.SIGKILL)
