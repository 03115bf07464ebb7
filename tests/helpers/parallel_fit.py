"""A few optimizer steps of a tiny JointStage on fixed synthetic batches, sharded or not.

Run as a script (Lightning relaunches it once per rank under MoEParallelStrategy)::

    python parallel_fit.py --out DIR --world 4 --ep 2 --steps 3     # FSDP x EP on 4 CPU processes
    python parallel_fit.py --out DIR --world 1 --global_rows 8       # the single-process reference

Micro-batch ``s`` has one global batch of ``world x rows`` sequences (all the same length, so every
rank holds the same number of targets and the mean of the ranks' losses is the global loss);
rank ``r`` trains on rows ``[r*rows, (r+1)*rows)``, the reference on all of them. Each rank
writes ``rank<r>.pt``: per-step losses, global load-balance values and router selections;
rank 0 adds the full (gathered) parameters after training.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from unimoe.model.config import AudioLMConfig
from unimoe.model.tasks import Batch, Modality
from unimoe.moe.config import MoEConfig
from unimoe.moe.stats import mean_over_layers
from unimoe.training.stages import JointStage

ROWS, SEQ = 2, 12


def tiny_config(routed: int = 4) -> AudioLMConfig:
    moe = MoEConfig(num_routed_experts=routed, routed_intermediate_size=32, num_null_experts=1, num_shared_experts=1,
                    shared_intermediate_size=16, router={"name": "top_p", "top_p": 0.7, "jitter": 0.0},
                    load_balance={"start": 0.05, "end": 0.05, "steps": 0})
    return AudioLMConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                         max_seq_len=64, num_codebooks=2, codebook_size=16, delays=[0, 1], moe=moe)


def global_batch(step: int, rows: int, cfg: AudioLMConfig) -> Batch:
    g = torch.Generator().manual_seed(1000 + step)
    c, v = cfg.num_codebooks, cfg.codebook_size
    codes = torch.randint(0, v, (rows, c, SEQ), generator=g)
    labels = torch.randint(0, v, (rows, c, SEQ), generator=g)
    tasks = torch.randint(0, 2, (rows, 1), generator=g).expand(rows, SEQ)
    return Batch(text_ids=torch.zeros(rows, SEQ, dtype=torch.long), audio_codes=codes,
                 modality=torch.full((rows, SEQ), int(Modality.AUDIO)), attention_mask=torch.ones(rows, SEQ, dtype=torch.bool),
                 position_ids=torch.arange(SEQ).expand(rows, SEQ).clone(), labels=labels, task_ids=tasks.clone(),
                 lengths=torch.full((rows,), SEQ))


def rank_slice(batch: Batch, rank: int, rows: int) -> Batch:
    return Batch(**{k: (v[rank * rows:(rank + 1) * rows] if isinstance(v, torch.Tensor) else v)
                    for k, v in batch.__dict__.items()})


class SyntheticData(L.LightningDataModule):
    def __init__(self, global_rows: int, steps: int, cfg: AudioLMConfig) -> None:
        super().__init__()
        self.global_rows, self.steps, self.cfg = global_rows, steps, cfg

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = self.global_rows // world  # the reference (world 1) takes every rank's rows
        batches = [rank_slice(global_batch(s, self.global_rows, self.cfg), rank, rows) for s in range(self.steps)]
        return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


class RecordingJoint(JointStage):
    """JointStage that remembers each step's loss, global balance loss and router selections."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.record = {"loss": [], "load_balance": [], "selected": [], "dtypes": set()}
        for block in self.model.blocks:
            block.ffn.router.register_forward_hook(self._on_route)
            block.attn.register_forward_hook(self._on_attention)

    def _on_route(self, module, args, output) -> None:
        if self.training:
            self.record["selected"].append(output.selected.detach().clone())
            self.record["dtypes"].add(("router", module.gate.weight.dtype))

    def _on_attention(self, module, args, output) -> None:
        self.record["dtypes"].add(("attention", module.q_proj.weight.dtype))

    def balanced_routing(self, routing, step):
        balanced = super().balanced_routing(routing, step)
        self.record["load_balance"].append(float(mean_over_layers(balanced.routing).load_balance.detach()))
        return balanced

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.record["loss"].append(float(loss.detach()))
        return loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global_rows", type=int, default=None, help="rows of each step's global batch (default 2 x world)")
    p.add_argument("--routed", type=int, default=4)
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--accumulate", type=int, default=1, help="trainer.accumulate_grad_batches")
    p.add_argument("--mixed_precision", default="fp32")
    p.add_argument("--save", default=None, help="save a checkpoint here after training")
    p.add_argument("--resume", default=None, help="fit(ckpt_path=...) from this checkpoint")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = tiny_config(args.routed)
    module = RecordingJoint(model=cfg, optimizer={"lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.1}, seed=0,
                            task_ids=["tts", "t2m"])  # the synthetic batches use ids 0 and 1
    trainer_args = dict(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=args.clip or None,
                        accumulate_grad_batches=args.accumulate)
    if args.world > 1 or args.ep > 1:
        from unimoe.training.parallel import MoEParallelStrategy

        strategy = MoEParallelStrategy(expert_parallel_size=args.ep, mixed_precision=args.mixed_precision,
                                       activation_checkpointing=args.activation_checkpointing)
        trainer = L.Trainer(devices=args.world, strategy=strategy, **trainer_args)
    else:
        trainer = L.Trainer(devices=1, **trainer_args)
    trainer.fit(module, datamodule=SyntheticData(args.global_rows or ROWS * args.world, args.steps * args.accumulate, cfg),
                ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)
    result = dict(module.record)
    if args.world > 1 or args.ep > 1:
        from unimoe.training.parallel import gather_full_state_dict

        result["params"] = gather_full_state_dict(module.model)
    else:
        result["params"] = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
