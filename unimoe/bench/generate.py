"""Generation benchmark: KV cache vs full recomputation, and lowered router top-p (adaptive compute).

One model (a randomly initialised preset, optionally with fewer layers), one set of prompts,
and three variants of the real decoding loop (:func:`unimoe.generation.decode`), timed
round-robin in the same process (median of repeats) so the ratios survive load drift:

* ``cache``            KV-cache decoding, the routers' trained top-p
* ``no_cache``         the whole sequence recomputed every step (what the cache saves)
* ``cache_low_top_p``  KV-cache decoding with the routers' top-p lowered (fewer experts per token)

Every request generates exactly ``--frames`` frames (EOS is held back until then and forced
there), so the variants do the same number of steps. Real-time factor = seconds of compute
per second of audio at ``--frame-rate`` (the codec is not timed: this measures the LM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from unimoe.devices import resolve_device
from unimoe.generation.decode import DecodeOutput, decode
from unimoe.generation.generator import effective_router_top_p, inference_mode
from unimoe.generation.sampling import CodebookSampling
from unimoe.generation.settings import GenerationSettings
from unimoe.model.config import AudioLMConfig
from unimoe.model.tasks import build_task_builder
from unimoe.model.transformer import AudioLM

CAPTIONS = [
    "calm solo piano, slow tempo, soft dynamics",
    "energetic drums and bass",
    "a string quartet playing a sad melody in a minor key, with long sustained notes and gentle vibrato",
    "lo-fi beat",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class GenerateBenchConfig:
    preset: str = "small-moe"
    layers: int = 4
    """Keep only this many layers of the preset (0 = all): same widths, shorter run."""
    requests: int = 2
    frames: int = 48
    frame_rate: float = 50.0
    """Codec frames per second for the real-time factor (spectral_rvq's default is 50)."""
    cfg_scale: float = 3.0
    low_top_p: float = 0.3
    repeats: int = 3
    warmup: int = 1
    """Untimed cached runs before timing (first-call allocations)."""
    dtype: str = "fp32"
    device: str = "auto"
    threads: int = 0
    """torch intra-op threads (0 = leave torch's default)."""
    timer: str = "wall"
    """``wall`` (perf_counter) or ``cpu`` (process CPU time: steadier on a shared, contended CPU with --threads 1)."""
    seed: int = 0


def build_model(cfg: GenerateBenchConfig) -> AudioLM:
    overrides = {"num_layers": cfg.layers} if cfg.layers else {}
    torch.manual_seed(cfg.seed)
    return AudioLM(AudioLMConfig.from_preset(cfg.preset, **overrides)).eval()


def _run(model: AudioLM, prompts, sampling, cfg: GenerateBenchConfig, *, use_cache: bool, top_p: float | None) -> DecodeOutput:
    cond, uncond = prompts
    device = model.audio_head.weight.device
    with inference_mode(model, top_p):
        return decode(model, cond, uncond if cfg.cfg_scale != 1.0 else None, sampling,
                      max_frames=[cfg.frames] * len(cond), min_frames=cfg.frames, cfg_scale=cfg.cfg_scale,
                      use_cache=use_cache,
                      generators=[torch.Generator(device=device).manual_seed(cfg.seed + i) for i in range(len(cond))])


def _experts(out: DecodeOutput) -> float | None:
    if out.expert_sums is None:
        return None
    return round(float(out.expert_sums.sum(0).div(out.expert_tokens.sum()).mean()), 4)


def run(cfg: GenerateBenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model = build_model(cfg).to(device=device, dtype=DTYPES[cfg.dtype])
    if model.config.moe is None:
        raise ValueError(f"--preset {cfg.preset} is dense: the low-top-p variant needs an MoE preset (e.g. small-moe)")
    t2m = build_task_builder("t2m", model.config)
    pairs = [t2m.cfg_prefixes(text=CAPTIONS[i % len(CAPTIONS)]) for i in range(cfg.requests)]
    prompts = ([c for c, _ in pairs], [u for _, u in pairs])
    sampling = CodebookSampling.from_settings(GenerationSettings(), model.config.num_codebooks)
    trained_top_p = effective_router_top_p(model)
    variants = {
        "cache": dict(use_cache=True, top_p=None),
        "no_cache": dict(use_cache=False, top_p=None),
        "cache_low_top_p": dict(use_cache=True, top_p=cfg.low_top_p),
    }
    for _ in range(cfg.warmup):
        _run(model, prompts, sampling, cfg, **variants["cache"])
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, DecodeOutput] = {}
    if cfg.timer not in ("wall", "cpu"):
        raise ValueError(f"--timer must be wall or cpu, got {cfg.timer!r}")
    for _ in range(cfg.repeats):
        for name, kw in variants.items():
            cpu_start = time.process_time()
            outputs[name] = out = _run(model, prompts, sampling, cfg, **kw)
            times[name].append(out.seconds if cfg.timer == "wall" else time.process_time() - cpu_start)
    audio_seconds = cfg.requests * cfg.frames / cfg.frame_rate
    result_variants = {}
    for name, kw in variants.items():
        sec = statistics.median(times[name])
        result_variants[name] = {
            "seconds": round(sec, 4),
            "frames_per_second": round(cfg.requests * cfg.frames / sec, 2),
            "real_time_factor": round(sec / audio_seconds, 4),
            "router_top_p": kw["top_p"] if kw["top_p"] is not None else trained_top_p,
            "activated_experts_per_token": _experts(outputs[name]),
            "times": [round(t, 4) for t in times[name]],
        }
    same = sum(torch.equal(a, b) for a, b in zip(outputs["cache"].segments, outputs["no_cache"].segments))
    return {
        "benchmark": "generate",
        "config": asdict(cfg),
        "device": str(device),
        "dtype": cfg.dtype,
        "threads": torch.get_num_threads(),
        "timer": cfg.timer,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "model": {
            "preset": cfg.preset, "layers": model.config.num_layers, "hidden": model.config.hidden_size,
            "params": model.num_parameters(), "params_active_min": model.num_parameters("min"),
            "params_active_max": model.num_parameters("max"),
        },
        "prompt_lengths": [len(s) for s in prompts[0]],
        "rows": cfg.requests * (2 if cfg.cfg_scale != 1.0 else 1),
        "frames_per_request": cfg.frames,
        "frame_rate_assumed": cfg.frame_rate,
        "variants": result_variants,
        "cache_speedup": round(result_variants["no_cache"]["seconds"] / result_variants["cache"]["seconds"], 3),
        "low_top_p_speedup": round(result_variants["cache"]["seconds"] / result_variants["cache_low_top_p"]["seconds"], 3),
        "activated_experts_per_token": {
            str(trained_top_p): result_variants["cache"]["activated_experts_per_token"],
            str(cfg.low_top_p): result_variants["cache_low_top_p"]["activated_experts_per_token"],
        },
        "cache_matches_recompute": f"{same}/{cfg.requests} requests token-identical",
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe bench generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(GenerateBenchConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    as_json = args.pop("json")
    result = run(GenerateBenchConfig(**args))
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    for name, v in result["variants"].items():
        print(f"{name:16s} {v['seconds']:8.3f} s  {v['frames_per_second']:8.1f} frames/s  RTF {v['real_time_factor']:.3f}"
              f"  router top-p {v['router_top_p']}  experts/token {v['activated_experts_per_token']}")
    print(f"cache speedup {result['cache_speedup']}x, low top-p speedup {result['low_top_p_speedup']}x "
          f"({result['cache_matches_recompute']})")
    return 0
