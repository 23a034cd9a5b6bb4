"""Line resistance: our exact G_eff against a sparse direct solve and an iterative solver.

1. G_eff of one R x R tile (R = 64, 128, 256): runtime/physics.py's nested dissection vs SciPy
   SuperLU (splu) on the full 2 R C nodal system with R right-hand sides; same answer to 1e-6.
2. Per input vector at 128 x 128, batch 1000: ours (G_eff computed once, amortised over the
   batch, plus the GEMM v @ G_eff) vs a relaxation solver of the CrossSim kind, written here:
   line voltages recomputed from the cell currents they carry, with damping, one input vector at
   a time, until the column currents change by < 1e-6 (relative), for mild (1 ohm) and harsh
   (10 ohm) wires. Timed on a few vectors and reported per vector.

    python benchmarks/bench_geff.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np

from xcompile.runtime.physics import effective_conductance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nodal_reference import effective_conductance_reference  # noqa: E402 - the tests' reference solve

R_SOURCE = R_SINK = 100.0


def best_time(fn, repeats=3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@numba.njit(cache=True)
def relaxation(G, v, r_wire, r_source, r_sink, tolerance, max_iterations):
    """CrossSim-style parasitic solve for one input vector; returns (column currents, iterations).

    From the cell currents I = G (a - b), every line voltage follows from the currents it
    carries: a_ij = v_i - R_source sum_k I_ik - r_wire sum_{m=1..j} sum_{k>=m} I_ik and
    b_ij = R_sink sum_k I_kj + r_wire sum_{m=i..R-2} sum_{k<=m} I_kj; the voltages are updated
    with damping until the column currents change by < tolerance (relative).
    """
    rows, cols = G.shape
    a = np.empty((rows, cols))
    for i in range(rows):
        a[i, :] = v[i]
    b = np.zeros((rows, cols))
    previous = np.zeros(cols)
    damping = 1.0
    last_change = np.inf
    for iteration in range(max_iterations):
        current = G * (a - b)
        new_a = np.empty((rows, cols))
        for i in range(rows):
            carried = current[i].sum()
            drop = r_source * carried
            for j in range(cols):
                if j > 0:
                    carried -= current[i, j - 1]
                    drop += r_wire * carried
                new_a[i, j] = v[i] - drop
        new_b = np.empty((rows, cols))
        for j in range(cols):
            carried = current[:, j].sum()
            rise = r_sink * carried
            for i in range(rows - 1, -1, -1):
                if i < rows - 1:
                    carried -= current[i + 1, j]
                    rise += r_wire * carried
                new_b[i, j] = rise
        a += damping * (new_a - a)
        b += damping * (new_b - b)
        columns = current.sum(axis=0)
        change = np.abs(columns - previous).max()
        if change <= tolerance * np.abs(columns).max():
            return columns, iteration + 1
        if iteration > 0 and change > 0.9 * last_change:
            damping *= 0.7  # oscillating: damp harder
        last_change = change
        previous[:] = columns
    return previous, max_iterations


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="64 and 128 only")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("1. G_eff of one tile (r_wire 2.5 ohm, R_source = R_sink = 100 ohm)")
    print(f"{'size':>9} {'ours ms':>9} {'splu ms':>9} {'speed-up':>9} {'max rel err':>12}")
    for n in (64, 128) if args.quick else (64, 128, 256):
        G = rng.uniform(1e-6, 1e-4, (n, n))
        ours = best_time(lambda: effective_conductance(G, 2.5, R_SOURCE, R_SINK))
        reference = best_time(lambda: effective_conductance_reference(G, 2.5, R_SOURCE, R_SINK), repeats=1)
        error = np.abs(effective_conductance(G, 2.5, R_SOURCE, R_SINK) - effective_conductance_reference(G, 2.5, R_SOURCE, R_SINK))
        error = error.max() / effective_conductance_reference(G, 2.5, R_SOURCE, R_SINK).max()
        print(f"{n:>4}x{n:<4} {ours * 1e3:>9.1f} {reference * 1e3:>9.1f} {reference / ours:>8.1f}x {error:>12.1e}")

    print("\n2. per input vector, 128 x 128, batch 1000 (G in [1e-6, 1e-4] S)")
    n, batch = 128, 1000
    G = rng.uniform(1e-6, 1e-4, (n, n))
    v = rng.uniform(0, 0.2, (batch, n))
    print(f"{'wires':>14} {'relaxation us':>14} {'iters':>7} {'ours us':>9} {'ratio':>7} {'rel diff':>9}")
    for label, r_wire in (("mild 1 ohm", 1.0), ("harsh 10 ohm", 10.0)):
        relaxation(G, v[0], r_wire, R_SOURCE, R_SINK, 1e-6, 10)  # compile
        sample = 5
        start = time.perf_counter()
        results = [relaxation(G, v[k], r_wire, R_SOURCE, R_SINK, 1e-7, 100000) for k in range(sample)]
        per_relaxation = (time.perf_counter() - start) / sample
        sweeps = int(np.mean([s for _, s in results]))

        def ours():
            return v @ effective_conductance(G, r_wire, R_SOURCE, R_SINK)

        per_ours = best_time(ours) / batch
        exact = ours()[:sample]
        diff = max(np.abs(c - e).max() / np.abs(e).max() for (c, _), e in zip(results, exact))
        print(f"{label:>14} {per_relaxation * 1e6:>14.0f} {sweeps:>7} {per_ours * 1e6:>9.1f} {per_relaxation / per_ours:>6.0f}x {diff:>9.1e}")
    print("target: ours <= 1/100 of the relaxation's time per vector")


if __name__ == "__main__":
    main()
