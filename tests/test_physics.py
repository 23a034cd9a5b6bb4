"""The exact line-resistance solver: against ngspice, against a sparse nodal solve, and physics."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from xcompile.runtime.physics import effective_conductance
from nodal_reference import effective_conductance_reference
from ngspice import column_currents

needs_ngspice = pytest.mark.skipif(
    shutil.which("ngspice") is None and not os.environ.get("CI"),
    reason="ngspice not installed (apt-get install -y ngspice); CI installs it and fails without it",
)


def _conductances(rows, cols, seed=0, low=1e-6, high=1e-4):
    return np.random.default_rng(seed).uniform(low, high, (rows, cols))


@pytest.mark.ngspice
@needs_ngspice
@pytest.mark.parametrize("rows, cols", [(1, 1), (4, 4), (8, 5), (3, 10), (12, 1), (32, 32)])
@pytest.mark.parametrize("r_wire, r_source, r_sink", [(0.5, 10.0, 10.0), (2.5, 100.0, 50.0), (10.0, 1000.0, 300.0)])
def test_column_currents_equal_ngspice(rows, cols, r_wire, r_source, r_sink):
    G = _conductances(rows, cols, seed=rows * 100 + cols, high=1e-3)
    v = np.random.default_rng(cols).uniform(0.0, 0.2, rows)
    expected = column_currents(G, r_wire, r_source, r_sink, v)
    got = v @ effective_conductance(G, r_wire, r_source, r_sink)
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()


@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 5), (5, 1), (7, 3), (16, 16), (33, 17), (48, 64)])
@pytest.mark.parametrize("r_wire, r_source, r_sink", [(1.0, 10.0, 20.0), (10.0, 500.0, 500.0), (0.1, 1.0, 1.0)])
def test_structured_solver_equals_the_full_nodal_solve(rows, cols, r_wire, r_source, r_sink):
    G = _conductances(rows, cols, seed=rows + cols)
    expected = effective_conductance_reference(G, r_wire, r_source, r_sink)
    got = effective_conductance(G, r_wire, r_source, r_sink)
    assert np.abs(got - expected).max() <= 1e-9 * np.abs(expected).max()


@pytest.mark.parametrize("rows, cols", [(1, 4), (6, 1), (9, 7)])
def test_ideal_drivers_and_sinks_are_the_limits_of_small_resistances(rows, cols):
    G = _conductances(rows, cols, seed=3)
    for r_source, r_sink in ((0.0, 50.0), (50.0, 0.0), (0.0, 0.0)):
        exact = effective_conductance(G, 2.0, r_source, r_sink)
        nearly = effective_conductance_reference(G, 2.0, max(r_source, 1e-7), max(r_sink, 1e-7))
        assert np.abs(exact - nearly).max() <= 1e-6 * np.abs(nearly).max()


def test_ideal_wires_give_g_itself_and_lumped_lines_otherwise():
    G = _conductances(6, 5, seed=4)
    np.testing.assert_array_equal(effective_conductance(G, 0.0), G)
    # r_wire = 0 with a driver resistance: each word line is one node, a voltage divider per row
    lumped = effective_conductance(G, 0.0, r_source=100.0, r_sink=0.0)
    np.testing.assert_allclose(lumped, G / (1.0 + 100.0 * G.sum(axis=1, keepdims=True)), rtol=1e-12)
    # and the general lumped case agrees with vanishing wires in the full nodal solve
    both = effective_conductance(G, 0.0, r_source=100.0, r_sink=40.0)
    np.testing.assert_allclose(both, effective_conductance_reference(G, 1e-7, 100.0, 40.0), rtol=1e-5)


def test_currents_fall_as_wires_get_worse_and_the_far_corner_loses_most():
    G = np.full((32, 32), 5e-5)
    totals = [effective_conductance(G, r, 50.0, 50.0).sum() for r in (0.0, 1.0, 5.0, 20.0)]
    assert all(a > b for a, b in zip(totals, totals[1:]))
    ratio = effective_conductance(G, 5.0, 50.0, 50.0) / G
    # column 0 is nearest the drivers, the last row nearest the sinks: (R-1, 0) keeps the most
    assert ratio[-1, 0] == ratio.max() and ratio[0, -1] == ratio.min()


def test_linearity_superposition():
    G = _conductances(10, 8, seed=5)
    geff = effective_conductance(G, 3.0, 20.0, 20.0)
    assert (geff > 0).all()  # a passive network: every input raises every output current
    assert (geff <= G.sum(axis=0) + 1e-18).all()


@pytest.mark.parametrize("rows, cols", [(2, 2), (2, 3), (3, 3), (1, 40), (40, 1), (2, 64), (64, 3), (31, 65), (70, 45)])
@pytest.mark.parametrize("r_source, r_sink", [(10.0, 20.0), (0.0, 20.0), (10.0, 0.0), (0.0, 0.0)])
def test_every_shape_and_terminal_kind_equals_the_nodal_solve(rows, cols, r_source, r_sink):
    """Small domains eliminated whole and split ones, loop and BLAS eliminations, odd halves, thin
    strips; a pinned source or grounded sink against the nodal solve with a vanishing resistance."""
    G = _conductances(rows, cols, seed=rows * cols)
    expected = effective_conductance_reference(G, 2.0, max(r_source, 1e-9), max(r_sink, 1e-9))
    got = effective_conductance(G, 2.0, r_source, r_sink)
    assert np.abs(got - expected).max() <= 1e-7 * np.abs(expected).max()


def test_cells_without_conductance_leave_the_network_solvable():
    G = _conductances(20, 24, seed=7)
    G[::3, :] = 0.0
    G[:, 5] = 0.0
    expected = effective_conductance_reference(G, 1.5, 30.0, 40.0)
    got = effective_conductance(G, 1.5, 30.0, 40.0)
    assert np.abs(got - expected).max() <= 1e-9 * np.abs(expected).max()
    assert np.abs(got[:, 5]).max() <= 1e-15 * np.abs(expected).max()  # a column without cells carries nothing


@pytest.mark.parametrize(
    "G, r_wire, r_source, r_sink, message",
    [
        (np.ones(3), 1.0, 0.0, 0.0, "2-D"),
        (np.full((2, 2), np.nan), 1.0, 0.0, 0.0, "finite"),
        (-np.ones((2, 2)), 1.0, 0.0, 0.0, ">= 0"),
        (np.ones((2, 2)), -1.0, 0.0, 0.0, "r_wire"),
        (np.ones((2, 2)), 1.0, float("inf"), 0.0, "r_source"),
    ],
)
def test_bad_input_is_a_clear_value_error(G, r_wire, r_source, r_sink, message):
    with pytest.raises(ValueError, match=message):
        effective_conductance(G, r_wire, r_source, r_sink)
