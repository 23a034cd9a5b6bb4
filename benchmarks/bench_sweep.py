"""Sweep throughput: the local process pool against a Dask LocalCluster, both with 2 workers.

Side by side in one run, the same grid and seeds into fresh results folders, alternating the two
engines (shared, noisy machine) and taking the median. Each engine's time is the whole sweep as
a user meets it, starting and stopping its processes included. The points are the digits CNN on
512 x 512 crossbars with line resistance and variation, so one trial takes over a second (the
exact G_eff of every tile, single-threaded). Every engine runs the grid with two trial counts:
the difference of the two sweeps' times over the difference of their trial counts is the time a
trial adds (fixed costs such as starting the cluster drop out), and Dask overhead per trial is
that of Dask over that of the pool. The whole-sweep ratio, start included, is printed too.

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
    "fixed": {"rows": 512, "cols": 512, "variation": "lognormal", "sigma": 0.05},
}
TRIALS = (2, 6)  # per point: a short and a long sweep of the same grid
WORKERS = 2
ROUNDS = 3
ENGINES = {"process pool": None, "Dask LocalCluster": "local"}


def main() -> None:
    seconds = {(name, trials): [] for name in ENGINES for trials in TRIALS}  # whole sweeps
    trial_seconds = {name: [] for name in ENGINES}  # mean trial inside a worker
    tables = {}
    points = len(GRID["grid"]["r_wire"]) * len(GRID["grid"]["encoding"])
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(ROUNDS):
            for trials in TRIALS:
                for name, scheduler in ENGINES.items():
                    started = time.perf_counter()
                    table = xcompile.sweep(
                        MODEL, GRID, dataset="digits", trials=trials, output=Path(scratch) / f"{round_}-{trials}-{scheduler}",
                        scheduler=scheduler, workers=WORKERS, progress=False,
                    )
                    seconds[name, trials].append(time.perf_counter() - started)
                    trial_seconds[name].append(table["run_seconds"].mean())
                    tables[name, trials] = table
                    print(f"round {round_ + 1}: {name:<18} {points * trials:3d} trials {seconds[name, trials][-1]:6.1f} s", flush=True)
    for trials in TRIALS:  # same seeds, same table
        pool, dask = (tables[name, trials].drop(columns=list(TIMING_COLUMNS)) for name in ENGINES)
        pd.testing.assert_frame_equal(pool, dask)
    few, many = (points * trials for trials in TRIALS)
    median = {key: statistics.median(times) for key, times in seconds.items()}
    print(f"\n{points} points; {WORKERS} workers; median of {ROUNDS} rounds:")
    per_trial = {}
    for name in ENGINES:
        per_trial[name] = (median[name, TRIALS[1]] - median[name, TRIALS[0]]) / (many - few)
        fixed = median[name, TRIALS[0]] - few * per_trial[name]
        print(f"  {name:<18} {many} trials {median[name, TRIALS[1]]:6.1f} s = {many / median[name, TRIALS[1]]:.3f} trials/s; "
              f"a trial adds {per_trial[name]:.3f} s, fixed {fixed:.1f} s; "
              f"{statistics.median(trial_seconds[name]):.2f} s per trial inside a worker")
    pool, dask = (median[name, TRIALS[1]] for name in ENGINES)
    print(f"  whole sweep of {many} trials, start and stop included: Dask / pool time {dask / pool:.3f} ({(dask - pool) / pool:+.1%})")
    overhead = per_trial["Dask LocalCluster"] / per_trial["process pool"] - 1
    print(f"  Dask overhead per trial: {(per_trial['Dask LocalCluster'] - per_trial['process pool']) * 1e3:+.0f} ms = "
          f"{overhead:+.1%} (target <= 10%: {'PASS' if overhead <= 0.10 else 'MISS'})")


if __name__ == "__main__":
    main()
