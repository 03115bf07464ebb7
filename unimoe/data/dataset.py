"""The training dataset: examples read from codec-token shards (never from audio).

A :class:`ShardDataset` is one shard directory restricted to a split (and optionally some
tasks). It knows every example's sizes from ``index.json`` without opening a shard, and
opens shards lazily, memory-mapped, keeping a few open per process (DataLoader workers
each have their own).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor
from torch.utils.data import Dataset

from unimoe.data.shards import ShardError, compare_codecs, load_shard, read_index


@dataclass
class Example:
    """One tokenised example, as the task builders take it."""

    index: int
    id: str
    task: str
    codes: Tensor
    """Target codes ``[C, T]`` long."""
    text: str | None = None
    prompt_codes: Tensor | None = None
    prompt_text: str | None = None
    video: Tensor | None = None
    """Frames ``[F, 3, H, W]`` uint8."""
    video_fps: float | None = None
    speaker: str | None = None
    split: str = "train"
    duration: float | None = None
    meta: dict | None = None
    draw: Any = None
    """The :class:`~unimoe.data.sampler.Draw` that picked it for training (None otherwise)."""


class ShardDataset(Dataset):
    """Examples of one or more shard directories (one split, optionally some tasks).

    Several directories (e.g. one per tokenisation run of a source) must share a codec.
    ``expected_codec`` (a codec's ``describe()``, or ``codec_record(codec)`` to also compare
    weights) makes a mismatch an immediate error naming the differing fields, instead of a
    model trained on foreign tokens.
    """

    def __init__(
        self,
        directory: str | Path | Sequence[str | Path],
        split: str | None = "train",
        tasks: Sequence[str] | None = None,
        expected_codec: dict[str, Any] | None = None,
        max_open_shards: int = 16,
    ) -> None:
        dirs = [directory] if isinstance(directory, (str, Path)) else list(directory)
        if not dirs:
            raise ValueError("ShardDataset needs at least one shard directory")
        self.directories = [Path(d) for d in dirs]
        self.directory = self.directories[0]
        self.split = split
        self.codec_info: dict[str, Any] | None = None
        self.shard_files: list[list[str]] = []
        self.rows: dict[str, list] = {}
        for k, d in enumerate(self.directories):
            index = read_index(d)
            if expected_codec is not None:
                compare_codecs(index["codec"], expected_codec, str(d))
            if self.codec_info is None:
                self.codec_info = index["codec"]
            else:
                compare_codecs(index["codec"], self.codec_info, f"{d} (vs {self.directory})")
            files = [shard["file"] for shard in index["shards"]]
            missing = [f for f in files if not (d / f).is_file()]
            if missing:
                raise ShardError(f"{d}: index.json lists shards that are missing: {', '.join(missing[:5])}")
            self.shard_files.append(files)
            columns: dict[str, list] = index["items"]
            keep = [
                i for i in range(index["num_items"])
                if (split is None or columns["split"][i] == split) and (tasks is None or columns["task"][i] in tasks)
            ]
            for key, values in columns.items():
                self.rows.setdefault(key, []).extend(values[i] for i in keep)
            self.rows.setdefault("dir", []).extend([k] * len(keep))
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[tuple[int, int], dict] = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows.get("id", []))

    def row(self, i: int) -> dict[str, Any]:
        """The index entry of example ``i`` (sizes, text, ids) without opening its shard."""
        return {key: values[i] for key, values in self.rows.items()}

    @property
    def tasks(self) -> list[str]:
        return self.rows.get("task", [])

    def _shard(self, d: int, shard: int) -> dict:
        key = (d, shard)
        payload = self._open.get(key)
        if payload is None:
            payload = load_shard(self.directories[d] / self.shard_files[d][shard], mmap=True)
            self._open[key] = payload
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(key)
        return payload

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples in {self.directory}")
        row = self.row(i)
        item = self._shard(row["dir"], row["shard"])["items"][row["pos"]]
        if item["id"] != row["id"]:
            raise ShardError(f"{self.directories[row['dir']]}: shard {row['shard']} position {row['pos']} holds "
                             f"{item['id']!r}, index.json says {row['id']!r}; the folder was modified after "
                             f"tokenisation, re-run it")
        return Example(
            index=i, id=item["id"], task=item["task"], codes=item["codes"].long(), text=item["text"],
            prompt_codes=item["prompt_codes"].long() if item["prompt_codes"] is not None else None,
            prompt_text=item["prompt_text"], video=item["video"].clone() if item["video"] is not None else None,
            video_fps=item["video_fps"], speaker=item["speaker"], split=item["split"], duration=item["duration"],
            meta=json.loads(item["meta"]) if item.get("meta") else None,
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # each worker process opens its own memory maps
        return state


class DrawnDataset(Dataset):
    """A map-style dataset indexed by :class:`~unimoe.data.sampler.Draw` (or plain indices).

    The batch sampler's draws travel with the indices into the worker processes; the
    returned :class:`Example` carries its draw, from which the collate function derives the
    example's random choices (the CFG condition drop) instead of from a per-process stream.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Any) -> Example:
        if isinstance(item, tuple):  # a Draw
            example = self.dataset[item.index]
            example.draw = item
            return example
        return self.dataset[item]
