"""The ``unimoe`` command: a small dispatcher in front of LightningCLI.

Training commands (``fit``/``validate``/``test``/``predict``) go to LightningCLI, which
builds model, data and trainer from YAML. Commands that need no Trainer (``data``,
``tokenize``, ``generate``, ``evaluate``, ``bench``...) live in ``unimoe.commands.<name>``
with a ``main(argv) -> int`` each, so adding a command never touches this file's logic.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

# name -> (import target "module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("unimoe.training.cli:run_lightning_cli", "train a stage from a LightningCLI YAML recipe"),
    "validate": ("unimoe.training.cli:run_lightning_cli", "run validation of a stage"),
    "test": ("unimoe.training.cli:run_lightning_cli", "run the test loop of a stage"),
    "predict": ("unimoe.training.cli:run_lightning_cli", "run the predict loop of a stage"),
    "curriculum": ("unimoe.commands.curriculum:main", "run specialists -> upcycle -> warmup -> joint, resumable"),
    "study": ("unimoe.commands.study:main", "run a grid of arms x seeds (curricula, recipes) and report mean/std per arm"),
    "upcycle": ("unimoe.commands.upcycle:main", "merge dense specialist checkpoints into one MoE checkpoint"),
    "data": ("unimoe.commands.data:main", "build the offline demo corpus, import and validate manifests"),
    "codec": ("unimoe.commands.codec:main", "fit the embedded spectral_rvq codec on a corpus; round-trip a file"),
    "tokenize": ("unimoe.commands.tokenize:main", "encode a manifest's audio into codec-token shards"),
    "checkpoint": ("unimoe.commands.checkpoint:main", "consolidate or inspect sharded (multi-GPU) checkpoints"),
    "import": ("unimoe.commands.import_model:main", "convert a released model (uni-moe-audio: the authors' checkpoint) into a model folder"),
    "export": ("unimoe.commands.export:main", "write a checkpoint as a pickle-free model folder (safetensors + JSON)"),
    "generate": ("unimoe.commands.generate:main", "generate speech or music from a checkpoint"),
    "evaluate": ("unimoe.commands.evaluate:main", "score a checkpoint or a folder of WAVs with a suite"),
    "plan": ("unimoe.commands.plan:main", "per-device memory of a stage (params, grads, optimizer, activations): does it fit?"),
    "bench": ("unimoe.commands.bench:main", "run a benchmark and print JSON"),
    "demo": ("unimoe.commands.demo:main", "the offline end-to-end demo: corpus, curriculum, samples, scores"),
    "plugins": ("unimoe.commands.plugins:main", "list every registered plug-in component"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: unimoe <command> [options]   (unimoe <command> --help for details)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _resolve(target: str) -> Callable[[list[str]], int | None]:
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from unimoe import __version__

        print(f"unimoe {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"unimoe: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    handler = _resolve(COMMANDS[name][0])
    if COMMANDS[name][0].endswith("run_lightning_cli"):
        rest = [name, *rest]  # LightningCLI parses its own subcommand
    from unimoe.atomic import OutputWriteError

    try:
        result = handler(rest)
    except OutputWriteError as exc:  # disk full, read-only folder: one clear line, the old file kept
        print(f"unimoe {name}: error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
