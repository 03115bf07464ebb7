"""``unimoe import``: bring a model released in another format into unimoe (a model folder).

    unimoe import uni-moe-audio models/UniMoE-Audio-preview models/unimoe-audio-preview
    unimoe generate --ckpt models/unimoe-audio-preview --preset uni_moe_audio_t2m --task t2m --text "calm piano" --out out/

``uni-moe-audio``: the authors' UniMoE-Audio checkpoint (HITsz-TMG/Uni-MoE, Hugging Face
``foggyforest/UniMoE-Audio-preview``: config.json, model.safetensors.index.json + shards,
tokenizer files). Only safetensors are read (never pickle); tensors are streamed into the
output one at a time. See docs/pretrained.md, "The authors' released model".
"""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = ("keep", "fp32", "bf16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    uma = sub.add_parser("uni-moe-audio", help="the authors' released UniMoE-Audio model (Hugging Face format)")
    uma.add_argument("source", help="the release folder (config.json, safetensors, tokenizer files)")
    uma.add_argument("out", help="the unimoe model folder to write")
    uma.add_argument("--codec", help="codec spec to record, JSON (default {\"name\": \"dac\", \"variant\": \"16khz\"}; "
                                     "e.g. '{\"name\": \"dac\", \"path\": \"weights_16khz.pth\"}')")
    uma.add_argument("--dtype", choices=DTYPES, default="keep", help="cast floating tensors (default: keep the release's bf16)")
    uma.add_argument("--max-seq-len", type=int, default=8192, help="longest sequence / default KV cache (default 8192)")
    uma.add_argument("--overwrite", action="store_true", help="replace an existing model folder at OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from unimoe.checkpoint import CheckpointError
    from unimoe.pretrained.hub import PretrainedError
    from unimoe.release.convert import import_release

    dtype = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        codec = json.loads(args.codec) if args.codec else None
        summary = import_release(args.source, args.out, codec=codec, dtype=dtype, max_seq_len=args.max_seq_len,
                                 overwrite=args.overwrite)
    except json.JSONDecodeError as exc:
        print(f"unimoe import: error: --codec is not valid JSON: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, PretrainedError) as exc:
        print(f"unimoe import: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
