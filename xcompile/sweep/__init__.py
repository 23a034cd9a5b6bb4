"""Parameter sweeps: every point of a grid of compile and hardware options is compiled once and
evaluated over seeded Monte-Carlo trials, on a local process pool or a Dask cluster.

The grid (a TOML file or the same as a dict, docs/sweep.md):

    [grid]                                   # one axis per key; the points are their product
    r_wire = [0.0, 1.0, 2.5]
    encoding = ["dual", "acm"]
    crossbar = { rows = [64, 128], cols = [64, 128] }   # a linked axis: options that move together
    [fixed]                                  # options every point shares
    variation = "lognormal"
    sigma = 0.05

A results folder holds manifest.json (model and dataset digests, grid, trials, seed: a folder
from another sweep is refused, never mixed), points/<key>.json (one per finished point, saying
what made it, written atomically: an interrupted sweep loses nothing that finished and a rerun
computes only what is missing or does not check out), table.csv (one row per point and trial),
summary.csv (mean and std per point), plots/accuracy_vs_<axis>.png, and sweep.lock (a run holds
it: two runs never write one folder).

The parts, in the order data flows: grid (axes and points), work (one point: compile, float
model, trials), engines (this process, a process pool, Dask), store (the locked folder, its
manifest and point records, checked by records), tables (table, summary, plots), run (sweep).
"""

from xcompile.sweep.grid import FLOAT_OPTIONS, OPTIONS, RESERVED_COLUMNS, Axis, Grid, Point, load_grid
from xcompile.sweep.run import sweep
from xcompile.sweep.store import MANIFEST_FORMAT, Results
from xcompile.sweep.tables import summarize, write_plots
from xcompile.sweep.work import POINT_COLUMNS, TIMING_COLUMNS, TRIAL_COLUMNS, PointTask, run_point

__all__ = [
    "FLOAT_OPTIONS", "MANIFEST_FORMAT", "OPTIONS", "POINT_COLUMNS", "RESERVED_COLUMNS", "TIMING_COLUMNS", "TRIAL_COLUMNS",
    "Axis", "Grid", "Point", "PointTask", "Results", "load_grid", "run_point", "summarize", "sweep", "write_plots",
]
