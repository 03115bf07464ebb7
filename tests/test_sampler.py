"""Mixes and batch sampling: proportions, seed subsets, token budgets, buckets, ranks, epochs."""

import math

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from unimoe.data.sampler import (
    MixtureSampler, OrderedSampler, SubsetSampler, TokenBudgetBatchSampler, mixture_probabilities, seed_subset,
)

SIZES = {"speech_en": 6000, "music": 400, "v2m": 30}


def chi2_df2_critical(alpha):
    """Chi-square with 2 degrees of freedom has survival exp(-x/2): the critical value is -2 ln(alpha)."""
    return -2.0 * math.log(alpha)


def test_mixture_probabilities():
    raw = mixture_probabilities(SIZES, "raw")
    assert raw["speech_en"] == pytest.approx(6000 / 6430)
    bal = mixture_probabilities(SIZES, "balanced", weights={"speech_en": 2, "music": 1, "v2m": 1})
    assert bal == pytest.approx({"speech_en": 0.5, "music": 0.25, "v2m": 0.25})
    t = mixture_probabilities(SIZES, "balanced", temperature=2.0)
    z = sum(math.sqrt(n) for n in SIZES.values())
    assert t == pytest.approx({k: math.sqrt(n) / z for k, n in SIZES.items()})
    assert mixture_probabilities(SIZES, "seed") == pytest.approx({k: 1 / 3 for k in SIZES})
    assert mixture_probabilities({**SIZES, "empty": 0}, "balanced")["empty"] == 0
    with pytest.raises(ValueError, match=r"missing \['v2m'\]"):
        mixture_probabilities(SIZES, "balanced", weights={"speech_en": 1, "music": 1})
    with pytest.raises(ValueError, match="unknown mix"):
        mixture_probabilities(SIZES, "uniform")
    with pytest.raises(ValueError, match="natural proportions"):
        mixture_probabilities(SIZES, "raw", temperature=2.0)


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_mixture_sampler_proportions_pass_chi_square(epoch):
    sizes = list(SIZES.values())
    p = np.array([0.5, 0.3, 0.2])
    n = 30000
    sampler = MixtureSampler([range(s) for s in sizes], p, num_samples=n, seed=11)
    sampler.set_epoch(epoch)
    drawn = np.array(list(sampler))
    assert len(drawn) == n == len(sampler)
    edges = np.cumsum([0] + sizes)
    counts = np.array([((drawn >= edges[i]) & (drawn < edges[i + 1])).sum() for i in range(3)])
    expected = p * n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < chi2_df2_critical(1e-4), (counts, expected)
    # each source is drawn without replacement inside a pass: the 30-item source's items
    # are used equally often (counts differ by at most one)
    small = np.bincount(drawn[drawn >= edges[2]] - edges[2], minlength=30)
    assert small.max() - small.min() <= 1


def test_mixture_sampler_deterministic_per_epoch():
    s = MixtureSampler([range(100), range(10)], [0.5, 0.5], num_samples=200, seed=3)
    a = list(s)
    assert list(s) == a
    s.set_epoch(1)
    assert list(s) != a


def test_seed_subset_is_small_balanced_and_fixed():
    sizes = [5000, 300, 12]
    subset = seed_subset(sizes, [1 / 3] * 3, total=60, seed=0)
    assert [len(x) for x in subset] == [20, 20, 12]  # the small source gives all it has
    assert all(len(set(x.tolist())) == len(x) and x.max() < n for x, n in zip(subset, sizes))
    assert [x.tolist() for x in seed_subset(sizes, [1 / 3] * 3, total=60, seed=0)] == [x.tolist() for x in subset]
    offsets = [0, 5000, 5300]
    sampler = MixtureSampler(subset, [20 / 52, 20 / 52, 12 / 52], num_samples=52, offsets=offsets)
    allowed = {o + int(i) for o, x in zip(offsets, subset) for i in x}
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert set(sampler) <= allowed


def lognormal_lengths(n, seed=0):
    return np.clip(np.random.default_rng(seed).lognormal(5.5, 0.8, n), 8, 3000).astype(int)


def test_token_budget_never_exceeded_and_every_example_used_once():
    lengths = lognormal_lengths(3000)
    bs = TokenBudgetBatchSampler(OrderedSampler(len(lengths), shuffle=True), lengths, max_tokens=4096, num_buckets=8)
    batches = list(bs)
    assert len(batches) == len(bs)
    assert all(len(b) * lengths[b].max() <= 4096 for b in batches)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    # buckets keep padding low compared with batching in arrival order under the same budget
    waste_bucketed = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)
    plain = TokenBudgetBatchSampler(OrderedSampler(len(lengths), shuffle=True), lengths, max_tokens=4096, num_buckets=1)
    waste_plain = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in plain)
    assert waste_bucketed < 0.5 * waste_plain


def test_max_batch_size_and_oversize():
    lengths = np.full(100, 10)
    bs = TokenBudgetBatchSampler(range(100), lengths, max_tokens=10_000, max_batch_size=16, shuffle=False)
    assert [len(b) for b in bs] == [16] * 6 + [4]
    lengths = np.array([10, 5000, 20, 30])
    with pytest.raises(ValueError, match=r"index 1 \(clip-b\) with 5000 tokens"):
        TokenBudgetBatchSampler(range(4), lengths, max_tokens=100, names=["a", "clip-b", "c", "d"])
    bs = TokenBudgetBatchSampler(range(4), lengths, max_tokens=100, oversize="skip", shuffle=False)
    assert bs.num_oversize == 1 and sorted(i for b in bs for i in b) == [0, 2, 3]


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_equal_disjoint_shares(drop_last):
    lengths = lognormal_lengths(500, seed=1)
    sampler = OrderedSampler(500, shuffle=True, seed=5)
    ranks = [TokenBudgetBatchSampler(sampler, lengths, 4096, num_replicas=3, rank=r, drop_last=drop_last, seed=5) for r in range(3)]
    per_rank = [list(r) for r in ranks]
    assert len({len(b) for b in per_rank}) == 1
    whole = list(TokenBudgetBatchSampler(sampler, lengths, 4096, seed=5))
    n = len(whole)
    assert len(per_rank[0]) == (n // 3 if drop_last else math.ceil(n / 3))
    used = [i for r in per_rank for b in r for i in b]
    if drop_last:
        assert len(used) == len(set(used))
    else:
        assert set(used) == set(range(500))


def test_lightning_set_epoch_reaches_the_sampler():
    lengths = lognormal_lengths(200, seed=2)
    mix = MixtureSampler([range(150), range(50)], [0.5, 0.5], num_samples=200, seed=0)
    loader = DataLoader(torch.arange(200), batch_sampler=TokenBudgetBatchSampler(mix, lengths, 4096), collate_fn=list)
    first = [[int(x) for x in b] for b in loader]
    _set_sampler_epoch(loader, 1)  # what Lightning's fit loop calls each epoch
    second = [[int(x) for x in b] for b in loader]
    assert first != second
    _set_sampler_epoch(loader, 0)
    assert [[int(x) for x in b] for b in loader] == first


# ---------------------------------------------------------------------- resume state
def _resumable(kind, num_replicas=1, rank=0, seed=9):
    lengths = lognormal_lengths(300, seed=3)
    if kind == "mixture":
        inner = MixtureSampler([range(200), range(100)], [0.7, 0.3], num_samples=250, seed=seed)
    else:
        inner = SubsetSampler(np.arange(0, 300, 2), num_samples=200, seed=seed)
    return TokenBudgetBatchSampler(inner, lengths, 4096, num_replicas=num_replicas, rank=rank, seed=seed)


def _epochs(sampler, epochs):
    """(epoch, batch) for ``epochs`` the way a training loop drives it: set_epoch, then iterate."""
    out = []
    for e in epochs:
        sampler.set_epoch(e)
        out += [(e, b) for b in sampler]
    return out


@pytest.mark.parametrize("kind", ["mixture", "subset"])
@pytest.mark.parametrize("num_replicas,rank", [(1, 0), (3, 2)])
def test_state_round_trip_continues_a_fresh_iteration(kind, num_replicas, rank):
    reference = _epochs(_resumable(kind, num_replicas, rank), range(3))
    n0 = sum(1 for e, _ in reference if e == 0)
    for cut in (0, 1, n0 // 2, n0, n0 + 2):
        first = _resumable(kind, num_replicas, rank)
        done = 0
        for e in range(3):  # consume `cut` batches, epoch by epoch
            first.set_epoch(e)
            it = iter(first)
            while done < cut:
                try:
                    next(it)
                except StopIteration:
                    break
                done += 1
            if done == cut:
                break
        state = first.state_dict()
        resumed = _resumable(kind, num_replicas, rank)  # a new process: fresh objects
        resumed.load_state_dict(state)
        rest = [(state["epoch"], b) for b in resumed]  # load_state_dict restored the epoch itself
        rest += _epochs(resumed, range(state["epoch"] + 1, 3))
        assert rest == reference[cut:], cut
    # a state at an epoch's end, driven into the next epoch: that epoch from its first batch
    end = _resumable(kind, num_replicas, rank)
    list(end)
    nxt = _resumable(kind, num_replicas, rank)
    nxt.load_state_dict(end.state_dict())
    assert _epochs(nxt, [1]) == [x for x in reference if x[0] == 1]


def test_state_counts_consumed_batches_not_prefetched_ones():
    reference = list(_resumable("mixture"))
    sampler = _resumable("mixture")
    it = iter(sampler)
    for _ in range(5):  # a DataLoader with workers draws ahead ...
        next(it)
    state = sampler.state_dict(consumed=2)  # ... of the two batches the training loop used
    resumed = _resumable("mixture")
    resumed.load_state_dict(state)
    assert list(resumed) == reference[2:]


def test_resume_with_another_world_size_maps_the_position(caplog):
    two = _resumable("mixture", num_replicas=2, rank=0)
    it = iter(two)
    for _ in range(3):
        next(it)
    one = _resumable("mixture")
    one.load_state_dict(two.state_dict())
    with caplog.at_level("WARNING", logger="unimoe.data.sampler"):
        rest = list(one)
    assert rest == list(_resumable("mixture"))[6:]  # 3 batches on each of 2 ranks = the epoch's first 6
    assert "written with 2 ranks, this run has 1" in caplog.text


def test_resume_on_changed_settings_is_reported(caplog):
    saved = _resumable("mixture", seed=9)
    it = iter(saved)
    next(it)
    other = _resumable("mixture", seed=10)
    other.load_state_dict(saved.state_dict())
    with caplog.at_level("WARNING", logger="unimoe.data.sampler"):
        list(other)
    assert "batch plan differs from the checkpoint's" in caplog.text
    with pytest.raises(ValueError, match="state version"):
        other.load_state_dict({**saved.state_dict(), "version": 99})
