"""Non-finite training: skip a step whose loss or gradient is NaN/inf, stop after too many,
and never write a checkpoint whose weights are not finite.

A NaN that reaches the optimizer poisons every weight and every later checkpoint, and the
run keeps "training" on garbage. :class:`NonFiniteGuard` checks the loss before backward and
the gradients before the optimizer step. A bad step is *skipped*: the gradients are dropped,
so AdamW leaves the weights and its moments untouched (the learning-rate schedule and the
global step move on, as PyTorch's GradScaler does for fp16 overflows). The warning names the
step and the examples of the batch, so the data can be checked. After ``max_skips`` skipped
steps in a run (the count survives a resume) it stops with :class:`NonFiniteTrainingError`,
before any update with the bad gradient; no checkpoint is written on that path.

:func:`check_finite_weights` is the last line of defence: the stage modules call it on every
checkpoint they are about to write (``last.ckpt``, the final model), and
:func:`unimoe.checkpoint.save_model_checkpoint` on its own, so weights that became non-finite
in another way (an overflowing update) are refused and the previous good file stays.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from unimoe.finite import check_finite_weights, local_tensor, nonfinite_tensors

__all__ = ["NonFiniteGuard", "NonFiniteTrainingError", "check_finite_weights"]

log = logging.getLogger("unimoe.training")

MAX_IDS_SHOWN = 16


class NonFiniteTrainingError(RuntimeError):
    """Too many steps had a non-finite loss or gradient; the message names the last one."""


class NonFiniteGuard(Callback):
    """Skip optimizer steps with a NaN/inf loss or gradient; stop after ``max_skips`` of them.

    Args:
        max_skips: skipped steps allowed in a run (resumes included); the next one stops
            training with :class:`NonFiniteTrainingError`. 0 = stop at the first.
        check_gradients: also check the gradient norm before each optimizer step (one fused
            norm over all gradients). Under fp16 mixed precision the GradScaler already skips
            overflowing steps, so only the loss is checked there.

    ``skipped`` lists ``{step, epoch, batch, reason, ids}`` of every skipped step of this run.
    """

    def __init__(self, max_skips: int = 10, check_gradients: bool = True) -> None:
        if max_skips < 0:
            raise ValueError(f"NonFiniteGuard.max_skips must be >= 0, got {max_skips}")
        self.max_skips = int(max_skips)
        self.check_gradients = check_gradients
        self.skipped: list[dict[str, Any]] = []
        self._ids: list[str] = []
        self._batches: list[int] = []
        self._losses: list[Tensor] = []

    # ------------------------------------------------------------------ collect
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._ids.extend(_example_ids(batch))
        self._batches.append(batch_idx)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._losses.append(loss.detach().float().reshape(-1)[:1])  # checked with the gradients: one sync per step

    # ------------------------------------------------------------------ decide
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        losses, ids, batches = self._losses, self._ids, self._batches  # one loss per accumulated batch
        self._losses, self._ids, self._batches = [], [], []
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        check_norm = self.check_gradients and scaler is None and bool(params)
        values = list(losses)
        if check_norm:
            # the norm of this rank's gradient shards (sharded on several meshes under FSDP2 x EP, where
            # one norm over the DTensors cannot be taken): non-finite on any rank -> the flag below
            norm = torch.nn.utils.get_total_norm([local_tensor(p.grad) for _, p in params])
            values.append(norm.float().reshape(1))
        if not values:
            return
        stacked = torch.cat([v.to(pl_module.device) for v in values])
        flag = (~torch.isfinite(stacked)).any().float()
        if trainer.world_size > 1:  # every rank must skip (or stop) together
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if not bool(flag > 0):  # the only host sync of a healthy step
            return
        numbers = stacked.tolist()
        reasons = [f"loss {v}" for v in numbers[: len(losses)] if not math.isfinite(v)]
        if check_norm and not math.isfinite(numbers[-1]):
            bad = nonfinite_tensors((n, p.grad) for n, p in params)
            where = ", ".join(n for n, _, _ in bad[:3]) or "the gradient norm overflowed"
            reasons.append(f"gradient norm {numbers[-1]} ({where})")
        record = {"step": int(trainer.global_step), "epoch": int(trainer.current_epoch), "batch": batches,
                  "reason": "; ".join(reasons) or "non-finite on another rank", "ids": ids}
        shown = ", ".join(ids[:MAX_IDS_SHOWN]) + (f" ... ({len(ids)} examples)" if len(ids) > MAX_IDS_SHOWN else "")
        where = (f"step {record['step']} (epoch {record['epoch']}, batch {', '.join(map(str, batches))}): "
                 f"{record['reason']}; examples: {shown or 'unknown (the batch carries no example ids)'}")
        if len(self.skipped) >= self.max_skips:
            raise NonFiniteTrainingError(
                f"non-finite training at {where}. {len(self.skipped)} step(s) were skipped already "
                f"(NonFiniteGuard.max_skips={self.max_skips}), so training stops here, before this step "
                "updates any weight; no checkpoint is written. Resume from checkpoints/last.ckpt with a lower "
                "learning rate, check those examples, or raise max_skips."
            )
        for _, p in params:
            p.grad = None  # the optimizer skips parameters without gradients: no update, no moment change
        self.skipped.append(record)
        log.warning("skipped %s (skip %d of at most %d)", where, len(self.skipped), self.max_skips)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = list(state_dict.get("skipped", []))


def _example_ids(batch: Any) -> list[str]:
    ids = getattr(batch, "example_ids", None)
    return [str(i) for i in ids] if ids else []
