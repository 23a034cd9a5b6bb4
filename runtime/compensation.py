"""Line-resistance compensation: the fits a chip makes per programmed tile so the wires cost less.

The array is linear, I = v @ G_eff, so what the wires do to a tile is known once its cells are
programmed. Compensation fits digital corrections that bring the currents back to the ones the
target conductances T (from the levels, before any device effect) would give, in the
least-squares sense over an input distribution with second moment Mv = E[v v^T] (v the
normalised row voltages in [0, 1]):

- column:     I'_c = a_c I_c, one gain per physical column, applied after the ADC:
              a_c = (g_c^T Mv t_c) / (g_c^T Mv g_c), g_c and t_c the columns of G_eff and T.
              No offset: the currents are linear in v with no constant term, so an offset could
              only fit the probe's mean. The g_off baseline is part of every fitted column, so
              the encodings' differences (dual pairs, ACM neighbours, the offset reference) stay
              balanced.
- row-column: v'_i = r_i v_i before the DAC (r_i <= 1: within its range) and the column gains,
              fitted together by alternating least squares: for fixed r the gains above; for
              fixed a the r solving (Mv o (G diag(a^2) G^T)) r = ((Mv T) o G) a. Row scales are
              shared by the tiles of a row block (one DAC pass feeds them all).
- predistort: before programming, the cells' target conductances are solved through the exact
              network so that G_eff, after the column gains, matches T: bounded least squares
              (L-BFGS-B) on sum_c min_a E[(a v.g_c - v.t_c)^2] over the used cells, within
              [g_off, g_on]. The gains are eliminated in closed form, so the solve only has to
              fix each column's shape (which rows lose how much), not its overall loss, which
              the window could not hold. The gradient is exact, from the nodal system
              (d G_eff[i, j] / d G_kl is minus the product of the cell's voltage under a unit
              drive of row i and under a unit injection at sink j; envelope theorem for the
              gains). It starts from T, where the objective is what column gains alone leave,
              and each step lowers it. Column gains are then fitted again after programming.

Without calibration data Mv is the probe distribution's: every normalised row voltage
independent and uniform on [0, 1], Mv = 1/4 (all ones) + 1/12 I. With data, Mv is measured on
the voltages the calibration run drives the tile's rows with.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

# resistances the nodal system needs positive: an ideal driver / sense end becomes 1e-4 ohm,
# 1e-7 of a 1 kOhm cell
_SHORT = 1e-4
ALS_ROUNDS = 30
ROW_SCALE_FLOOR = 1e-3  # relative to the largest row scale: a row is never switched off
PREDISTORT_ITERATIONS = 40


def probe_moment(rows: int) -> np.ndarray:
    """E[v v^T] of independent uniform [0, 1] row voltages."""
    return np.full((rows, rows), 0.25) + np.eye(rows) / 12.0


def column_gains(effective: np.ndarray, target: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """Per column the gain a minimising E[(a v.g - v.t)^2] over v with second moment `moment`."""
    weighted = moment @ effective
    numerator = (weighted * target).sum(axis=0)
    denominator = (weighted * effective).sum(axis=0)
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 1.0)


def misfit(effective: np.ndarray, target: np.ndarray, moment: np.ndarray) -> float:
    """E||v @ effective - v @ target||^2 over v with second moment `moment`."""
    error = effective - target
    return float(((moment @ error) * error).sum())


def row_column(effective: np.ndarray, target: np.ndarray, moment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row scales r (max 1) and column gains a fitted together by alternating least squares."""
    rows = effective.shape[0]
    r = np.ones(rows)
    gains = column_gains(effective, target, moment)
    previous = misfit(effective * gains, target, moment)
    moment_target = moment @ target
    for _ in range(ALS_ROUNDS):
        system = moment * ((effective * gains**2) @ effective.T)
        rhs = (moment_target * effective) @ gains
        system[np.diag_indices(rows)] += 1e-12 * max(float(np.trace(system)) / rows, 1e-300)
        r = np.linalg.solve(system, rhs)
        r = np.maximum(r, ROW_SCALE_FLOOR * max(float(r.max()), 1e-300))
        r /= r.max()
        gains = column_gains(effective * r[:, None], target, moment)
        current = misfit(effective * r[:, None] * gains, target, moment)
        if previous - current <= 1e-6 * previous:
            break
        previous = current
    return r, gains


def predistort(target: np.ndarray, used: tuple[int, int], hw, moment: np.ndarray) -> tuple[np.ndarray, dict]:
    """Conductances to program so that G_eff of the whole array matches `target` on the used
    rows x columns; returns them and what the solve did (objective before and after, seconds)."""
    from scipy.optimize import minimize

    started = time.perf_counter()
    rows, cols = used
    resistances = (max(hw.r_wire, _SHORT), max(hw.r_source, _SHORT), max(hw.r_sink, _SHORT))
    goal = target[:rows, :cols]
    scale = misfit(np.zeros_like(goal), goal, moment)  # the objective relative to the signal
    g = target.copy()
    before = _misfit_and_gradient(g, goal, moment, resistances, gradient=False)[0] / scale

    def objective(x):
        g[:rows, :cols] = x.reshape(rows, cols) * hw.g_on
        value, gradient = _misfit_and_gradient(g, goal, moment, resistances)
        return value / scale, gradient[:rows, :cols].ravel() * hw.g_on / scale

    start = goal.ravel() / hw.g_on
    result = minimize(
        objective, start, jac=True, method="L-BFGS-B", bounds=[(hw.g_off / hw.g_on, 1.0)] * start.size,
        options={"maxiter": PREDISTORT_ITERATIONS},
    )
    g[:rows, :cols] = result.x.reshape(rows, cols) * hw.g_on
    info = {"misfit_before": before, "misfit_after": float(result.fun), "iterations": int(result.nit),
            "seconds": time.perf_counter() - started}
    return g, info


def _misfit_and_gradient(g: np.ndarray, goal: np.ndarray, moment: np.ndarray, resistances, gradient: bool = True):
    """tr(E^T Mv E) for E = G_eff[:r, :c] diag(a) - goal with the best column gains a, and its
    gradient with respect to every cell (None unless asked)."""
    from scipy.sparse.linalg import splu

    from xcompile.runtime.physics import nodal_system

    rows, cols = goal.shape
    total_rows, total_cols = g.shape
    matrix, inputs, outputs = nodal_system(g, *resistances)
    factor = splu(matrix.tocsc(), permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True})
    cells = total_rows * total_cols
    drive = inputs[:, :rows].toarray()
    sense = outputs[:cols].toarray().T
    # one right-hand side at a time: SuperLU's multi-column solve is slower per column
    across_drive = np.empty((cells, rows))
    effective = np.empty((rows, cols))
    for i in range(rows):
        voltages = factor.solve(drive[:, i])
        across_drive[:, i] = voltages[:cells] - voltages[cells:]
        effective[i] = outputs[:cols] @ voltages
    gains = column_gains(effective, goal, moment)
    error = effective * gains - goal
    weighted = moment @ error
    if not gradient:
        return float((weighted * error).sum()), None
    weighted_by_gain = weighted * gains  # d/d G_eff of the misfit at the best gains, over 2
    across_sense = np.empty((cells, cols))
    for j in range(cols):
        voltages = factor.solve(sense[:, j])
        across_sense[:, j] = voltages[:cells] - voltages[cells:]
    slope = -2.0 * ((across_drive @ weighted_by_gain) * across_sense).sum(axis=1)
    return float((weighted * error).sum()), slope.reshape(total_rows, total_cols)


_PREDISTORTED: dict[str, tuple[np.ndarray, dict]] = {}


def predistorted(target: np.ndarray, used: tuple[int, int], hw, moment: np.ndarray) -> tuple[np.ndarray, dict]:
    """`predistort`, remembered per target and wires: it does not depend on the trial's draws."""
    key = hashlib.sha256(
        b"".join([target.tobytes(), moment.tobytes(), np.array([*used, hw.g_on, hw.g_off, hw.r_wire, hw.r_source, hw.r_sink]).tobytes()])
    ).hexdigest()
    if key not in _PREDISTORTED:
        _PREDISTORTED[key] = predistort(target, used, hw, moment)
    g, info = _PREDISTORTED[key]
    return g.copy(), dict(info)
