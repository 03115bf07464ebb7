"""Callbacks that simulate failures in curriculum tests (imported by class path from stage YAML)."""

import json
import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger


class KillOnce(Callback):
    """SIGKILL this process once, after ``at_step`` optimizer steps and a saved ``last.ckpt``.

    ``marker`` is created just before the kill, so a re-run (the resume) trains through. The
    kill is a real one: no exception handling, no cleanup, no final checkpoint. ``rank``: kill
    only that global rank of a multi-process run (the others then lose their peer).
    """

    def __init__(self, at_step: int, marker: str, rank: int | None = None) -> None:
        self.at_step, self.marker, self.rank = at_step, Path(marker), rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if self.marker.exists() or trainer.global_step < self.at_step or not last.exists():
            return
        self.marker.write_text(json.dumps({"killed_at_step": trainer.global_step}))
        os.kill(os.getpid(), signal.SIGKILL)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` and the hyperparameters."""

    def __init__(self):
        super().__init__()
        self.rows, self.params = [], {}

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        self.params.update(params if isinstance(params, dict) else vars(params))

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


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


class LossRecorder(Callback):
    """Global rank 0 appends ``{"step", "loss"}`` (this rank's ``train/loss``) to a JSON Lines file each step."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            loss = float(trainer.callback_metrics["train/loss"])
            with self.path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": loss, "world": trainer.world_size}) + "\n")


TINY_MOE = {"num_routed_experts": 4, "routed_intermediate_size": 64, "num_null_experts": 1, "num_shared_experts": 1,
            "shared_intermediate_size": 32, "router": {"name": "top_p", "top_p": 0.7, "jitter": 0.0}}


def parallel_stage(data: Path, root: Path, world: int, ep: int, steps: int, *, every: int = 2, moe: dict | None = None,
                   callbacks: list | None = None, validate: bool = False) -> dict:
    """A JointStage fit config on the tiny shards under MoEParallelStrategy (fp32, CPU ranks).

    No condition drop, so a resumed step sees exactly the uninterrupted run's batch. Keeps every
    ``every``-th step's checkpoint as ``checkpoints/step=<n>.ckpt`` (besides ``last.ckpt``)
    and records rank 0's per-step loss in ``<root>/losses.jsonl``.
    """
    strategy = {"class_path": "unimoe.training.parallel.MoEParallelStrategy",
                "init_args": {"expert_parallel_size": ep, "mixed_precision": "fp32"}}
    return {
        "seed_everything": 0,
        "model": {"class_path": "JointStage", "init_args": {
            "model": {**TINY_MODEL, "moe": moe or TINY_MOE}, "codec": {"name": "spectral_rvq", "path": str(data / "codec.pt")},
            "optimizer": {"lr": 3e-3, "warmup_steps": 1}}},
        "data": {"class_path": "unimoe.data.datamodule.UniMoEDataModule", "init_args": {
            "sources": {t: str(data / "shards" / t) for t in ("tts", "t2m", "v2m")}, "model": TINY_MODEL,
            "max_tokens": 2048, "samples_per_epoch": 96, "val_split": "val" if validate else None, "test_split": None,
            "cond_drop_prob": 0.0}},
        "trainer": {"accelerator": "cpu", "devices": world, "strategy": strategy, "use_distributed_sampler": False,
                    "max_steps": steps, "logger": False, "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    **({"val_check_interval": every, "check_val_every_n_epoch": None} if validate else {}),
                    "default_root_dir": str(root), "log_every_n_steps": 1, "gradient_clip_val": 1.0,
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "save_top_k": -1,
                                       "every_n_train_steps": every, "filename": "{step}"}},
                        {"class_path": "training_helpers.LossRecorder", "init_args": {"path": str(root / "losses.jsonl")}},
                        *(callbacks or [])]},
    }


def recorded_losses(root: Path) -> dict[int, float]:
    lines = (root / "losses.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}
