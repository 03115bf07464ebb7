"""Two runs, one folder: a second `unimoe fit` / `curriculum` / `tokenize` on a folder that a
live process holds refuses, naming the holder (pid, host, command); a lock left by a
SIGKILLed process is taken over. Every holder here is a real, separate process."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from unimoe.locks import LOCK_NAME, FolderInUseError, FolderLock, primary_process

HOLD = textwrap.dedent("""
    import sys, time
    from unimoe.locks import FolderLock
    lock = FolderLock(sys.argv[1], command="holder " + sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    lock.release()
""")


def _holder(folder: Path, seconds: float = 120.0) -> subprocess.Popen:
    """A separate process that holds ``folder``'s lock (started and holding when this returns)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def held(tmp_path):
    folder = tmp_path / "out"
    proc = _holder(folder)
    yield folder, proc
    if proc.poll() is None:
        _kill(proc)


def test_a_live_holder_is_refused_by_name_and_a_killed_one_is_taken_over(held, caplog):
    folder, proc = held
    record = json.loads((folder / LOCK_NAME).read_text())
    assert record["pid"] == proc.pid and record["host"] == socket.gethostname()
    with pytest.raises(FolderInUseError, match=rf"{folder} is in use by another unimoe process: pid {proc.pid} on host "
                                               rf"{socket.gethostname()} \(`holder {folder}`, since 20"):
        FolderLock(folder).acquire()
    _kill(proc)  # SIGKILL: no cleanup, the lock file stays behind
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="unimoe.locks"):
        with FolderLock(folder, command="second") as lock:
            assert lock.took_over["pid"] == proc.pid
            assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by pid {proc.pid}" in caplog.text
    assert not (folder / LOCK_NAME).exists()  # released: removed


def test_exactly_one_of_many_racing_processes_wins(tmp_path):
    race = textwrap.dedent("""
        import sys, time
        from unimoe.locks import FolderLock, FolderInUseError
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
        try:
            lock = FolderLock(sys.argv[1]).acquire()
        except FolderInUseError:
            print("refused"); sys.exit(0)
        print("won", flush=True); time.sleep(1.5); lock.release()
    """)
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", race, str(tmp_path / "f"), str(start)], stdout=subprocess.PIPE,
                              text=True) for _ in range(6)]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert results == ["refused"] * 5 + ["won"]


def test_reentrant_in_one_process_and_no_lock_in_non_zero_ranks(tmp_path, monkeypatch):
    with FolderLock(tmp_path) as outer:
        with FolderLock(tmp_path):
            pass
        assert (tmp_path / LOCK_NAME).exists()  # the inner release keeps the outer's lock
        assert outer._active
    assert not (tmp_path / LOCK_NAME).exists()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child re-running rank 0's command
    assert not primary_process()
    with FolderLock(tmp_path / "child"):
        assert not (tmp_path / "child" / LOCK_NAME).exists()


def test_without_flock_a_dead_holder_on_this_host_is_taken_over(tmp_path, monkeypatch):
    import unimoe.locks as locks

    def no_flock(fd, op):
        raise OSError(locks.errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "command": "x"}))
    with FolderLock(tmp_path) as lock:
        assert lock.took_over["pid"] == int(dead.stdout)
        with pytest.raises(FolderInUseError, match=f"pid {os.getpid()}"):
            locks._HELD.clear()  # as if another process on this host tried
            FolderLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "x"}))
    with pytest.raises(FolderInUseError, match=rf"cannot be checked: if that process is gone, delete {tmp_path / LOCK_NAME}"):
        FolderLock(tmp_path).acquire()


# ---------------------------------------------------------------------- the real commands
def _unimoe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unimoe", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_tokenize_refuses_a_folder_in_use(held, tmp_path):
    folder, proc = held
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    result = _unimoe("tokenize", "--manifest", str(manifest), "--codec", "spectral_rvq", "--out", str(folder),
                     "--quiet", cwd=tmp_path)
    assert result.returncode == 1
    assert f"unimoe tokenize: error: {folder} is in use by another unimoe process: pid {proc.pid}" in result.stderr


def test_fit_refuses_a_run_folder_in_use(held, tmp_path):
    folder, proc = held
    data = tmp_path / "data"
    config = tmp_path / "fit.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {{class_path: SpecialistStage, init_args: {{model: tiny}}}}
        data: {{class_path: unimoe.data.datamodule.UniMoEDataModule, init_args: {{sources: {{tts: {data}}}}}}}
        trainer: {{max_steps: 1, logger: false, default_root_dir: {folder}}}
    """))
    result = _unimoe("fit", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"unimoe fit: error: {folder} is in use by another unimoe process: pid {proc.pid}" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # nothing was written into it


def test_curriculum_refuses_a_root_in_use(held, tmp_path):
    folder, proc = held
    stage = tmp_path / "stage.yaml"
    stage.write_text("model: {class_path: SpecialistStage, init_args: {model: tiny}}\n"
                     f"data: {{class_path: unimoe.data.datamodule.UniMoEDataModule, init_args: {{sources: {{tts: {tmp_path}}}}}}}\n")
    cur = tmp_path / "cur.yaml"
    cur.write_text(f"name: t\nroot: {folder}\nstages:\n  - {{name: s1, config: stage.yaml, trainer: {{max_steps: 1}}}}\n")
    result = _unimoe("curriculum", "--config", str(cur), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"unimoe curriculum: error: {folder} is in use by another unimoe process: pid {proc.pid}" in result.stderr
    assert not (folder / "s1").exists()
