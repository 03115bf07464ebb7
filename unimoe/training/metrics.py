"""Per-task, per-codebook losses over a whole evaluation pass (exact, DDP-safe).

Averaging per-batch means would weight small batches like large ones; instead every
validation batch adds its per-task, per-codebook *sums* of token cross entropy and the
matching target counts, and the epoch-end value is ``sum / count`` after one all-reduce.
Over the whole set, ``loss`` equals what :class:`~unimoe.model.transformer.AudioLM` would
report for one batch holding every example (sum over codebooks of per-codebook means).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor

from unimoe.model.batch import IGNORE_INDEX
from unimoe.model.tasks import TaskIds, task_class
from unimoe.registry import RegistryError


def declared_domains(tasks: Iterable[str]) -> dict[str, str]:
    """Task -> the domain its task class declares (``tts: speech``...); tasks without one are left out.

    A task whose plug-in is not installed any more (named in an old checkpoint) has no domain.
    """
    out = {}
    for name in tasks:
        try:
            domain = task_class(name).domain
        except RegistryError:
            continue
        if domain:
            out[name] = domain
    return out


class TaskLossAccumulator:
    """Sums of token CE and target counts per (task, codebook) across batches; tasks by the model's ids."""

    def __init__(self, num_codebooks: int, task_ids: TaskIds) -> None:
        self.num_codebooks = num_codebooks
        self.task_ids = task_ids
        self.num_tasks = len(task_ids)
        self.sums: Tensor | None = None  # [num_tasks, C] float64
        self.counts: Tensor | None = None  # [num_tasks, C] float64

    def reset(self) -> None:
        self.sums = self.counts = None

    def update(self, token_loss: Tensor, labels: Tensor, task_ids: Tensor) -> None:
        """token_loss [B, C, L] (0 where ignored), labels [B, C, L], task_ids [B, L] (row id everywhere)."""
        valid = labels != IGNORE_INDEX  # [B, C, L]
        row_task = task_ids[:, 0].long()  # [B]
        sums = (token_loss.detach().double() * valid).sum(-1)  # [B, C]
        counts = valid.sum(-1).double()  # [B, C]
        if self.sums is None:
            shape = (self.num_tasks, self.num_codebooks)
            self.sums = torch.zeros(shape, dtype=torch.float64, device=token_loss.device)
            self.counts = torch.zeros(shape, dtype=torch.float64, device=token_loss.device)
        self.sums.index_add_(0, row_task, sums)
        self.counts.index_add_(0, row_task, counts)

    def compute(
        self,
        prefix: str,
        reduce: Optional[Callable[[Tensor], Tensor]] = None,
        domains: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """``{prefix}/loss``, ``{prefix}/loss/<task>``, ``{prefix}/loss/<task>/cb<k>``, ``{prefix}/loss/<domain>``.

        ``reduce`` sums the tables over ranks (e.g. ``strategy.reduce(t, reduce_op="sum")``).
        """
        if self.sums is None:
            return {}
        table = torch.stack([self.sums, self.counts])  # [2, tasks, C]: one collective for both
        if reduce is not None:
            table = reduce(table)
        sums, counts = table[0].cpu(), table[1].cpu()
        out: dict[str, float] = {}
        total = counts.sum(0)  # [C]
        if total.sum() == 0:
            return out
        out[f"{prefix}/loss"] = float((sums.sum(0) / total.clamp_min(1)).sum())
        for t in range(sums.shape[0]):
            if counts[t].sum() == 0:
                continue
            name = self.task_ids.name(t)
            per_cb = sums[t] / counts[t].clamp_min(1)  # [C]
            out[f"{prefix}/loss/{name}"] = float(per_cb.sum())
            for c in range(per_cb.shape[0]):
                out[f"{prefix}/loss/{name}/cb{c}"] = float(per_cb[c])
        ids = self.task_ids
        domains = declared_domains(ids) if domains is None else domains
        for domain in sorted(set(domains.values())):
            rows = [ids[t] for t, d in domains.items() if d == domain and t in ids and ids[t] < sums.shape[0]]
            if not rows:
                continue
            s, n = sums[rows].sum(0), counts[rows].sum(0)
            if n.sum() > 0:
                out[f"{prefix}/loss/{domain}"] = float((s / n.clamp_min(1)).sum())
        return out
