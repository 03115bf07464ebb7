"""Shard-index benchmark entry point: ``python benchmarks/data_index.py [--sizes 1000000 5000000 --workers 0 2 4]``.

Prints one JSON object (see unimoe/bench/data.py for what is measured).
"""

import sys

from unimoe.bench.data import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
