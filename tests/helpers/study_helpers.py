"""A callback for the study tests: an independent record of what each training step consumed."""

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class PositionRecorder(Callback):
    """Appends ``{"step", "positions"}`` (non-padding positions of the batch) per optimizer step to a JSONL file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "positions": int(batch.attention_mask.sum())}) + "\n")
