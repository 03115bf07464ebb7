"""Memory of starting a model from a pretrained LM: streamed ``init_from`` vs a full state-dict load.

A random Qwen2-layout checkpoint (``config.json``, ``model.safetensors``, a tiny tokenizer;
no ``transformers`` needed) is written once, then each variant runs in a fresh process that
samples its own anonymous resident memory (``RssAnon`` in ``/proc/self/status``: the heap,
not the page cache of the memory-mapped file):

* ``base``      imports only (the floor every variant pays)
* ``streamed``  ``SpecialistStage(init_from=folder)``: the model, then one tensor at a time
* ``full``      the usual way: ``safetensors.torch.load_file`` every file, rename/stack the keys,
                ``model.load_state_dict``

Reported: peak anonymous MB above ``base`` per variant and as a multiple of the model's
parameter bytes (1.0 = the model alone). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

AUDIO = {"num_codebooks": 4, "codebook_size": 16, "delays": [0, 1, 2, 3], "max_seq_len": 256}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe bench load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="dtype of the checkpoint file")
    p.add_argument("--dir", help="where to write the checkpoint (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child process
    return p


def write_checkpoint(folder: Path, args) -> None:
    import torch
    from tokenizers import Tokenizer, models

    from unimoe.pretrained.hf_weights import hf_key_map
    from unimoe.safetensors_io import save_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    heads, kv = max(1, args.hidden // 64), max(1, args.hidden // 512)
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": args.hidden,
              "num_hidden_layers": args.layers, "num_attention_heads": heads, "num_key_value_heads": kv,
              "intermediate_size": args.intermediate, "vocab_size": args.vocab, "rope_theta": 1e6,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config))
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    D, F, V, q, k = args.hidden, args.intermediate, args.vocab, heads * (args.hidden // heads), kv * (args.hidden // heads)
    shapes = {"embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "norm.weight": (D,), "layernorm.weight": (D,),
              "q_proj.weight": (q, D), "k_proj.weight": (k, D), "v_proj.weight": (k, D), "o_proj.weight": (D, q),
              "q_proj.bias": (q,), "k_proj.bias": (k,), "v_proj.bias": (k,),
              "gate_proj.weight": (F, D), "up_proj.weight": (F, D), "down_proj.weight": (D, F)}
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tensors = {}
    for parts in hf_key_map(args.layers, qkv_bias=True, tie=False).values():
        for key in parts:
            shape = next(v for suffix, v in shapes.items() if key.endswith(suffix))
            tensors[key] = (0.02 * torch.randn(shape)).to(dtype)
    save_safetensors(folder / "model.safetensors", tensors)


def _peak_anon_mb(run) -> tuple[float, float]:
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    time.sleep(0.02)
    done.set()
    thread.join()
    return peak[0], seconds


def child(variant: str, folder: Path) -> dict:
    import torch

    from unimoe.training.stages import SpecialistStage

    result: dict = {}

    def streamed() -> None:
        stage = SpecialistStage(model=dict(AUDIO), init_from=str(folder))
        result["model_mb"] = sum(p.numel() * p.element_size() for p in stage.model.parameters()) / 2**20

    def full() -> None:
        from safetensors.torch import load_file

        from unimoe.model.config import AudioLMConfig
        from unimoe.model.transformer import AudioLM
        from unimoe.pretrained import merge_backbone, open_pretrained

        lm = open_pretrained(folder)
        model = AudioLM(merge_backbone(AudioLMConfig(**AUDIO), lm.backbone, str(folder)))
        hf = {}
        for path in sorted(folder.glob("*.safetensors")):
            hf.update(load_file(str(path)))
        state = {k: hf[v[0]] if len(v) == 1 else torch.stack([hf[p] for p in v]) for k, v in lm.tensors.keys_map.items()}
        model.load_state_dict(state, strict=False)

    run = {"base": lambda: None, "streamed": streamed, "full": full}[variant]
    result["peak_anon_mb"], result["seconds"] = _peak_anon_mb(run)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.variant:
        import unimoe.training.stages  # noqa: F401  import costs belong to the floor

        print(json.dumps(child(args.variant, Path(args.dir))))
        return 0
    if not Path("/proc/self/status").is_file():
        print("unimoe bench load: needs Linux (/proc/self/status)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp) / "pretrained"
        if not (folder / "model.safetensors").is_file():
            write_checkpoint(folder, args)
        out = {}
        for variant in ("base", "streamed", "full"):
            proc = subprocess.run([sys.executable, "-m", "unimoe", "bench", "load", "--variant", variant,
                                   "--dir", str(folder)], capture_output=True, text=True, check=True)
            out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        file_mb = (folder / "model.safetensors").stat().st_size / 2**20
    model_mb = out["streamed"]["model_mb"]
    report = {"checkpoint_mb": round(file_mb, 1), "checkpoint_dtype": args.dtype, "model_mb": round(model_mb, 1)}
    for variant in ("streamed", "full"):
        extra = out[variant]["peak_anon_mb"] - out["base"]["peak_anon_mb"]
        report[variant] = {"extra_mb": round(extra, 1), "x_model": round(extra / model_mb, 3),
                           "seconds": round(out[variant]["seconds"], 2)}
    print(json.dumps(report, indent=None if args.json else 2))
    return 0
