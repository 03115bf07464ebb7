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


# ---------------------------------------------------------------------- tiny real data
TINY_MODEL = {
    "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128,
    "max_seq_len": 1024, "num_codebooks": 4, "codebook_size": 16, "delays": [0, 1, 2, 3],
    "vision": {"name": "vit", "width": 32, "depth": 1, "num_heads": 2, "intermediate_size": 64, "patch_size": 8,
               "temporal_patch_size": 2, "merge_size": 2, "image_size": 32, "num_frames": 4},
}


def tiny_data(base: Path) -> Path:
    """A tiny offline demo corpus, a spectral_rvq codec fitted on it (4 x 16 codes, 25 frames/s)
    and its shards per task, built once under ``base/tiny_data`` (reused by every test module).

    Layout (the data-root contract of the demo recipes): corpus/, codec.pt, shards/{tts,t2m,v2m}.
    """
    import fcntl

    from unimoe.data.demo.tiny import build_tiny_data

    root = base / "tiny_data"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test modules in several processes share it
        return build_tiny_data(root)
