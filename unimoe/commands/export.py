"""``unimoe export``: a unimoe checkpoint -> a pickle-free model folder.

    unimoe export runs/demo/joint/checkpoints/last.ckpt models/demo-joint
    unimoe export runs/paper/joint/final models/unimoe-paper --dtype bf16 --overwrite

The folder holds ``model.safetensors`` (the AudioLM's tensors) and ``config.json`` (plain
JSON: model config, codec spec, task builders, stage, lineage). Reading it never runs code
from the file; ``unimoe generate --ckpt``, ``unimoe evaluate --ckpt``, ``unimoe upcycle`` and
``init_from`` all read it. The codec and an ``hf`` text tokenizer are recorded as the specs
they were trained with (paths included): ship those files next to the folder.
"""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = ("keep", "fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a unimoe .ckpt (any stage, 'unimoe upcycle' output) or model folder")
    p.add_argument("out", help="the model folder to write")
    p.add_argument("--dtype", choices=DTYPES, default="keep",
                   help="cast floating-point tensors (bf16 halves the size); default: keep the stored dtypes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    import torch

    from unimoe.checkpoint import CheckpointError, open_model_file, save_model_folder

    dtype = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
        source = open_model_file(args.source)
        if out.resolve() == source.path.resolve():
            raise CheckpointError(f"{out} is the source itself; export into another folder")
        _check_complete(source)
        save_model_folder(out, source.tensors, source.metadata, dtype=dtype)
    except CheckpointError as exc:
        print(f"unimoe export: error: {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.iterdir())
    print(json.dumps({"out": str(out), "stage": source.metadata.stage, "tensors": len(source.tensors),
                      "bytes": size}, indent=2))
    return 0


def _check_complete(source) -> None:
    """The source's tensors must rebuild its own model: exporting a broken file would hide the problem."""
    from unimoe.checkpoint import CheckpointError, load_state_into
    from unimoe.model.transformer import meta_model

    try:
        model = meta_model(source.metadata.config)
    except Exception as exc:  # noqa: BLE001 - a config that no longer builds
        raise CheckpointError(f"{source.path}: cannot build its model ({type(exc).__name__}: {exc})") from exc
    load_state_into(model, source.tensors, source.path, check_only=True)
