"""Generation requests: what to generate, from a JSONL file or built in Python.

A request file uses the training manifest's field names (``unimoe/data/manifest.py``), so a
test split of a training manifest is a valid request file (its ``audio``, ``speaker``,
``duration``, ``split``, ``lang`` and ``meta`` are carried along and otherwise ignored;
``audio`` is the ground truth and is never read). One request per line::

    {"id": "s1", "task": "tts", "text": "Hello there.", "prompt_audio": "ref.wav", "prompt_text": "Hi."}
    {"id": "m1", "task": "t2m", "text": "calm piano, slow tempo"}
    {"id": "v1", "task": "v2m", "video": "clip.npz", "text": "upbeat"}

Paths are absolute or relative to the request file's folder. ``seed`` (an int) is the one
field a request file may add: it fixes that request's sampling seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from unimoe.data.manifest import FIELD_NAMES, known_tasks
from unimoe.jsonl import iter_json_lines, resolve_path

REQUEST_FIELDS: tuple[str, ...] = (*FIELD_NAMES, "seed")
PATH_FIELDS: tuple[str, ...] = ("prompt_audio", "video")


class RequestError(ValueError):
    """Requests that cannot be served; the message lists every problem with its file, line and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problem(s) with generation requests:\n{shown}{more}")


@dataclass
class GenerationRequest:
    """One clip to generate.

    ``text`` is the transcript (tts) or caption (t2m, v2m). Conditioning comes from files
    (``prompt_audio``: any sample rate, trimmed to ``max_prompt_seconds``; ``video``: ``.npy``
    ``[F, H, W, 3]`` or ``.npz`` with ``frames``) or, for in-memory callers such as a training
    callback, from tensors: ``prompt_codes [C, Tp]`` (already encoded by the model's codec) and
    ``video_frames [F, 3, H, W]`` (uint8 or float 0-1). Tensors win over paths.
    """

    id: str
    task: str
    text: str | None = None
    prompt_audio: str | None = None
    prompt_text: str | None = None
    video: str | None = None
    seed: int | None = None
    prompt_codes: Tensor | None = None
    video_frames: Tensor | None = None
    source: str = "<python>"
    """Where the request came from (``file:line``), for error messages."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Manifest fields generation does not use (``audio``, ``speaker``, ``lang`` ...), kept for the sidecar."""

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary of the request (tensors as shapes) for the sidecar."""
        out: dict[str, Any] = {"id": self.id, "task": self.task}
        for name in ("text", "prompt_audio", "prompt_text", "video"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.prompt_codes is not None:
            out["prompt_codes_shape"] = list(self.prompt_codes.shape)
        if self.video_frames is not None:
            out["video_frames_shape"] = list(self.video_frames.shape)
        return out


def read_requests(path: str | Path) -> list[GenerationRequest]:
    """Parse and check a JSONL request file; every problem is reported at once (:class:`RequestError`)."""
    path = Path(path)
    if not path.is_file():
        raise RequestError([f"{path}: request file not found"])
    try:
        rows = list(iter_json_lines(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise RequestError([f"{path}: cannot read request file: {exc}"]) from exc
    tasks = known_tasks()
    problems: list[str] = []
    requests: list[GenerationRequest] = []
    seen: dict[str, int] = {}
    for number, obj, error in rows:
        where = f"{path}:{number}"
        if error is not None:
            problems.append(f"{where}: {error}")
            continue
        request, errors = _parse(obj, where, path.parent, tasks)
        problems += errors
        rid = obj.get("id") if isinstance(obj, dict) else None
        if isinstance(rid, str) and rid:
            if rid in seen:
                problems.append(f"{where}: field 'id': duplicate id {rid!r} (first on line {seen[rid]})")
            seen.setdefault(rid, number)
        if request is not None:
            requests.append(request)
    if not requests and not problems:
        problems.append(f"{path}: no requests (the file is empty)")
    if problems:
        raise RequestError(problems)
    return requests


def _parse(obj: Any, where: str, base: Path, tasks: tuple[str, ...]) -> tuple[GenerationRequest | None, list[str]]:
    problems: list[str] = []
    if not isinstance(obj, dict):
        return None, [f"{where}: expected a JSON object, got {type(obj).__name__}"]
    for key in obj:
        if key not in REQUEST_FIELDS:
            problems.append(f"{where}: field '{key}': unknown field; allowed: {', '.join(REQUEST_FIELDS)}")
    for key in ("id", "task"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            problems.append(f"{where}: field '{key}': is required (a non-empty string)")
    for key in ("text", "prompt_audio", "prompt_text", "video"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            problems.append(f"{where}: field '{key}': must be a string, got {type(obj[key]).__name__}")
    seed = obj.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        problems.append(f"{where}: field 'seed': must be an integer, got {seed!r}")
    task = obj.get("task")
    if isinstance(task, str) and task.strip() and task not in tasks:
        problems.append(f"{where}: field 'task': unknown task {task!r}; known tasks: {', '.join(tasks)}")
    if problems:
        return None, problems
    paths = {k: resolve_path(obj[k], base) for k in PATH_FIELDS if obj.get(k)}
    extra = {k: v for k, v in obj.items() if k not in ("id", "task", "text", "prompt_text", "seed", *PATH_FIELDS)}
    return GenerationRequest(
        id=obj["id"], task=task, text=obj.get("text"), prompt_audio=paths.get("prompt_audio"),
        prompt_text=obj.get("prompt_text"), video=paths.get("video"), seed=seed, source=where, extra=extra,
    ), []



