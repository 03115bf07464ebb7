"""Generation benchmark entry point: ``python benchmarks/generate.py [--frames N --layers L ...]``.

Prints one JSON object (see unimoe/bench/generate.py for what is measured).
"""

import sys

from unimoe.bench.generate import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if "--json" in args else [*args, "--json"]))
