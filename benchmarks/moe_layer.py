"""MoE layer benchmark entry point: ``python benchmarks/moe_layer.py [--tokens N --dtype bf16 ...]``.

Prints one JSON object (see unimoe/bench/moe.py for what is measured).
"""

import sys

from unimoe.bench.moe import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if "--json" in args else [*args, "--json"]))
