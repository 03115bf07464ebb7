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

Resuming mid-epoch: because the order is a pure function of ``(seed, epoch)``, the whole
sampling state is the epoch plus the position in that epoch's batch order - there is no
live RNG stream to save. ``state_dict()`` / ``load_state_dict()`` on every sampler carry
that (and a digest of the epoch's plan, so a resume on changed data or settings is
reported instead of silently drawing other examples); :mod:`unimoe.data.resumable` puts it
into Lightning checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
from torch.utils.data import Sampler

log = logging.getLogger(__name__)

MIXES = ("raw", "balanced", "seed")
STATE_VERSION = 1
"""Version of :meth:`TokenBudgetBatchSampler.state_dict`'s layout (stored in checkpoints)."""


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


class Draw(NamedTuple):
    """One example drawn for training: its global ``index``, the ``epoch`` and the draw's
    ``position`` in that epoch's stream of draws (before batching).

    Every random choice made for the example (the CFG condition drop) is derived from
    ``(seed, epoch, position, index)``, so it is the same in a resumed run, with any number
    of DataLoader workers and on any rank; an example drawn twice in an epoch gets two
    independent choices.
    """

    index: int
    epoch: int
    position: int


class _EpochState:
    """``state_dict`` / ``load_state_dict`` of an index sampler that is a pure function of ``(seed, epoch)``.

    The numpy generators are re-created from ``[seed, epoch, k]`` on every ``__iter__``, so
    the epoch is the only mutable state; seed and size are stored so a changed
    configuration can be named when a resume does not match.
    """

    seed: int
    epoch: int

    def state_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "epoch": int(self.epoch), "seed": self.seed,
                "num_samples": len(self)}  # type: ignore[arg-type]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))  # type: ignore[attr-defined]


class MixtureSampler(_EpochState, Sampler[int]):
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

    def order(self) -> np.ndarray:
        """This epoch's global indices as one int64 array (what ``__iter__`` yields)."""
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
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.num_samples


class OrderedSampler(_EpochState, Sampler[int]):
    """Every index once, in order or reshuffled per epoch (validation, test, single source)."""

    def __init__(self, size: int, shuffle: bool = False, seed: int = 0) -> None:
        self.size, self.shuffle, self.seed, self.epoch = int(size), shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        return np.arange(self.size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.size


class SubsetSampler(_EpochState, Sampler[int]):
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

    def order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, 4])
        passes = math.ceil(self.num_samples / self.indices.size)
        order = np.concatenate([self.indices[rng.permutation(self.indices.size)] for _ in range(passes)])
        return order[: self.num_samples]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.num_samples


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Dynamic batches: padded tokens ``len(batch) * max(length in batch) <= max_tokens``.

    Indices from ``sampler`` go to one of ``num_buckets`` length buckets (quantile
    boundaries of ``lengths``); a bucket is emitted as a batch when the next index would
    break the budget (or ``max_batch_size``). Batch order is shuffled per epoch when
    ``shuffle``. With ``num_replicas`` > 1 every rank gets the same number of batches
    (``drop_last`` drops the remainder, otherwise the first batches are repeated).

    With ``draws=True`` a batch is a list of :class:`Draw` (index, epoch, position in the
    epoch's draws) instead of plain indices, for datasets that derive per-example randomness
    from it (:class:`~unimoe.data.dataset.DrawnDataset`).

    An example longer than ``max_tokens`` cannot form any batch: ``oversize="error"``
    (default) refuses at construction, naming it; ``"skip"`` leaves it out and counts it
    in ``num_oversize``.

    Resumable: :meth:`state_dict` records the epoch and how many of this rank's batches of
    it were consumed; after :meth:`load_state_dict` the next iteration of that epoch starts
    right after them, and an iteration of the following epoch starts at its beginning (a
    checkpoint written at an epoch's end). Iteration is lazy (a generator), so ``set_epoch``
    called after ``iter()`` but before the first ``next()`` still takes effect.
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
        draws: bool = False,
    ) -> None:
        self.sampler = sampler
        self.draws = draws
        self.lengths = np.asarray(lengths)
        if self.lengths.dtype.kind not in "iu":
            self.lengths = self.lengths.astype(np.int64)
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
        self._oversize_mask = self.lengths > max_tokens
        self.max_tokens = int(max_tokens)
        self.max_batch_size = max_batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        fitting = self.lengths[self.lengths <= max_tokens]
        qs = np.linspace(0, 1, max(1, num_buckets) + 1)[1:-1]
        self.boundaries = np.unique(np.quantile(fitting, qs).astype(np.int64)) if fitting.size else np.zeros(0, np.int64)
        self._cache: tuple[int, _BatchPlan] | None = None
        self._digest: tuple[int, str] | None = None
        # the latest iteration: epoch, first position, batches yielded so far (incl. skipped), plan
        self._record: dict[str, Any] | None = None
        # a loaded state, applied (then dropped) when the next iteration starts
        self._pending: dict[str, Any] | None = None

    @property
    def num_oversize(self) -> int:
        return int(self._oversize_mask.sum())

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _all_batches(self) -> "_BatchPlan":
        """Every rank's batches for the current epoch (identical on all ranks)."""
        epoch = self.epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        order = self.sampler.order() if hasattr(self.sampler, "order") else np.fromiter(iter(self.sampler), np.int64)
        plan = _plan_batches(np.asarray(order, dtype=np.int64), self.lengths, self.boundaries, self.max_tokens,
                             self.max_batch_size, self._oversize_mask)
        if self.shuffle:
            plan = plan.take(np.random.default_rng([self.seed, epoch, 3]).permutation(len(plan)))
        self._cache = (epoch, plan)
        return plan

    def _rank_batches(self) -> np.ndarray:
        """Numbers (into the epoch's plan) of this rank's batches, in order."""
        n = len(self._all_batches())
        R = self.num_replicas
        if R == 1:
            return np.arange(n)
        if self.drop_last:
            per_rank = n // R
        else:
            per_rank = math.ceil(n / R)  # the first batches repeat so every rank runs the same number of steps
        ids = np.arange(per_rank * R) % max(n, 1) if n else np.zeros(0, np.int64)
        return ids[self.rank: per_rank * R: R]

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[Draw]]:
        plan = self._all_batches()
        mine = self._rank_batches()
        epoch = self.epoch
        start = self._resume_position(epoch, len(mine))
        record = self._record = {"epoch": epoch, "start": start, "yielded": start, "num_batches": len(mine),
                                 "plan": self.plan_digest()}
        for i in range(start, len(mine)):
            record["yielded"] = i + 1
            if self.draws:
                yield [Draw(index, epoch, position) for index, position in plan.draws(int(mine[i]))]
            else:
                yield plan.batch(int(mine[i]))

    def __len__(self) -> int:
        return len(self._rank_batches())

    # ------------------------------------------------------------------ resume
    def plan_digest(self) -> str:
        """A digest of the current epoch's global batch list (the same on every rank).

        Stored with the position: a resume whose plan differs (other shards, seed, budget,
        mix) cannot continue "the same" epoch, and says so instead of silently drawing
        other examples.
        """
        epoch = self.epoch
        if self._digest is None or self._digest[0] != epoch:
            plan = self._all_batches()
            h = hashlib.blake2b(digest_size=8)
            h.update(plan.sizes().astype(np.int64).tobytes())
            h.update(plan.indices.astype(np.int64).tobytes())
            self._digest = (epoch, h.hexdigest())
        return self._digest[1]

    @property
    def started_at(self) -> tuple[int, int] | None:
        """``(epoch, position)`` where the latest iteration began (None before any)."""
        return None if self._record is None else (self._record["epoch"], self._record["start"])

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The sampling state: the epoch and how many of this rank's batches of it were consumed.

        ``consumed``: batches of the latest iteration its consumer actually used. Default: all
        this sampler handed out - a DataLoader with worker processes draws batches ahead of
        the training loop, so it passes its own count. Before any iteration the state is the
        loaded one (if any), else the current epoch at position 0. The seeds' generators are
        re-created from ``(seed, epoch)`` every epoch, so no RNG state needs saving.
        """
        if self._record is not None:
            r = self._record
            position = r["yielded"] if consumed is None else min(r["start"] + int(consumed), r["num_batches"])
            epoch, num_batches, plan = r["epoch"], r["num_batches"], r["plan"]
        elif self._pending is not None:
            return dict(self._pending)
        else:
            epoch, position, num_batches, plan = self.epoch, 0, len(self), self.plan_digest()
        inner = None
        if hasattr(self.sampler, "state_dict"):
            inner = {**self.sampler.state_dict(), "epoch": epoch}  # type: ignore[union-attr]
        return {"version": STATE_VERSION, "epoch": int(epoch), "position": int(position),
                "num_batches": int(num_batches), "num_replicas": self.num_replicas, "rank": self.rank,
                "seed": self.seed, "max_tokens": self.max_tokens, "plan": plan, "sampler": inner}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (:meth:`state_dict` of this or an identically configured sampler).

        Sets the epoch (so the sampler is right even if nobody calls ``set_epoch``) and
        remembers the position for the next iteration. Each rank keeps its own rank: the
        saved position is per rank and equal on all ranks.
        """
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"unknown batch-sampler state version {version!r} (this code reads {STATE_VERSION}): {dict(state)}")
        inner = state.get("sampler")
        if inner is not None and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(inner)  # type: ignore[union-attr]
        else:
            self.set_epoch(int(state["epoch"]))
        self._pending = dict(state)
        self._record = None

    def _resume_position(self, epoch: int, num_batches: int) -> int:
        """Where an iteration of ``epoch`` starts: after the loaded state's position if it is that epoch's."""
        saved, self._pending = self._pending, None
        if saved is None:
            return 0
        saved_epoch, position = int(saved["epoch"]), int(saved["position"])
        if epoch != saved_epoch:
            finished = position >= int(saved["num_batches"])
            if epoch == saved_epoch + 1 and finished:
                return 0  # checkpoint written at an epoch's end: the next epoch starts fresh
            level = logging.INFO if epoch == saved_epoch + 1 else logging.WARNING
            log.log(level, "training data: the checkpoint stopped at batch %d of %d of epoch %d, but training continues "
                    "with epoch %d; it starts at its first batch", position, saved["num_batches"], saved_epoch, epoch)
            return 0
        if int(saved["num_replicas"]) != self.num_replicas:
            # ranks take batches round robin: p batches per rank of R ranks = the first p * R of the epoch
            converted = position * int(saved["num_replicas"]) // self.num_replicas
            log.warning("training data: the checkpoint was written with %d ranks, this run has %d; resuming epoch %d "
                        "at batch %d per rank (approximate: up to %d batches are repeated)", saved["num_replicas"],
                        self.num_replicas, epoch, converted, self.num_replicas - 1)
            position = converted
        if saved.get("plan") != self.plan_digest():
            log.warning("training data: epoch %d's batch plan differs from the checkpoint's (shards, seed, mix, token "
                        "budget or buckets changed: saved seed %s max_tokens %s sampler %s; now seed %s max_tokens %s "
                        "sampler %s); skipping its first %d batches anyway, but this is not the interrupted run's order",
                        epoch, saved.get("seed"), saved.get("max_tokens"), saved.get("sampler"), self.seed,
                        self.max_tokens, getattr(self.sampler, "state_dict", lambda: None)(), position)
        if position:
            log.info("training data: resuming epoch %d after batch %d of %d", epoch, min(position, num_batches), num_batches)
        return min(position, num_batches)


class _BatchPlan:
    """An epoch's batches as flat arrays (indices, their stream positions, batch starts), not lists of Python ints.

    At millions of examples per epoch the list form cost ~36 bytes per index in every rank;
    this costs 16. ``positions[k]`` is where ``indices[k]`` was in the sampler's stream
    (the :class:`Draw` position).
    """

    def __init__(self, indices: np.ndarray, starts: np.ndarray, positions: np.ndarray) -> None:
        # batch b = indices[starts[b]:starts[b + 1]], drawn at positions[starts[b]:starts[b + 1]]
        self.indices, self.starts, self.positions = indices, starts, positions

    def __len__(self) -> int:
        return len(self.starts) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)

    def batch(self, b: int) -> list[int]:
        return self.indices[self.starts[b]: self.starts[b + 1]].tolist()

    def draws(self, b: int) -> list[tuple[int, int]]:
        """Batch ``b`` as (index, stream position) pairs."""
        span = slice(self.starts[b], self.starts[b + 1])
        return list(zip(self.indices[span].tolist(), self.positions[span].tolist()))

    def take(self, order: np.ndarray) -> "_BatchPlan":
        """The batches in ``order``."""
        sizes = self.sizes()[order]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if not len(order):
            return _BatchPlan(self.indices[:0], starts, self.positions[:0])
        # gather each batch's run of indices: position p of new batch k comes from old start + p
        first = np.repeat(self.starts[:-1][order] - starts[:-1], sizes)
        gather = np.arange(starts[-1]) + first
        return _BatchPlan(self.indices[gather], starts, self.positions[gather])


def _plan_batches(order: np.ndarray, lengths: np.ndarray, boundaries: np.ndarray, max_tokens: int,
                  max_batch_size: int | None, oversize: np.ndarray) -> _BatchPlan:
    """Cut an index stream into token-budget batches, bucket by bucket.

    The same batches, in the same order, as feeding the stream one index at a time into
    per-bucket accumulators: a bucket's batch is emitted when its next index would break the
    budget (``(n + 1) * max length > max_tokens``) or ``max_batch_size``; the partly filled
    buckets follow at the end in bucket order. Each bucket is cut on its own (one pass over
    its lengths), and batches are then ordered by the stream position that closed them.
    """
    stream_positions = np.nonzero(~oversize[order])[0]  # positions count the skipped oversize draws too
    order = order[stream_positions]
    stream_lengths = lengths[order].astype(np.int64)
    bucket_of = np.searchsorted(boundaries, stream_lengths, side="left")
    chunks, chunk_positions, keys = [], [], []
    end_key = len(order)  # partial buckets sort after every closed batch, in bucket order
    for b in np.unique(bucket_of):
        where = np.nonzero(bucket_of == b)[0]  # stream positions of this bucket, in order
        cuts = _greedy_cuts(stream_lengths[where].tolist(), max_tokens, max_batch_size)
        bounds = [0, *cuts, len(where)]
        for k in range(len(bounds) - 1):
            chunks.append(order[where[bounds[k]: bounds[k + 1]]])
            chunk_positions.append(stream_positions[where[bounds[k]: bounds[k + 1]]])
            keys.append(int(where[bounds[k + 1]]) if k < len(cuts) else end_key + int(b))
    ranked = np.argsort(np.asarray(keys, dtype=np.int64), kind="stable")
    sizes = np.asarray([len(chunks[i]) for i in ranked], dtype=np.int64)
    indices = np.concatenate([chunks[i] for i in ranked]) if chunks else np.zeros(0, np.int64)
    positions = np.concatenate([chunk_positions[i] for i in ranked]) if chunks else np.zeros(0, np.int64)
    return _BatchPlan(indices, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), positions)


def _greedy_cuts(lengths: list[int], max_tokens: int, max_batch_size: int | None) -> list[int]:
    """Positions where a new batch starts in one bucket's length sequence."""
    cuts = []
    count = longest = 0
    cap = max_batch_size if max_batch_size is not None else math.inf
    for j, length in enumerate(lengths):
        new_max = length if length > longest else longest
        if count and ((count + 1) * new_max > max_tokens or count >= cap):
            cuts.append(j)
            count, new_max = 0, length
        count += 1
        longest = new_max
    return cuts
