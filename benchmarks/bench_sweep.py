"""Sweep throughput: the local process pool against a Dask LocalCluster, both with 2 workers.

Side by side in one run, the same grid and seeds into fresh results folders, alternating the two
engines (shared, noisy machine) and taking the median. Each engine's time is the whole sweep as
a user meets it, starting and stopping its processes included. The points are the digits CNN on
192 x 192 crossbars with line resistance and variation, so one trial takes over a second (the
exact G_eff of every tile, single-threaded); Dask overhead per trial = (Dask - pool) / trials.

    python benchmarks/bench_sweep.py        # needs dask.distributed: pip install -e ".[cluster]"
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

import xcompile
from xcompile.sweep import TIMING_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
GRID = {
    "grid": {"r_wire": [1.0, 2.5, 5.0], "encoding": ["dual", "offset"]},
    "fixed": {"rows": 192, "cols": 192, "variation": "lognormal", "sigma": 0.05},
}
TRIALS = 6
WORKERS = 2
ROUNDS = 3
ENGINES = {"process pool": None, "Dask LocalCluster": "local"}


def main() -> None:
    seconds = {name: [] for name in ENGINES}  # whole sweeps
    trial_seconds = {name: [] for name in ENGINES}  # mean trial inside a worker
    tables = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(ROUNDS):
            for name, scheduler in ENGINES.items():
                started = time.perf_counter()
                table = xcompile.sweep(
                    MODEL, GRID, dataset="digits", trials=TRIALS, output=Path(scratch) / f"{round_}-{scheduler}",
                    scheduler=scheduler, workers=WORKERS, progress=False,
                )
                seconds[name].append(time.perf_counter() - started)
                trial_seconds[name].append(table["run_seconds"].mean())
                tables[name] = table
                print(f"round {round_ + 1}: {name:<18} {seconds[name][-1]:6.1f} s", flush=True)
    pool, dask = (tables[name].drop(columns=list(TIMING_COLUMNS)) for name in ENGINES)
    pd.testing.assert_frame_equal(pool, dask)  # same seeds, same table
    trials = len(tables["process pool"])
    print(f"\n{trials} trials ({len(GRID['grid']['r_wire']) * len(GRID['grid']['encoding'])} points x {TRIALS}); "
          f"{WORKERS} workers; median of {ROUNDS} rounds:")
    median = {name: statistics.median(times) for name, times in seconds.items()}
    for name, value in median.items():
        print(f"  {name:<18} {value:6.1f} s   {trials / value:.3f} trials/s   "
              f"{statistics.median(trial_seconds[name]):.2f} s per trial inside a worker")
    pool_s, dask_s = median["process pool"], median["Dask LocalCluster"]
    print(f"  Dask / pool throughput: {pool_s / dask_s:.3f}; Dask overhead per trial: "
          f"{(dask_s - pool_s) / trials * 1e3:+.0f} ms = {(dask_s - pool_s) / pool_s:+.1%} (target <= 10%)")

if __name__ == "__main__":
    main()
