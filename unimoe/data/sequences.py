"""From examples to model batches: the registered task builders lay out each example as a
:class:`~unimoe.model.tasks.Sequence` (with its task id on every position and the CFG
condition drop), and :func:`~unimoe.model.tasks.collate` pads them into a ``Batch``.

:meth:`SequenceMaker.length` gives the exact sequence length of an index row without
loading its codes, so the token-budget sampler can plan batches before any shard is read.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Mapping

import torch

from unimoe.data.dataset import Example


class SequenceMaker:
    """Builds sequences for every task found in the data; used as the DataLoader's ``collate_fn``.

    ``model`` is the model's :class:`~unimoe.model.config.AudioLMConfig` (codebooks,
    delays, tokenizer, vision encoder, ``max_seq_len``). ``cond_drop_prob`` is passed to
    every task builder (classifier-free guidance training); ``train=False`` never drops.
    ``tasks`` gives extra builder arguments per task, e.g. ``{"tts": {"uncond_keep": ["prompt"]}}``.

    The condition drop of an example is drawn from :func:`draw_rng` of its training draw
    (``Example.draw``: epoch and position in the epoch's draws), never from a per-process
    stream: a resumed run, or one with another number of workers or ranks, drops the
    conditions of exactly the same examples. An example without a draw (built outside the
    data module's training loader) gets a choice derived from ``(seed, id)``.
    """

    def __init__(
        self,
        model: Any,
        cond_drop_prob: float = 0.1,
        tasks: Mapping[str, Mapping[str, Any]] | None = None,
        train: bool = True,
        pad_to_multiple_of: int = 1,
        seed: int = 0,
    ) -> None:
        self.model = model
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
            from unimoe.model.tasks import build_task_builder

            spec = {"name": task, "cond_drop_prob": self.cond_drop_prob, **self.task_args.get(task, {})}
            b = self._builders[task] = build_task_builder(spec, self.model)
        return b

    @staticmethod
    def _accepted(builder) -> set[str]:
        return set(builder.conditions) | set(getattr(builder, "extra_inputs", ()))

    def _conditions(self, builder, text, prompt, prompt_text, video) -> dict[str, Any]:
        given = {"text": text, "prompt": prompt, "prompt_text": prompt_text, "video": video}
        accepted = self._accepted(builder)
        return {k: v for k, v in given.items() if v is not None and k in accepted}

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
        from unimoe.model.tasks import collate

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
