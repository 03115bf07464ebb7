"""Memory-plan check: the estimate of ``unimoe plan`` vs the measured peak of real training steps.

Each case runs in a fresh process on the CPU (fp32, one process, the plan's ``single``
layout): build the AudioLM and AdamW (the stages' optimizer), then run ``--steps``
training steps (forward with the loss and the MoE aux loss, backward, optimizer step,
``zero_grad(set_to_none=True)`` as Lightning does) on a batch of exactly ``tokens``
positions, all of them labelled. Two peaks are measured, each in its own process:

* ``tensors``: the peak of live tensor memory (parameters, gradients, optimizer states,
  activations, temporaries) from PyTorch's ``MemTracker`` (``torch.distributed._tools``,
  which follows every storage through a dispatch mode): what the estimate models;
* ``rss``: the process's high-water mark of resident memory (``VmHWM``, reset through
  ``/proc/self/clear_refs`` once imports and the batch are ready) minus its resident memory
  then: the tensors plus what the C allocator keeps (glibc's ``malloc`` does not hand freed
  blocks back at once; CUDA's caching allocator has its own, smaller, overhead).

The estimate is :func:`unimoe.training.memory.estimate` for the same model, tokens and the
mean number of real experts per token the run's router chose. ``error = estimate / measured - 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

CASES: list[dict[str, Any]] = [
    {"name": "dense-256", "preset": "small", "layers": 4, "hidden": 256, "ffn": 704, "tokens": 2048},
    {"name": "dense-256", "preset": "small", "layers": 4, "hidden": 256, "ffn": 704, "tokens": 8192},
    {"name": "dense-256-ac", "preset": "small", "layers": 4, "hidden": 256, "ffn": 704, "tokens": 8192, "ac": True},
    {"name": "moe-256", "preset": "small-moe", "layers": 4, "hidden": 256, "ffn": 704, "tokens": 2048},
    {"name": "moe-256", "preset": "small-moe", "layers": 4, "hidden": 256, "ffn": 704, "tokens": 8192},
    {"name": "moe-256-ac", "preset": "small-moe", "layers": 4, "hidden": 256, "ffn": 704, "tokens": 8192, "ac": True},
    {"name": "moe-512", "preset": "small-moe", "layers": 8, "hidden": 512, "ffn": 1408, "tokens": 4096},
    {"name": "moe-512-ac", "preset": "small-moe", "layers": 8, "hidden": 512, "ffn": 1408, "tokens": 4096, "ac": True},
    # one small codebook: the blocks, not the loss head, set the checkpointed peak (as at paper scale)
    {"name": "dense-512-ac-1cb", "preset": "small", "layers": 8, "hidden": 512, "ffn": 1408, "tokens": 4096, "ac": True,
     "codebooks": 1},
    {"name": "moe-512-ac-1cb", "preset": "small-moe", "layers": 8, "hidden": 512, "ffn": 1408, "tokens": 4096, "ac": True,
     "codebooks": 1},
]


def case_config(case: dict[str, Any]):
    """The AudioLMConfig of a case: a preset with the case's depth and widths, no vision tower."""
    import dataclasses

    from unimoe.model.config import AudioLMConfig

    cfg = AudioLMConfig.from_preset(case["preset"], num_layers=case["layers"], hidden_size=case["hidden"],
                                    intermediate_size=case["ffn"], num_heads=max(2, case["hidden"] // 64),
                                    num_kv_heads=max(1, case["hidden"] // 256), vision=None,
                                    max_seq_len=case.get("seq_len", 1024), gradient_checkpointing=bool(case.get("ac")))
    if case.get("codebooks"):
        cfg = cfg.replace(num_codebooks=case["codebooks"], codebook_size=16, delays=list(range(case["codebooks"])))
    if cfg.moe is not None:
        cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, routed_intermediate_size=case["ffn"] // 4,
                                                  shared_intermediate_size=case["ffn"] // 8))
    return cfg


def _batch(cfg, tokens: int, seq_len: int):
    import torch

    from unimoe.model.tasks import Batch, Modality

    b, length = max(1, tokens // seq_len), min(seq_len, tokens)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.codebook_size, (b, cfg.num_codebooks, length), generator=g)
    return Batch(text_ids=torch.zeros(b, length, dtype=torch.long), audio_codes=codes,
                 modality=torch.full((b, length), int(Modality.AUDIO)), attention_mask=torch.ones(b, length, dtype=torch.bool),
                 position_ids=torch.arange(length).expand(b, length).contiguous(), labels=codes.clone(),
                 task_ids=torch.zeros(b, length, dtype=torch.long), lengths=torch.full((b,), length))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(case: dict[str, Any], steps: int, mode: str) -> dict[str, Any]:
    """One case in this process (call it in a fresh one): measured peak (``rss`` or ``tensors``) and the estimate."""
    import contextlib
    import gc

    import torch

    from unimoe.model.transformer import AudioLM
    from unimoe.training.memory import SHARDED_PRECISIONS, Layout, Workload, estimate, model_shape
    from unimoe.training.optim import OptimizerConfig, build_optimizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = case_config(case)
    batch = _batch(cfg, case["tokens"], case.get("seq_len", 1024))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    model = AudioLM(cfg).train()
    opt, _ = build_optimizer(model.named_parameters(), OptimizerConfig(lr=1e-4), total_steps=10)
    tracker = None
    if mode == "tensors":
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(model, opt)
    active = []
    with tracker if tracker is not None else contextlib.nullcontext():
        for step in range(steps):
            _step(model, opt, batch, cfg, step, active)
            if tracker is not None:
                tracker.reset_mod_stats()  # per-module stats are per iteration; the global peak is kept
    if tracker is not None:
        peak = tracker.get_tracker_snapshot("peak")
        measured = max(v.get("Total", 0) for v in peak.values())
        breakdown = {str(k): round(b / 2**20, 1) for v in peak.values() for k, b in v.items()}
    else:
        measured, breakdown = _status("VmHWM") - base, None
    names = [n for n, _ in model.named_parameters()]
    shape = model_shape(model, names)
    k = sum(active) / len(active) if active else 0.0
    layout = Layout("single", SHARDED_PRECISIONS["fp32"], activation_checkpointing=bool(case.get("ac")), gpu=False)
    est = estimate(shape, layout, Workload(tokens=batch.batch_size * batch.seq_len, active_experts=k))
    return {**case, "mode": mode, "measured_breakdown_mb": breakdown, "params": shape.total, "batch": [batch.batch_size, batch.seq_len], "mean_active_experts": round(k, 2),
            "measured_mb": round(measured / 2**20, 1), "estimate_mb": round(est.peak / 2**20, 1),
            "error": round(est.peak / measured - 1, 3), "estimate_components_mb": {k_: round(v / 2**20, 1)
                                                                                   for k_, v in est.components.items()}}


def _step(model, opt, batch, cfg, step: int, active: list[float]) -> None:
    out = model(batch, logits="none")
    loss = out.loss + (cfg.moe.aux_loss(out.routing, step) if cfg.moe is not None else 0.0)
    if cfg.moe is not None:
        active.append(float(out.aux.mean_active_real))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unimoe bench plan", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="training steps per case (the peak is steady from step 2)")
    parser.add_argument("--cases", type=int, nargs="*", default=None, help="indices into the built-in cases (default all)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["case"], args.steps, spec["mode"])))
        return 0
    chosen = [CASES[i] for i in args.cases] if args.cases is not None else CASES
    rows = []
    for case in chosen:
        row = {}
        for mode in ("tensors", "rss"):
            spec = json.dumps({"case": case, "mode": mode})
            cmd = [sys.executable, "-m", "unimoe.bench.plan", "--steps", str(args.steps), "--child", spec]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                raise RuntimeError(f"case {case} ({mode}) failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            row.update({k: v for k, v in r.items() if k not in ("mode", "measured_mb", "error", "measured_breakdown_mb")})
            row[f"{mode}_mb"], row[f"error_vs_{mode}"] = r["measured_mb"], r["error"]
            if r["measured_breakdown_mb"]:
                row["tensors_breakdown_mb"] = r["measured_breakdown_mb"]
        rows.append(row)
        if not args.json:
            print(f"{row['name']:14s} tokens {row['tokens']:6d}  estimate {row['estimate_mb']:8.1f} MB  tensors "
                  f"{row['tensors_mb']:8.1f} MB ({100 * row['error_vs_tensors']:+5.1f}%)  rss {row['rss_mb']:8.1f} MB "
                  f"({100 * row['error_vs_rss']:+5.1f}%)", file=sys.stderr)
    result = {"benchmark": "memory_plan", "device": "cpu", "dtype": "fp32", "steps": args.steps, "cases": rows}
    for mode in ("tensors", "rss"):
        errors = [abs(r[f"error_vs_{mode}"]) for r in rows]
        result[f"max_abs_error_vs_{mode}"] = round(max(errors), 3) if errors else None
        result[f"mean_abs_error_vs_{mode}"] = round(sum(errors) / len(errors), 3) if errors else None
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
