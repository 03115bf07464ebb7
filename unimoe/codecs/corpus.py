"""Which audio files a codec is fitted on: folders, JSONL manifests and single files.

A manifest is JSON Lines with an ``"audio"`` path per line (relative paths are relative to
the manifest's folder); this is the subset of ``unimoe.data.manifest`` that fitting needs,
so a codec can be fitted before any dataset tooling exists. Errors name the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from unimoe.audio import AudioFileError
from unimoe.jsonl import iter_json_lines, resolve_path

__all__ = ["AUDIO_EXTENSIONS", "list_audio_files"]

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".au", ".opus"})


def _from_manifest(manifest: Path) -> list[Path]:
    files: list[Path] = []
    try:
        rows = list(iter_json_lines(manifest))
    except (OSError, UnicodeDecodeError) as exc:
        raise AudioFileError(f"cannot read manifest {manifest}: {exc}") from exc
    for number, record, error in rows:
        if error is not None:
            raise AudioFileError(f"manifest {manifest} line {number}: {error}")
        audio = record.get("audio") if isinstance(record, dict) else None
        if not isinstance(audio, str) or not audio:
            raise AudioFileError(f"manifest {manifest} line {number} has no \"audio\" path")
        files.append(Path(resolve_path(audio, manifest.parent)))
    return files


def list_audio_files(sources: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively, sorted), ``.jsonl`` manifests and files into audio paths.

    Order is deterministic (a fitted codec must not depend on directory listing order);
    duplicates are kept once. An empty result is an error, as is a missing source.
    """
    sources = list(sources)
    files: list[Path] = []
    for source in sources:
        source = Path(source).expanduser()
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        elif source.suffix.lower() in (".jsonl", ".json") and source.is_file():
            files += _from_manifest(source)
        elif source.is_file():
            files.append(source)
        else:
            raise AudioFileError(f"audio source not found: {source}")
    unique = list(dict.fromkeys(files))
    if not unique:
        raise AudioFileError(f"no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}) found in {list(map(str, sources))}")
    return unique
