"""``unimoe bench moe --ep N``: the MoE layer with expert parallelism over N processes, next to one process.

Every rank builds the benchmark's layer (:func:`unimoe.bench.moe.build`, same seed: same
weights everywhere) and routes its own ``--tokens`` tokens. Timed round-robin on every rank,
in the same run (median of ``--repeats``; a barrier starts every timed step together):

* ``single``: the whole layer on this rank alone, all experts local (today's path; what one
  process without expert parallelism does with these tokens);
* ``ep``: the same layer with its routed experts split over the N ranks
  (:class:`~unimoe.moe.expert_parallel.ExpertParallelDispatcher`), forward + backward;
* ``ep_forward``: forward only, with the wall time spent inside the three exchanges (counts,
  rows, outputs) measured around them: ``all_to_all_share_forward`` is that time over the
  forward time. The backward's two all-to-alls move the same number of rows again.

Every number is the median over repeats of the slowest rank (a step of N ranks ends when the
slowest does). On one CPU the N processes share its cores, so the ratios say how much the
exchange costs here, not on a GPU cluster (NCCL over NVLink / InfiniBand).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist


def run_expert_parallel(cfg, ep: int, threads: int | None = None) -> dict:
    """Spawn ``ep`` gloo processes (CPU) and return the benchmark JSON (see the module docstring)."""
    import torch.multiprocessing as mp

    from unimoe.devices import resolve_device

    if ep < 2:
        raise ValueError(f"--ep must be >= 2 for the multi-process mode, got {ep}")
    if cfg.routed_experts % ep:
        raise ValueError(f"--routed-experts {cfg.routed_experts} is not divisible by --ep {ep}")
    if resolve_device(cfg.device).type != "cpu":
        raise ValueError("the --ep mode runs on CPU processes over gloo; pass --device cpu (GPU numbers need NCCL "
                         "ranks, one per GPU: run the training strategy there)")
    from unimoe.bench.moe import DTYPES

    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}")
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        mp.start_processes(_rank_main, args=(ep, port, asdict(cfg), threads or 1, out), nprocs=ep, start_method="spawn")
        results = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(ep)]
    return _summarise(cfg, ep, threads or 1, results)


def _rank_main(rank: int, ep: int, port: int, cfg_dict: dict, threads: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=ep)
    try:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(_measure(rank, ep, cfg_dict)))
    finally:
        dist.destroy_process_group()


def _measure(rank: int, ep: int, cfg_dict: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from unimoe.bench.moe import DTYPES, MoEBenchConfig, build
    from unimoe.moe.expert_parallel import shard_experts

    cfg = MoEBenchConfig(**cfg_dict)
    dtype = DTYPES[cfg.dtype]
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    single = build(cfg, device, dtype)
    torch.manual_seed(cfg.seed)
    sharded = build(cfg, device, dtype)
    mesh = init_device_mesh("cpu", (ep,), mesh_dim_names=("expert_parallel",))
    dispatcher = shard_experts(sharded, mesh)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    x = torch.randn(1, cfg.tokens, cfg.hidden, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(1, cfg.tokens, cfg.hidden, generator=g)

    with torch.no_grad():  # the two layers compute the same function
        max_diff = float((single(x)[0].float() - sharded(x)[0].float()).abs().max())

    def fwd_bwd(layer):
        def step() -> None:
            for p in (x, *layer.parameters()):
                p.grad = None
            (layer(x)[0].float() * grad).sum().backward()
        return step

    a2a: list[float] = []

    def ep_forward() -> None:
        dispatcher.trace.timing = True
        with torch.no_grad():
            sharded(x)
        dispatcher.trace.timing = False
        a2a.append(dispatcher.trace.seconds_all_to_all * 1e3)

    steps = {"single": fwd_bwd(single), "ep": fwd_bwd(sharded), "ep_forward": ep_forward}
    for _ in range(cfg.warmup):
        for step in steps.values():
            dist.barrier()
            step()
    a2a.clear()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(cfg.repeats):
        for name, step in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            step()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {"samples": samples, "all_to_all_forward": a2a, "sent_rows": dispatcher.trace.sent_rows,
            "received_rows": dispatcher.trace.received_rows, "max_abs_diff": max_diff,
            "real_pairs": int(sharded.router(x[0].detach()).selected[:, : cfg.routed_experts].sum())}


def _summarise(cfg, ep: int, threads: int, results: list[dict]) -> dict:
    def slowest(key: str, field: str = "samples") -> float:
        per_repeat = zip(*[r[field][key] if field == "samples" else r[field] for r in results])
        return statistics.median(max(values) for values in per_repeat)

    single, ep_ms, fwd = slowest("single"), slowest("ep"), slowest("ep_forward")
    a2a = statistics.median(max(v) for v in zip(*[r["all_to_all_forward"] for r in results]))
    return {
        "benchmark": "moe_layer_expert_parallel",
        "mode": "forward+backward",
        "ep": ep,
        "backend": "gloo",
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads_per_rank": threads,
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "dtype": cfg.dtype,
        "torch": torch.__version__,
        "tokens_per_rank": cfg.tokens,
        "shape": {"hidden": cfg.hidden, "routed_experts": cfg.routed_experts, "experts_per_rank": cfg.routed_experts // ep,
                  "routed_intermediate": cfg.routed_intermediate, "null_experts": cfg.null_experts,
                  "shared_experts": cfg.shared_experts, "shared_intermediate": cfg.shared_intermediate,
                  "top_p": cfg.top_p, "skew": cfg.skew},
        "single_process_ms": round(single, 2),
        "ep_ms": round(ep_ms, 2),
        "ep_over_single": round(ep_ms / single, 3),
        "ep_forward_ms": round(fwd, 2),
        "all_to_all_forward_ms": round(a2a, 2),
        "all_to_all_share_forward": round(a2a / fwd, 3) if fwd else None,
        "rows_sent_per_rank": [r["sent_rows"] for r in results],
        "rows_computed_per_rank": [r["received_rows"] for r in results],
        "real_pairs_per_rank": [r["real_pairs"] for r in results],
        "max_abs_diff_ep_vs_single": max(r["max_abs_diff"] for r in results),
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
