"""Importers: turn the dataset layouts users already have into a manifest.

* :func:`import_librispeech` - LibriSpeech (``*.trans.txt`` per chapter, flac) and LibriTTS
  (``<utt>.normalized.txt`` next to each wav) speaker/chapter trees -> ``tts`` entries with
  a speaker prompt chosen from the same speaker (see :mod:`unimoe.data.prompts`).
* :func:`import_captions` - a caption CSV plus an audio folder (MusicCaps / FMA style) ->
  ``t2m`` (or ``v2m`` with a video column) entries.

Files that are listed but missing or unreadable are not fatal: they are reported with the
reason, so one broken clip in 100k does not stop an import. Malformed index files (a CSV
row without the caption column, an unknown split value) are errors naming file and line.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from unimoe.data.manifest import ManifestEntry, write_manifest
from unimoe.data.prompts import assign_prompts

AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".mp3", ".ogg", ".opus")
SPLIT_ALIASES: dict[str, str] = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "eval": "test", "evaluation": "test",
}
TRUE_VALUES = frozenset({"true", "1", "yes", "y", "t"})
FALSE_VALUES = frozenset({"false", "0", "no", "n", "f"})


class ImportFormatError(ValueError):
    """An index file (transcript, CSV) is malformed; the message names file and line."""


@dataclass
class ImportReport:
    """What an importer wrote and what it left out (with the reason for each)."""

    manifest: Path
    entries: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file or id, reason) for every item left out."""
    speakers: int = 0
    without_prompt: int = 0
    splits: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items()))
        lines = [f"wrote {self.entries} entries to {self.manifest} ({splits})"]
        if self.speakers:
            lines.append(f"{self.speakers} speakers; {self.without_prompt} entries without a speaker prompt")
        if self.skipped:
            reasons: dict[str, int] = defaultdict(int)
            for _, reason in self.skipped:
                reasons[reason.split(":")[0]] += 1
            lines.append("skipped " + ", ".join(f"{n} ({r})" for r, n in sorted(reasons.items())))
        return "\n".join(lines)


def _audio_duration(path: Path) -> float:
    info = sf.info(str(path))
    if info.frames <= 0 or info.samplerate <= 0:
        raise ValueError("no samples")
    return info.frames / info.samplerate


def split_from_path(parts: tuple[str, ...], default: str = "train") -> str:
    """Infer a split from a subset folder name (``train-clean-100``, ``dev-clean``, ``test-other``)."""
    for part in parts:
        head = re.split(r"[-_.]", part.lower())[0]
        if head in SPLIT_ALIASES:
            return SPLIT_ALIASES[head]
    return default


def normalize_split(value: str, *, where: str, true_split: str = "test") -> str:
    """Map a CSV split cell to train/val/test; booleans mean "held out" (MusicCaps' is_audioset_eval)."""
    v = value.strip().lower()
    if v in SPLIT_ALIASES:
        return SPLIT_ALIASES[v]
    if v in TRUE_VALUES:
        return true_split
    if v in FALSE_VALUES:
        return "train"
    raise ImportFormatError(f"{where}: unknown split value {value!r}; use train/val/test (or true/false for held-out)")


# ---------------------------------------------------------------------- LibriSpeech / LibriTTS
def _librispeech_items(root: Path) -> list[tuple[str, Path, str, str]]:
    """(utt id, audio path, transcript, speaker) from every ``*.trans.txt`` under root."""
    items = []
    for trans in sorted(root.rglob("*.trans.txt")):
        with open(trans, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                utt, _, text = line.strip().partition(" ")
                if not text.strip():
                    raise ImportFormatError(f"{trans}:{number}: expected '<utterance-id> <transcript>', got {line.strip()!r}")
                audio = next((trans.parent / f"{utt}{ext}" for ext in AUDIO_EXTENSIONS if (trans.parent / f"{utt}{ext}").exists()), trans.parent / f"{utt}.flac")
                items.append((utt, audio, text.strip(), utt.split("-")[0]))
    return items


def _libritts_items(root: Path) -> list[tuple[str, Path, str, str]]:
    """(utt id, audio path, transcript, speaker) from every ``<utt>.normalized.txt`` under root."""
    items = []
    for norm in sorted(root.rglob("*.normalized.txt")):
        utt = norm.name[: -len(".normalized.txt")]
        text = norm.read_text(encoding="utf-8").strip()
        if not text:
            raise ImportFormatError(f"{norm}:1: empty transcript")
        audio = next((norm.parent / f"{utt}{ext}" for ext in AUDIO_EXTENSIONS if (norm.parent / f"{utt}{ext}").exists()), norm.parent / f"{utt}.wav")
        items.append((utt, audio, text, utt.split("_")[0]))
    return items


def import_librispeech(
    root: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    lang: str = "en",
    lowercase: bool = False,
    seed: int = 0,
    prompt_min_seconds: float = 1.0,
    prompt_max_seconds: float = 10.0,
) -> ImportReport:
    """Import a LibriSpeech or LibriTTS tree (any mix of subsets) into ``tts`` entries.

    The split comes from ``split`` or, when None, from the subset folder name
    (``train-*`` -> train, ``dev-*`` -> val, ``test-*`` -> test; otherwise train).
    Speaker prompts are chosen within the same speaker and split.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LibriSpeech/LibriTTS root is not a directory: {root}")
    items = _librispeech_items(root) + _libritts_items(root)
    if not items:
        raise ImportFormatError(f"{root}: found no '*.trans.txt' (LibriSpeech) or '*.normalized.txt' (LibriTTS) files")
    report = ImportReport(manifest=Path(out))
    entries: list[ManifestEntry] = []
    seen: set[str] = set()
    for utt, audio, text, speaker in items:
        if utt in seen:
            report.skipped.append((str(audio), "duplicate utterance id"))
            continue
        seen.add(utt)
        if not audio.exists():
            report.skipped.append((str(audio), "missing audio file"))
            continue
        try:
            duration = _audio_duration(audio)
        except Exception as exc:
            report.skipped.append((str(audio), f"unreadable: {exc}"))
            continue
        entry_split = split or split_from_path(audio.relative_to(root).parts)
        entries.append(
            ManifestEntry(
                id=utt, task="tts", audio=str(audio.resolve()), text=text.lower() if lowercase else text,
                speaker=speaker, duration=round(duration, 4), split=entry_split, lang=lang,
            )
        )
    report.without_prompt = assign_prompts(entries, seed=seed, min_seconds=prompt_min_seconds, max_seconds=prompt_max_seconds)
    report.speakers = len({e.speaker for e in entries})
    _finish(report, entries)
    return report


# ---------------------------------------------------------------------- caption CSV
def _index_audio(folder: Path) -> dict[str, list[Path]]:
    """Audio files under ``folder`` by stem (recursive), for id -> file matching."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in folder.rglob("*"):
        if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file():
            by_stem[p.stem].append(p)
    return by_stem


def _find_audio(key: str, folder: Path, by_stem: dict[str, list[Path]]) -> tuple[Path | None, str | None]:
    direct = folder / key
    if Path(key).suffix and direct.is_file():
        return direct, None
    exact = by_stem.get(Path(key).stem if Path(key).suffix else key, [])
    if len(exact) == 1:
        return exact[0], None
    if len(exact) > 1:
        return None, f"ambiguous: {len(exact)} files named {key!r}"
    # MusicCaps downloaders name clips '<ytid>-<start>-<end>.wav' or '<ytid>_<start>.wav'.
    prefixed = [p for stem, paths in by_stem.items() if stem.startswith(key) and stem[len(key): len(key) + 1] in ("-", "_", ".") for p in paths]
    if len(prefixed) == 1:
        return prefixed[0], None
    if len(prefixed) > 1:
        return None, f"ambiguous: {len(prefixed)} files start with {key!r}"
    return None, "missing audio file"


def import_captions(
    csv_path: str | Path,
    audio_dir: str | Path,
    out: str | Path,
    *,
    id_column: str = "ytid",
    caption_column: str = "caption",
    audio_column: str | None = None,
    audio_template: str | None = None,
    split_column: str | None = None,
    default_split: str = "train",
    video_column: str | None = None,
    video_dir: str | Path | None = None,
    task: str | None = None,
    delimiter: str = ",",
) -> ImportReport:
    """Import a caption CSV (one row per clip) and its audio folder.

    The audio of a row is ``audio_column`` (a path relative to ``audio_dir``), or
    ``audio_template.format(**row)`` (e.g. ``"{track_id:0>6}"`` for FMA), or the id; a
    name without extension is matched by file stem anywhere under ``audio_dir`` (also
    ``<id>-<start>-<end>.wav`` style names). ``split_column`` cells may be
    train/val/test or booleans meaning held-out -> test (MusicCaps' ``is_audioset_eval``).
    With ``video_column`` the task defaults to ``v2m`` and videos resolve under
    ``video_dir`` (default ``audio_dir``).
    """
    csv_path, audio_dir = Path(csv_path), Path(audio_dir)
    if not csv_path.is_file():
        raise FileNotFoundError(f"caption CSV not found: {csv_path}")
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"audio folder not found: {audio_dir}")
    task = task or ("v2m" if video_column else "t2m")
    video_root = Path(video_dir) if video_dir is not None else audio_dir
    by_stem = _index_audio(audio_dir)
    report = ImportReport(manifest=Path(out))
    entries: list[ManifestEntry] = []
    seen: set[str] = set()
    with open(csv_path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        header = reader.fieldnames or []
        for column in [id_column, caption_column, audio_column, split_column, video_column]:
            if column is not None and column not in header:
                raise ImportFormatError(f"{csv_path}:1: no column {column!r}; columns are {', '.join(header)}")
        for row in reader:
            where = f"{csv_path}:{reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                raise ImportFormatError(f"{where}: row has {len([v for v in row.values() if v is not None])} cells, header has {len(header)}")
            clip_id = row[id_column].strip()
            if not clip_id:
                raise ImportFormatError(f"{where}: column {id_column!r} is empty")
            if clip_id in seen:
                raise ImportFormatError(f"{where}: duplicate id {clip_id!r} in column {id_column!r}")
            seen.add(clip_id)
            entry_split = normalize_split(row[split_column], where=f"{where}: column {split_column!r}") if split_column else default_split
            caption = row[caption_column].strip()
            if not caption and task != "v2m":
                report.skipped.append((clip_id, "empty caption"))
                continue
            if audio_column is not None:
                key = row[audio_column].strip()
            elif audio_template is not None:
                try:
                    key = audio_template.format(**row)
                except (KeyError, ValueError, IndexError) as exc:
                    raise ImportFormatError(f"{where}: audio_template {audio_template!r} failed: {exc}") from exc
            else:
                key = clip_id
            audio, problem = _find_audio(key, audio_dir, by_stem)
            if audio is None:
                report.skipped.append((clip_id, problem or "missing audio file"))
                continue
            try:
                duration = _audio_duration(audio)
            except Exception as exc:
                report.skipped.append((clip_id, f"unreadable: {exc}"))
                continue
            video = None
            if video_column is not None:
                video_path = video_root / row[video_column].strip()
                if not row[video_column].strip() or not video_path.is_file():
                    report.skipped.append((clip_id, "missing video file"))
                    continue
                video = str(video_path.resolve())
            entries.append(
                ManifestEntry(id=clip_id, task=task, audio=str(audio.resolve()), text=caption or None,
                              video=video, duration=round(duration, 4), split=entry_split)
            )
    _finish(report, entries)
    return report


def _finish(report: ImportReport, entries: list[ManifestEntry]) -> None:
    write_manifest(report.manifest, entries)
    report.entries = len(entries)
    splits: dict[str, int] = defaultdict(int)
    for e in entries:
        splits[e.split] += 1
    report.splits = dict(splits)
