"""MoE layer benchmark: our dropless grouped dispatch vs the usual alternatives.

All variants compute the same layer (same router, same weights, same routing, same
shared experts) forward + backward on the same inputs, timed round-robin in one run
(median of repeats), so the ratios are robust to machine-load drift:

* ``ours``:   the real :class:`~unimoe.moe.layer.MoELayer` (routing stats and aux losses included)
* ``loop``:   HF-transformers-style loop over experts (``where`` per expert, skip empty ones)
* ``padded``: every real expert padded to the most loaded expert's count, then batched
              matmuls (the capacity layout of the authors' DeepSpeed-MoE release, with a
              gather instead of its one-hot einsum, and null pairs dropped: a generous baseline)
* ``ideal``:  one dense matmul chain with exactly the routed FLOPs (all routed rows as one
              expert) + the router matmul + the shared experts: no dispatch cost at all

``null_saving`` times only the routed experts (dispatch + grouped GEMMs) on a routing with
half of the tokens sent only to null experts, divided by the same routing with none.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from unimoe.devices import resolve_device
from unimoe.moe import MoEConfig, build_moe_layer
from unimoe.moe.dispatch import dispatch, group_slots
from unimoe.moe.experts import SwiGLUExperts
from unimoe.moe.ffn import swiglu
from unimoe.moe.grouped import grouped_kernel_supported
from unimoe.moe.layer import MoELayer
from unimoe.moe.routers import TopPRouter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class MoEBenchConfig:
    tokens: int = 4096
    hidden: int = 512
    routed_experts: int = 8
    routed_intermediate: int = 1376
    null_experts: int = 1
    shared_experts: int = 2
    shared_intermediate: int = 688
    top_p: float = 0.7
    router_scale: float = 4.0  # multiplies the gate weights: a trained router is peaked, not flat
    skew: float = 1.5  # logit bias slope across the real experts: uneven loads
    dtype: str = "fp32"
    device: str = "auto"
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    timer: str = "wall"  # "cpu": process CPU time, for a shared/contended CPU (use with --threads 1)


class BiasedTopPRouter(TopPRouter):
    """Top-p router with a fixed per-expert logit bias: a controlled load skew."""

    def __init__(self, *args, bias: Tensor, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("bias", bias)  # [E + S]

    def compute_logits(self, x: Tensor) -> Tensor:
        return super().compute_logits(x) + self.bias


# ---------------------------------------------------------------------- baseline dispatchers
def loop_dispatch(x: Tensor, selected: Tensor, weights: Tensor, experts: SwiGLUExperts) -> Tensor:
    """HF-style: for each expert, find its tokens, run it, scatter-add (host syncs per expert)."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in range(experts.num_experts):
        token_idx = torch.where(selected[:, e])[0]
        if token_idx.numel() == 0:
            continue
        y = swiglu(x[token_idx], experts.gate_up_proj[e].to(x.dtype), experts.down_proj[e].to(x.dtype))
        out.index_add_(0, token_idx, y.float() * weights[token_idx, e, None])
    return out.to(x.dtype)


def padded_dispatch(x: Tensor, selected: Tensor, weights: Tensor, experts: SwiGLUExperts) -> Tensor:
    """Capacity = max load: scatter rows into [E, C, D] slots, batched matmuls, gather back."""
    e, _, f, d = experts.gate_up_proj.shape
    sel = selected[:, :e]  # [T, E] real experts only
    slot_of = sel.long().cumsum(0) - 1  # [T, E] slot of token t in expert e's buffer
    capacity = int(sel.sum(0).max())  # host sync, like the capacity computation of the release
    expert_idx, token_idx = sel.t().nonzero(as_tuple=True)
    slot = slot_of[token_idx, expert_idx]
    buf = x.new_zeros(e, capacity, d).index_put((expert_idx, slot), x[token_idx])  # [E, C, D]
    w_gate_up = experts.gate_up_proj.to(x.dtype).reshape(e, 2 * f, d).transpose(1, 2)  # [E, D, 2F]
    h = torch.bmm(buf, w_gate_up)  # [E, C, 2F]
    gate, up = h.split(f, dim=-1)
    out_buf = torch.bmm(F.silu(gate) * up, experts.down_proj.to(x.dtype).transpose(1, 2))  # [E, C, D]
    y = out_buf[expert_idx, slot].float() * weights[token_idx, expert_idx, None]
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_idx, y).to(x.dtype)


def layer_with(layer: MoELayer, routed_fn: Callable[..., Tensor]) -> Callable[[Tensor], Tensor]:
    """The same layer math with another routed-expert dispatcher (router and shared reused)."""

    def forward(x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        route = layer.router(flat)
        routed_w, shared_w = layer.combine_weights(route)
        y = routed_fn(flat, route.selected, routed_w, layer.experts[0])
        return (y + layer.shared_experts(flat, shared_w)).view_as(x)

    return forward


# ---------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TIMERS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_round_robin(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, device: torch.device, timer: str = "wall"
) -> dict[str, float]:
    """Median ms per step; variants interleaved each round so load drift hits all alike.

    ``timer="cpu"`` counts this process's CPU time instead of wall time: on a CPU shared
    with other jobs it excludes the time the scheduler gave to them (single-thread runs).
    """
    clock = TIMERS[timer]
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            t0 = clock()
            step()
            _sync(device)
            samples[name].append((clock() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def fwd_bwd(fn: Callable[[], Tensor], grad_out: Tensor, params: list[Tensor]) -> Callable[[], None]:
    def step() -> None:
        for p in params:
            p.grad = None
        (fn().float() * grad_out).sum().backward()

    return step


# ---------------------------------------------------------------------- the benchmark
def build(cfg: MoEBenchConfig, device: torch.device, dtype: torch.dtype) -> MoELayer:
    """The benchmarked layer: the paper's layout with a biased (skewed) top-p router."""
    e_dyn = cfg.routed_experts + cfg.null_experts
    bias = torch.zeros(e_dyn + cfg.shared_experts)
    bias[: cfg.routed_experts] = cfg.skew * torch.linspace(1.0, -1.0, cfg.routed_experts)
    router = BiasedTopPRouter(cfg.hidden, e_dyn, cfg.shared_experts, top_p=cfg.top_p, jitter=0.0, bias=bias)
    moe = MoEConfig(
        num_routed_experts=cfg.routed_experts,
        routed_intermediate_size=cfg.routed_intermediate,
        num_null_experts=cfg.null_experts,
        num_shared_experts=cfg.shared_experts,
        shared_intermediate_size=cfg.shared_intermediate,
        router=router,  # a built component passes through the registry unchanged
    )
    layer = build_moe_layer(cfg.hidden, moe)
    with torch.no_grad():
        layer.router.gate.weight.mul_(cfg.router_scale)
    return layer.to(device=device, dtype=dtype)


def run(cfg: MoEBenchConfig) -> dict:
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    layer = build(cfg, device, dtype)
    experts: SwiGLUExperts = layer.experts[0]
    x = torch.randn(1, cfg.tokens, cfg.hidden, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(1, cfg.tokens, cfg.hidden, device=device)
    params = [x, *layer.parameters()]

    with torch.no_grad():
        route = layer.router(x[0])
    sel_real = route.selected[:, : cfg.routed_experts]
    pairs = int(sel_real.sum())
    counts = route.selected.sum(0)

    # ideal: router matmul + all routed rows through one expert's weights + shared experts
    rows = torch.randn(pairs, cfg.hidden, device=device, dtype=dtype, requires_grad=True)
    g_rows = torch.randn(pairs, cfg.hidden, device=device)
    w1 = experts.gate_up_proj[0].detach().clone().requires_grad_()
    w2 = experts.down_proj[0].detach().clone().requires_grad_()
    wg = layer.router.gate.weight.detach().clone().requires_grad_()
    g_logits = torch.randn(cfg.tokens, wg.shape[0], device=device)
    shared = layer.shared_experts

    def ideal_step() -> None:
        for p in (rows, w1, w2, wg, x, *shared.parameters()):
            p.grad = None
        flat = x[0]
        logits = F.linear(flat.float(), wg.float())
        y_rows = swiglu(rows, w1, w2)
        y_shared = shared(flat)
        loss = (y_rows.float() * g_rows).sum() + (y_shared.float() * g[0]).sum() + (logits * g_logits).sum()
        loss.backward()

    variants = {
        "ours": fwd_bwd(lambda: layer(x)[0], g, params),
        "loop": fwd_bwd(lambda: layer_with(layer, loop_dispatch)(x), g, params),
        "padded": fwd_bwd(lambda: layer_with(layer, padded_dispatch)(x), g, params),
        "ideal": ideal_step,
    }
    with torch.no_grad():  # the baselines compute the same function
        y_ours = layer(x)[0].float()
        diffs = {
            name: float((layer_with(layer, fn)(x).float() - y_ours).abs().max())
            for name, fn in (("loop", loop_dispatch), ("padded", padded_dispatch))
        }
    ms = time_round_robin(variants, cfg.warmup, cfg.repeats, device, cfg.timer)

    null = null_saving(layer, x[0].detach(), route, cfg, device)
    return {
        "benchmark": "moe_layer",
        "mode": "forward+backward",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "timer": cfg.timer,
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "dtype": cfg.dtype,
        "torch": torch.__version__,
        "grouped_kernel": grouped_kernel_supported(x[0], experts.gate_up_proj.transpose(1, 2)),
        "shape": {
            "tokens": cfg.tokens, "hidden": cfg.hidden, "routed_experts": cfg.routed_experts,
            "routed_intermediate": cfg.routed_intermediate, "null_experts": cfg.null_experts,
            "shared_experts": cfg.shared_experts, "shared_intermediate": cfg.shared_intermediate,
            "top_p": cfg.top_p, "router_scale": cfg.router_scale, "skew": cfg.skew,
        },
        "routing": {
            "routed_pairs": pairs,
            "mean_active_real": pairs / cfg.tokens,
            "null_only_fraction": float((sel_real.sum(-1) == 0).float().mean()),
            "tokens_per_expert": counts.tolist(),
            "max_over_mean_load": float(sel_real.sum(0).max()) / (pairs / cfg.routed_experts),
        },
        "ours_ms": round(ms["ours"], 2),
        "loop_ms": round(ms["loop"], 2),
        "padded_ms": round(ms["padded"], 2),
        "ideal_ms": round(ms["ideal"], 2),
        "efficiency": round(ms["ideal"] / ms["ours"], 3),
        "speedup_vs_padded": round(ms["padded"] / ms["ours"], 3),
        "speedup_vs_loop": round(ms["loop"] / ms["ours"], 3),
        **null,
        "max_abs_diff_vs_ours": diffs,
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
    }


def null_saving(layer: MoELayer, x: Tensor, route, cfg: MoEBenchConfig, device: torch.device) -> dict:
    """Routed-expert time with half the tokens null-only / time with no null-only token."""
    r = cfg.routed_experts
    sel = route.selected.clone()
    sel[:, r:] = False  # no null experts ...
    top_real = route.probs[:, :r].argmax(-1)
    sel[torch.arange(sel.shape[0], device=device), top_real] |= ~sel[:, :r].any(-1)  # ... and >= 1 real each
    half = sel.clone()
    half[::2] = False
    half[::2, r] = True  # every other token: only the null expert
    w_base = torch.where(sel, route.probs, 0.0)
    w_base = w_base / w_base.sum(-1, keepdim=True)
    xin = x.detach().clone().requires_grad_()
    g = torch.randn_like(x, dtype=torch.float32)
    steps = {}
    for name, s in (("none", sel), ("half", half)):
        w = torch.where(s, w_base, 0.0).requires_grad_()
        steps[name] = fwd_bwd(
            lambda s=s, w=w: dispatch(xin, s, w, group_slots(layer.experts)), g, [xin, w, *layer.experts.parameters()]
        )
    ms = time_round_robin(steps, cfg.warmup, cfg.repeats, device, cfg.timer)
    return {
        "null_saving": round(ms["half"] / ms["none"], 3),
        "null_saving_rows_ratio": round(int(half[:, :r].sum()) / int(sel[:, :r].sum()), 3),
        "routed_ms_no_null": round(ms["none"], 2),
        "routed_ms_half_null": round(ms["half"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    defaults = MoEBenchConfig()
    parser = argparse.ArgumentParser(prog="unimoe bench moe", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "dtype":
            parser.add_argument(flag, choices=sorted(DTYPES), default=value)
        elif name == "timer":
            parser.add_argument(flag, choices=sorted(TIMERS), default=value,
                                help="wall (default) or cpu: process CPU time, for contended CPUs with --threads 1")
        elif name == "device":
            parser.add_argument(flag, default=value, help="auto (cuda if available), cpu, cuda, cuda:1 ...")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert parallelism over this many CPU processes (gloo), timed next to one process "
                             "(unimoe.bench.moe_ep); default 1: the single-process benchmark")
    args = vars(parser.parse_args(argv))
    as_json, threads, ep = args.pop("json"), args.pop("threads"), args.pop("ep")
    if ep > 1:
        from unimoe.bench.moe_ep import run_expert_parallel

        try:
            result = run_expert_parallel(MoEBenchConfig(**args), ep, threads)
        except ValueError as exc:
            parser.error(str(exc))
        print(json.dumps(result, indent=2) if as_json else _ep_text(result))
        return 0
    if threads:
        torch.set_num_threads(threads)
    result = run(MoEBenchConfig(**args))
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        keys = ("ours_ms", "loop_ms", "padded_ms", "ideal_ms", "efficiency", "speedup_vs_padded", "speedup_vs_loop", "null_saving")
        print(f"moe layer, {result['shape']['tokens']} tokens, {result['dtype']} on {result['device']} (forward+backward, median)")
        for k in keys:
            print(f"  {k:18s} {result[k]}")
        print(f"  mean real experts/token {result['routing']['mean_active_real']:.2f}, max/mean load {result['routing']['max_over_mean_load']:.2f}")
    return 0


def _ep_text(result: dict) -> str:
    lines = [f"moe layer, expert parallel over {result['ep']} gloo processes, {result['tokens_per_rank']} tokens per rank "
             f"({result['dtype']}, forward+backward, median of the slowest rank)"]
    for k in ("single_process_ms", "ep_ms", "ep_over_single", "ep_forward_ms", "all_to_all_forward_ms",
              "all_to_all_share_forward"):
        lines.append(f"  {k:26s} {result[k]}")
    return "\n".join(lines)
