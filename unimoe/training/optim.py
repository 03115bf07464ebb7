"""AdamW with a linear-warmup + cosine learning-rate schedule, used by every curriculum stage.

The paper trains all three stages with AdamW and a cosine schedule (specialists at 1e-4,
warmup at 3e-5, joint at 1e-5); only the learning rate differs per stage, so one small
config serves all of them. Parameters that do not require grad (frozen in the warmup
stage) are never handed to the optimizer, so AdamW's decoupled weight decay cannot touch
them either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    """AdamW + warmup/cosine settings of one stage.

    lr:            peak learning rate (paper: 1e-4 specialists, 3e-5 warmup, 1e-5 joint)
    weight_decay:  decoupled weight decay of matrices (norm gains and biases get none)
    betas, eps:    AdamW moments
    warmup_steps:  linear warmup from ~0 to ``lr`` over this many optimizer steps
    min_lr_ratio:  the cosine ends at ``lr * min_lr_ratio``
    total_steps:   length of the schedule; None = the trainer's estimated stepping batches
                   (``max_steps`` when set)
    """

    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    total_steps: Optional[int] = None

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"OptimizerConfig.lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimizerConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimizerConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.eps <= 0:
            raise ValueError(f"OptimizerConfig.eps must be > 0, got {self.eps}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimizerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            raise ValueError(f"OptimizerConfig.total_steps must be a positive int or null, got {self.total_steps!r}")


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup, cosine to ``min_lr_ratio``.

    Warmup reaches 1.0 at ``step = warmup_steps - 1``; the cosine then falls over the
    remaining ``total_steps - warmup_steps`` steps and stays at ``min_lr_ratio`` after.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed matrices and undecayed vectors (norms, biases)."""
    decay, no_decay = [], []
    for _, p in named:
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    named: Iterable[tuple[str, nn.Parameter]], cfg: OptimizerConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its per-step warmup/cosine scheduler."""
    groups = parameter_groups(named, cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    total = cfg.total_steps or total_steps
    if total < 1:
        raise ValueError(
            f"cannot size the LR schedule: total steps is {total}; set trainer.max_steps or optimizer.total_steps"
        )
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, cfg.warmup_steps, total, cfg.min_lr_ratio)
    )
    return optimizer, scheduler
