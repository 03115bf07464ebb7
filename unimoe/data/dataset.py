"""The training dataset: examples read from codec-token shards (never from audio).

A :class:`ShardDataset` is one or more shard directories restricted to a split (and
optionally some tasks). It knows every example's sizes from the folders' memory-mapped
index (:mod:`unimoe.data.index`) without opening a shard, and opens shards lazily,
memory-mapped, keeping a few open per process (DataLoader workers each have their own).
A split is a slice of the index's ``by_split`` column, so a dataset holds no per-example
Python objects: every rank and worker of a node shares the same pages.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor
from torch.utils.data import Dataset

import numpy as np

from unimoe.data.index import ShardIndex, open_index
from unimoe.data.shards import ShardError, compare_codecs, load_shard


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


class _Part:
    """The examples one shard folder contributes: its index and which rows (None = all)."""

    def __init__(self, index: ShardIndex, split: str | None, tasks: Sequence[str] | None) -> None:
        self.index, self.split, self.tasks = index, split, None if tasks is None else list(tasks)
        self.rows = self._select()

    def _select(self) -> np.ndarray | None:
        rows = self.index.split_rows(self.split)
        if self.tasks is None:
            return rows
        names = self.index.categories("task")
        wanted = [names.index(t) for t in self.tasks if t in names]
        codes = np.asarray(self.index.column("task"))
        codes = codes if rows is None else codes[rows]
        keep = np.nonzero(np.isin(codes, wanted))[0]
        return keep.astype(np.int64) if rows is None else np.asarray(rows)[keep]

    def __len__(self) -> int:
        return len(self.index) if self.rows is None else len(self.rows)

    def row_numbers(self) -> np.ndarray:
        """Index row of each example (a copy: for vectorised column reads)."""
        return np.arange(len(self.index)) if self.rows is None else np.asarray(self.rows, dtype=np.int64)

    def __getstate__(self) -> dict:
        # a split's rows are a slice of the mapped index: re-derive them instead of pickling a copy
        state = dict(self.__dict__)
        if self.tasks is None:
            state["rows"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.tasks is None:
            self.rows = self.index.split_rows(self.split)


class ShardDataset(Dataset):
    """Examples of one or more shard directories (one split, optionally some tasks).

    Several directories (e.g. one per tokenisation run of a source) must share a codec.
    ``expected_codec`` (a codec's ``describe()``, or ``codec_record(codec)`` to also compare
    weights) makes a mismatch an immediate error naming the differing fields, instead of a
    model trained on foreign tokens. Folders with only the old ``index.json`` are converted
    once (see :func:`unimoe.data.index.open_index`).
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
        self.parts: list[_Part] = []
        for d in self.directories:
            index = open_index(d)
            if expected_codec is not None:
                compare_codecs(index.codec, expected_codec, str(d))
            if self.codec_info is None:
                self.codec_info = index.codec
            else:
                compare_codecs(index.codec, self.codec_info, f"{d} (vs {self.directory})")
            missing = [s["file"] for s in index.shards if not (d / s["file"]).is_file()]
            if missing:
                raise ShardError(f"{d}: the index lists shards that are missing: {', '.join(missing[:5])}")
            self.parts.append(_Part(index, split, tasks))
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[tuple[int, int], dict] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """``(directory number, index row)`` of example ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples in {self.directory}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        part = self.parts[k]
        local = i - int(self.starts[k])
        return k, local if part.rows is None else int(part.rows[local])

    def row(self, i: int) -> dict[str, Any]:
        """The index entry of example ``i`` (sizes, text, ids) without opening its shard."""
        k, r = self.locate(i)
        return {**self.parts[k].index.row(r), "dir": k}

    @property
    def tasks(self) -> list[str]:
        """The task of every example (a Python list: for small datasets and tests)."""
        return [p.index.categories("task")[c] for p in self.parts for c in np.asarray(p.index.column("task"))[p.row_numbers()]]

    def _shard(self, d: int, shard: int) -> dict:
        key = (d, shard)
        payload = self._open.get(key)
        if payload is None:
            index = self.parts[d].index
            payload = load_shard(self.directories[d] / index.shards[shard]["file"], mmap=True)
            self._open[key] = payload
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(key)
        return payload

    def __getitem__(self, i: int) -> Example:
        d, r = self.locate(i)
        index = self.parts[d].index
        shard, pos = int(index.column("shard")[r]), int(index.column("pos")[r])
        item = self._shard(d, shard)["items"][pos]
        expected = index.strings("id")[r]
        if item["id"] != expected:
            raise ShardError(f"{self.directories[d]}: shard {shard} position {pos} holds "
                             f"{item['id']!r}, the index says {expected!r}; the folder was modified after "
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
