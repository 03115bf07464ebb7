"""Expert-load monitoring: routing counts accumulated across steps, logged as metrics and figures.

Every training / validation step of a stage leaves its per-layer :class:`RoutingInfo` in
``pl_module.step_stats``; this callback sums the counts (tokens per dynamic expert, split
by task; tokens by number of real experts used; router entropy) between logs, sums them
over ranks (one all-reduce) when it logs, and writes:

* metrics ``moe/<split>/...`` every ``log_every_n_steps`` (train) and at each validation end
  (val): per layer ``mean_active``, ``null_frac`` (tokens that used no real expert),
  ``entropy``, ``max_load`` (busiest expert's share x E), with ``detail`` the routing share
  of every expert (``share/<expert>``) and the activated-expert distribution
  (``active_k<k>``); ``moe/train/aux_loss`` and ``moe/train/aux_weight``;
* at each validation end (and at the end of training, over the whole stage) the figures of
  :mod:`unimoe.training.callbacks.plots` as PNGs in ``<run dir>/plots/`` plus the raw
  counts as JSON, also logged as MLflow artifacts under ``plots/``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from torch import Tensor

from unimoe.atomic import write_text_atomic
from unimoe.model.tasks import TaskIds
from unimoe.moe.stats import RoutingInfo
from unimoe.training.callbacks.plots import activated_experts_figure, expert_load_figure, save_figure

log = logging.getLogger("unimoe.training")


@dataclass
class RoutingTotals:
    """Sums over steps (and ranks after :meth:`reduced`) for the MoE layers of a model."""

    layers: list[int]
    task_names: list[str]  # the model's task table: row t of by_task is task_names[t]
    tokens: Tensor  # [L, E] routed (token, expert) pairs per dynamic expert, null included
    by_task: Tensor  # [L, T, E] the same split by task id
    hist: Tensor  # [L, R+1] tokens by number of real experts used
    entropy_sum: Tensor  # [L] sum over tokens of router entropy
    num_tokens: Tensor  # [L] real tokens routed
    aux_sum: Tensor  # [] sum over steps of the weighted aux loss
    steps: Tensor  # [] steps accumulated

    @classmethod
    def empty(cls, routing: list[Optional[RoutingInfo]], task_names: list[str]) -> "RoutingTotals":
        layers = [i for i, info in enumerate(routing) if info is not None]
        first = routing[layers[0]]
        dev = first.tokens_per_expert.device
        e, r = first.num_experts, first.active_real_hist.shape[0]
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=dev)  # noqa: E731
        return cls(layers, list(task_names), z(len(layers), e), z(len(layers), len(task_names), e), z(len(layers), r),
                   z(len(layers)), z(len(layers)), z(), z())

    def add(self, routing: list[Optional[RoutingInfo]], aux: float) -> None:
        for row, layer in enumerate(self.layers):
            info = routing[layer]
            self.tokens[row] += info.tokens_per_expert.double()
            self.hist[row] += info.active_real_hist.double()
            self.entropy_sum[row] += info.entropy_sum.detach().double()
            self.num_tokens[row] += info.num_tokens.double()
            table = info.tokens_per_expert_by_task
            if table is not None:
                n = min(table.shape[0], self.by_task.shape[1])
                self.by_task[row, :n] += table[:n].double()
        self.aux_sum += aux
        self.steps += 1

    def reduced(self, reduce) -> "RoutingTotals":
        """A copy summed over ranks with ONE collective (``reduce(flat) -> flat``)."""
        parts = [self.tokens, self.by_task, self.hist, self.entropy_sum, self.num_tokens, self.aux_sum, self.steps]
        flat = torch.cat([p.reshape(-1) for p in parts])
        flat = reduce(flat) if reduce is not None else flat
        out, offset = [], 0
        for p in parts:
            out.append(flat[offset: offset + p.numel()].reshape(p.shape).cpu())
            offset += p.numel()
        return RoutingTotals(list(self.layers), list(self.task_names), *out)

    # ------------------------------------------------------------------ derived numbers
    def shares(self) -> np.ndarray:
        """[L, E] share of each layer's routing decisions per expert."""
        t = self.tokens.numpy()
        return t / np.maximum(t.sum(1, keepdims=True), 1)

    def task_shares(self) -> tuple[list[str], np.ndarray]:
        """Task names with tokens and their [T', L, E] routing shares."""
        table = self.by_task.numpy()  # [L, T, E]
        names, rows = [], []
        for t in range(table.shape[1]):
            counts = table[:, t]  # [L, E]
            if counts.sum() > 0:
                names.append(self.task_names[t])
                rows.append(counts / np.maximum(counts.sum(1, keepdims=True), 1))
        return names, np.stack(rows) if rows else np.zeros((0, *table.shape[::2]))

    def metrics(self, prefix: str, labels: list[str], detail: bool, per_task: bool) -> dict[str, float]:
        out: dict[str, float] = {}
        shares = self.shares()
        hist = self.hist.numpy()
        tokens = np.maximum(hist.sum(1), 1)  # [L]
        dist = hist / tokens[:, None]
        mean_active = (dist * np.arange(hist.shape[1])).sum(1)
        entropy = self.entropy_sum.numpy() / np.maximum(self.num_tokens.numpy(), 1)
        for row, layer in enumerate(self.layers):
            key = f"{prefix}/layer_{layer}"
            out[f"{key}/mean_active"] = float(mean_active[row])
            out[f"{key}/null_frac"] = float(dist[row, 0])
            out[f"{key}/entropy"] = float(entropy[row])
            out[f"{key}/max_load"] = float(shares[row].max() * shares.shape[1])
            if detail:
                for e, label in enumerate(labels):
                    out[f"{key}/share/{label}"] = float(shares[row, e])
                for k in range(hist.shape[1]):
                    out[f"{key}/active_k{k}"] = float(dist[row, k])
        out[f"{prefix}/mean_active"] = float(mean_active.mean())
        out[f"{prefix}/null_frac"] = float(dist[:, 0].mean())
        out[f"{prefix}/entropy"] = float(entropy.mean())
        names, table = self.task_shares()
        null_cols = [e for e, label in enumerate(labels) if label.startswith("null")]
        for name, per_layer in zip(names, table):
            if null_cols:
                out[f"{prefix}/{name}/null_share"] = float(per_layer[:, null_cols].sum(1).mean())
            if per_task:
                for row, layer in enumerate(self.layers):
                    for e, label in enumerate(labels):
                        out[f"{prefix}/{name}/layer_{layer}/share/{label}"] = float(per_layer[row, e])
        if float(self.steps) > 0:
            out[f"{prefix}/aux_loss"] = float(self.aux_sum / self.steps)
        return out

    def to_json(self, labels: list[str]) -> dict:
        names, table = self.task_shares()
        return {
            "layers": self.layers,
            "experts": labels,
            "tokens_per_expert": self.tokens.tolist(),
            "tokens_per_expert_by_task": {self.task_names[t]: self.by_task[:, t].tolist()
                                          for t in range(self.by_task.shape[1]) if float(self.by_task[:, t].sum()) > 0},
            "active_real_hist": self.hist.tolist(),
            "num_tokens": self.num_tokens.tolist(),
        }


def expert_labels_for(pl_module: L.LightningModule, num_dynamic: int) -> list[str]:
    """Names of the dynamic experts in layer order: routed (upcycled names if known), extra, null."""
    moe = pl_module.model.config.moe
    routed = moe.num_routed_experts
    known = getattr(pl_module, "expert_labels", None)
    labels = list(known) if known and len(known) == routed else [f"e{i}" for i in range(routed)]
    extra = num_dynamic - routed - moe.num_null_experts
    labels += [f"x{i}" for i in range(extra)]
    labels += ["null" if moe.num_null_experts == 1 else f"null{i}" for i in range(moe.num_null_experts)]
    return labels


class ExpertLoadMonitor(Callback):
    """Routing statistics of an MoE stage as ``moe/...`` metrics and Figure-4/5-style PNGs.

    Args:
        log_every_n_steps: log training routing metrics every this many optimizer steps
            (counts accumulate in between).
        detail: also log every expert's share and the activated-expert distribution per layer.
        per_task_metrics: also log per-task, per-layer, per-expert shares (many metrics at paper scale).
        plots: write and log the figures at each validation end and at the end of training.
    """

    def __init__(self, log_every_n_steps: int = 50, detail: bool = True, per_task_metrics: bool = False,
                 plots: bool = True) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"ExpertLoadMonitor.log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.detail, self.per_task_metrics, self.plots = detail, per_task_metrics, plots
        self._train: RoutingTotals | None = None
        self._stage_total: RoutingTotals | None = None
        self._val: RoutingTotals | None = None
        self._last_logged = -1
        self.written: list[Path] = []

    # ------------------------------------------------------------------ accumulation
    @staticmethod
    def _stats(pl_module):
        stats = getattr(pl_module, "step_stats", None)
        if stats is None or not any(i is not None for i in stats.routing):
            return None
        return stats

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = self._stats(pl_module)
        if stats is None:
            return
        for name in ("_train", "_stage_total"):
            if getattr(self, name) is None:
                setattr(self, name, RoutingTotals.empty(stats.routing, _task_names(pl_module)))
            getattr(self, name).add(stats.routing, stats.aux_loss)
        step = trainer.global_step
        if step % self.log_every_n_steps == 0 and step != self._last_logged:
            self._last_logged = step
            totals = self._train.reduced(_reducer(trainer))
            metrics = totals.metrics("moe/train", self._labels(pl_module, totals), self.detail, self.per_task_metrics)
            metrics["moe/train/aux_weight"] = stats.aux_weight
            _log_metrics(trainer, metrics, _logging_step(trainer))
            self._train = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        stats = self._stats(pl_module)
        if stats is None:
            return
        if self._val is None:
            self._val = RoutingTotals.empty(stats.routing, _task_names(pl_module))
        self._val.add(stats.routing, stats.aux_loss)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._val is None:
            return
        totals = self._val.reduced(_reducer(trainer))
        self._val = None
        labels = self._labels(pl_module, totals)
        _log_metrics(trainer, totals.metrics("moe/val", labels, self.detail, self.per_task_metrics), _logging_step(trainer))
        if self.plots and trainer.is_global_zero:
            self._figures(trainer, totals, labels, f"val_step{trainer.global_step:07d}", "validation")

    def on_train_end(self, trainer, pl_module) -> None:
        if self._stage_total is None:
            return
        totals = self._stage_total.reduced(_reducer(trainer))
        if self.plots and trainer.is_global_zero:
            self._figures(trainer, totals, self._labels(pl_module, totals), f"train_total_step{trainer.global_step:07d}",
                          "training, whole stage")

    # ------------------------------------------------------------------ output
    @staticmethod
    def _labels(pl_module, totals: RoutingTotals) -> list[str]:
        return expert_labels_for(pl_module, totals.tokens.shape[1])

    def _figures(self, trainer, totals: RoutingTotals, labels: list[str], tag: str, what: str) -> None:
        out_dir = Path(trainer.default_root_dir) / "plots"
        names, task_table = totals.task_shares()
        groups = ["all tasks", *names]
        shares = np.concatenate([totals.shares()[None], task_table]) if len(names) else totals.shares()[None]
        paths = []
        fig = expert_load_figure(shares, groups, labels, totals.layers,
                                 f"Routing share per expert and layer ({what}, step {trainer.global_step})")
        paths.append(save_figure(fig, out_dir / f"expert_load_{tag}.png"))
        fig = activated_experts_figure(totals.hist.numpy(), totals.layers,
                                       f"Activated real experts per token ({what}, step {trainer.global_step})")
        paths.append(save_figure(fig, out_dir / f"activated_experts_{tag}.png"))
        raw = out_dir / f"routing_{tag}.json"
        write_text_atomic(raw, json.dumps({"step": trainer.global_step, "what": what, **totals.to_json(labels)}, indent=1))
        paths.append(raw)
        self.written += paths
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                for path in paths:
                    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="plots")


def _task_names(pl_module) -> list[str]:
    """The stage's task table (names in id order); a module without one gets the legacy order."""
    ids = getattr(pl_module, "task_ids", None)
    return list(ids if ids is not None else TaskIds.legacy())


def _reducer(trainer):
    if trainer.world_size <= 1:
        return None
    return lambda t: trainer.strategy.reduce(t, reduce_op="sum")


def _logging_step(trainer) -> int:
    """The step Lightning itself logs this batch's metrics at (``train/loss``, ``val/loss``), so charts line up."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def _log_metrics(trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
