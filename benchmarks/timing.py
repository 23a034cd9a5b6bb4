"""Timing for the benchmarks: the median of repeated runs after a warm-up (shared, noisy machines)."""

from __future__ import annotations

import time

import numpy as np


def median_time(fn, repeats: int = 15, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
