"""Shared by the fuzz suites (tests/test_fuzz_*.py): how many examples they run, and a tally of
what each example ended in, for benchmarks/fuzz_campaign.py to count."""

from __future__ import annotations

import os

EXAMPLES = int(os.environ.get("XCOMPILE_FUZZ_EXAMPLES", "300"))


def record(outcome: str) -> None:
    """Append one example's outcome (e.g. 'ran', 'refused') to $XCOMPILE_FUZZ_TALLY, if set."""
    path = os.environ.get("XCOMPILE_FUZZ_TALLY")
    if path:
        with open(path, "a") as handle:
            handle.write(outcome + "\n")
