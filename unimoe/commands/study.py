"""``unimoe study``: run a grid of arms x seeds and report mean ± std per arm.

    unimoe study --config recipes/studies/curriculum.yaml [--data_root DIR] [--root DIR]
    unimoe study --config recipes/studies/curriculum.yaml --scale 4      # 4x longer stages (GPUs)
    unimoe study --config recipes/studies/curriculum.yaml --report_only  # rebuild report + plots

Re-running the same command resumes: finished cells are skipped, an interrupted cell continues
(its finished stages are skipped, the interrupted stage resumes from its last checkpoint).
Stages identical across arms (the specialists) are trained once per seed. Report:
``<root>/report.md``, ``report.json``, ``plots/``; MLflow: ``mlflow ui --backend-store-uri
sqlite:///<root>/mlflow.db``. See docs/study.md.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="study YAML (see recipes/studies/curriculum.yaml)")
    p.add_argument("--root", default=None, help="run folder of the study (default: the file's 'root')")
    p.add_argument("--data_root", "--data-root", dest="data_root", default=None,
                   help="data root for ${data_root} (default: $UNIMOE_DATA_ROOT, else the file's 'data_root')")
    p.add_argument("--scale", type=float, default=None,
                   help="multiply every stage's length (max_steps, val_check_interval, warmup, aux anneal) on top of "
                        "the file's 'scale'")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the file's seeds")
    p.add_argument("--dry_run", "--dry-run", dest="dry_run", action="store_true",
                   help="print the grid and parse every cell's stages, train nothing")
    p.add_argument("--report_only", "--report-only", dest="report_only", action="store_true",
                   help="train nothing; rebuild the report and plots from the finished cells")
    return p


def main(argv: list[str] | None = None) -> int:
    from unimoe.study import StudyRunner, load_study
    from unimoe.training.recipe_vars import RecipeError

    args = build_parser().parse_args(argv)
    try:
        study = load_study(args.config, root=args.root, data_root=args.data_root, scale=args.scale, seeds=args.seeds)
        return StudyRunner(study).run(dry_run=args.dry_run, report_only=args.report_only)
    except RecipeError as exc:
        print(f"unimoe study: error: {exc}", file=sys.stderr)
        return 2
