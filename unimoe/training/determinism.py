"""Forward-pass randomness of a training step as a pure function of where the step is.

Anything random inside the model's forward (the routers' input jitter today, dropout if a
plug-in adds it) draws from torch's global generator. That generator is per process and
not in Lightning checkpoints, so a resumed run would draw other noise than the
uninterrupted one. :func:`step_randomness` seeds it for one step from ``(seed, epoch,
batch index, rank)`` and restores the caller's state afterwards, so a resumed run, or one
with another number of DataLoader workers, sees the same noise at the same step.
(Per-example choices made while batching, the CFG condition drop, are derived from the
example's draw instead: :func:`unimoe.data.sequences.draw_rng`.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> int:
    """A 63-bit torch seed that depends only on the arguments."""
    key = f"forward:{seed}:{epoch}:{batch_idx}:{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


@contextmanager
def step_randomness(seed: int, epoch: int, batch_idx: int, rank: int = 0,
                    device: torch.device | None = None) -> Iterator[None]:
    """Run the block with torch's CPU (and ``device``'s) generator seeded by :func:`step_seed`."""
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(step_seed(seed, epoch, batch_idx, rank))
        yield
