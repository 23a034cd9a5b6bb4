"""Shared by the fuzz suites (tests/test_fuzz_*.py): how many examples they run, from which seed,
and a tally of what each example ended in, for benchmarks/fuzz_campaign.py to count.

XCOMPILE_FUZZ_EXAMPLES: examples per fuzz test (default 300: CI time). XCOMPILE_FUZZ_SEED: a
seed for a campaign's parallel runs (default: hypothesis's derandomised examples, the same every
run). XCOMPILE_FUZZ_TALLY: a file each example's outcome is appended to.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, seed, settings

EXAMPLES = int(os.environ.get("XCOMPILE_FUZZ_EXAMPLES", "300"))
SEED = os.environ.get("XCOMPILE_FUZZ_SEED")


def fuzz(test):
    """Hypothesis settings of a fuzz test: the example count and seed above, no deadline."""
    test = settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED is None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )(test)
    return test if SEED is None else seed(int(SEED))(test)


def record(outcome: str) -> None:
    """Append one example's outcome (e.g. 'ran', 'refused') to $XCOMPILE_FUZZ_TALLY, if set."""
    path = os.environ.get("XCOMPILE_FUZZ_TALLY")
    if path:
        with open(path, "a") as handle:
            handle.write(outcome + "\n")
