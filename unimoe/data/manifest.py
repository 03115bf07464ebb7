"""The JSONL manifest: one training example per line, validated with precise errors.

A manifest is the single, human-editable record of what a model trains on. Every importer
writes one and ``unimoe tokenize`` reads one. Users hand-edit and concatenate manifests,
so validation reports every problem with its file, line and field instead of failing on
the first one with a traceback.

Paths inside a manifest may be absolute or relative to the manifest's own directory, so a
corpus folder can be moved or copied as a whole.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from unimoe.atomic import atomic_path
from unimoe.jsonl import iter_json_lines, resolve_path
from unimoe.model.tasks import field_of, task_class, task_names
from unimoe.registry import RegistryError

SPLITS: tuple[str, ...] = ("train", "val", "test")
PATH_FIELDS: tuple[str, ...] = ("audio", "prompt_audio", "video")
MAX_REPORTED_PROBLEMS = 50


@dataclass
class ManifestEntry:
    """One example. ``text`` is the transcript (tts) or the caption (t2m/v2m)."""

    id: str
    task: str
    audio: str
    text: str | None = None
    speaker: str | None = None
    prompt_audio: str | None = None
    """Another utterance of the same speaker (voice cloning); chosen at import time."""
    prompt_text: str | None = None
    video: str | None = None
    """Frames as .npy ``[F, H, W, 3]`` uint8, or .npz with ``frames`` (and optional ``fps``)."""
    duration: float | None = None
    split: str = "train"
    lang: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form extras (source dataset, musical key...); carried into shards untouched."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this entry, without empty optional fields."""
        out = asdict(self)
        return {k: v for k, v in out.items() if v is not None and not (k == "meta" and not v)}


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ManifestEntry))
REQUIRED_FIELDS: tuple[str, ...] = ("id", "task", "audio")


@dataclass(frozen=True)
class ManifestProblem:
    path: str
    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        return f"{where}: field '{self.field}': {self.message}" if self.field else f"{where}: {self.message}"


class ManifestError(ValueError):
    """A manifest has one or more invalid lines; ``problems`` lists each with line and field."""

    def __init__(self, problems: list[ManifestProblem]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:MAX_REPORTED_PROBLEMS])
        more = len(problems) - MAX_REPORTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(problems)} problem(s) in manifest:\n{shown}{tail}")


def known_tasks() -> tuple[str, ...]:
    """Every registered task, in-tree or from a plug-in (names only: read from the package metadata)."""
    return tuple(task_names())


def required_fields(task: str) -> list[str]:
    """The manifest fields a line of ``task`` must fill, as the task declares (``TaskBuilder.required``)."""
    return [field_of(name) for name in task_class(task).required]


# ---------------------------------------------------------------------- parsing
def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_entry(obj: Any, *, path: str, line: int, tasks: Iterable[str]) -> tuple[ManifestEntry | None, list[ManifestProblem]]:
    """Check one decoded JSON value; return the entry (None if unusable) and its problems."""
    problems: list[ManifestProblem] = []

    def bad(fname: str | None, msg: str) -> None:
        problems.append(ManifestProblem(path, line, fname, msg))

    if not isinstance(obj, dict):
        bad(None, f"expected a JSON object, got {type(obj).__name__}")
        return None, problems
    for key in obj:
        if key not in FIELD_NAMES:
            bad(key, f"unknown field{_suggest(key, FIELD_NAMES)}; allowed: {', '.join(FIELD_NAMES)}")
    for key in REQUIRED_FIELDS:
        if key not in obj or obj[key] in (None, ""):
            bad(key, "is required")

    def string(key: str, required: bool = False) -> None:
        value = obj.get(key)
        if value is None:
            return
        if not isinstance(value, str):
            bad(key, f"must be a string, got {type(value).__name__} {value!r}")
        elif required and not value.strip():
            bad(key, "must not be empty")

    for key in ("id", "task", "audio"):
        string(key, required=True)
    for key in ("text", "speaker", "prompt_audio", "prompt_text", "video", "lang", "split"):
        string(key)

    task = obj.get("task")
    tasks = tuple(tasks)
    if isinstance(task, str) and task and task not in tasks:
        bad("task", f"unknown task {task!r}{_suggest(task, tasks)}; known tasks: {', '.join(tasks)}")
    elif isinstance(task, str) and task:
        try:
            needed = required_fields(task)
        except RegistryError as exc:  # a broken plug-in: this line cannot be checked, the others still are
            bad("task", f"task {task!r} cannot be loaded: {exc}")
            needed = []
        for name in needed:
            value = obj.get(name)
            if not (isinstance(value, str) and value.strip()):
                if name == "text":
                    what = f"a non-empty text ({task_class(task).text_role})"
                else:
                    what = f"a {name} path" if name in PATH_FIELDS else f"a non-empty {name}"
                bad(name, f"task {task!r} needs {what}")

    split = obj.get("split", "train")
    if isinstance(split, str) and split not in SPLITS:
        bad("split", f"must be one of {', '.join(SPLITS)}, got {split!r}{_suggest(split, SPLITS)}")

    duration = obj.get("duration")
    if duration is not None:
        if isinstance(duration, bool) or not isinstance(duration, (int, float)):
            bad("duration", f"must be a number of seconds, got {duration!r}")
        elif not (duration > 0 and duration < float("inf")):
            bad("duration", f"must be a positive finite number of seconds, got {duration!r}")

    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        bad("meta", f"must be a JSON object, got {type(meta).__name__}")

    if obj.get("prompt_audio") and obj.get("prompt_audio") == obj.get("audio"):
        bad("prompt_audio", "is the target audio itself; use another utterance of the same speaker")

    if problems:
        return None, problems
    values = {k: obj[k] for k in FIELD_NAMES if k in obj and obj[k] is not None}
    if "duration" in values:
        values["duration"] = float(values["duration"])
    return ManifestEntry(**values), problems


def check_manifest(path: str | Path, *, check_files: bool = False, tasks: Iterable[str] | None = None) -> tuple[list[tuple[int, ManifestEntry]], list[ManifestProblem]]:
    """Parse and validate every line; return (line, entry) pairs and all problems found.

    With ``check_files`` every referenced audio, prompt and video file must exist.
    Entries come back with absolute paths.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    tasks = tuple(tasks) if tasks is not None else known_tasks()
    base = path.parent.resolve()
    entries: list[tuple[int, ManifestEntry]] = []
    problems: list[ManifestProblem] = []
    first_line: dict[str, int] = {}
    for number, obj, error in iter_json_lines(path):
        if error is not None:
            problems.append(ManifestProblem(str(path), number, None, error))
            continue
        entry, found = parse_entry(obj, path=str(path), line=number, tasks=tasks)
        problems.extend(found)
        if entry is None:
            continue
        if entry.id in first_line:
            problems.append(ManifestProblem(str(path), number, "id", f"duplicate id {entry.id!r} (first on line {first_line[entry.id]})"))
            continue
        first_line[entry.id] = number
        for key in PATH_FIELDS:
            setattr(entry, key, resolve_path(getattr(entry, key), base))
            if check_files and getattr(entry, key) is not None and not Path(getattr(entry, key)).is_file():
                problems.append(ManifestProblem(str(path), number, key, f"file not found: {getattr(entry, key)}"))
        entries.append((number, entry))
    return entries, problems


def read_manifest(path: str | Path, *, check_files: bool = False, tasks: Iterable[str] | None = None) -> list[ManifestEntry]:
    """Read a manifest; raise :class:`ManifestError` listing every bad line and field."""
    entries, problems = check_manifest(path, check_files=check_files, tasks=tasks)
    if problems:
        raise ManifestError(problems)
    return [entry for _, entry in entries]


def _relative(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    p = Path(value)
    if not p.is_absolute():
        return value
    resolved = p.resolve()
    try:
        return str(resolved.relative_to(base))
    except ValueError:
        pass
    try:  # a sibling folder (corpus/manifests/x.jsonl -> corpus/audio/...) stays portable too
        return str(Path("..") / resolved.relative_to(base.parent))
    except ValueError:
        return str(p)


def write_manifest(path: str | Path, entries: Iterable[ManifestEntry]) -> Path:
    """Write entries as JSONL atomically; paths under the manifest's folder (or its parent) become relative."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for entry in entries:
            obj = entry.to_json()
            for key in PATH_FIELDS:
                if key in obj:
                    obj[key] = _relative(obj[key], base)
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path
