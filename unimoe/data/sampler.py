"""Sampling: which examples an epoch draws (mixes), and how they are cut into batches.

* :func:`mixture_probabilities` - per-source probabilities for the curriculum's mixes:
  ``raw`` (natural proportions: specialists), ``balanced`` (explicit weights or temperature
  ``p ~ n^(1/T)``), ``seed`` (the balanced mix over a small fixed subset: warmup).
* :class:`MixtureSampler` - an epoch of ``num_samples`` global indices: each draw picks a
  source with its probability, then the next example of that source's reshuffled cycle
  (without replacement inside a pass, so small sources repeat evenly).
* :func:`seed_subset` / :class:`SubsetSampler` - the fixed small balanced subset for
  warmup, each example used equally often.
* :class:`TokenBudgetBatchSampler` - cuts any index stream into batches whose padded size
  ``len(batch) * max(length)`` stays within a token budget, grouping similar lengths in
  buckets so little of the budget is padding; shards batches across ranks.

Everything is a pure function of ``(seed, epoch)``, so every rank computes the same epoch
and takes its own slice. Lightning calls ``set_epoch`` on ``batch_sampler.sampler``; the
batch sampler reads the epoch from there.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Sampler

MIXES = ("raw", "balanced", "seed")


def mixture_probabilities(
    sizes: Mapping[str, int],
    mix: str = "raw",
    weights: Mapping[str, float] | None = None,
    temperature: float | None = None,
) -> dict[str, float]:
    """Per-source sampling probabilities for a mix (sources with no examples get 0).

    ``raw``: proportional to size. ``balanced`` / ``seed``: proportional to ``weights``
    when given, else to ``size ** (1 / temperature)`` when given, else equal.
    """
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; use one of {', '.join(MIXES)}")
    names = list(sizes)
    if not names:
        raise ValueError("no data sources given")
    if mix == "raw":
        if weights or temperature:
            raise ValueError("mix 'raw' uses natural proportions; weights/temperature need mix 'balanced' or 'seed'")
        raw = {n: float(sizes[n]) for n in names}
    elif weights:
        unknown = sorted(set(weights) - set(names))
        missing = sorted(set(names) - set(weights))
        if unknown or missing:
            raise ValueError(f"weights must name every source exactly: unknown {unknown}, missing {missing}; sources: {names}")
        if any(not (w >= 0 and math.isfinite(w)) for w in weights.values()):
            raise ValueError(f"weights must be non-negative finite numbers, got {dict(weights)}")
        raw = {n: float(weights[n]) if sizes[n] > 0 else 0.0 for n in names}
    elif temperature is not None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        raw = {n: float(sizes[n]) ** (1.0 / temperature) if sizes[n] > 0 else 0.0 for n in names}
    else:
        raw = {n: 1.0 if sizes[n] > 0 else 0.0 for n in names}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"every source is empty or has weight 0 (sizes {dict(sizes)})")
    return {n: raw[n] / total for n in names}


def seed_subset(sizes: Sequence[int], probabilities: Sequence[float], total: int, seed: int = 0) -> list[np.ndarray]:
    """A fixed subset of about ``total`` examples split across sources by ``probabilities``.

    Returns, per source, the chosen local indices (sorted). A source smaller than its
    quota gives all it has (the subset is then smaller than ``total``).
    """
    if total < 1:
        raise ValueError(f"seed subset size must be >= 1, got {total}")
    quotas = _largest_remainder(probabilities, total)
    rng = np.random.default_rng([seed, 0x5EED])
    out = []
    for size, quota in zip(sizes, quotas):
        take = min(size, quota)
        out.append(np.sort(rng.permutation(size)[:take]))
    return out


def _largest_remainder(probabilities: Sequence[float], total: int) -> list[int]:
    exact = [p * total for p in probabilities]
    base = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: exact[i] - base[i], reverse=True)
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


class MixtureSampler(Sampler[int]):
    """``num_samples`` global indices per epoch drawn from several sources by probability.

    ``sources`` are the sources' local index lists (e.g. ``range(n)`` or a seed subset);
    global index = ``offsets[s] + local``. Deterministic in ``(seed, epoch)``.
    """

    def __init__(
        self,
        sources: Sequence[Sequence[int] | np.ndarray],
        probabilities: Sequence[float],
        num_samples: int,
        offsets: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        if len(sources) != len(probabilities):
            raise ValueError(f"{len(sources)} sources but {len(probabilities)} probabilities")
        p = np.asarray(probabilities, dtype=np.float64)
        if (p < 0).any() or not np.isclose(p.sum(), 1.0):
            raise ValueError(f"probabilities must be >= 0 and sum to 1, got {list(probabilities)}")
        for s, (src, prob) in enumerate(zip(sources, p)):
            if prob > 0 and len(src) == 0:
                raise ValueError(f"source {s} has probability {prob:.3f} but no examples")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.sources = [np.asarray(src, dtype=np.int64) for src in sources]
        self.probabilities = p / p.sum()
        self.num_samples = int(num_samples)
        if offsets is None:
            offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])[:-1]]).tolist()
        self.offsets = [int(o) for o in offsets]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def draw_sources(self) -> np.ndarray:
        """The source of each draw of this epoch (i.i.d. by probability)."""
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        return rng.choice(len(self.sources), size=self.num_samples, p=self.probabilities)

    def __iter__(self) -> Iterator[int]:
        choice = self.draw_sources()
        rng = np.random.default_rng([self.seed, self.epoch, 2])
        out = np.empty(self.num_samples, dtype=np.int64)
        for s, src in enumerate(self.sources):
            where = np.nonzero(choice == s)[0]
            if where.size == 0:
                continue
            passes = math.ceil(where.size / len(src))
            cycle = np.concatenate([src[rng.permutation(len(src))] for _ in range(passes)])[: where.size]
            out[where] = cycle + self.offsets[s]
        return iter(out.tolist())

    def __len__(self) -> int:
        return self.num_samples


class OrderedSampler(Sampler[int]):
    """Every index once, in order or reshuffled per epoch (validation, test, single source)."""

    def __init__(self, size: int, shuffle: bool = False, seed: int = 0) -> None:
        self.size, self.shuffle, self.seed, self.epoch = int(size), shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist())
        return iter(range(self.size))

    def __len__(self) -> int:
        return self.size


class SubsetSampler(Sampler[int]):
    """A fixed index set, reshuffled each epoch, cycled to ``num_samples`` (default: once each).

    The warmup stage's seed subset is balanced by construction, so an epoch uses each of
    its examples equally often instead of drawing sources at random.
    """

    def __init__(self, indices: Sequence[int] | np.ndarray, num_samples: int | None = None, seed: int = 0) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.size == 0:
            raise ValueError("SubsetSampler got no indices")
        self.num_samples = int(num_samples or self.indices.size)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 4])
        passes = math.ceil(self.num_samples / self.indices.size)
        order = np.concatenate([self.indices[rng.permutation(self.indices.size)] for _ in range(passes)])
        return iter(order[: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Dynamic batches: padded tokens ``len(batch) * max(length in batch) <= max_tokens``.

    Indices from ``sampler`` go to one of ``num_buckets`` length buckets (quantile
    boundaries of ``lengths``); a bucket is emitted as a batch when the next index would
    break the budget (or ``max_batch_size``). Batch order is shuffled per epoch when
    ``shuffle``. With ``num_replicas`` > 1 every rank gets the same number of batches
    (``drop_last`` drops the remainder, otherwise the first batches are repeated).

    An example longer than ``max_tokens`` cannot form any batch: ``oversize="error"``
    (default) refuses at construction, naming it; ``"skip"`` leaves it out and counts it
    in ``num_oversize``.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterable[int],
        lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        *,
        num_buckets: int = 8,
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        oversize: str = "error",
        names: Sequence[str] | None = None,
    ) -> None:
        self.sampler = sampler
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        if oversize not in ("error", "skip"):
            raise ValueError(f"oversize must be 'error' or 'skip', got {oversize!r}")
        too_long = np.nonzero(self.lengths > max_tokens)[0]
        if too_long.size and oversize == "error":
            i = int(too_long[0])
            name = f" ({names[i]})" if names is not None else ""
            raise ValueError(
                f"{too_long.size} example(s) are longer than max_tokens={max_tokens}, e.g. index {i}{name} with "
                f"{int(self.lengths[i])} tokens; raise max_tokens, lower --max-seconds at tokenisation, or use oversize='skip'"
            )
        self.oversize = set(too_long.tolist())
        self.max_tokens = int(max_tokens)
        self.max_batch_size = max_batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        fitting = self.lengths[self.lengths <= max_tokens]
        qs = np.linspace(0, 1, max(1, num_buckets) + 1)[1:-1]
        self.boundaries = np.unique(np.quantile(fitting, qs).astype(np.int64)) if fitting.size else np.zeros(0, np.int64)
        self._cache: tuple[int, list[list[int]]] | None = None

    @property
    def num_oversize(self) -> int:
        return len(self.oversize)

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def padded_tokens(self, batch: Sequence[int]) -> int:
        return len(batch) * int(self.lengths[list(batch)].max())

    def _all_batches(self) -> list[list[int]]:
        """Every rank's batches for the current epoch (identical on all ranks)."""
        epoch = self.epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        buckets: dict[int, list[int]] = {}
        longest: dict[int, int] = {}
        batches: list[list[int]] = []
        for index in self.sampler:
            if index in self.oversize:
                continue
            length = int(self.lengths[index])
            b = int(np.searchsorted(self.boundaries, length, side="left"))
            current = buckets.setdefault(b, [])
            new_max = max(longest.get(b, 0), length)
            full = self.max_batch_size is not None and len(current) >= self.max_batch_size
            if current and ((len(current) + 1) * new_max > self.max_tokens or full):
                batches.append(current)
                current = buckets[b] = []
                new_max = length
            current.append(index)
            longest[b] = new_max
        batches.extend(buckets[b] for b in sorted(buckets) if buckets[b])
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 3]).permutation(len(batches))
            batches = [batches[i] for i in order]
        self._cache = (epoch, batches)
        return batches

    def _rank_batches(self) -> list[list[int]]:
        batches = self._all_batches()
        R = self.num_replicas
        if R == 1:
            return batches
        if self.drop_last:
            per_rank = len(batches) // R
        else:
            per_rank = math.ceil(len(batches) / R)
            if batches:  # repeat from the start so every rank runs the same number of steps
                batches = batches + [batches[i % len(batches)] for i in range(per_rank * R - len(batches))]
        return batches[self.rank: per_rank * R: R]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._rank_batches())

    def __len__(self) -> int:
        return len(self._rank_batches())
