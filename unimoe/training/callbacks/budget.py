"""Training tokens and training FLOPs of a stage, counted as it trains (and kept across a resume).

A study compares arms by what their final models cost to train, so every stage records

* ``train/tokens``: sequence positions trained on (text + vision + audio frames, padding
  excluded; summed over ranks), cumulative over the stage;
* ``train/flops``: ``6 x activated non-embedding parameters x tokens`` (forward 2N + backward
  4N per token, the Kaplan et al. approximation; attention-score FLOPs are left out: the
  sequences are short next to the width). For an MoE the activated parameters of a step use
  the routed experts its tokens *actually* used (the measured mean real experts per token of
  each layer), so a top-p MoE is charged for its dynamic compute, not its maximum.

Both are logged each step and land in ``final_metrics.json``; the totals live in the
checkpoint (``state_dict``), so a resumed stage continues counting where it stopped.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class TrainingBudget(Callback):
    """Counts ``train/tokens`` and ``train/flops`` (see the module docstring)."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.flops = 0.0
        self._dense: float | None = None  # non-embedding params with no routed expert
        self._expert: list[float] = []  # per MoE layer: params of one routed expert

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from unimoe.model.params import routed_expert_sizes, count_parameters, parameter_breakdown
        from unimoe.moe.layer import MoELayer

        model = getattr(pl_module, "model", None)
        if model is None or not hasattr(model, "blocks"):
            return
        parts = parameter_breakdown(model)
        embeds = parts["text_embed"] + parts["audio_embed"]
        self._dense = float(count_parameters(model, active=0) - embeds)
        self._expert = []
        for layer in (m for m in model.modules() if isinstance(m, MoELayer)):  # same order as the routing list
            sizes = routed_expert_sizes(layer)
            self._expert.append(sum(sizes) / max(1, len(sizes)))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        import torch

        if self._dense is None:
            return
        positions = batch.attention_mask.sum().to(torch.float64)
        routing = getattr(getattr(pl_module, "step_stats", None), "routing", None) or []
        active = [float(r.mean_active_real) for r in routing if r is not None]
        per_token = self._dense + sum(k * size for k, size in zip(active, self._expert))
        step = torch.stack([positions, positions * 6.0 * per_token]).to(pl_module.device)
        if trainer.world_size > 1:
            step = trainer.strategy.reduce(step, reduce_op="sum")
        self.tokens += float(step[0])
        self.flops += float(step[1])
        pl_module.log("train/tokens", self.tokens, on_step=True, on_epoch=False, sync_dist=False)
        pl_module.log("train/flops", self.flops, on_step=True, on_epoch=False, sync_dist=False)

    def state_dict(self) -> dict[str, float]:
        return {"tokens": self.tokens, "flops": self.flops}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.tokens = float(state_dict.get("tokens", 0.0))
        self.flops = float(state_dict.get("flops", 0.0))
