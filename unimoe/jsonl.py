"""JSON Lines files (manifests, request files) read with line numbers for error messages.

Each caller decides what a bad line means (collect every problem, or stop at the first);
this module only does the shared part: skip blank lines, parse, and say why a line failed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def resolve_path(value: str | None, base: Path) -> str | None:
    """A path value read from a JSON Lines file, made absolute: relative paths (and ``~``)
    are relative to ``base``, the folder of the file that named them."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line number, parsed value, None)`` or ``(line number, None, error)`` per non-blank line.

    Opening or decoding the file raises ``OSError`` / ``UnicodeDecodeError`` as usual.
    """
    with open(path, encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                value, error = json.loads(raw), None
            except json.JSONDecodeError as exc:
                value, error = None, f"not valid JSON ({exc.msg}, column {exc.colno})"
            yield number, value, error
