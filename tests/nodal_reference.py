"""The slow, obviously-right line-resistance reference: the full 2*R*C nodal analysis.

Tests and benchmarks check runtime/physics.py's nested dissection against it (and it against
ngspice); the product never runs it.
"""

from __future__ import annotations

import numpy as np

from xcompile.runtime.physics import check_network


def nodal_system(G, r_wire: float, r_source: float, r_sink: float):
    """The full 2*R*C nodal analysis (positive resistances): (sparse matrix, input map, output map).

    Unknowns: word-line nodes a_ij at i*C + j, bit-line nodes b_ij at R*C + i*C + j. The system
    matrix M, a map B (v -> right-hand side) and a map O (node voltages -> column currents) give
    I = O @ solve(M, B @ v). The slow, obviously-right reference for tests and benchmarks.
    """
    import scipy.sparse as sp

    G = check_network(G, r_wire, r_source, r_sink)
    if min(r_wire, r_source, r_sink) <= 0:
        raise ValueError("the nodal reference needs positive resistances")
    rows, cols = G.shape
    n = rows * cols
    gw, gs, gk = 1.0 / r_wire, 1.0 / r_source, 1.0 / r_sink
    a = np.arange(n).reshape(rows, cols)
    b = a + n
    entries_i, entries_j, values = [], [], []

    def conductance(p, q, g):  # a two-terminal conductance between node arrays p and q
        entries_i.extend([p, q, p, q])
        entries_j.extend([p, q, q, p])
        values.extend([g, g, -g, -g])

    conductance(a[:, :-1].ravel(), a[:, 1:].ravel(), np.full(rows * (cols - 1), gw))
    conductance(b[:-1, :].ravel(), b[1:, :].ravel(), np.full((rows - 1) * cols, gw))
    conductance(a.ravel(), b.ravel(), G.ravel())
    diagonal = np.zeros(2 * n)
    diagonal[a[:, 0]] += gs
    diagonal[b[-1, :]] += gk
    i = np.concatenate([np.concatenate(entries_i), np.arange(2 * n)])
    j = np.concatenate([np.concatenate(entries_j), np.arange(2 * n)])
    v = np.concatenate([np.concatenate(values), diagonal])
    matrix = sp.csc_matrix((v, (i, j)), shape=(2 * n, 2 * n))
    inputs = sp.csc_matrix((np.full(rows, gs), (a[:, 0], np.arange(rows))), shape=(2 * n, rows))
    outputs = sp.csr_matrix((np.full(cols, gk), (np.arange(cols), b[-1, :])), shape=(cols, 2 * n))
    return matrix, inputs, outputs


def effective_conductance_reference(G, r_wire: float, r_source: float, r_sink: float) -> np.ndarray:
    """G_eff by a sparse direct (SuperLU) solve of the full nodal system: slow, for checking."""
    from scipy.sparse.linalg import splu

    matrix, inputs, outputs = nodal_system(G, r_wire, r_source, r_sink)
    voltages = splu(matrix).solve(inputs.toarray())
    return np.asarray(outputs @ voltages).T
