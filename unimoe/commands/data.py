"""``unimoe data``: build the offline demo corpus, import datasets, validate manifests.

    unimoe data demo --out DIR [--scale 1.0] [--seed 0] [--workers N]
    unimoe data import-librispeech --root DIR --out M.jsonl [--split train] [--seed 0]
    unimoe data import-captions --csv C --audio-dir DIR --out M.jsonl [--id-column ytid] ...
    unimoe data validate M.jsonl|SHARD_DIR [...] [--check-files]
    unimoe data index SHARD_DIR [...]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter


def _demo(args: argparse.Namespace) -> int:
    from unimoe.data.demo.build import DemoConfig, build_demo_corpus

    cfg = DemoConfig.scaled(args.scale, seed=args.seed)
    report = build_demo_corpus(args.out, cfg, workers=args.workers, progress=not args.quiet)
    print(report.summary())
    return 0


def _import_librispeech(args: argparse.Namespace) -> int:
    from unimoe.data.importers import import_librispeech

    report = import_librispeech(args.root, args.out, split=args.split, lang=args.lang, lowercase=args.lowercase,
                                seed=args.seed, prompt_min_seconds=args.prompt_min_seconds,
                                prompt_max_seconds=args.prompt_max_seconds)
    print(report.summary())
    _print_skipped(report.skipped, args.verbose)
    return 0


def _import_captions(args: argparse.Namespace) -> int:
    from unimoe.data.importers import import_captions

    report = import_captions(
        args.csv, args.audio_dir, args.out, id_column=args.id_column, caption_column=args.caption_column,
        audio_column=args.audio_column, audio_template=args.audio_template, split_column=args.split_column,
        default_split=args.split, video_column=args.video_column, video_dir=args.video_dir, task=args.task,
        delimiter="\t" if args.delimiter == "tab" else args.delimiter,
    )
    print(report.summary())
    _print_skipped(report.skipped, args.verbose)
    return 0


def _print_skipped(skipped: list[tuple[str, str]], verbose: bool) -> None:
    for what, reason in skipped[: None if verbose else 20]:
        print(f"  skipped {what}: {reason}")
    if not verbose and len(skipped) > 20:
        print(f"  ... {len(skipped) - 20} more (--verbose lists all)")


def _validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unimoe.data.manifest import check_manifest

    status = 0
    for path in args.manifests:
        if Path(path).is_dir():
            status = _validate_shards(Path(path)) or status
            continue
        entries, problems = check_manifest(path, check_files=args.check_files)
        for problem in problems:
            print(problem)
        tasks = Counter(e.task for _, e in entries)
        splits = Counter(e.split for _, e in entries)
        hours = sum(e.duration or 0.0 for _, e in entries) / 3600
        verdict = "OK" if not problems else f"{len(problems)} problem(s)"
        print(f"{path}: {verdict}; {len(entries)} valid entries ({dict(tasks)}; {dict(splits)}; {hours:.2f} h)")
        status = status or (1 if problems else 0)
    return status


def _validate_shards(directory) -> int:
    """A shard folder: its index (checksums, ranges, shard files), then a summary."""
    import numpy as np

    from unimoe.data.index import check_index, open_index

    problems = check_index(directory)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{directory}: {len(problems)} problem(s)")
        return 1
    index = open_index(directory)
    counts = {}
    for name in ("task", "split"):
        codes = np.bincount(np.asarray(index.column(name)), minlength=len(index.categories(name)))
        counts[name] = {c: int(n) for c, n in zip(index.categories(name), codes)}
    hours = float(np.asarray(index.column("duration")).sum()) / 3600
    print(f"{directory}: OK; {len(index)} examples in {len(index.shards)} shards ({counts['task']}; {counts['split']}; "
          f"{hours:.2f} h)")
    return 0


def _index(args: argparse.Namespace) -> int:
    """Convert shard folders with the old index.json to the memory-mapped index (once)."""
    from pathlib import Path

    from unimoe.data.index import INDEX_DIR, open_index

    for directory in args.directories:
        d = Path(directory)
        before = (d / INDEX_DIR).stat().st_mtime_ns if (d / INDEX_DIR).is_dir() else None
        index = open_index(d, in_memory_fallback=False)
        after = (d / INDEX_DIR).stat().st_mtime_ns
        state = "up to date" if before == after else "converted from index.json"
        print(f"{d}: {len(index)} examples in {d / INDEX_DIR} ({state})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimoe data", description="Build the demo corpus, import datasets, validate manifests.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthesise the offline demo corpus (espeak-ng speech, fluidsynth music, synthetic video)")
    p.add_argument("--out", required=True, help="output folder (re-running completes/reuses it)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply clip counts (default 1: 320 speech, 22 t2m, 10 v2m, plus 16 test pieces per music task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="parallel synthesis jobs (default: CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)

    p = sub.add_parser("import-librispeech", help="LibriSpeech (*.trans.txt) / LibriTTS (*.normalized.txt) tree -> tts manifest")
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    p.add_argument("--split", choices=("train", "val", "test"), default=None, help="force a split (default: from subset folder names)")
    p.add_argument("--lang", default="en")
    p.add_argument("--lowercase", action="store_true", help="lower-case transcripts (LibriSpeech is upper case)")
    p.add_argument("--seed", type=int, default=0, help="seed of the speaker-prompt choice")
    p.add_argument("--prompt-min-seconds", type=float, default=1.0)
    p.add_argument("--prompt-max-seconds", type=float, default=10.0)
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_import_librispeech)

    p = sub.add_parser("import-captions", help="caption CSV + audio folder (MusicCaps / FMA style) -> t2m/v2m manifest")
    p.add_argument("--csv", required=True)
    p.add_argument("--audio-dir", required=True)
    p.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    p.add_argument("--id-column", default="ytid")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--audio-column", default=None, help="column with the audio path relative to --audio-dir")
    p.add_argument("--audio-template", default=None, help="audio name from the row, e.g. '{track_id:0>6}' (FMA)")
    p.add_argument("--split-column", default=None, help="train/val/test or true/false (= held out -> test) per row")
    p.add_argument("--split", choices=("train", "val", "test"), default="train", help="split when there is no split column")
    p.add_argument("--video-column", default=None, help="column with a frames file (.npy/.npz) -> task v2m")
    p.add_argument("--video-dir", default=None)
    p.add_argument("--task", default=None, help="task name (default t2m, or v2m with --video-column)")
    p.add_argument("--delimiter", default=",", help="CSV delimiter ('tab' for TSV)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_import_captions)

    p = sub.add_parser("validate", help="check manifests (every problem names its line and field) or shard folders "
                                         "(index checksums, value ranges, shard files)")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST_OR_SHARD_DIR")
    p.add_argument("--check-files", action="store_true", help="also require every audio/prompt/video file to exist")
    p.set_defaults(func=_validate)

    p = sub.add_parser("index", help="convert shard folders with the old index.json to the memory-mapped index")
    p.add_argument("directories", nargs="+", metavar="SHARD_DIR")
    p.set_defaults(func=_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # ShardError is a RuntimeError
        print(f"unimoe data {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
