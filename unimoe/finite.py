"""Finite-weights check before a checkpoint is written (a NaN checkpoint is worse than none:
it replaces the last good resume point and every later stage starts from garbage)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor


class NonFiniteWeightsError(RuntimeError):
    """A checkpoint was about to be written with NaN/inf weights; it names the tensors."""


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (a plain tensor as is): each rank checks its own shards."""
    return t.to_local() if hasattr(t, "to_local") else t


def nonfinite_tensors(tensors: Iterable[tuple[str, Any]]) -> list[tuple[str, int, int]]:
    """``(name, NaN count, inf count)`` of every floating tensor holding a non-finite value."""
    bad = []
    for name, t in tensors:
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        t = local_tensor(t).detach()
        if t.numel() == 0 or bool(torch.isfinite(t).all()):
            continue
        bad.append((name, int(torch.isnan(t).sum()), int(torch.isinf(t).sum())))
    return bad


def check_finite_weights(state_dict: Mapping[str, Any], what: str,
                         reduce: Callable[[Tensor], Tensor] | None = None) -> None:
    """Raise :class:`NonFiniteWeightsError` if any tensor of ``state_dict`` is not finite.

    ``what`` names the checkpoint in the message. ``reduce`` sums a count over ranks (sharded
    weights: every rank must take the same decision, or the others would hang in the save).
    """
    bad = nonfinite_tensors(state_dict.items())
    total = len(bad)
    if reduce is not None:
        total = int(reduce(torch.tensor(float(total))).item())
    if not total:
        return
    shown = "; ".join(f"{name}: {nan} NaN, {inf} inf" for name, nan, inf in bad[:8]) or "on another rank"
    more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
    raise NonFiniteWeightsError(
        f"refusing to write {what}: {total} weight tensor(s) hold non-finite values ({shown}{more}). "
        "The previous checkpoint is left as it was; resume from it with a lower learning rate, or find "
        "the batch that diverged (NonFiniteGuard warnings name the examples)."
    )
