"""Line resistance: the exact effective conductance matrix of a crossbar with resistive wires.

Conventions (DESIGN.md, binding): row i is driven by v_i at column 0's end through R_source;
word-line segments between neighbouring cells are r_wire; column j is sensed at row R-1's end
into a virtual ground through R_sink; bit-line segments are r_wire; cell (i, j) joins word-line
node a_ij and bit-line node b_ij with conductance G_ij; the output of column j is the current
into ground. The network is linear, so I = v @ G_eff exactly.

Solution (exact, direct, O(R C^3) with LAPACK and BLAS): with gw = 1/r_wire, gs = 1/R_source,
gk = 1/R_sink and D_i = diag(G_i), KCL on word line i gives T_i a_i = s v_i e_0 + D'_i b_i, T_i
the tridiagonal chain (gw) plus D_i plus gs at node 0 (a pinned node 0 when R_source = 0:
s = 1, D'_i = D_i without row 0; else s = gs, D'_i = D_i). Eliminating a_i from the bit-line
equations leaves a block-tridiagonal system over rows with diagonal coupling -gw between row i
and i+1:
    A_i b_i - gw b_{i-1} - gw b_{i+1} = v_i r_i,   A_i = D_i - D_i T_i^-1 D'_i + vertical terms,
    r_i = s D_i T_i^-1 e_0.
Block elimination from the top, S_0 = A_0, S_i = A_i - gw^2 S_{i-1}^-1 (every S_i is a Schur
complement of the SPD nodal matrix, so it is inverted by Cholesky), needs only the last block of
the solution: row k's response G_eff[k] = g_out S_last^-1 gw S_{last-1}^-1 ... gw S_k^-1 r_k is
carried down as one column of a C x (i+1) matrix that each row's S_i^-1 multiplies, so no
inverse is kept beyond the next row. R_sink = 0 grounds the last bit-line row instead; r_wire = 0
makes every line one node (a small dense system). Cost: R Cholesky inverses (C^3 each) and
R^2 C^2 for the carried responses; at 128 x 128 the inverses are about 2/3 of the time.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from scipy.linalg import lapack
from threadpoolctl import ThreadpoolController


def effective_conductance(G, r_wire: float, r_source: float = 0.0, r_sink: float = 0.0) -> np.ndarray:
    """Exact R x C matrix G_eff (S) with I = v @ G_eff for the crossbar network above."""
    G = _check(G, r_wire, r_source, r_sink)
    if r_wire == 0:
        return _lumped(G, r_source, r_sink)
    rows, cols = G.shape
    gw = 1.0 / r_wire
    pinned_source = r_source == 0
    grounded_sink = r_sink == 0

    # word lines: the tridiagonal T_i of every row, inverted in O(C^2) each
    idx = np.arange(cols)
    diagonal = gw * (2.0 - (idx == 0) - (idx == cols - 1)) + G
    lower = np.full((rows, cols), -gw)  # lower[:, j] = T[j, j-1]
    upper = np.full((rows, cols), -gw)  # upper[:, j] = T[j, j+1]
    if pinned_source:  # node 0 is the source voltage itself: row 0 of T_i is e_0
        diagonal[:, 0] = 1.0
        upper[:, 0] = 0.0
        source_gain = 1.0
    else:
        diagonal[:, 0] += 1.0 / r_source
        source_gain = 1.0 / r_source
    D_prime = G.copy()
    if pinned_source:
        D_prime[:, 0] = 0.0
    r = np.empty((rows, cols))

    last = rows - 2 if grounded_sink else rows - 1  # last bit-line row with unknown voltages
    vertical = np.full(rows, 2 * gw)  # the bit-line segments around each unknown bit-line row
    vertical[0] -= gw
    if last >= 0 and not grounded_sink:
        vertical[last] += 1.0 / r_sink - gw
    # Row k's response, carried down to the last unknown row: after row i, column k <= i of
    # `carried` is gw^(i-k) S_i^-1 ... S_k^-1 r_k, so the last row gives G_eff[k] = g_out * column k.
    carried = np.empty((cols, last + 1))
    product = np.empty((cols, last + 1))
    S = np.empty((cols, cols))
    S_inv = np.zeros((cols, cols))
    with _single_threaded_blas():
        for i in range(rows):
            coupling = gw * gw if 0 < i <= last else 0.0
            _schur_row(lower[i], diagonal[i], upper[i], G[i], D_prime[i], source_gain, vertical[i], S_inv, coupling, S, r[i])
            if i > last:
                continue
            S_inv = _spd_inverse(S)
            carried[:, :i] *= gw
            carried[:, i] = r[i]
            np.matmul(S_inv, carried[:, : i + 1], out=product[:, : i + 1])
            carried, product = product, carried
    out_gain = gw if grounded_sink else 1.0 / r_sink  # current into ground from the last unknown row
    result = np.empty((rows, cols))
    result[: last + 1] = out_gain * carried.T
    if grounded_sink:  # the last row's cells feed the grounded bit-line nodes directly (all of them for one row)
        result[rows - 1] = r[rows - 1]
    return result


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def _single_threaded_blas():
    """One BLAS thread per block: numpy's and SciPy's OpenBLAS each keep a thread pool, and on
    C x C blocks their threads spin against each other (128 x 128: 20x slower on two cores)."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _spd_inverse(S: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite block by Cholesky (LAPACK potrf + potri): half
    the work of an LU inverse. Every S_i is a Schur complement of the SPD nodal matrix."""
    factor, info = lapack.dpotrf(S, lower=True, clean=False)
    if info == 0:
        inverse, info = lapack.dpotri(factor, lower=True, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"line-resistance block not positive definite (LAPACK info {info})")
    _mirror_lower(inverse)
    return inverse


@numba.njit(cache=True)
def _mirror_lower(matrix):
    """Copy the lower triangle over the upper one (LAPACK's symmetric routines fill one side)."""
    n = matrix.shape[0]
    for j in range(n):
        for k in range(j + 1, n):
            matrix[j, k] = matrix[k, j]


@numba.njit(cache=True)
def tridiagonal_inverse(lower, diagonal, upper, inverse):
    """Write the dense inverse of a tridiagonal matrix (its three diagonals) into `inverse`, O(n^2).

    With the pivots p of the LU sweep from the top and q of the sweep from the bottom, column k
    of the inverse is 1 / (p_k + q_k - d_k) on the diagonal and decays away from it by the
    ratios -upper/p (above) and -lower/q (below): every entry costs O(1), and no ratio exceeds 1
    for the diagonally dominant chains here, so nothing overflows.
    """
    n = diagonal.shape[0]
    p = np.empty(n)
    q = np.empty(n)
    p[0] = diagonal[0]
    for j in range(1, n):
        p[j] = diagonal[j] - lower[j] * upper[j - 1] / p[j - 1]
    q[n - 1] = diagonal[n - 1]
    for j in range(n - 2, -1, -1):
        q[j] = diagonal[j] - upper[j] * lower[j + 1] / q[j + 1]
    for k in range(n):
        inverse[k, k] = 1.0 / (p[k] + q[k] - diagonal[k])
    for i in range(n - 2, -1, -1):  # above the diagonal, row by row from the bottom
        ratio = -upper[i] / p[i]
        for k in range(i + 1, n):
            inverse[i, k] = ratio * inverse[i + 1, k]
    for i in range(1, n):  # below the diagonal, row by row from the top
        ratio = -lower[i] / q[i]
        for k in range(i):
            inverse[i, k] = ratio * inverse[i - 1, k]


@numba.njit(cache=True)
def _schur_row(lower, diagonal, upper, g, g_prime, source_gain, vertical, previous, coupling, S, r):
    """Row i's bit-line block S_i = D_i - D_i T_i^-1 D'_i + vertical - coupling * S_{i-1}^-1 and
    its drive r_i = s D_i T_i^-1 e_0, written into S and r."""
    cols = g.shape[0]
    tridiagonal_inverse(lower, diagonal, upper, S)  # S holds T_i^-1 until overwritten row by row
    for j in range(cols):
        r[j] = source_gain * g[j] * S[j, 0]
        for k in range(cols):
            S[j, k] = -g[j] * S[j, k] * g_prime[k] - coupling * previous[j, k]
        S[j, j] += g[j] + vertical


def _lumped(G: np.ndarray, r_source: float, r_sink: float) -> np.ndarray:
    """r_wire = 0: every word line is one node a_i, every bit line one node b_j."""
    if r_source == 0 and r_sink == 0:
        return G.copy()
    row_sum, col_sum = G.sum(axis=1), G.sum(axis=0)
    if r_sink == 0:  # b = 0: a_i = gs v_i / (gs + sum_j G_ij)
        gs = 1.0 / r_source
        return (gs / (gs + row_sum))[:, None] * G
    gk = 1.0 / r_sink
    if r_source == 0:  # a = v: b_j = sum_i G_ij v_i / (gk + sum_i G_ij)
        return G * (gk / (gk + col_sum))[None, :]
    gs = 1.0 / r_source
    drive = gs / (gs + row_sum)
    M = np.diag(gk + col_sum) - G.T @ (G / (gs + row_sum)[:, None])
    return gk * np.linalg.solve(M, (drive[:, None] * G).T).T


def _check(G, r_wire, r_source, r_sink) -> np.ndarray:
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or 0 in G.shape:
        raise ValueError(f"G must be a non-empty 2-D array of conductances, got shape {list(G.shape)}")
    if not np.isfinite(G).all() or (G < 0).any():
        raise ValueError("G must hold finite conductances >= 0 (siemens)")
    for name, value in (("r_wire", r_wire), ("r_source", r_source), ("r_sink", r_sink)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite resistance >= 0 (ohms), got {value!r}")
    return G


def nodal_system(G, r_wire: float, r_source: float, r_sink: float):
    """The full 2*R*C nodal analysis (positive resistances): (sparse matrix, input map, output map).

    Unknowns: word-line nodes a_ij at i*C + j, bit-line nodes b_ij at R*C + i*C + j. The system
    matrix M, a map B (v -> right-hand side) and a map O (node voltages -> column currents) give
    I = O @ solve(M, B @ v). The slow, obviously-right reference for tests and benchmarks.
    """
    import scipy.sparse as sp

    G = _check(G, r_wire, r_source, r_sink)
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
