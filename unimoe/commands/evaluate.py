"""``unimoe evaluate``: score a folder of WAVs, an evaluation manifest, or a checkpoint.

    unimoe evaluate --suite evaluation/demo.yaml --wavs out/wavs --manifest data/test.jsonl
    unimoe evaluate --suite speech --manifest eval.jsonl            # audio = generated clip
    unimoe evaluate --suite music --ckpt model.ckpt --manifest requests.jsonl

Writes results.json, results.md and an MLflow run into --out (see docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import sys

from unimoe.evaluation.errors import EvaluationError
from unimoe.registry import RegistryError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, help="suite YAML path, or a name from evaluation/ (speech, music, demo)")
    p.add_argument("--manifest", required=True,
                   help="JSONL: an evaluation manifest (audio = generated clip), or with --wavs/--ckpt a reference/"
                        "request manifest in the training format (id, task, audio, text, speaker, prompt_audio, ...)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--wavs", help="folder of generated clips named <id>.wav")
    src.add_argument("--ckpt", help="checkpoint to generate from first (needs unimoe.generation)")
    p.add_argument("--preset", help="with --ckpt: the generation preset to sample with (e.g. uni_moe_audio_tts)")
    p.add_argument("--out", help="output folder (default runs/eval/<suite>-<time>)")
    p.add_argument("--reference-set", help="folder or manifest of reference clips for FAD (overrides the suite)")
    p.add_argument("--audio-root", help="resolve relative manifest paths against this folder (default: the manifest's)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    p.add_argument("--experiment", default="unimoe-eval", help="MLflow experiment name")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--split", help="use only manifest lines of this split (e.g. test; lines without one are train)")
    p.add_argument("--limit", type=int, help="score only the first N items")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="report metrics whose backend cannot load (missing package/weights) instead of failing")
    p.add_argument("--by-task", action="store_true",
                   help="score each task (tts, t2m, v2m...) on its own: one row per metric and task")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unimoe.evaluation.report import to_markdown
    from unimoe.evaluation.runner import load_checkpoint_generator, run_suite
    from unimoe.evaluation.suite import load_suite

    try:
        suite = load_suite(args.suite)
        if args.skip_unavailable:
            suite.on_unavailable = "skip"
        if args.by_task:
            suite.by_task = True
        options = {"preset": args.preset} if args.preset else {}
        generator = load_checkpoint_generator(args.ckpt, **options) if args.ckpt else None
        report = run_suite(
            suite, manifest=args.manifest, wavs=args.wavs, generator=generator, out_dir=args.out,
            reference_set=args.reference_set, audio_root=args.audio_root, tracking_uri=args.tracking_uri,
            experiment=args.experiment, mlflow=not args.no_mlflow, limit=args.limit, split=args.split,
            log=lambda msg: print(msg, file=sys.stderr),
        )
    except (EvaluationError, RegistryError) as exc:  # bad input or config: one clear line, no traceback
        print(f"unimoe evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(to_markdown(report))
    return 0
