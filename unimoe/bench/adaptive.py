"""Adaptive compute on a trained checkpoint: quality and speed at several router top-p values and expert budgets.

``unimoe bench adaptive --ckpt runs/demo/joint/final --shards data/demo/shards`` runs, for
each routing setting (the trained top-p, ``--top-p`` overrides, ``--budgets`` experts per token):

* quality: the teacher-forced audio loss (sum over codebooks of each codebook's mean CE, the
  training stages' ``val/loss``) on every example of ``--split`` of the task shard folders
  under ``--shards``, with the real experts per token those tokens used;
* speed: decoding frames/s of ``--requests`` text-to-music prompts at batch 1 with CFG
  (``--frames`` frames each, eager), with the experts per token decoding used.

Settings are timed round-robin (median of ``--repeats``). A budget's controller adapts while
it runs (evaluation batches, decoding steps), as ``unimoe generate --experts-per-token`` does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from unimoe.bench.generate import CAPTIONS, Timer
from unimoe.checkpoint import load_model
from unimoe.data.index import INDEX_DIR, LEGACY_INDEX_FILE, META_FILE
from unimoe.generation.decode import decode
from unimoe.generation.generator import effective_router_top_p, inference_mode
from unimoe.generation.sampling import CodebookSampling
from unimoe.generation.settings import GenerationSettings
from unimoe.model.tasks import build_task_builder


@dataclass
class AdaptiveBenchConfig:
    ckpt: str = ""
    shards: str = ""
    """Folder with one shard folder per task (``tts``, ``t2m``, ``v2m``: what ``unimoe tokenize`` wrote)."""
    split: str = "test"
    top_p: str = "0.3,0.5,0.9"
    budgets: str = "1.0,1.5,2.0,3.0"
    requests: int = 4
    frames: int = 100
    cfg_scale: float = 3.0
    repeats: int = 3
    threads: int = 1
    timer: str = "auto"
    max_tokens: int = 1024
    """Padded tokens per evaluation batch (smaller batches: more controller updates for a budget)."""


def eval_batches(cfg: AdaptiveBenchConfig, model) -> list:
    """The split's batches (labels included), built by the training data module from the task shards."""
    from unimoe.data.datamodule import UniMoEDataModule

    root = Path(cfg.shards)
    sources = {d.name: str(d) for d in sorted(root.iterdir()) if is_shard_folder(d)} if root.is_dir() else {}
    if not sources:
        raise ValueError(f"--shards {root}: no shard folders (each with {INDEX_DIR}/{META_FILE} or {LEGACY_INDEX_FILE}) inside")
    dm = UniMoEDataModule(sources, model=model.config, max_tokens=cfg.max_tokens, train_split=None,
                          val_split=cfg.split if cfg.split == "val" else None,
                          test_split=cfg.split if cfg.split != "val" else None)
    dm.setup("validate" if cfg.split == "val" else "test")
    loader = dm.val_dataloader() if cfg.split == "val" else dm.test_dataloader()
    batches = list(loader)
    if not batches:
        raise ValueError(f"--shards {root}: no examples in split {cfg.split!r}")
    return batches


def is_shard_folder(path: Path) -> bool:
    """A finished task shard folder: memory-mapped columns or an older ``index.json``."""
    return (path / INDEX_DIR / META_FILE).is_file() or (path / LEGACY_INDEX_FILE).is_file()


@torch.no_grad()
def quality(model, batches) -> dict:
    """Token-weighted audio loss over the batches and the real experts per token they used."""
    ce_sum = torch.zeros(model.config.num_codebooks)
    targets = torch.zeros(model.config.num_codebooks)
    experts = tokens = 0.0
    for batch in batches:
        out = model(batch, logits="none")
        ce_sum += out.codebook_losses * out.num_targets
        targets += out.num_targets
        infos = [i for i in out.routing if i is not None]
        n = float(infos[0].num_tokens)
        experts += sum(float(i.mean_active_real) for i in infos) / len(infos) * n
        tokens += n
    return {"audio_loss": round(float((ce_sum / targets.clamp_min(1)).sum()), 4),
            "experts_per_token": round(experts / max(tokens, 1.0), 4), "tokens": int(tokens)}


def run(cfg: AdaptiveBenchConfig) -> dict:
    if not cfg.ckpt:
        raise ValueError("--ckpt is required (an MoE checkpoint, e.g. runs/demo/joint/final)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, meta = load_model(cfg.ckpt, map_location="cpu")
    model.eval()
    if model.config.moe is None:
        raise ValueError(f"--ckpt {cfg.ckpt} is a dense model: adaptive compute needs an MoE checkpoint")
    trained = effective_router_top_p(model)
    settings = [("top_p", trained)] + [("top_p", float(p)) for p in cfg.top_p.split(",") if p]
    settings += [("budget", float(b)) for b in cfg.budgets.split(",") if b]
    batches = eval_batches(cfg, model)
    t2m = build_task_builder((meta.tasks or {}).get("t2m", "t2m"), model.config)
    pairs = [t2m.cfg_prefixes(text=CAPTIONS[i % len(CAPTIONS)]) for i in range(cfg.requests)]
    sampling = CodebookSampling.from_settings(GenerationSettings(), model.config.num_codebooks)
    timer = Timer(cfg.timer, torch.device("cpu"))

    def decode_all(kind: str, value: float):
        with inference_mode(model, value if kind == "top_p" else None, value if kind == "budget" else None):
            outs = [decode(model, [c], [u], sampling, max_frames=[cfg.frames], min_frames=cfg.frames,
                           cfg_scale=cfg.cfg_scale, seeds=[i]) for i, (c, u) in enumerate(pairs)]
        sums = torch.stack([o.expert_sums[0] for o in outs]).sum(0)
        count = float(sum(o.expert_tokens[0] for o in outs))
        return float((sums / count).mean())

    times: dict[str, list[float]] = {}
    decode_experts: dict[str, float] = {}
    for _ in range(cfg.repeats):
        for kind, value in settings:
            name = f"{kind}={value:g}"
            seconds, decode_experts[name] = timer(lambda: decode_all(kind, value))
            times.setdefault(name, []).append(seconds)
    rows = {}
    for kind, value in settings:
        name = f"{kind}={value:g}"
        with inference_mode(model, value if kind == "top_p" else None, value if kind == "budget" else None):
            q = quality(model, batches)
            for _ in range(2 if kind == "budget" else 0):  # the controller started from the trained top-p: settle it
                q = quality(model, batches)
        sec = statistics.median(times[name])
        rows[name] = {"router": kind, "value": value, **q,
                      "decode_frames_per_second": round(cfg.requests * cfg.frames / sec, 1),
                      "decode_experts_per_token": round(decode_experts[name], 4)}
        if kind == "budget":
            rows[name]["decode_budget_error"] = round((decode_experts[name] - value) / value, 4)
    base = rows[f"top_p={trained:g}"]
    for row in rows.values():
        row["speed_vs_trained"] = round(row["decode_frames_per_second"] / base["decode_frames_per_second"], 3)
        row["loss_vs_trained"] = round(row["audio_loss"] - base["audio_loss"], 4)
    return {"benchmark": "adaptive", "config": asdict(cfg), "trained_top_p": trained,
            "model": {"params": model.num_parameters(), "layers": model.config.num_layers,
                      "hidden": model.config.hidden_size, "routed_experts": model.config.moe.num_routed_experts,
                      "null_experts": model.config.moe.num_null_experts},
            "eval_examples": sum(b.batch_size for b in batches), "threads": torch.get_num_threads(),
            "timer": timer.kind, "settings": rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe bench adaptive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(AdaptiveBenchConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, required=name in ("ckpt", "shards"))
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    as_json = args.pop("json")
    started = time.perf_counter()
    result = run(AdaptiveBenchConfig(**args))
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'setting':14s} {'loss':>8s} {'experts':>8s} {'frames/s':>9s} {'dec.experts':>11s} {'speed':>6s}")
    for name, r in result["settings"].items():
        print(f"{name:14s} {r['audio_loss']:8.3f} {r['experts_per_token']:8.3f} {r['decode_frames_per_second']:9.1f} "
              f"{r['decode_experts_per_token']:11.3f} {r['speed_vs_trained']:6.2f}")
    return 0
