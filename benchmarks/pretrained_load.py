"""Pretrained-load memory benchmark entry point: ``python benchmarks/pretrained_load.py [--hidden D --layers L ...]``.

Prints one JSON object (see unimoe/bench/load.py for what is measured).
"""

import sys

from unimoe.bench.load import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if "--json" in args else [*args, "--json"]))
