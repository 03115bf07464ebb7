"""Benchmark implementations (``benchmarks/*.py`` and ``unimoe bench <name>`` are entry points).

Each benchmark measures its baselines in the same run, on the same inputs, and prints one
JSON object; speed is never asserted in tests.
"""
