"""The LightningDataModule of every training stage: shard sources, a mix, token budgets.

Configured from LightningCLI YAML, e.g. for the joint stage::

    data:
      class_path: UniMoEDataModule
      init_args:
        sources: {speech_en: shards/tts, music: shards/t2m, video_music: shards/v2m}
        mix: balanced
        temperature: 3.0
        max_tokens: 16384

The sequence layout (codebooks, delays, tokenizer, vision encoder, ``max_seq_len``) and the
task ids come from the training stage the data module is attached to
(:meth:`~unimoe.training.stages.StageModule.sequence_layout`): the model config is written
once, in the stage (or comes from its ``init_from`` checkpoint). ``model`` is only for using
the data module on its own (tests, notebooks). Specialists use one source with ``mix: raw``;
the warmup stage uses ``mix: seed`` with a small ``seed_size``. Validation and test iterate every example of their split once, in
order, without condition drop. Under DDP set ``Trainer(use_distributed_sampler=False)``:
the batch sampler shards batches across ranks itself (equal counts on every rank).

The training loader is a :class:`~unimoe.data.resumable.ResumableDataLoader`: a crash
resume (``fit(ckpt_path=...)``) continues the interrupted epoch's batch order exactly
where the checkpoint was written. Validation and test loaders restart every time anyway,
so they carry no state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import lightning as L
import numpy as np
from torch.utils.data import ConcatDataset, DataLoader

from unimoe.data.dataset import DrawnDataset, ShardDataset
from unimoe.data.resumable import ResumableDataLoader
from unimoe.data.sampler import (
    MixtureSampler, SubsetSampler, TokenBudgetBatchSampler, mixture_probabilities, seed_subset,
)
from unimoe.data.sequences import SequenceLayout, SequenceMaker
from unimoe.data.index import open_index
from unimoe.data.shards import CodecMismatchError, compare_codecs
from unimoe.model.config import AudioLMConfig, model_config
from unimoe.model.tasks import TaskIds

log = logging.getLogger(__name__)


class _Split:
    """The datasets of one split, one per source, with lengths that fit the limits.

    Per example it keeps only numpy arrays (lengths, kept positions): a few bytes each,
    never Python objects, so a 5M-example mix stays small in every rank.
    """

    def __init__(self, datasets: dict[str, ShardDataset], maker: SequenceMaker, max_len: int, max_tokens: int) -> None:
        self.names = list(datasets)
        self.kept: dict[str, np.ndarray] = {}
        self.datasets = datasets
        lengths = [maker.lengths(datasets[n]) for n in self.names]
        limit = min(max_len, max_tokens)
        for name, ds, length in zip(self.names, (datasets[n] for n in self.names), lengths):
            ok = length <= limit
            if (~ok).any():
                worst = int(np.argmax(length))
                log.warning("source %r (%s): leaving out %d of %d examples longer than %d tokens (longest: %s, %d tokens)",
                            name, ds.split, int((~ok).sum()), len(ds), limit, ds.row(worst)["id"], int(length[worst]))
            self.kept[name] = np.nonzero(ok)[0].astype(_index_dtype(len(ds)))
        self.concat = ConcatDataset([datasets[n] for n in self.names])
        self.offsets = [0, *np.cumsum([len(datasets[n]) for n in self.names])[:-1].tolist()]
        self.all_lengths = (np.concatenate(lengths) if lengths else np.zeros(0, np.int64)).astype(np.int32)

    @property
    def lengths(self) -> dict[str, np.ndarray]:
        return {n: self.all_lengths[o: o + len(self.datasets[n])] for n, o in zip(self.names, self.offsets)}

    def sizes(self) -> dict[str, int]:
        return {n: len(self.kept[n]) for n in self.names}


def _index_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


class UniMoEDataModule(L.LightningDataModule):
    """Shard sources mixed for a curriculum stage, batched by a token budget.

    Args:
        sources: source name -> shard directory (or several directories of one source).
        model: only without a training stage (standalone use): the ``AudioLMConfig`` or preset
            name to lay sequences out for (task ids then number the data's tasks in name order).
            Under a stage the layout is the stage's; a ``model`` given there must agree with it.
        mix: ``raw`` (natural proportions), ``balanced`` (``weights`` or ``temperature``,
            else equal per source) or ``seed`` (a fixed subset of ``seed_size`` examples,
            balanced like ``balanced``).
        weights: per-source target ratios for ``balanced``/``seed`` (must name every source).
        temperature: ``p ~ n ** (1 / temperature)`` for ``balanced``/``seed`` without weights.
        seed_size: examples in the warmup seed subset (``mix: seed``).
        samples_per_epoch: draws per training epoch (default: all training examples of the
            sources, or the seed subset's size).
        max_tokens: padded tokens per batch (``batch size x longest sequence``).
        max_batch_size: optional cap on examples per batch.
        num_buckets: length buckets of the batch sampler.
        num_workers: DataLoader worker processes.
        train_split / val_split / test_split: shard splits per stage (None: no loader).
        cond_drop_prob: CFG condition-drop probability given to the task builders (training only).
        tasks: extra task-builder arguments per task, e.g. ``{"tts": {"uncond_keep": ["prompt"]}}``.
        codec: the model codec's ``describe()`` (or ``unimoe.data.shards.codec_record(codec)``,
            which adds a weights hash); shards made with another codec are refused.
        seed: seed of every sampling decision (epochs reshuffle deterministically).
        pad_to_multiple_of: round padded lengths up (tensor-core friendly shapes).
        pin_memory: DataLoader pin_memory.
    """

    def __init__(
        self,
        sources: Dict[str, Union[str, List[str]]],
        model: Optional[Union[str, AudioLMConfig, Dict[str, Any]]] = None,
        mix: Literal["raw", "balanced", "seed"] = "raw",
        weights: Optional[Dict[str, float]] = None,
        temperature: Optional[float] = None,
        seed_size: int = 256,
        samples_per_epoch: Optional[int] = None,
        max_tokens: int = 8192,
        max_batch_size: Optional[int] = None,
        num_buckets: int = 8,
        num_workers: int = 0,
        train_split: Optional[str] = "train",
        val_split: Optional[str] = "val",
        test_split: Optional[str] = "test",
        cond_drop_prob: float = 0.1,
        tasks: Optional[Dict[str, Dict[str, Any]]] = None,
        codec: Optional[Dict[str, Any]] = None,
        seed: int = 0,
        pad_to_multiple_of: int = 1,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("UniMoEDataModule needs at least one source (name -> shard directory)")
        self.sources = {name: [str(d)] if isinstance(d, (str, Path)) else [str(x) for x in d] for name, d in sources.items()}
        self.model_config = model_config(model, "UniMoEDataModule.model") if model is not None else None
        self.layout: SequenceLayout | None = None
        mixture_probabilities({n: 1 for n in self.sources}, mix, weights, temperature)  # validate early
        self.mix, self.weights, self.temperature = mix, weights, temperature
        self.seed_size, self.samples_per_epoch = seed_size, samples_per_epoch
        self.max_tokens, self.max_batch_size, self.num_buckets = max_tokens, max_batch_size, num_buckets
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.cond_drop_prob, self.task_args = cond_drop_prob, tasks
        self.expected_codec, self.seed, self.pad_to_multiple_of = codec, seed, pad_to_multiple_of
        self._data: dict[str, _Split] = {}
        self.codec_info: dict[str, Any] | None = None

    # ------------------------------------------------------------------ layout
    def data_tasks(self) -> list[str]:
        """Every task in the sources' shards (any split), in name order; read from the indexes only."""
        tasks = set()
        for dirs in self.sources.values():
            for d in dirs:
                tasks.update(open_index(Path(d)).categories("task"))
        return sorted(tasks)

    def builder_specs(self, tasks: list[str]) -> dict[str, dict[str, Any]]:
        """The task-builder spec of each task as this data module builds it (recorded in checkpoints)."""
        return {t: {"name": t, "cond_drop_prob": self.cond_drop_prob, **(self.task_args or {}).get(t, {})} for t in tasks}

    def resolve_layout(self) -> SequenceLayout:
        """The stage's layout (it also assigns ids to the data's new tasks), else the explicit ``model``'s."""
        if self.layout is not None:
            return self.layout
        tasks = self.data_tasks()
        trainer = getattr(self, "trainer", None)
        stage = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if stage is not None and hasattr(stage, "sequence_layout"):
            layout = stage.sequence_layout(self.builder_specs(tasks))
            diff = [] if self.model_config is None else layout.disagreements(self.model_config)
            if diff:
                raise ValueError(
                    "data.init_args.model disagrees with the stage's model on how sequences are laid out "
                    f"({'; '.join(diff)}); drop data.init_args.model: the data module takes the stage's layout")
        elif self.model_config is not None:
            layout = SequenceLayout(self.model_config, TaskIds(tasks))
        else:
            raise ValueError(
                "UniMoEDataModule has no model to lay sequences out for: attach it to a unimoe training stage "
                "(unimoe fit does), or give model= (a preset name or an AudioLMConfig) to use it on its own")
        self.layout = layout
        return layout

    # ------------------------------------------------------------------ setup
    def maker(self, train: bool) -> SequenceMaker:
        layout = self.resolve_layout()
        return SequenceMaker(layout.config, cond_drop_prob=self.cond_drop_prob, tasks=self.task_args, train=train,
                             pad_to_multiple_of=self.pad_to_multiple_of, seed=self.seed, task_ids=layout.task_ids,
                             task_formats=layout.task_formats)

    def _load(self, which: str) -> _Split | None:
        split = self.splits[which]
        if split is None:
            return None
        if which not in self._data:
            datasets = {}
            for name, dirs in self.sources.items():
                datasets[name] = ShardDataset(dirs, split=split, expected_codec=self.expected_codec)
                self._check_codec(datasets[name])
            self._data[which] = _Split(datasets, self.maker(train=which == "train"), self.resolve_layout().config.max_seq_len,
                                       self.max_tokens)
        return self._data[which]

    def _check_codec(self, ds: ShardDataset) -> None:
        info = ds.codec_info
        if self.codec_info is None:
            cfg = self.resolve_layout().config
            if (info.get("num_codebooks"), info.get("cardinality")) != (cfg.num_codebooks, cfg.codebook_size):
                raise CodecMismatchError(
                    f"{ds.directory}: shards have {info.get('num_codebooks')} codebooks of {info.get('cardinality')} codes, "
                    f"the model expects {cfg.num_codebooks} of {cfg.codebook_size} (AudioLMConfig.num_codebooks/codebook_size)"
                )
            self.codec_info = info
        else:
            compare_codecs(info, self.codec_info, f"{ds.directory} (other sources use another codec)")

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), None: ("train", "val", "test")}
        for which in wanted.get(stage, ()):
            self._load(which)

    # ------------------------------------------------------------------ sampling
    def train_probabilities(self) -> dict[str, float]:
        data = self._load("train")
        return mixture_probabilities(data.sizes(), self.mix, self.weights, self.temperature)

    def train_batch_sampler(self) -> TokenBudgetBatchSampler:
        data = self._load("train")
        if data is None:
            raise ValueError("train_split is None: no training data")
        probs = self.train_probabilities()
        p = [probs[n] for n in data.names]
        local = [data.kept[n] for n in data.names]
        if self.mix == "seed":  # balanced by construction: every subset example equally often
            picked = seed_subset([len(x) for x in local], p, self.seed_size, seed=self.seed)
            subset = np.concatenate([x[sel].astype(np.int64) + o for x, sel, o in zip(local, picked, data.offsets)])
            sampler = SubsetSampler(subset, self.samples_per_epoch, seed=self.seed)
        else:
            n = self.samples_per_epoch or int(sum(len(x) for x in local))
            sampler = MixtureSampler(local, p, num_samples=n, offsets=data.offsets, seed=self.seed)
        world, rank = self._world()
        return TokenBudgetBatchSampler(sampler, data.all_lengths, self.max_tokens, num_buckets=self.num_buckets,
                                       max_batch_size=self.max_batch_size, shuffle=True, seed=self.seed,
                                       num_replicas=world, rank=rank, draws=True)

    def _eval_batch_sampler(self, data: _Split) -> TokenBudgetBatchSampler:
        kept = np.concatenate([data.kept[n].astype(np.int64) + o for n, o in zip(data.names, data.offsets)]) if data.names else np.zeros(0, np.int64)
        world, rank = self._world()
        return TokenBudgetBatchSampler(_Fixed(kept), data.all_lengths, self.max_tokens, num_buckets=self.num_buckets,
                                       max_batch_size=self.max_batch_size, shuffle=False, num_replicas=world, rank=rank)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        if trainer.world_size > 1 and getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False):
            raise RuntimeError("UniMoEDataModule shards batches across ranks itself: "
                               "set Trainer(use_distributed_sampler=False) (trainer.use_distributed_sampler: false)")
        return trainer.world_size, trainer.global_rank

    # ------------------------------------------------------------------ loaders
    def _loader(self, data: _Split, batch_sampler, train: bool) -> DataLoader:
        kwargs: dict[str, Any] = dict(batch_sampler=batch_sampler, collate_fn=self.maker(train=train),
                                      num_workers=self.num_workers, pin_memory=self.pin_memory,
                                      persistent_workers=self.num_workers > 0)
        if train:
            return ResumableDataLoader(DrawnDataset(data.concat), loop_position=self._loop_position, **kwargs)
        return DataLoader(data.concat, **kwargs)

    def _loop_position(self) -> Optional[tuple[int, int]]:
        """The fitting Trainer's ``(current_epoch, batches of it already consumed)``; None outside fit.

        The epoch picks the training order (see :mod:`unimoe.data.resumable` for why not the
        number Lightning passes to ``set_epoch``); the count lets the loader notice a resume
        that cannot continue the interrupted order (a checkpoint without data state).
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None or not getattr(trainer, "training", False):
            return None
        return int(trainer.current_epoch), int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader(self._load("train"), self.train_batch_sampler(), train=True)  # type: ignore[return-value]

    def val_dataloader(self) -> DataLoader | list:
        data = self._load("val")
        return [] if data is None else self._loader(data, self._eval_batch_sampler(data), train=False)

    def test_dataloader(self) -> DataLoader | list:
        data = self._load("test")
        return [] if data is None else self._loader(data, self._eval_batch_sampler(data), train=False)


class _Fixed:
    """A fixed index list as a sampler (evaluation order)."""

    def __init__(self, indices) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        return self.indices

    def __iter__(self):
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)
