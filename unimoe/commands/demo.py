"""``unimoe demo``: the whole UniMoE-Audio recipe offline, end to end, on one machine.

    unimoe demo                          # data/demo + runs/demo, about 15-20 min on 2 CPU cores
    unimoe demo --scale 2 --root runs/demo-x2

It runs exactly the commands a user would type, in order, each resumable, so an
interrupted demo continues where it stopped when run again:

1. ``unimoe data demo``          build the offline corpus (espeak-ng speech, fluidsynth music, video)
2. ``unimoe codec fit``          fit the embedded spectral_rvq codec on that corpus
3. ``unimoe tokenize``           encode each task's audio into codec-token shards
4. ``unimoe curriculum``         specialists -> upcycle -> warmup -> joint (recipes/demo)
5. ``unimoe evaluate``           generate the test split with the joint model and score it
                                 with the offline ``demo`` suite

and finally prints where the checkpoints, samples, plots and scores are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

def default_recipe() -> Path:
    """``recipes/demo/curriculum.yaml`` of a source checkout, else of the current folder."""
    here = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "curriculum.yaml"
    return here if here.is_file() else Path("recipes/demo/curriculum.yaml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo", help="data folder: corpus/, codec.pt, shards/ (default data/demo)")
    p.add_argument("--root", default="runs/demo", help="curriculum run folder (default runs/demo)")
    p.add_argument("--recipe", default=None, help="curriculum YAML (default recipes/demo/curriculum.yaml)")
    p.add_argument("--scale", type=float, default=1.0, help="demo corpus size multiplier (default 1)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes for synthesis and tokenisation")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N test items")
    p.add_argument("--skip-eval", action="store_true", help="stop after training")
    return p


def _step(title: str, command: str, fn: Callable[[list[str]], int | None], argv: list[str]) -> None:
    """Run one subcommand; a failure stops the demo with the step that failed."""
    print(f"\n[unimoe demo] {title}\n  $ unimoe {command} {' '.join(argv)}", flush=True)
    started = time.monotonic()
    try:
        code = int(fn(argv) or 0)
    except SystemExit as exc:  # argparse-based commands exit on bad input
        code = exc.code if isinstance(exc.code, int) else 1
    if code != 0:
        raise DemoStepError(f"step '{title}' failed (exit code {code}); fix the problem above and re-run "
                            f"'unimoe demo' to continue from this step")
    print(f"[unimoe demo] {title}: done in {time.monotonic() - started:.0f} s", flush=True)


class DemoStepError(RuntimeError):
    pass


def corpus_tasks(corpus: Path) -> list[str]:
    """The tasks the built corpus has a manifest for (``corpus.json``), in its order."""
    try:
        manifests = json.loads((corpus / "corpus.json").read_text())["manifests"]
    except (OSError, ValueError, KeyError) as exc:
        raise DemoStepError(f"{corpus / 'corpus.json'} lists no manifests ({exc}); rebuild the corpus "
                            f"(unimoe data demo --out {corpus})") from exc
    return [name for name in manifests if name != "all"]


def run_demo(args: argparse.Namespace) -> dict:
    from unimoe.commands import codec, curriculum, data, evaluate, tokenize

    data_dir, root = Path(args.data), Path(args.root)
    recipe = Path(args.recipe) if args.recipe else default_recipe()
    if not recipe.is_file():
        raise DemoStepError(f"curriculum recipe not found: {recipe} (give --recipe)")
    corpus, codec_file = data_dir / "corpus", data_dir / "codec.pt"
    manifests = corpus / "manifests"

    _step("1/5 build the offline demo corpus", "data", data.main,
          ["demo", "--out", str(corpus), "--scale", str(args.scale), "--workers", str(args.workers)])
    if codec_file.is_file():
        print(f"\n[unimoe demo] 2/5 codec: reusing {codec_file}")
    else:
        _step("2/5 fit the spectral_rvq codec on the corpus", "codec", codec.main,
              ["fit", "--audio", str(manifests / "all.jsonl"), "--out", str(codec_file)])
    for task in corpus_tasks(corpus):
        _step(f"3/5 tokenise {task}", "tokenize", tokenize.main,
              ["--manifest", str(manifests / f"{task}.jsonl"), "--codec", str(codec_file),
               "--out", str(data_dir / "shards" / task), "--workers", str(args.workers)])
    _step("4/5 the three-stage curriculum", "curriculum", curriculum.main,
          ["--config", str(recipe), "--data_root", str(data_dir), "--root", str(root)])

    summary: dict = {"data": str(data_dir), "root": str(root), "recipe": str(recipe)}
    from unimoe.training.curriculum import final_model

    final = final_model(root / "joint")
    summary["checkpoint"] = str(final)
    if not args.skip_eval:
        eval_dir = root / "eval" / "joint"
        argv = ["--suite", "demo", "--ckpt", str(final), "--manifest", str(manifests / "all.jsonl"),
                "--split", "test", "--out", str(eval_dir),
                "--tracking-uri", f"sqlite:///{root.resolve() / 'mlflow.db'}", "--experiment", "unimoe-demo-eval"]
        if args.eval_limit:
            argv += ["--limit", str(args.eval_limit)]
        _step("5/5 generate the test split and score it (offline demo suite)", "evaluate", evaluate.main, argv)
        summary["evaluation"] = str(eval_dir)
    return summary


def print_summary(summary: dict) -> None:
    root = Path(summary["root"])
    print("\n" + "=" * 72 + "\nunimoe demo: finished\n" + "=" * 72)
    print(f"stages:     {root / 'curriculum.json'} (losses per stage in the table above)")
    if "evaluation" in summary:
        print(f"scores:     {Path(summary['evaluation']) / 'results.md'} (table above; also results.json, MLflow)")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"samples:    {root}/*/samples/  (WAV + JSON sidecars per validation)")
    print(f"plots:      {root}/warmup/plots/ and {root}/joint/plots/  (routing heatmaps/histograms)")
    print(f"browse:     mlflow ui --backend-store-uri sqlite:///{root.resolve() / 'mlflow.db'}")
    print(f"generate:   unimoe generate --ckpt {summary['checkpoint']} --task tts --text 'Hello there.' "
          f"--prompt-audio <a voice.wav> --out out/")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_demo(args)
    except DemoStepError as exc:
        print(f"unimoe demo: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0
