"""``unimoe bench <name> [options]``: run one benchmark (each prints JSON with ``--json``).

Benchmarks live in ``unimoe.bench.<module>``; add one by adding a row to ``BENCHMARKS``.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function" taking argv and returning an exit code, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "moe": ("unimoe.bench.moe:main", "MoE layer forward+backward: ours vs loop / padded / ideal, null-expert saving"),
    "generate": ("unimoe.bench.generate:main", "decoding: vs a MusicGen-style peer, compiled, cache, batches, MoE paths, budgets"),
    "adaptive": ("unimoe.bench.adaptive:main", "a trained MoE checkpoint: loss and decoding speed per router top-p / expert budget"),
    "plan": ("unimoe.bench.plan:main", "memory plan vs measured peak (live tensors and RSS) of real CPU training steps"),
    "data": ("unimoe.bench.data:main", "shard index: open time and RSS/PSS/USS per process, old index.json vs memory-mapped"),
    "load": ("unimoe.bench.load:main", "peak memory of init_from a pretrained LM: streamed vs a full state-dict load"),
}


def _usage() -> str:
    lines = ["usage: unimoe bench <name> [options]   (unimoe bench <name> --help)", "", "benchmarks:"]
    lines += [f"  {name:10s} {help_}" for name, (_, help_) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in BENCHMARKS:
        print(f"unimoe bench: unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = BENCHMARKS[name][0].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(rest) or 0)
