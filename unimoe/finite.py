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
    raise_if_nonfinite(nonfinite_tensors(state_dict.items()), what, reduce)


def raise_if_nonfinite(bad: list[tuple[str, int, int]], what: str,
                       reduce: Callable[[Tensor], Tensor] | None = None) -> None:
    """Raise :class:`NonFiniteWeightsError` naming ``bad`` (from :func:`nonfinite_tensors`), if any."""
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


class FiniteCheckedTensors(Mapping):
    """A view of a (lazy) tensor mapping that records the non-finite tensors as they are read, so a
    streaming writer checks each tensor in the same single pass that writes it (:attr:`bad`)."""

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self.tensors = tensors
        self.bad: list[tuple[str, int, int]] = []

    def __getitem__(self, key: str) -> Any:
        value = self.tensors[key]
        self.bad.extend(nonfinite_tensors([(key, value)]))
        return value

    def shape_of(self, key: str) -> tuple[int, ...]:
        """From the wrapped mapping's header when it is lazy: planning a file reads no tensor."""
        from unimoe.safetensors_io import tensor_shape

        return tensor_shape(self.tensors, key)

    def dtype_of(self, key: str) -> torch.dtype:
        from unimoe.safetensors_io import tensor_dtype

        return tensor_dtype(self.tensors, key)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)
