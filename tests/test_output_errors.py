"""Full disk and read-only output: writing a checkpoint, a shard or a report fails with an
error naming the file, the previous good file stays byte for byte, no temporary file is left
and no space stays held by a half-written one.

Real filesystems where possible: a small tmpfs mounted for the test (needs root), filled
until the next write cannot fit, and remounted read-only. Without root the same writers run
in a subprocess under a file-size limit (RLIMIT_FSIZE), a real kernel write failure too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from unimoe.atomic import OutputWriteError, write_json_atomic
from unimoe.checkpoint import CheckpointMetadata, save_model_checkpoint, save_model_folder
from unimoe.data.index import SCHEMA, IndexWriter
from unimoe.data.shards import save_shard
from unimoe.model.config import AudioLMConfig
from unimoe.model.transformer import AudioLM
from unimoe.training.checkpoint_io import AtomicCheckpointIO

TINY = AudioLMConfig.from_preset("tiny")
TESTS_DIR = Path(__file__).parent


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (the file-size-limit tests cover this case)")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def free(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def fill(folder: Path, leave: int) -> Path:
    """Leave about ``leave`` bytes free on ``folder``'s filesystem."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free(folder) - leave))
    return filler


def remount_read_only(mnt: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)


def _model(seed: int) -> AudioLM:
    torch.manual_seed(seed)
    return AudioLM(TINY)


def _index(folder: Path, v: int) -> Path:
    writer = IndexWriter()
    for i in range(8_000):  # about 0.6 MB: two versions fit the 4 MiB test filesystem
        writer.add({**{k: 0 for k in SCHEMA}, "id": f"ex-{v}-{i:06d}", "task": "tts", "split": "train",
                    "speaker": "s", "text": "some text", "prompt_text": None, "video_size": None})
    header = {"codec": {}, "config": {}, "manifest": "m.jsonl", "shards": [], "skipped": {}}
    return writer.write(folder, header)


META = CheckpointMetadata(config=TINY, codec=None, stage="upcycle")
WRITERS = {
    "checkpoint": ("m.ckpt", lambda path, v: save_model_checkpoint(path, _model(v), META)),
    "model folder": ("final", lambda path, v: save_model_folder(path, _model(v), META)),
    "shard index": ("index", lambda path, v: _index(path.parent, v)),
    "shard": ("shard-00000.pt", lambda path, v: save_shard(path.parent, 0, {"format": "x", "v": torch.full((150_000,), v)})),
    "report": ("results.json", lambda path, v: write_json_atomic(path, {"v": v, "values": [v] * 120_000})),
}


def _first_version(folder: Path, kind: str):
    """Write version 1 of ``kind`` into ``folder``: (file name, writer, path, its bytes)."""
    name, write = WRITERS[kind]
    path = folder / name
    write(path, 1)
    return name, write, path, content(path)


def content(path: Path) -> bytes | dict[str, bytes]:
    """A file's bytes, or a folder output's files and their bytes."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return path.read_bytes()


def size(good: bytes | dict[str, bytes]) -> int:
    return sum(map(len, good.values())) if isinstance(good, dict) else len(good)


def _others(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_nearly_full_disk_keeps_the_previous_file(small_fs, kind):
    name, write, path, good = _first_version(small_fs, kind)
    filler = fill(small_fs, leave=size(good) // 3)  # the next version cannot fit
    before = free(small_fs)
    with pytest.raises(OutputWriteError, match=rf"could not write {path}: No space left on device \(.* free there "
                                               rf"without it\); the previous {name} is unchanged"):
        write(path, 2)
    assert content(path) == good
    assert _others(small_fs, {name, filler.name}) == []  # no temporary file left behind
    assert free(small_fs) == before  # and no space held by a half-written one still open
    filler.unlink()
    write(path, 3)  # with room again, the same call works
    assert content(path) != good


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_read_only_folder_keeps_the_previous_file(small_fs, kind):
    name, write, path, good = _first_version(small_fs, kind)
    remount_read_only(small_fs)
    with pytest.raises(OutputWriteError, match=rf"could not write {path}: Read-only file system; the previous "
                                               rf"{name} is unchanged"):
        write(path, 2)
    assert content(path) == good
    with pytest.raises(OutputWriteError, match=rf"could not write {small_fs}/sub/{name}: Read-only file system; "
                                               "nothing was written under that name"):
        write(small_fs / "sub" / name, 2)


class FillAfter(Callback):
    """Fills the run's disk right after the first checkpoint was written."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2 and not (self.folder / "filler.bin").exists():
            fill(self.folder, leave=64 << 10)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(60_000))

    def training_step(self, batch, batch_idx):
        return ((self.w - batch[0]) ** 2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.arange(20.0)[:, None], batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_checkpoint_on_a_full_disk_fails_clearly_and_keeps_last_ckpt(small_fs):
    ckpt = ModelCheckpoint(dirpath=small_fs / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = L.Trainer(max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(small_fs), plugins=[AtomicCheckpointIO()], callbacks=[FillAfter(small_fs), ckpt])
    last = small_fs / "checkpoints" / "last.ckpt"
    with pytest.raises(OutputWriteError, match=rf"could not write {last}: No space left on device"):
        trainer.fit(Tiny())
    state = torch.load(last, weights_only=True)  # complete and readable: the step before the full disk
    assert state["global_step"] == 1
    assert not [p.name for p in last.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_unimoe_tokenize_into_a_full_disk_exits_with_the_shard_named(small_fs, tmp_path):
    sys.path.insert(0, str(TESTS_DIR))
    from test_tokenize import small_corpus

    manifest = small_corpus(tmp_path)
    out = small_fs / "shards"
    out.mkdir()
    fill(small_fs, leave=4 << 10)
    spec = json.dumps({"class_path": "test_tokenize.FrameEnergyCodec"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "unimoe", "tokenize", "--manifest", str(manifest), "--codec", spec,
                             "--out", str(out), "--shard-size", "6", "--workers", "2", "--quiet"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert f"unimoe tokenize: error: could not write {out}/" in result.stderr
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert not list(out.glob(".*tmp*"))


# ---------------------------------------------------------------------- without root: a file-size limit
LIMITED = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    import test_output_errors as t
    from unimoe.atomic import OutputWriteError
    name, write = t.WRITERS[sys.argv[3]]
    path = Path(sys.argv[1]) / name
    write(path, 1)
    good = t.content(path)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (max(map(len, good.values())) // 2 if isinstance(good, dict) else len(good) // 2,
                                               resource.RLIM_INFINITY))
    try:
        write(path, 2)
        print(json.dumps({"error": None}))
    except OutputWriteError as exc:
        leftovers = sorted(p.name for p in path.parent.iterdir() if p.name != name)
        print(json.dumps({"error": str(exc), "same": t.content(path) == good, "leftovers": leftovers}))
""")


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_write_failure_under_a_file_size_limit_keeps_the_previous_file(tmp_path, kind):
    result = subprocess.run([sys.executable, "-c", LIMITED, str(tmp_path), str(TESTS_DIR), kind],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    name = WRITERS[kind][0]
    assert outcome["error"] is not None and outcome["error"].startswith(f"could not write {tmp_path / name}: ")
    assert outcome["error"].endswith(f"the previous {name} is unchanged")
    assert "File too large" in outcome["error"] or "writing failed" in outcome["error"]
    assert outcome["same"] and outcome["leftovers"] == []


def test_unimoe_fit_writes_checkpoints_with_the_atomic_io(tmp_path):
    from unimoe.training.cli import build_cli

    cli = build_cli(["--model", "SpecialistStage", "--model.model", "tiny", "--data", "unimoe.data.datamodule.UniMoEDataModule",
                     "--data.sources", '{"tts": "none"}', "--trainer.logger", "false",
                     "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
