"""``unimoe tokenize``: encode a manifest's audio into codec-token shards (resumable).

    unimoe tokenize --manifest corpus/manifests/all.jsonl --codec spectral_rvq --out shards/all
    unimoe tokenize --manifest m.jsonl --codec '{"name": "encodec", "bandwidth": 6.0}' --out shards/m --workers 4

``--codec`` is a registered codec name, an import path, a JSON/YAML mapping
(``{"name": ..., ...}`` or ``{"class_path": ..., "init_args": {...}}``), a .yaml file holding
one, or a fitted ``spectral_rvq`` file (``codec.pt``, from ``unimoe codec fit``). Re-running the
same command after a crash resumes: finished shards are kept, the rest are encoded.
"""

from __future__ import annotations

import argparse
import os
import sys



def _codec_spec(text: str):
    """Name / import path / JSON-YAML mapping / .yaml file / fitted ``spectral_rvq`` file (.pt)."""
    from unimoe.codecs.spec import parse_codec_spec

    try:
        return parse_codec_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    from unimoe.data.tokenize import TokenizeConfig

    d = TokenizeConfig()
    p = argparse.ArgumentParser(prog="unimoe tokenize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="JSONL manifest (see docs/data.md)")
    p.add_argument("--codec", required=True, type=_codec_spec, help="codec: name, import path, JSON/YAML mapping, .yaml file or fitted spectral_rvq .pt")
    p.add_argument("--out", required=True, help="shard directory (created; resumed if it exists)")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="encoding processes (1: this process)")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="manifest lines per shard")
    p.add_argument("--min-seconds", type=float, default=d.min_seconds)
    p.add_argument("--max-seconds", type=float, default=d.max_seconds)
    p.add_argument("--silence-db", type=float, default=d.silence_db, help="RMS level (dBFS) below which a clip is silent")
    p.add_argument("--prompt-tasks", nargs="*", default=None,
                   help="tasks that need a speaker prompt (default: those that declare one, e.g. tts)")
    p.add_argument("--prompt-max-seconds", type=float, default=d.prompt_max_seconds)
    p.add_argument("--prompt-min-seconds", type=float, default=d.prompt_min_seconds)
    p.add_argument("--splits", nargs="*", default=None, choices=("train", "val", "test"), help="only these splits")
    p.add_argument("--overwrite", action="store_true", help="accept a folder made with other settings; redo changed shards")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from unimoe.codecs.spectral_rvq import CodecFileError
    from unimoe.codecs.weights import CodecWeightsError
    from unimoe.data.manifest import ManifestError
    from unimoe.data.shards import ShardError
    from unimoe.data.tokenize import TokenizeConfig, tokenize_manifest
    from unimoe.locks import FolderInUseError
    from unimoe.registry import RegistryError

    args = build_parser().parse_args(argv)
    try:
        cfg = TokenizeConfig(
            shard_size=args.shard_size, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
            silence_db=args.silence_db, prompt_tasks=None if args.prompt_tasks is None else tuple(args.prompt_tasks), prompt_max_seconds=args.prompt_max_seconds,
            prompt_min_seconds=args.prompt_min_seconds, splits=tuple(args.splits) if args.splits else None,
        )
        report = tokenize_manifest(args.manifest, args.codec, args.out, config=cfg, workers=args.workers,
                                   overwrite=args.overwrite, progress=not args.quiet)
    except (ManifestError, ShardError, RegistryError, CodecFileError, CodecWeightsError, ValueError, FileNotFoundError,
            FolderInUseError) as exc:
        print(f"unimoe tokenize: error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
