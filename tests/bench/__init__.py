"""The benchmark suite: Runslot against the floor Temporal sets on the same machine.

Run it with ``scripts/bench`` (``python -m tests.bench``); docs/benchmarks.md says what each
scenario measures and how. Not a test module: pytest collects nothing here.
"""
