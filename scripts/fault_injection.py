#!/usr/bin/env python
"""Kill real unimoe commands at random moments and check nothing is lost (see unimoe/fault_injection.py).

    .venv/bin/python scripts/fault_injection.py --trials 20 --seed 0 --json faults.json
    .venv/bin/python scripts/fault_injection.py --commands tokenize upcycle --trials 5

Prints a JSON summary: per command the kill points tried, where they landed (inside which kind
of write, or at a time) and how many trials survived; exits 1 if any trial lost something.
"""

import sys

from unimoe.fault_injection import main

if __name__ == "__main__":
    sys.exit(main())
