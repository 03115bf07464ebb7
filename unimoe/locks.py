"""One writer per output folder: ``unimoe fit``, ``curriculum`` and ``tokenize`` hold a lock.

Two processes writing one run folder or shard folder overwrite each other's checkpoints,
shards and status files, and the result looks fine until it is read. :class:`FolderLock`
makes the second one refuse with a message naming the holder (pid, host, command, since).

The lock is ``<folder>/.unimoe.lock``, locked with ``flock``: the kernel releases it when
the holder exits in any way (SIGKILL included), so a lock left by a killed process is taken
over by the next run, which says so; there is no pid guessing and no pid-reuse problem. The
file's content (JSON: pid, host, command, time) only serves the messages. Where ``flock`` is
not supported (some network filesystems), the lock falls back to an exclusively created file
whose holder is checked by pid on the same host; a lock from another host is then refused
with the instruction to delete it if that process is gone.

Only the primary process of a multi-process launch locks (``RANK``/``LOCAL_RANK``/``NODE_RANK``
unset or 0): Lightning's DDP launcher re-runs the same command in the other ranks, which
must not refuse the folder their rank 0 holds. Locks are re-entrant within a process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("unimoe.locks")

LOCK_NAME = ".unimoe.lock"
_HELD: dict[Path, "FolderLock"] = {}  # this process's locks, by resolved folder (re-entrance)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock; the message names it."""


def primary_process() -> bool:
    """False in the non-zero ranks of a multi-process launch (they share rank 0's folder)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _describe(holder: dict[str, Any]) -> str:
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (`{holder.get('command', '?')}`, since {when})"


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class FolderLock:
    """Exclusive use of ``folder`` by this process for ``command`` (a context manager).

    ``acquire()`` creates the folder if needed and raises :class:`FolderInUseError` if a live
    process holds it; ``release()`` removes the lock file. ``took_over`` is the holder record
    of a stale lock this process replaced (None if there was none).
    """

    def __init__(self, folder: str | Path, command: str | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command or " ".join(["unimoe", *sys.argv[1:]])
        self.took_over: dict[str, Any] | None = None
        self._fd: int | None = None
        self._depth = 0  # nested acquisitions of this folder by this process
        self._active = False
        self._outer: FolderLock | None = None

    # ------------------------------------------------------------------ public
    def acquire(self) -> "FolderLock":
        if not primary_process():
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        outer = _HELD.get(key)
        if outer is not None:  # re-entrant: this process already holds it
            outer._depth += 1
            self._outer = outer
            return self
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._in_use(_read_holder(self.path)) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _UNSUPPORTED:
                    return self._acquire_without_flock(key)
                raise
            try:  # the file may have been released and removed between open() and flock()
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            self._took_over(_read_fd(fd))
            self._write(fd)
            self._activate(key)
            return self
        raise FolderInUseError(f"{self.folder}: could not lock {self.path} (it keeps being replaced)")

    def release(self) -> None:
        if self._outer is not None:
            self._outer._depth -= 1
            self._outer = None
            return
        if not self._active:
            return
        self._active = False
        _HELD.pop(self.folder.resolve(), None)
        try:
            self.path.unlink(missing_ok=True)  # while still locked: the next holder re-checks the inode
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------ helpers
    def _record(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": time.time()}

    def _write(self, fd: int) -> None:
        data = json.dumps(self._record()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _activate(self, key: Path) -> None:
        self._active = True
        _HELD[key] = self

    def _took_over(self, previous: dict[str, Any]) -> None:
        if previous:
            self.took_over = previous
            log.warning("%s: taking over the lock left by %s, which is no longer running", self.folder,
                        _describe(previous))

    def _in_use(self, holder: dict[str, Any]) -> FolderInUseError:
        return FolderInUseError(
            f"{self.folder} is in use by another unimoe process: {_describe(holder)}. Two runs writing one folder "
            "would overwrite each other's checkpoints, shards and status files. Wait for it to finish, stop it, "
            "or choose another output folder."
        )

    def _acquire_without_flock(self, key: Path) -> "FolderLock":
        """Exclusive creation plus a pid check on this host (filesystems without flock)."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder.get("host") != socket.gethostname():
                    raise FolderInUseError(
                        f"{self._in_use(holder)} (This filesystem does not support flock, so a holder on another "
                        f"host cannot be checked: if that process is gone, delete {self.path}.)") from None
                if _alive(holder.get("pid")):
                    raise self._in_use(holder) from None
                self._took_over(holder)
                self.path.unlink(missing_ok=True)
                continue
            self._write(fd)
            os.close(fd)
            self._activate(key)
            return self
        raise FolderInUseError(f"{self.folder}: could not lock {self.path}")


def _read_fd(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
