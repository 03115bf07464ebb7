"""Write files so that a crash never leaves a half-written file under the final name.

Everything unimoe writes that another step reads back (checkpoints, shards, manifests,
audio, reports, status files) goes through :func:`atomic_path`: the content is written to a
temporary sibling (``.<name>.tmp-<pid>``, so concurrent writers never share one) and renamed
over the target only when writing succeeded; on failure the temporary file is removed.

A write that fails for a reason of the filesystem (disk full, read-only folder, no
permission, file-size limit) raises :class:`OutputWriteError`, naming the file and saying that
the previous file under that name is unchanged. ``torch.save`` reports a full disk only as
``unexpected pos 704 vs 598``; such serialisation failures are recognised and explained too.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class OutputWriteError(OSError):
    """An output file could not be written; ``path`` is the file, the old one is unchanged."""

    def __init__(self, path: Path, code: int, reason: str, existed: bool) -> None:
        kept = f"the previous {path.name} is unchanged" if existed else "nothing was written under that name"
        self.message = f"could not write {path}: {reason}; {kept}"
        super().__init__(code, self.message, str(path))
        self.path = path

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # crosses process boundaries intact (tokenize workers)
        return _rebuild, (str(self.path), self.errno, self.message)


def _rebuild(path: str, code: int, message: str) -> OutputWriteError:
    error = OutputWriteError(Path(path), code, "", True)
    error.message = message
    error.strerror = message
    return error


# torch.save's C++ writer does not raise OSError: "unexpected pos 704 vs 598" (disk full, file-size
# limit), "file write failed", "File <path> cannot be opened." (read-only, no permission)
_TORCH_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|file write failed|cannot be opened")
# safetensors' Rust writer: "Error while serializing: I/O error: No space left on device (os error 28)"
_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")
# numpy's ndarray.tofile on a short write: OSError without errno, "20001 requested and 13734 written"
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def _failure_code(path: Path, exc: BaseException, staging: Path | None = None) -> int | None:
    """The errno of ``exc`` if it is a filesystem failure (checked before the temporary file is
    removed, while a full disk is still full), else None. ``staging``: the temporary folder a
    folder output is built in (failures of the files in it are failures of ``path``)."""
    if isinstance(exc, OutputWriteError):
        return None
    if isinstance(exc, OSError) and exc.errno is not None:
        # about this output (write() errors name no file); an error reading some input is not
        where = None if exc.filename is None else Path(os.fsdecode(exc.filename))
        named = where is None or where == path.parent or where.parent in (path.parent, staging)
        return exc.errno if named else None
    in_message = _OS_ERROR_IN_MESSAGE.search(str(exc))
    if in_message and type(exc).__name__ == "SafetensorError":
        return int(in_message.group(1))
    short_write = isinstance(exc, OSError) and _SHORT_WRITE.search(str(exc))
    if not (short_write or isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(exc))):
        return None
    found = re.search(r"errno (\d+)", str(exc))
    if found:
        return int(found.group(1))
    if "cannot be opened" in str(exc) and not os.access(path.parent, os.W_OK):
        return errno.EROFS if _read_only(path.parent) else errno.EACCES
    free = _free_bytes(path.parent)
    if free is not None and free < (1 << 20):
        return errno.ENOSPC  # what "unexpected pos" means when the filesystem is full
    return errno.EIO


def _write_error(path: Path, code: int, exc: BaseException, existed: bool) -> OutputWriteError:
    free = _free_bytes(path.parent)
    if code == errno.EIO and not (isinstance(exc, OSError) and exc.errno is not None):
        reason = f"writing failed ({str(exc).strip()})"
    else:
        reason = os.strerror(code)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO) and free is not None:
        reason += f" ({_size(free)} free there without it)"
    return OutputWriteError(path, code, reason, existed)


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _drop_frames(exc: BaseException | None) -> None:
    """Clear the locals of the finished frames in ``exc``'s chain (context included)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


FAULT_TRACE_ENV = "UNIMOE_FAULT_TRACE"
FAULT_KILL_ENV = "UNIMOE_FAULT_KILL_AT"


def fault_point(path: Path) -> None:
    """Fault-injection hook (``unimoe.fault_injection``), inert unless ``$UNIMOE_FAULT_TRACE`` is set.

    Then every atomic write, with its temporary file complete but not yet renamed, appends its
    target to that trace file (one counter for all processes of the command, under a lock);
    the write whose number is ``$UNIMOE_FAULT_KILL_AT`` SIGKILLs the command's whole process
    group right there: the harness's exact "killed during the write of X" point.
    """
    trace = os.environ.get(FAULT_TRACE_ENV)
    if not trace:
        return
    import fcntl
    import signal

    with open(trace, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        number = sum(1 for _ in fh) + 1
        fh.write(f"{path}\n")
        fh.flush()
        os.fsync(fh.fileno())
    if os.environ.get(FAULT_KILL_ENV) == str(number):
        os.killpg(os.getpgid(0), signal.SIGKILL)


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` when the block succeeds.

    With ``durable`` the temporary file is fsynced before the rename (for data that must
    survive a power cut, such as token shards). A filesystem failure anywhere (creating the
    folder, writing, syncing, renaming) becomes an :class:`OutputWriteError` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(path, exc.errno or errno.EIO, exc, existed) from exc
    try:
        yield tmp
        fault_point(path)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        code = _failure_code(path, exc)
        if code is not None:
            _drop_frames(exc)  # torch's failed writer still holds the file open (and its space) in them
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. a read-only folder, where nothing was created anyway
        if code is not None:
            raise _write_error(path, code, exc, existed) from exc
        raise


@contextmanager
def folder_write_errors(path: str | Path, staging: str | Path) -> Iterator[None]:
    """For folder outputs built in ``staging`` and renamed to ``path`` (model folders, the shard
    index): a filesystem failure inside the block becomes an :class:`OutputWriteError` naming
    ``path``, as :func:`atomic_path` does for files; ``staging`` is removed first (its space is
    free again when the error says how much is left)."""
    path, staging = Path(path), Path(staging)
    existed = path.exists()
    try:
        yield
    except BaseException as exc:
        code = _failure_code(path, exc, staging)
        if code is None:
            raise
        _drop_frames(exc)
        shutil.rmtree(staging, ignore_errors=True)
        raise _write_error(path, code, exc, existed) from exc


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(data, **dumps_kwargs)`` plus a final newline, written atomically."""
    return write_text_atomic(path, json.dumps(data, **dumps_kwargs) + "\n")
