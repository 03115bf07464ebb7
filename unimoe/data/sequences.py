"""From examples to model batches: the registered task builders lay out each example as a
:class:`~unimoe.model.tasks.Sequence` (with its task id on every position and the CFG
condition drop), and :func:`~unimoe.model.tasks.collate` pads them into a ``Batch``.

:meth:`SequenceMaker.length` gives the exact sequence length of an index row without
loading its codes, so the token-budget sampler can plan batches before any shard is read.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from unimoe.data.dataset import Example
from unimoe.model.batch import collate
from unimoe.model.config import AudioLMConfig
from unimoe.model.tasks import TaskIds, build_task_builder
from unimoe.registry import spec_parts

SEQUENCE_FIELDS = ("num_codebooks", "codebook_size", "delays", "text_tokenizer", "vision", "max_seq_len")
"""The model-config fields that decide how an example is laid out (and whether it fits)."""


@dataclass
class SequenceLayout:
    """What the data pipeline needs from a model to lay its examples out.

    ``config`` supplies the :data:`SEQUENCE_FIELDS`; ``task_ids`` numbers the tasks. A
    training stage hands its own to the data module (:meth:`unimoe.training.stages.StageModule.sequence_layout`),
    so the data module never holds a second copy of the model config.
    """

    config: AudioLMConfig
    task_ids: TaskIds
    task_formats: dict[str, str] = field(default_factory=dict)
    """Task -> the builder the model was trained with (its prompt format, e.g. ``uni_moe_audio_tts`` for the
    imported release); the data's own ``tasks`` args still override it."""

    def disagreements(self, other: AudioLMConfig) -> list[str]:
        """``field: data <other's> vs model <this one's>`` for every sequence-layout field where they differ."""
        return [f"{f}: data {getattr(other, f)!r} vs model {getattr(self.config, f)!r}" for f in SEQUENCE_FIELDS
                if spec_parts(getattr(other, f)) != spec_parts(getattr(self.config, f))]


class SequenceMaker:
    """Builds sequences for every task found in the data; used as the DataLoader's ``collate_fn``.

    ``model`` is the model's :class:`~unimoe.model.config.AudioLMConfig` (codebooks,
    delays, tokenizer, vision encoder, ``max_seq_len``); ``task_ids`` its task table (default:
    the legacy order, for standalone use). ``cond_drop_prob`` is passed to every task builder
    (classifier-free guidance training); ``train=False`` never drops. ``tasks`` gives extra
    builder arguments per task, e.g. ``{"tts": {"uncond_keep": ["prompt"]}}``.

    The condition drop of an example is drawn from :func:`draw_rng` of its training draw
    (``Example.draw``: epoch and position in the epoch's draws), never from a per-process
    stream: a resumed run, or one with another number of workers or ranks, drops the
    conditions of exactly the same examples. An example without a draw (built outside the
    data module's training loader) gets a choice derived from ``(seed, id)``.
    """

    def __init__(
        self,
        model: AudioLMConfig,
        cond_drop_prob: float = 0.1,
        tasks: Mapping[str, Mapping[str, Any]] | None = None,
        train: bool = True,
        pad_to_multiple_of: int = 1,
        seed: int = 0,
        task_ids: TaskIds | None = None,
        task_formats: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model
        self.task_ids = task_ids
        self.task_formats = dict(task_formats or {})
        self.cond_drop_prob = cond_drop_prob
        self.task_args = {k: dict(v) for k, v in (tasks or {}).items()}
        self.train = train
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self._builders: dict[str, Any] = {}
        self._memo: dict[tuple, int] = {}

    # ------------------------------------------------------------------ builders
    def builder(self, task: str):
        b = self._builders.get(task)
        if b is None:
            spec = {"name": self.task_formats.get(task, task), "cond_drop_prob": self.cond_drop_prob,
                    **self.task_args.get(task, {})}
            b = self._builders[task] = build_task_builder(spec, self.model, task_ids=self.task_ids)
        return b

    def _conditions(self, builder, text, prompt, prompt_text, video) -> dict[str, Any]:
        given = {"text": text, "prompt": prompt, "prompt_text": prompt_text, "video": video}
        return {k: v for k, v in given.items() if v is not None and builder.accepts(k)}

    # ------------------------------------------------------------------ lengths
    def length(self, row: Mapping[str, Any]) -> int:
        """Exact length of the fully conditioned sequence of an index row (``ShardDataset.row``).

        Builders depend on text only through its token count (and whether there is any), so
        the conditioning length is computed once per (task, token counts, text present,
        prompt/video sizes) and reused.
        """
        text, prompt_text = row.get("text"), row.get("prompt_text")
        tok = self.builder(row["task"]).tokenizer
        n_text = len(tok.encode(text)) if text else 0
        n_ptext = len(tok.encode(prompt_text)) if prompt_text else 0
        video_size = tuple(row["video_size"]) if row.get("video_size") else (0, 0)
        features = np.array([[n_text, n_ptext, text is None, prompt_text is None, row.get("prompt_frames", 0),
                              row.get("video_frames", 0), *video_size]], dtype=np.int64)
        key = (row["task"], *map(int, self._mask_features(row["task"], features)[0]))
        return self._condition_length(key, row) + int(row["frames"]) + 2 + max(self.model.delays)  # + delayed target

    def _mask_features(self, task: str, features: np.ndarray) -> np.ndarray:
        """Clear the key features of conditions ``task``'s builder does not take (so they never split a key).

        Columns: text tokens, prompt-text tokens, text is None, prompt text is None, prompt
        frames, video frames, video height, video width.
        """
        builder = self.builder(task)
        accepted = {k for k in ("text", "prompt", "prompt_text", "video") if builder.accepts(k)}
        out = features.copy()
        if "text" not in accepted:
            out[:, 0], out[:, 2] = 0, 1
        if "prompt_text" not in accepted:
            out[:, 1], out[:, 3] = 0, 1
        if "prompt" not in accepted:
            out[:, 4] = 0
        no_video = (out[:, 5] == 0) | (out[:, 6] == 0) if "video" in accepted else np.ones(len(out), bool)
        out[no_video, 5:8] = 0
        return out

    def _condition_length(self, key: tuple, row: Mapping[str, Any]) -> int:
        """Length of the conditioning prefix (without the target's BOS frame) of rows like ``row``."""
        cond = self._memo.get(key)
        if cond is None:
            b = self.builder(row["task"])
            C = self.model.num_codebooks
            prompt = torch.zeros(C, row["prompt_frames"], dtype=torch.long) if row.get("prompt_frames") else None
            video_size = tuple(row["video_size"]) if row.get("video_size") else None
            video = (torch.zeros(row["video_frames"], 3, *video_size, dtype=torch.uint8)
                     if row.get("video_frames") and video_size else None)
            conds = self._conditions(b, row.get("text"), prompt, row.get("prompt_text"), video)
            cond = self._memo[key] = len(b.prefix(cond=True, **conds)) - 1  # minus the target's BOS frame
        return cond

    def lengths(self, dataset: Any, chunk: int = 1 << 20) -> np.ndarray:
        """``length(row)`` of every example of a :class:`~unimoe.data.dataset.ShardDataset`, vectorised.

        Reads the index columns ``chunk`` rows at a time (bounded temporary memory), groups
        rows by their conditioning key and builds one prefix per distinct key. Text is
        tokenised row by row except for the byte tokenizer, whose count is the UTF-8 length
        stored in the index.
        """
        out = [self._index_lengths(part.index, rows[a: a + chunk])
               for part in dataset.parts for rows in [part.row_numbers()] for a in range(0, len(rows), chunk)]
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _index_lengths(self, index: Any, rows: np.ndarray) -> np.ndarray:
        tasks = index.categories("task")
        codes = np.asarray(index.column("task"))[rows]
        frames = np.asarray(index.column("frames"))[rows].astype(np.int64)
        sizes = np.asarray(index.column("video_size"))[rows].clip(min=0)
        cond = np.zeros(len(rows), np.int64)
        for code in np.unique(codes):
            sel = np.nonzero(codes == code)[0]
            tok = self.builder(tasks[code]).tokenizer
            features = np.stack([self._token_counts(tok, index.strings("text"), rows[sel]),
                                 self._token_counts(tok, index.strings("prompt_text"), rows[sel]),
                                 index.strings("text").is_null(rows[sel]), index.strings("prompt_text").is_null(rows[sel]),
                                 np.asarray(index.column("prompt_frames"))[rows[sel]],
                                 np.asarray(index.column("video_frames"))[rows[sel]], sizes[sel, 0], sizes[sel, 1]],
                                axis=1).astype(np.int64)
            keys = self._mask_features(tasks[code], features)
            unique, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
            values = np.array([self._condition_length((tasks[code], *map(int, key)), index.row(int(rows[sel[f]])))
                               for key, f in zip(unique, first)], dtype=np.int64)
            cond[sel] = values[inverse.reshape(-1)]
        return cond + frames + 2 + max(self.model.delays)

    @staticmethod
    def _token_counts(tok: Any, column: Any, rows: np.ndarray) -> np.ndarray:
        from unimoe.model.text_tokenizer import ByteTokenizer

        if type(tok) is ByteTokenizer:  # one id per UTF-8 byte: the index already has the count
            return column.byte_lengths(rows)
        counts = np.zeros(len(rows), np.int64)
        for j, r in enumerate(rows):
            text = column[int(r)]
            counts[j] = len(tok.encode(text)) if text else 0
        return counts

    # ------------------------------------------------------------------ sequences
    def rng(self, example: Example) -> random.Random:
        """The random stream of ``example``'s training-time choices (see the class docstring)."""
        draw = example.draw
        if draw is not None:
            return draw_rng(self.seed, draw.epoch, draw.position, draw.index)
        return random.Random(_digest(f"cond-drop:{self.seed}:id:{example.id}"))

    def sequence(self, example: Example):
        b = self.builder(example.task)
        conds = self._conditions(b, example.text, example.prompt_codes, example.prompt_text, example.video)
        drop = None if self.train else False
        return b.build(example.codes, drop_condition=drop, rng=self.rng(example) if self.train else None, **conds)

    def __call__(self, examples: list[Example]):
        batch = collate([self.sequence(e) for e in examples], pad_to_multiple_of=self.pad_to_multiple_of)
        batch.example_ids = tuple(e.id for e in examples)  # named by the non-finite guard's messages
        return batch

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_builders"] = {}  # rebuilt per worker
        return state


def draw_rng(seed: int, epoch: int, position: int, index: int) -> random.Random:
    """A random stream that depends only on ``(seed, epoch, position of the draw, example index)``."""
    return random.Random(_digest(f"cond-drop:{seed}:{epoch}:{position}:{index}"))


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
