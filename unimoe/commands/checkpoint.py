"""``unimoe checkpoint``: look into and consolidate sharded checkpoints (``MoEParallelStrategy`` folders).

    unimoe checkpoint consolidate runs/joint/final.ckpt --out joint.ckpt   # one file: weights + metadata
    unimoe checkpoint info runs/joint/checkpoints/last.ckpt                # stage, step, tensors, size

Generation, evaluation, upcycling and ``init_from`` read sharded folders directly (the weights
are assembled in memory); ``consolidate`` writes the single file they read the same way, to
copy or publish a model without its optimizer state. See docs/training.md, "Scaling out".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("consolidate", help="write a sharded checkpoint folder as one checkpoint file (weights only)")
    c.add_argument("path", help="sharded checkpoint folder (holds meta.pt and *.distcp)")
    c.add_argument("--out", required=True, help="the checkpoint file to write")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    i = sub.add_parser("info", help="what a checkpoint (file or sharded folder) holds")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    from unimoe.checkpoint import CheckpointError, read_metadata
    from unimoe.sharded_checkpoint import (
        ShardedCheckpointError, checkpoint_exists, consolidate, is_sharded_checkpoint, read_header, tensor_shapes,
    )

    args = build_parser().parse_args(argv)
    path = Path(args.path)
    try:
        if not checkpoint_exists(path):
            raise ShardedCheckpointError(f"checkpoint not found: {path}")
        if args.action == "consolidate":
            if not is_sharded_checkpoint(path):
                raise ShardedCheckpointError(f"{path} is a single-file checkpoint already; nothing to consolidate")
            out = consolidate(path, args.out, overwrite=args.overwrite)
            print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) from {path}")
            return 0
        info = _info(path, is_sharded_checkpoint(path), read_header, tensor_shapes, read_metadata)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for key, value in info.items():
                print(f"{key:18s} {value}")
        return 0
    except (ShardedCheckpointError, CheckpointError) as exc:
        print(f"unimoe checkpoint: error: {exc}", file=sys.stderr)
        return 2


def _info(path: Path, sharded: bool, read_header, tensor_shapes, read_metadata) -> dict:
    import math

    from unimoe.checkpoint import read_checkpoint

    if sharded:
        header = read_header(path)
        shapes = tensor_shapes(path)
        tensors = {k: s for k, (s, _) in shapes.items()}
        shards = len(list(path.glob("*.distcp")))
        has_optimizer = bool(tensor_shapes(path, prefix="optimizer_"))
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    else:
        header = read_checkpoint(path)  # weights_only=True, memory-mapped: nothing in the file runs
        tensors = {k: tuple(v.shape) for k, v in (header.get("state_dict") or {}).items()}
        shards, size = 0, path.stat().st_size
        has_optimizer = bool(header.get("optimizer_states"))
    meta = read_metadata(header, path)
    return {
        "path": str(path), "format": "sharded" if sharded else "file", "shard_files": shards,
        "stage": meta.stage, "global_step": header.get("global_step"), "epoch": header.get("epoch"),
        "tensors": len(tensors), "parameters": sum(math.prod(s) for s in tensors.values()),
        "optimizer_state": has_optimizer, "size_mib": round(size / 2**20, 2),
        "moe": meta.config.moe is not None,
    }
