"""Write files so that a crash never leaves a half-written file under the final name.

Everything unimoe writes that another step reads back (checkpoints, shards, manifests,
audio, reports, status files) goes through :func:`atomic_path`: the content is written to a
temporary sibling (``.<name>.tmp-<pid>``, so concurrent writers never share one) and renamed
over the target only when writing succeeded; on failure the temporary file is removed.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` when the block succeeds.

    With ``durable`` the temporary file is fsynced before the rename (for data that must
    survive a power cut, such as token shards).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(data, **dumps_kwargs)`` plus a final newline, written atomically."""
    return write_text_atomic(path, json.dumps(data, **dumps_kwargs) + "\n")
