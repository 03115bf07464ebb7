"""Generation benchmark: unimoe's real decoding loop against a peer decoder, caches, batches and budgets.

Every number comes from :func:`unimoe.generation.decode` (or the peer decoder) on randomly
initialised models, variants of a section timed round-robin in one process (median of
repeats), so ratios survive load drift. Sections (``--sections``, all by default):

* ``peer``      the matched size (hidden 256, 4 layers, 4 heads, 8 codebooks x 1024, batch 1,
                no CFG, KV cache, ``--frames`` frames, temperature 1, top-k 250 as AudioCraft's
                defaults): unimoe eager, unimoe compiled, and :mod:`unimoe.bench.reference_decoder`
                (a MusicGen-style decoder doing what AudioCraft's ``LMModel`` does per step); also
                PyTorch ops per frame of each (profiler counts, one extra run).
* ``cache``     the matched model: KV cache vs recomputing the sequence, ``--cache-frames`` frames.
* ``batch``     the matched model with CFG at ``--batch-sizes`` requests: requests/s and frames/s,
                eager (and compiled with ``--compile``).
* ``moe``       a size where the routed experts dominate the step (:func:`moe_config`: hidden
                1024, 2 layers, 8 routed experts of 1024 + 1 null + 2 shared of 512), batch 1:
                router top-p ``--top-p`` values vs the expert budget ``--budget`` (experts/token
                reached and its error).
* ``dispatch``  that model's MoE layer alone at 1..128 rows: the grouped, small-batch and dense
                expert paths (what ``MoEConfig.small_batch_rows`` is chosen from).
* ``gpu``       only on CUDA: bf16 eager vs compiled at batch 1 and 32 (frames/s, real-time factor).

Every request generates exactly its frame count (EOS held back, then forced), so variants
do the same steps. Real-time factor = seconds of LM compute per second of audio at
``--frame-rate`` (the codec is not timed). ``--timer auto`` is process CPU time on a CPU with
one thread (steadier on a shared machine), else wall time.
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

from unimoe.bench.reference_decoder import ReferenceDecoder, ReferenceDecoderConfig
from unimoe.devices import resolve_device
from unimoe.generation.decode import DecodeOutput, decode
from unimoe.generation.generator import inference_mode
from unimoe.generation.sampling import CodebookSampling
from unimoe.generation.settings import GenerationSettings
from unimoe.model.config import AudioLMConfig
from unimoe.model.tasks import build_task_builder
from unimoe.model.transformer import AudioLM
from unimoe.moe.config import MoEConfig

CAPTIONS = [
    "calm solo piano, slow tempo, soft dynamics",
    "energetic drums and bass",
    "a string quartet playing a sad melody in a minor key, with long sustained notes and gentle vibrato",
    "lo-fi beat",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SECTIONS = ("peer", "cache", "batch", "moe", "dispatch", "gpu")


@dataclass
class GenerateBenchConfig:
    sections: str = "peer,cache,batch,moe,dispatch,gpu"
    frames: int = 250
    """Frames per request in ``peer``, ``moe`` and ``gpu`` (250 = 5 s at 50 Hz)."""
    cache_frames: int = 500
    batch_sizes: str = "1,8,32"
    batch_frames: int = 100
    cfg_scale: float = 3.0
    """Guidance of the ``batch`` and ``gpu`` sections (two rows per request)."""
    top_p: str = "0.7,0.3"
    budget: float = 2.0
    moe_layers: int = 2
    dispatch_rows: str = "1,2,4,8,16,32,64,128"
    compile: bool = True
    """Include the compiled decoder (the first compile of each shape is not timed: it is warm-up)."""
    reference: bool = True
    repeats: int = 3
    warmup: int = 1
    frame_rate: float = 50.0
    dtype: str = "fp32"
    device: str = "auto"
    threads: int = 1
    """torch intra-op threads (0 = leave torch's default)."""
    timer: str = "auto"
    seed: int = 0


# ---------------------------------------------------------------------- models
def peer_config() -> AudioLMConfig:
    """unimoe at the peer's size: hidden 256, 4 layers, 4 heads (no GQA), a SwiGLU with the
    parameters of a 4x GELU FFN (688 ~ 2/3 of 1024), 8 codebooks x 1024, delays 0..7."""
    return AudioLMConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=688,
                         num_codebooks=8, codebook_size=1024, delays=list(range(8)), max_seq_len=2048)


def moe_config(layers: int = 2) -> AudioLMConfig:
    """A step dominated by routed experts: hidden 1024, 8 routed experts of 1024 + 1 null + 2 shared of 512."""
    moe = MoEConfig(num_routed_experts=8, routed_intermediate_size=1024, num_null_experts=1, num_shared_experts=2,
                    shared_intermediate_size=512, router={"name": "top_p", "top_p": 0.7})
    return AudioLMConfig(hidden_size=1024, num_layers=layers, num_heads=8, num_kv_heads=2, intermediate_size=2816,
                         num_codebooks=8, codebook_size=1024, delays=list(range(8)), max_seq_len=2048, moe=moe)


def _model(config: AudioLMConfig, cfg: GenerateBenchConfig, device, dtype) -> AudioLM:
    torch.manual_seed(cfg.seed)
    return AudioLM(config).to(device=device, dtype=dtype).eval()


def _prompts(model: AudioLM, n: int):
    t2m = build_task_builder("t2m", model.config)
    pairs = [t2m.cfg_prefixes(text=CAPTIONS[i % len(CAPTIONS)]) for i in range(n)]
    return [c for c, _ in pairs], [u for _, u in pairs]


# ---------------------------------------------------------------------- timing
class Timer:
    """Seconds of one call: process CPU time or wall time (CUDA synchronised)."""

    def __init__(self, kind: str, device: torch.device) -> None:
        if kind == "auto":
            kind = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
        if kind not in ("cpu", "wall"):
            raise ValueError(f"--timer must be auto, cpu or wall, got {kind!r}")
        self.kind, self.device = kind, device

    def __call__(self, fn: Callable[[], object]) -> tuple[float, object]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        clock = time.process_time if self.kind == "cpu" else time.perf_counter
        start = clock()
        result = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return clock() - start, result


def round_robin(variants: dict[str, Callable[[], object]], cfg: GenerateBenchConfig, timer: Timer) -> tuple[dict, dict]:
    """Warm up each variant, then time them alternately: ``({name: median seconds}, {name: last result})``."""
    for _ in range(cfg.warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    last: dict[str, object] = {}
    for _ in range(cfg.repeats):
        for name, fn in variants.items():
            seconds, last[name] = timer(fn)
            times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}, last


def ops_per_frame(fn: Callable[[], object], frames: int) -> float:
    """ATen operator calls (nested ones included, as the profiler counts them) per generated frame."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return round(sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / frames, 1)


def _decode(model, prompts, sampling, frames: int, *, cfg_scale: float = 1.0, **kwargs) -> DecodeOutput:
    cond, uncond = prompts
    return decode(model, cond, uncond if cfg_scale != 1.0 else None, sampling, max_frames=[frames] * len(cond),
                  min_frames=frames, cfg_scale=cfg_scale, seeds=list(range(len(cond))), **kwargs)


def _rate(seconds: float, requests: int, frames: int, frame_rate: float) -> dict:
    return {"seconds": round(seconds, 4), "frames_per_second": round(requests * frames / seconds, 1),
            "requests_per_second": round(requests / seconds, 3),
            "real_time_factor": round(seconds / (requests * frames / frame_rate), 4)}


def _experts(out: DecodeOutput) -> float | None:
    if out.expert_sums is None:
        return None
    return round(float(out.expert_sums.sum(0).div(out.expert_tokens.sum()).mean()), 4)


def _same(a: DecodeOutput, b: DecodeOutput) -> str:
    """How many requests two runs decoded identically, and for the others the first step that differs.

    Sampled decoding of a random-weight model is sensitive to fp32 rounding: its logits are
    small and nearly tied, so a ~1e-6 difference between two attention kernels can move a
    top-k / top-p boundary; from that step on the two sequences are different samples.
    """
    same = sum(torch.equal(x, y) for x, y in zip(a.segments, b.segments))
    text = f"{same}/{len(a.segments)} requests token-identical"
    first = [int((x != y).any(0).nonzero()[0]) for x, y in zip(a.segments, b.segments)
             if x.shape == y.shape and not torch.equal(x, y)]
    return text + (f" (others first differ at step {', '.join(map(str, first))})" if first else "")


# ---------------------------------------------------------------------- sections
def peer_section(cfg: GenerateBenchConfig, device, dtype, timer: Timer) -> dict:
    model = _model(peer_config(), cfg, device, dtype)
    prompts = _prompts(model, 1)
    peer_sampling = GenerationSettings(temperature=1.0, top_k=250, top_p=1.0, cfg_scale=1.0)
    sampling = CodebookSampling.from_settings(peer_sampling, model.config.num_codebooks)
    F = cfg.frames
    variants: dict[str, Callable[[], object]] = {"unimoe_eager": lambda: _decode(model, prompts, sampling, F)}
    if cfg.compile:
        variants["unimoe_compiled"] = lambda: _decode(model, prompts, sampling, F, compile=True)
    reference = None
    if cfg.reference:
        torch.manual_seed(cfg.seed)
        reference = ReferenceDecoder(ReferenceDecoderConfig()).to(device=device, dtype=dtype).eval()
        generator = torch.Generator(device=device)
        variants["reference"] = lambda: reference.generate(F, model.config.delays, temperature=1.0, top_k=250,
                                                           generator=generator.manual_seed(cfg.seed))
    seconds, _ = round_robin(variants, cfg, timer)
    result = {"model": {"unimoe_params": model.num_parameters(),
                        "reference_params": reference.num_parameters() if reference is not None else None,
                        "prompt_positions": len(prompts[0][0]), "frames": F, "batch": 1, "cfg": False,
                        "sampling": "temperature 1.0, top-k 250, top-p off"},
              "variants": {name: _rate(s, 1, F, cfg.frame_rate) for name, s in seconds.items()}}
    if reference is not None:
        result["speed_vs_reference"] = {name: round(seconds["reference"] / s, 3) for name, s in seconds.items()
                                        if name != "reference"}
    if device.type == "cpu":
        result["aten_ops_per_frame"] = {"unimoe_eager": ops_per_frame(variants["unimoe_eager"], F)}
        if reference is not None:
            result["aten_ops_per_frame"]["reference"] = ops_per_frame(variants["reference"], F)
    return result


def cache_section(cfg: GenerateBenchConfig, device, dtype, timer: Timer) -> dict:
    model = _model(peer_config(), cfg, device, dtype)
    prompts = _prompts(model, 1)
    sampling = CodebookSampling.from_settings(GenerationSettings(), model.config.num_codebooks)
    F = cfg.cache_frames
    variants = {"cache": lambda: _decode(model, prompts, sampling, F),
                "recompute": lambda: _decode(model, prompts, sampling, F, use_cache=False)}
    seconds, last = round_robin(variants, cfg, timer)
    return {"frames": F, "variants": {n: _rate(s, 1, F, cfg.frame_rate) for n, s in seconds.items()},
            "cache_speedup": round(seconds["recompute"] / seconds["cache"], 3),
            "cache_matches_recompute": _same(last["cache"], last["recompute"])}


def batch_section(cfg: GenerateBenchConfig, device, dtype, timer: Timer) -> dict:
    model = _model(peer_config(), cfg, device, dtype)
    sampling = CodebookSampling.from_settings(GenerationSettings(), model.config.num_codebooks)
    F = cfg.batch_frames
    out = {"frames": F, "cfg_scale": cfg.cfg_scale, "batches": {}}
    for size in [int(b) for b in cfg.batch_sizes.split(",")]:
        prompts = _prompts(model, size)
        variants = {"eager": lambda: _decode(model, prompts, sampling, F, cfg_scale=cfg.cfg_scale)}
        if cfg.compile:
            variants["compiled"] = lambda: _decode(model, prompts, sampling, F, cfg_scale=cfg.cfg_scale, compile=True)
        seconds, _ = round_robin(variants, cfg, timer)
        out["batches"][str(size)] = {name: _rate(s, size, F, cfg.frame_rate) for name, s in seconds.items()}
    return out


def moe_section(cfg: GenerateBenchConfig, device, dtype, timer: Timer) -> dict:
    model = _model(moe_config(cfg.moe_layers), cfg, device, dtype)
    prompts = _prompts(model, 1)
    sampling = CodebookSampling.from_settings(GenerationSettings(), model.config.num_codebooks)
    F = cfg.frames

    def run(top_p=None, budget=None):
        with inference_mode(model, top_p, budget):
            return _decode(model, prompts, sampling, F)

    variants = {f"top_p_{p}": (lambda p=p: run(top_p=float(p))) for p in cfg.top_p.split(",")}
    variants[f"budget_{cfg.budget}"] = lambda: run(budget=cfg.budget)
    seconds, last = round_robin(variants, cfg, timer)
    result = {"preset": "hidden 1024, %d layers, 8 heads (2 KV), 8 routed experts of 1024 + 1 null + 2 shared of 512, "
                        "8 codebooks x 1024, batch 1, no CFG" % cfg.moe_layers,
              "params": model.num_parameters(), "frames": F, "variants": {}}
    slowest = max(seconds.values())
    for name, s in seconds.items():
        result["variants"][name] = {**_rate(s, 1, F, cfg.frame_rate), "activated_experts_per_token": _experts(last[name]),
                                    "speedup_vs_slowest": round(slowest / s, 3)}
    reached = result["variants"][f"budget_{cfg.budget}"]["activated_experts_per_token"]
    result["budget"] = {"target": cfg.budget, "reached": reached,
                        "relative_error": None if reached is None else round((reached - cfg.budget) / cfg.budget, 4)}
    return result


def dispatch_section(cfg: GenerateBenchConfig, device, dtype, timer: Timer) -> dict:
    torch.manual_seed(cfg.seed)
    config = moe_config(1)
    from unimoe.moe.layer import build_moe_layer

    layer = build_moe_layer(config.hidden_size, config.moe).to(device=device, dtype=dtype).eval()
    out = {"layer": "hidden 1024, 8 routed experts of 1024 + 1 null + 2 shared of 512, top-p 0.7", "rows": {}}
    reps = 20
    for rows in [int(r) for r in cfg.dispatch_rows.split(",")]:
        x = torch.randn(rows, 1, config.hidden_size, device=device, dtype=dtype)

        def forward(path):
            def fn():
                layer.dispatch = path
                for _ in range(reps):
                    layer(x, stats="counts")
            return fn

        with torch.no_grad():
            seconds, _ = round_robin({p: forward(p) for p in ("grouped", "small_batch", "dense")}, cfg, timer)
        layer.dispatch = "auto"
        out["rows"][str(rows)] = {p: round(s / reps * 1e3, 4) for p, s in seconds.items()}
        out["rows"][str(rows)]["fastest"] = min(seconds, key=seconds.get)
        out["rows"][str(rows)]["auto_picks"] = layer.dispatch_path(rows)
    out["unit"] = "ms per layer forward (no grad)"
    return out


def gpu_section(cfg: GenerateBenchConfig, device, dtype, timer: Timer) -> dict:
    if device.type != "cuda":
        return {"skipped": "no CUDA device (these numbers need a GPU)"}
    bf16 = torch.bfloat16
    model = _model(peer_config(), cfg, device, bf16)
    sampling = CodebookSampling.from_settings(GenerationSettings(), model.config.num_codebooks)
    out = {"dtype": "bf16", "frames": cfg.frames, "cfg_scale": cfg.cfg_scale, "batches": {}}
    for size in (1, 32):
        prompts = _prompts(model, size)
        variants = {"eager": lambda: _decode(model, prompts, sampling, cfg.frames, cfg_scale=cfg.cfg_scale),
                    "compiled": lambda: _decode(model, prompts, sampling, cfg.frames, cfg_scale=cfg.cfg_scale,
                                                compile=True)}
        seconds, _ = round_robin(variants, cfg, timer)
        out["batches"][str(size)] = {n: _rate(s, size, cfg.frames, cfg.frame_rate) for n, s in seconds.items()}
    return out


RUNNERS = {"peer": peer_section, "cache": cache_section, "batch": batch_section, "moe": moe_section,
           "dispatch": dispatch_section, "gpu": gpu_section}


def run(cfg: GenerateBenchConfig) -> dict:
    sections = [s.strip() for s in cfg.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    timer = Timer(cfg.timer, device)
    result = {
        "benchmark": "generate", "config": asdict(cfg), "device": str(device), "dtype": cfg.dtype,
        "threads": torch.get_num_threads(), "timer": timer.kind, "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "frame_rate_assumed": cfg.frame_rate,
    }
    for name in sections:
        started = time.perf_counter()
        result[name] = RUNNERS[name](cfg, device, DTYPES[cfg.dtype], timer)
        result[name]["section_wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe bench generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(GenerateBenchConfig()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument(flag, type=type(value), default=value)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    as_json = args.pop("json")
    result = run(GenerateBenchConfig(**args))
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    print(json.dumps({k: v for k, v in result.items() if k in SECTIONS}, indent=1))
    return 0
