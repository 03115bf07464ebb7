"""Evaluation manifests: which generated clip is scored against which reference.

Two inputs are accepted, both JSONL (one JSON object per line):

* an **evaluation manifest**, where ``audio`` is the *generated* clip and references sit
  beside it (``reference_audio``, ``prompt_audio``, ``text``, ``caption``);
* a **reference manifest** in the training format of ``unimoe/data/manifest.py``
  (``id, task, audio, text, speaker, prompt_audio, video, duration, split``) plus a folder
  of generated WAVs named ``<id>.wav``. Here ``audio`` is the ground truth and becomes
  ``reference_audio``, so a corpus test split is a reference set as it stands.

Relative paths resolve against the manifest's folder (or ``audio_root``), as in the
training manifest. ``language`` (or the training manifest's ``lang``) picks the text
normaliser and ASR language. ``split=`` keeps only lines of that split (the training
manifest's default split is ``train``). Other fields (``video``, ``duration``, ``meta``...)
are kept in ``extra``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from unimoe.jsonl import iter_json_lines, resolve_path
from unimoe.model.tasks import task_class
from unimoe.registry import TASKS, RegistryError

from .errors import ManifestError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
_KNOWN = {"id", "audio", "task", "text", "caption", "prompt_audio", "reference_audio", "speaker", "language", "lang"}


@dataclass
class EvalItem:
    """One generated clip and everything it is compared with."""

    id: str
    audio: Path | None  # the generated clip
    task: str | None = None
    text: str | None = None  # transcript (speech) or caption (music)
    caption: str | None = None  # explicit caption; falls back to ``text`` for music
    prompt_audio: Path | None = None  # speaker prompt (SIM reference in Seed-TTS eval)
    reference_audio: Path | None = None  # ground-truth clip (KL pair, FAD reference set)
    speaker: str | None = None
    language: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str | None:
        """``"speech"``, ``"music"`` or None (unknown task: every metric applies)."""
        return task_family(self.task)

    @property
    def speaker_reference(self) -> Path | None:
        """The clip SIM compares against: the speaker prompt, else the ground truth."""
        return self.prompt_audio or self.reference_audio

    @property
    def caption_text(self) -> str | None:
        return self.caption or self.text


@dataclass
class ManifestPairing:
    """Items found, items skipped before scoring (with reasons), and stray files."""

    items: list[EvalItem]
    skipped: list[dict[str, str]] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)


def task_family(task: str | None) -> str | None:
    """The domain a registered task declares (``tts`` -> ``speech``), a domain name given as the
    task itself (``"music"``), else None (an unknown task: every metric applies)."""
    if task is None:
        return None
    if task in TASKS:
        try:
            return task_class(task).domain
        except RegistryError:
            return None
    t = task.lower()
    return t if t in _declared_domains() else None


def _declared_domains() -> set[str]:
    domains = set()
    for name in TASKS.names():
        try:
            domains.add(task_class(name).domain)
        except RegistryError:
            continue
    return {d for d in domains if d}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Parse a JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    rows: list[dict[str, Any]] = []
    for lineno, row, error in iter_json_lines(path):
        if error is not None:
            raise ManifestError(f"{path}:{lineno}: {error}")
        if not isinstance(row, dict):
            raise ManifestError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ManifestError(f"manifest {path} has no entries")
    return rows


def _path(value: Any, root: Path, where: str, key: str) -> Path | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ManifestError(f"{where}: field {key!r} must be a path string, got {value!r}")
    return Path(resolve_path(value, root))


def _text(value: Any, where: str, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ManifestError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _item(row: dict[str, Any], root: Path, where: str, generated: Path | None, reference: Path | None) -> EvalItem:
    item_id = row.get("id")
    if item_id in (None, ""):
        raise ManifestError(f"{where}: missing required field 'id'")
    return EvalItem(
        id=str(item_id),
        audio=generated,
        task=_text(row.get("task"), where, "task"),
        text=_text(row.get("text"), where, "text"),
        caption=_text(row.get("caption"), where, "caption"),
        prompt_audio=_path(row.get("prompt_audio"), root, where, "prompt_audio"),
        reference_audio=reference,
        speaker=None if row.get("speaker") is None else str(row["speaker"]),
        language=_text(row.get("language", row.get("lang")), where, "language"),
        extra={k: v for k, v in row.items() if k not in _KNOWN},
    )


def _check_unique(items: Iterable[EvalItem], path: Path) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ManifestError(f"{path}: duplicate id {item.id!r}; ids must be unique")
        seen.add(item.id)


def _rows(path: Path, split: str | None) -> list[tuple[int, dict[str, Any]]]:
    rows = list(enumerate(read_jsonl(path), 1))
    if split is None:
        return rows
    kept = [(i, r) for i, r in rows if r.get("split", "train") == split]
    if not kept:
        found = sorted({str(r.get("split", "train")) for _, r in rows})
        raise ManifestError(f"manifest {path} has no line with split {split!r} (splits present: {', '.join(found)})")
    return kept


def read_eval_manifest(path: str | Path, audio_root: str | Path | None = None, split: str | None = None) -> list[EvalItem]:
    """Read an evaluation manifest whose ``audio`` field is the generated clip."""
    path = Path(path)
    root = Path(audio_root) if audio_root is not None else path.parent
    items = []
    for i, row in _rows(path, split):
        where = f"{path}:{i}"
        generated = _path(row.get("audio"), root, where, "audio")
        if generated is None:
            raise ManifestError(f"{where}: missing field 'audio' (the generated clip to score)")
        reference = _path(row.get("reference_audio"), root, where, "reference_audio")
        items.append(_item(row, root, where, generated, reference))
    _check_unique(items, path)
    return items


def find_generated(wav_dir: Path, item_id: str) -> Path | None:
    """``<wav_dir>/<id>.<ext>`` for the first known audio extension that exists."""
    for ext in AUDIO_EXTENSIONS:
        candidate = wav_dir / f"{item_id}{ext}"
        if candidate.is_file():
            return candidate
    return None


def pair_with_references(
    wav_dir: str | Path, reference_manifest: str | Path, audio_root: str | Path | None = None,
    split: str | None = None,
) -> ManifestPairing:
    """Pair ``<wav_dir>/<id>.wav`` with each line of a training-format reference manifest.

    A reference line without a generated file is skipped with a reason; generated files
    that no line names are listed in ``unreferenced``. If nothing matches at all the
    folder and manifest clearly belong to different sets, which is an error.
    """
    wav_dir, reference_manifest = Path(wav_dir), Path(reference_manifest)
    if not wav_dir.is_dir():
        raise ManifestError(f"generated audio folder not found: {wav_dir}")
    root = Path(audio_root) if audio_root is not None else reference_manifest.parent
    items: list[EvalItem] = []
    skipped: list[dict[str, str]] = []
    all_ids: list[str] = []
    for i, row in _rows(reference_manifest, split):
        where = f"{reference_manifest}:{i}"
        reference = _path(row.get("audio"), root, where, "audio")
        item = _item(row, root, where, None, reference)
        all_ids.append(item.id)
        item.audio = find_generated(wav_dir, item.id)
        if item.audio is None:
            skipped.append({"id": item.id, "metric": "*", "reason": f"no generated audio {wav_dir}/{item.id}.wav"})
        else:
            items.append(item)
    _check_unique([EvalItem(id=i, audio=None) for i in all_ids], reference_manifest)
    known = set(all_ids)
    present = sorted(p for p in wav_dir.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS)
    unreferenced = [p.name for p in present if p.stem not in known]
    if not items:
        example = ", ".join(p.name for p in present[:3]) or "no audio files"
        raise ManifestError(
            f"no generated clip in {wav_dir} matches an id of {reference_manifest} "
            f"(expected <id>.wav, e.g. {all_ids[0]}.wav; the folder has {example})"
        )
    return ManifestPairing(items=items, skipped=skipped, unreferenced=unreferenced)


def read_reference_set(path: str | Path) -> list[Path]:
    """Reference clips for set metrics (FAD): every audio file under a folder, or the
    ``audio`` field of every line of a manifest."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            raise ManifestError(f"reference set folder {path} contains no audio files")
        return files
    rows = read_jsonl(path)
    out = []
    for i, row in enumerate(rows, 1):
        p = _path(row.get("audio"), path.parent, f"{path}:{i}", "audio")
        if p is None:
            raise ManifestError(f"{path}:{i}: reference set line has no 'audio'")
        out.append(p)
    return out


def pair_with_generated_manifest(
    generated_manifest: str | Path, reference_manifest: str | Path, audio_root: str | Path | None = None,
    split: str | None = None,
) -> ManifestPairing:
    """Pair a generator's output manifest (lines with ``id`` and ``audio``) with the request /
    reference manifest it was generated from, by ``id`` (checkpoint mode)."""
    generated_manifest = Path(generated_manifest)
    produced: dict[str, Path] = {}
    for i, row in enumerate(read_jsonl(generated_manifest), 1):
        where = f"{generated_manifest}:{i}"
        if row.get("id") in (None, "") or row.get("audio") in (None, ""):
            raise ManifestError(f"{where}: generated manifest lines need 'id' and 'audio'")
        produced[str(row["id"])] = _path(row["audio"], generated_manifest.parent, where, "audio")
    reference_manifest = Path(reference_manifest)
    root = Path(audio_root) if audio_root is not None else reference_manifest.parent
    items, skipped, seen = [], [], set()
    for i, row in _rows(reference_manifest, split):
        where = f"{reference_manifest}:{i}"
        item = _item(row, root, where, None, _path(row.get("audio"), root, where, "audio"))
        if item.id in seen:
            raise ManifestError(f"{reference_manifest}: duplicate id {item.id!r}; ids must be unique")
        seen.add(item.id)
        item.audio = produced.get(item.id)
        if item.audio is None:
            skipped.append({"id": item.id, "metric": "*", "reason": "the generator produced no clip for this id"})
        else:
            items.append(item)
    if not items:
        raise ManifestError(f"no id of {generated_manifest} matches an id of {reference_manifest}")
    return ManifestPairing(items=items, skipped=skipped, unreferenced=sorted(set(produced) - seen))
