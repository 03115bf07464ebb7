"""From examples to model batches: the registered task builders lay out each example as a
:class:`~unimoe.model.tasks.Sequence` (with its task id on every position and the CFG
condition drop), and :func:`~unimoe.model.tasks.collate` pads them into a ``Batch``.

:meth:`SequenceMaker.length` gives the exact sequence length of an index row without
loading its codes, so the token-budget sampler can plan batches before any shard is read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from unimoe.data.dataset import Example
from unimoe.model.batch import collate
from unimoe.model.config import AudioLMConfig
from unimoe.model.tasks import TaskIds, build_task_builder

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

    def disagreements(self, other: AudioLMConfig) -> list[str]:
        """``field: data <other's> vs model <this one's>`` for every sequence-layout field where they differ."""
        return [f"{f}: data {getattr(other, f)!r} vs model {getattr(self.config, f)!r}" for f in SEQUENCE_FIELDS
                if getattr(other, f) != getattr(self.config, f)]


class SequenceMaker:
    """Builds sequences for every task found in the data; used as the DataLoader's ``collate_fn``.

    ``model`` is the model's :class:`~unimoe.model.config.AudioLMConfig` (codebooks,
    delays, tokenizer, vision encoder, ``max_seq_len``); ``task_ids`` its task table (default:
    the legacy order, for standalone use). ``cond_drop_prob`` is passed to every task builder
    (classifier-free guidance training); ``train=False`` never drops. ``tasks`` gives extra
    builder arguments per task, e.g. ``{"tts": {"uncond_keep": ["prompt"]}}``.
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
    ) -> None:
        self.model = model
        self.task_ids = task_ids
        self.cond_drop_prob = cond_drop_prob
        self.task_args = {k: dict(v) for k, v in (tasks or {}).items()}
        self.train = train
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self._builders: dict[str, Any] = {}
        self._memo: dict[tuple, int] = {}
        self._rng: random.Random | None = None
        self._rng_key: int | None = None

    # ------------------------------------------------------------------ builders
    def builder(self, task: str):
        b = self._builders.get(task)
        if b is None:
            spec = {"name": task, "cond_drop_prob": self.cond_drop_prob, **self.task_args.get(task, {})}
            b = self._builders[task] = build_task_builder(spec, self.model, task_ids=self.task_ids)
        return b

    def _conditions(self, builder, text, prompt, prompt_text, video) -> dict[str, Any]:
        given = {"text": text, "prompt": prompt, "prompt_text": prompt_text, "video": video}
        return {k: v for k, v in given.items() if v is not None and builder.accepts(k)}

    # ------------------------------------------------------------------ lengths
    def length(self, row: Mapping[str, Any]) -> int:
        """Exact length of the fully conditioned sequence of an index row (``ShardDataset.row``).

        Builders depend on text only through its token count, so the conditioning length is
        computed once per (task, token counts, prompt/video sizes) and reused.
        """
        b = self.builder(row["task"])
        tok = b.tokenizer
        text, prompt_text = row.get("text"), row.get("prompt_text")
        n_text = len(tok.encode(text)) if text else 0
        n_ptext = len(tok.encode(prompt_text)) if prompt_text else 0
        video_size = tuple(row["video_size"]) if row.get("video_size") else None
        key = (row["task"], n_text, n_ptext, row.get("prompt_frames", 0), row.get("video_frames", 0), video_size)
        cond = self._memo.get(key)
        if cond is None:
            C = self.model.num_codebooks
            prompt = torch.zeros(C, row["prompt_frames"], dtype=torch.long) if row.get("prompt_frames") else None
            video = (torch.zeros(row["video_frames"], 3, *video_size, dtype=torch.uint8)
                     if row.get("video_frames") and video_size else None)
            conds = self._conditions(b, text, prompt, prompt_text, video)
            cond = self._memo[key] = len(b.prefix(cond=True, **conds)) - 1  # minus the target's BOS frame
        return cond + int(row["frames"]) + 2 + max(self.model.delays)  # + delayed target segment

    # ------------------------------------------------------------------ sequences
    def rng(self) -> random.Random:
        """Per-process RNG for the condition drop; DataLoader workers re-seed each epoch."""
        key = torch.initial_seed()
        if self._rng is None or key != self._rng_key:
            self._rng, self._rng_key = random.Random(hash((self.seed, key))), key
        return self._rng

    def sequence(self, example: Example):
        b = self.builder(example.task)
        conds = self._conditions(b, example.text, example.prompt_codes, example.prompt_text, example.video)
        drop = None if self.train else False
        return b.build(example.codes, drop_condition=drop, rng=self.rng(), **conds)

    def __call__(self, examples: list[Example]):
        return collate([self.sequence(e) for e in examples], pad_to_multiple_of=self.pad_to_multiple_of)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_builders"], state["_rng"], state["_rng_key"] = {}, None, None  # rebuilt per worker
        return state
