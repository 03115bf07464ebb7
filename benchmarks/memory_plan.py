"""Memory-plan check entry point: ``python benchmarks/memory_plan.py [--cases 0 1 --steps 2]``.

Prints one JSON object (see unimoe/bench/plan.py for what is measured).
"""

import sys

from unimoe.bench.plan import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
