"""Residual k-means codebooks: k-means++ seeding and Lloyd iterations in vectorised torch.

Used by the ``spectral_rvq`` codec, which fits its codebooks on the user's corpus instead of
downloading weights. Everything is deterministic for a given ``seed`` (one
``torch.Generator`` drives every random choice) and works in bounded memory: distances are
computed in row chunks so ``N x K`` is never materialised for large ``N``.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["nearest", "kmeans_plus_plus", "kmeans", "fit_residual_codebooks", "rvq_encode", "rvq_decode"]

_CHUNK_ROWS = 8192


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and squared distance of the closest centroid for each row.

    ``x [N, D]``, ``centroids [K, D]`` -> ``(index [N] int64, dist2 [N])``.
    """
    c_sq = centroids.pow(2).sum(1)  # [K]
    indices, dists = [], []
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        rows = x[start : start + _CHUNK_ROWS]  # [n, D]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2 ; the |x|^2 term does not change the argmin.
        d = c_sq[None, :] - 2.0 * rows @ centroids.T  # [n, K]
        best, idx = d.min(dim=1)
        indices.append(idx)
        dists.append((best + rows.pow(2).sum(1)).clamp_min(0.0))
    return torch.cat(indices), torch.cat(dists)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre is drawn with probability proportional to D(x)^2.

    ``x [N, D]`` -> ``centroids [k, D]``. When every point already coincides with a centre
    (D = 0 everywhere, e.g. a corpus of identical frames), the rest are drawn uniformly.
    """
    n = x.shape[0]
    x_sq = x.pow(2).sum(1)  # [N]; |x - c|^2 = |x|^2 - 2 x.c + |c|^2 keeps each step one mat-vec
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype)
    dist2 = torch.full((n,), float("inf"), dtype=x.dtype)  # [N] distance to the closest chosen centre
    pick = int(torch.randint(n, (1,), generator=generator))
    for i in range(k):
        if i > 0:
            total = float(dist2.sum())
            if total > 0.0:
                pick = int(torch.multinomial(dist2 / total, 1, generator=generator))
            else:
                pick = int(torch.randint(n, (1,), generator=generator))
        centre = x[pick]
        centroids[i] = centre
        dist2 = torch.minimum(dist2, (x_sq - 2.0 * (x @ centre) + x_sq[pick]).clamp_min(0.0))
    return centroids


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 10,
    seed: int = 0,
    init_sample: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``k`` centroids to ``x [N, D]``; returns ``(centroids [k, D], index [N])``.

    Seeding runs k-means++ on a random subset of ``init_sample`` rows (default ``16 k``)
    because its k sequential steps dominate the cost on large ``N``; Lloyd iterations then
    use every row. A centroid that loses all its points is moved to the point that is
    currently worst served, so no codeword is wasted.
    """
    n, _ = x.shape
    if k < 1:
        raise ValueError(f"k-means needs k >= 1, got {k}")
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}; give more audio or a smaller codebook")
    generator = torch.Generator().manual_seed(seed)
    x = x.float()
    m = min(n, init_sample if init_sample is not None else 16 * k)
    subset = x if m == n else x[torch.randperm(n, generator=generator)[:m]]
    centroids = kmeans_plus_plus(subset, k, generator)
    index, dist2 = nearest(x, centroids)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, index, x)  # [k, D]
        counts = torch.bincount(index, minlength=k)  # [k]
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        empty = (~filled).nonzero().flatten()
        if empty.numel():
            worst = dist2.argsort(descending=True)[: empty.numel()]
            centroids[empty] = x[worst]
        new_index, dist2 = nearest(x, centroids)
        converged = torch.equal(new_index, index)
        index = new_index
        if converged:  # assignments are a fixed point: further iterations change nothing
            break
    return centroids, index


def fit_residual_codebooks(
    x: torch.Tensor,
    num_codebooks: int,
    codebook_size: int,
    iters: int = 10,
    seed: int = 0,
    on_codebook: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Residual k-means: codebook ``c`` is fitted to what codebooks ``< c`` left over.

    ``x [N, D]`` -> ``codebooks [C, K, D]``. ``on_codebook(c)`` is called after each stage
    (progress reporting).
    """
    residual = x.float().clone()
    books = []
    for c in range(num_codebooks):
        centroids, index = kmeans(residual, codebook_size, iters=iters, seed=seed + c)
        residual -= centroids[index]
        books.append(centroids)
        if on_codebook is not None:
            on_codebook(c)
    return torch.stack(books)


def rvq_encode(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Greedy residual quantisation: ``x [N, D]``, ``codebooks [C, K, D]`` -> ``codes [N, C]``."""
    residual = x.float().clone()
    codes = []
    for book in codebooks:
        index, _ = nearest(residual, book)
        residual -= book[index]
        codes.append(index)
    return torch.stack(codes, dim=1) if codes else torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device)


def rvq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Sum of the chosen codewords: ``codes [N, C]`` -> ``[N, D]``."""
    out = torch.zeros(codes.shape[0], codebooks.shape[-1], dtype=codebooks.dtype, device=codebooks.device)
    for c in range(codes.shape[1]):
        out += codebooks[c][codes[:, c]]
    return out
