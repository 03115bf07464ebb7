"""k-means++, Lloyd, residual VQ and the frame reservoir against known answers."""

from __future__ import annotations

import pytest
import torch

from unimoe.codecs.kmeans import fit_residual_codebooks, kmeans, kmeans_plus_plus, nearest, rvq_decode, rvq_encode
from unimoe.codecs.spectral_rvq import FrameReservoir


def _blobs(centres: torch.Tensor, per: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(centres.shape[0]).repeat_interleave(per)
    x = centres[labels] + spread * torch.randn(labels.shape[0], centres.shape[1], generator=g)
    perm = torch.randperm(labels.shape[0], generator=g)
    return x[perm], labels[perm]


def test_nearest_matches_brute_force_cdist():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(20000, 7, generator=g), torch.randn(33, 7, generator=g)  # > one chunk of rows
    idx, d2 = nearest(x, c)
    ref = torch.cdist(x.double(), c.double()).pow(2)
    assert torch.equal(idx, ref.argmin(1))
    assert torch.allclose(d2.double(), ref.min(1).values, atol=1e-4)


def test_kmeans_recovers_well_separated_centres():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(12, 5, generator=g) * 20  # far apart relative to spread 0.5
    x, labels = _blobs(centres, 200, 0.5, seed=2)
    found, index = kmeans(x, 12, iters=20, seed=3)
    # every true centre has exactly one found centroid within a few spreads
    dist = torch.cdist(centres, found)
    assert (dist.min(1).values < 0.3).all()
    assert sorted(dist.argmin(1).tolist()) == list(range(12))
    # clustering agrees with the generating labels up to renaming
    mapping = dist.argmin(1)
    assert torch.equal(index, mapping[labels])


def test_kmeans_is_deterministic_per_seed():
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(4))
    a, ia = kmeans(x, 16, iters=5, seed=7)
    b, ib = kmeans(x, 16, iters=5, seed=7)
    c, _ = kmeans(x, 16, iters=5, seed=8)
    assert torch.equal(a, b) and torch.equal(ia, ib)
    assert not torch.equal(a, c)


def test_kmeans_plus_plus_picks_distinct_data_points_and_handles_duplicates():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(5))
    seeds = kmeans_plus_plus(x, 50, torch.Generator().manual_seed(0))
    as_rows = {tuple(r.tolist()) for r in seeds}
    assert len(as_rows) == 50  # D^2 sampling never re-picks a chosen point
    assert all(any(torch.equal(s, p) for p in x) for s in seeds[:5])
    same = torch.ones(40, 3)
    dup = kmeans_plus_plus(same, 4, torch.Generator().manual_seed(0))
    assert torch.equal(dup, torch.ones(4, 3))  # D = 0 everywhere: uniform fallback, no NaN


def test_kmeans_needs_enough_points():
    with pytest.raises(ValueError, match="at least k=10"):
        kmeans(torch.randn(5, 2), 10)


def test_lloyd_never_increases_distortion_versus_seeding():
    x = torch.randn(4000, 6, generator=torch.Generator().manual_seed(6))
    seeded, _ = kmeans(x, 32, iters=0, seed=1)
    fitted, _ = kmeans(x, 32, iters=10, seed=1)
    assert nearest(x, fitted)[1].mean() < nearest(x, seeded)[1].mean()


def test_residual_vq_error_falls_with_each_codebook_and_codes_roundtrip():
    x = torch.randn(5000, 8, generator=torch.Generator().manual_seed(7))
    books = fit_residual_codebooks(x, num_codebooks=4, codebook_size=64, iters=6, seed=0)
    assert books.shape == (4, 64, 8)
    codes = rvq_encode(x, books)
    assert codes.shape == (5000, 4) and codes.min() >= 0 and codes.max() < 64
    errors = [float((x - rvq_decode(codes[:, :c], books[:c])).pow(2).mean()) for c in range(5)]
    assert errors[0] == pytest.approx(float(x.pow(2).mean()))
    assert all(a > b for a, b in zip(errors, errors[1:]))
    # greedy encoding equals a naive per-row loop
    row = x[123]
    residual = row.clone()
    for c in range(4):
        k = int(((books[c] - residual) ** 2).sum(1).argmin())
        assert k == int(codes[123, c])
        residual = residual - books[c][k]


def test_reservoir_sample_is_uniform_and_independent_of_batching():
    rows = torch.arange(10000, dtype=torch.float32)[:, None]
    a = FrameReservoir(1000, torch.Generator().manual_seed(0))
    for chunk in rows.split(37):
        a.add(chunk)
    kept = a.rows()[:, 0]
    assert a.seen == 10000 and kept.shape == (1000,)
    assert kept.unique().numel() == 1000  # without replacement
    # uniform: the kept values' mean and spread match the population's (within ~4 sigma)
    assert abs(float(kept.mean()) - 4999.5) < 4 * 2887 / 1000**0.5
    assert (kept < 5000).sum() == pytest.approx(500, abs=70)
    b = FrameReservoir(1000, torch.Generator().manual_seed(0))
    b.add(rows)  # one batch instead of many: the random keys are the same stream
    assert torch.equal(b.rows(), a.rows())
