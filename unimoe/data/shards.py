"""The on-disk shard format: codec tokens (and text, video) of many examples per file.

A shard directory holds

* ``shard-00000.pt`` ... - ``torch.save`` of a dict (loadable with ``weights_only=True``,
  memory-mapped on read) with ``format``, ``version``, ``codec`` (the codec's
  ``describe()`` plus ``weights_sha256``, see :func:`codec_record`), ``fingerprint``
  (hash of the manifest lines, settings and codec that produced it), ``shard``, ``items`` (one dict per example: ``id``, ``task``, ``split``,
  ``text``, ``speaker``, ``lang``, ``prompt_text``, ``duration``, ``line``, ``meta`` (JSON
  string), ``codes`` int16/int32 ``[C, T]``, ``prompt_codes`` ``[C, Tp]`` or None,
  ``video`` uint8 ``[F, 3, H, W]`` or None, ``video_fps``) and ``skipped`` (``id``, ``line``,
  ``reason``, ``detail`` of each example left out);
* ``index/`` - written last, only when every shard exists: codec, settings and a
  per-example table (id, task, split, speaker, shard, position, manifest line, duration,
  frame counts, text, prompt text, video frames and size) as memory-mapped columns, so
  datasets and samplers know sequence lengths without opening shards
  (:mod:`unimoe.data.index`; folders of older versions have ``index.json`` instead, which
  is converted on first use);
* ``tokenize.json`` - the settings of the run, checked when resuming;
* ``skipped.jsonl`` - every example left out, with its manifest line and reason.

Shards are written under a dot-prefixed temporary name and renamed into place, so a reader
(or a resumed run) never sees a half-written shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unimoe.atomic import atomic_path, write_json_atomic

SHARD_FORMAT = "unimoe-shard"
SHARD_VERSION = 1
SETTINGS_FILE = "tokenize.json"
SKIPPED_FILE = "skipped.jsonl"


class ShardError(RuntimeError):
    """A shard directory or file is missing, incomplete, corrupt or of another codec."""


class CodecMismatchError(ShardError):
    """Shards were made with a codec other than the one the model uses."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.pt"


def save_shard(directory: Path, index: int, payload: dict[str, Any]) -> Path:
    """Write one shard atomically: temporary file, fsync, rename."""
    final = directory / shard_name(index)
    with atomic_path(final, durable=True) as tmp:
        torch.save(payload, tmp)
    return final


def load_shard(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """Load a shard (tensors memory-mapped); raise :class:`ShardError` naming the file."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise ShardError(f"shard not found: {path}") from None
    except Exception as exc:
        raise ShardError(f"cannot read shard {path} (corrupt or not a shard): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != SHARD_FORMAT:
        raise ShardError(f"{path} is not a {SHARD_FORMAT} file")
    if payload.get("version") != SHARD_VERSION:
        raise ShardError(f"{path} has shard format version {payload.get('version')}, this code reads {SHARD_VERSION}")
    return payload


def codes_dtype(cardinality: int) -> torch.dtype:
    """Smallest integer type holding codes ``0..K+2`` (specials included)."""
    return torch.int16 if cardinality + 3 <= torch.iinfo(torch.int16).max else torch.int32


def write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=1, ensure_ascii=False)


WEIGHTS_KEY = "weights_sha256"


def codec_record(codec) -> dict[str, Any]:
    """The codec's ``describe()`` plus a hash of its weights (state dict).

    ``describe()`` gives the shape of the token space; two fits of a corpus-fitted codec
    share it but not their codebooks, and tokens of one are noise to a model trained on
    the other. The hash tells them apart.
    """
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(codec.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {**codec.describe(), WEIGHTS_KEY: h.hexdigest()}


def compare_codecs(found: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise :class:`CodecMismatchError` listing every field where two codec records differ.

    ``expected`` may be a plain ``describe()`` (then the weights hash is not compared) or a
    :func:`codec_record` (then it is).
    """
    keys = sorted(set(found) | set(expected))
    if WEIGHTS_KEY not in expected:
        keys = [k for k in keys if k != WEIGHTS_KEY]
    diff = [f"{k}: shards {found.get(k)!r} vs expected {expected.get(k)!r}" for k in keys if found.get(k) != expected.get(k)]
    if diff:
        raise CodecMismatchError(
            f"{where} was tokenised with a different codec ({'; '.join(diff)}); "
            f"re-run 'unimoe tokenize' with the model's codec"
        )
