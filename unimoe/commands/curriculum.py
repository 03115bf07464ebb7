"""``unimoe curriculum``: run a whole curriculum (specialists -> upcycle -> warmup -> joint).

    unimoe curriculum --config recipes/curriculum.yaml [--data_root DIR] [--root runs/demo]
    unimoe curriculum --config recipes/paper/curriculum.yaml --launcher subprocess
    unimoe curriculum --config recipes/curriculum.yaml --dry_run     # check every stage, train nothing

Re-running the same command resumes: finished stages (``DONE.json`` + final checkpoint)
are skipped, an interrupted stage continues from its ``checkpoints/last.ckpt``. All fit
stages log into one MLflow experiment in ``<root>/mlflow.db``:
``mlflow ui --backend-store-uri sqlite:///<root>/mlflow.db``. See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimoe curriculum", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="curriculum YAML (see recipes/curriculum.yaml)")
    p.add_argument("--root", default=None, help="run folder of the curriculum (default: the file's 'root', else runs/<name>)")
    p.add_argument("--data_root", "--data-root", dest="data_root", default=None,
                   help="data root for ${data_root} in recipes (default: $UNIMOE_DATA_ROOT, else the file's 'data_root')")
    p.add_argument("--launcher", choices=("inprocess", "subprocess"), default=None,
                   help="run stages in this process (default) or as `unimoe fit` subprocesses (DDP)")
    p.add_argument("--until", default=None, help="stop after this stage")
    p.add_argument("--dry_run", "--dry-run", dest="dry_run", action="store_true",
                   help="print the plan and parse every stage config, train nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    from contextlib import nullcontext

    from unimoe.locks import FolderInUseError, FolderLock
    from unimoe.training.curriculum import CurriculumRunner, load_curriculum
    from unimoe.training.recipe_vars import RecipeError

    args = build_parser().parse_args(argv)
    try:
        cur = load_curriculum(args.config, root=args.root, data_root=args.data_root, launcher=args.launcher)
        with nullcontext() if args.dry_run else FolderLock(cur.root):  # one curriculum per root
            return CurriculumRunner(cur, until=args.until).run(dry_run=args.dry_run)
    except (RecipeError, FolderInUseError) as exc:
        print(f"unimoe curriculum: error: {exc}", file=sys.stderr)
        return 2
