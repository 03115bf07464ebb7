"""Writing generated clips: ``<id>.wav`` + ``<id>.json`` sidecar each, and a JSONL manifest.

The manifest (``generated.jsonl``) has ``id``, ``task``, ``audio`` (relative to the folder),
``text`` and ``duration`` per clip: what ``unimoe evaluate`` pairs with its references.
File names are the ids with characters outside ``[A-Za-z0-9._-]`` replaced, made unique.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from unimoe.atomic import write_json_atomic, write_text_atomic
from unimoe.audio import save_audio
from unimoe.generation.generator import GeneratedClip

MANIFEST_NAME = "generated.jsonl"
SKIPPED_NAME = "skipped.jsonl"


def safe_stem(clip_id: str, taken: set[str]) -> str:
    """A file-name stem for ``clip_id`` not in ``taken`` (added to it)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", clip_id).strip(".") or "clip"
    candidate, n = stem, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}-{n}"
    taken.add(candidate)
    return candidate


def write_clips(
    clips: Sequence[GeneratedClip],
    out_dir: str | Path,
    *,
    skipped: Sequence[dict[str, Any]] = (),
    manifest_name: str = MANIFEST_NAME,
) -> Path:
    """Write every clip's WAV and sidecar into ``out_dir``; returns the manifest path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, taken = [], set()
    for clip in clips:
        if clip.wav is None:
            raise ValueError(f"clip {clip.id!r} has no waveform (generated without a codec); nothing to write")
        stem = safe_stem(clip.id, taken)
        wav_path = save_audio(out / f"{stem}.wav", clip.wav, clip.sample_rate)
        sidecar = {**clip.metadata, "audio": wav_path.name}
        _write_json(out / f"{stem}.json", sidecar)
        row = {"id": clip.id, "task": clip.task, "audio": wav_path.name, "duration": clip.metadata.get("duration")}
        if clip.metadata.get("text") is not None:
            row["text"] = clip.metadata["text"]
        rows.append(row)
    manifest = out / manifest_name
    write_text_atomic(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if skipped:
        write_text_atomic(out / SKIPPED_NAME, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))
    return manifest


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data, indent=2, ensure_ascii=False, default=str)
