"""Line resistance: the exact effective conductance matrix of a crossbar with resistive wires.

Conventions (docs/hardware.md, "The crossbar network"): row i is driven by v_i at column 0's end through R_source;
word-line segments between neighbouring cells are r_wire; column j is sensed at row R-1's end
into a virtual ground through R_sink; bit-line segments are r_wire; cell (i, j) joins word-line
node a_ij and bit-line node b_ij with conductance G_ij; the output of column j is the current
into ground. The network is linear, so I = v @ G_eff exactly.

Solution (exact, direct): nested dissection of the R x C grid of cells. Keep as terminals the
source nodes v_i (a_i0 itself when R_source = 0) and the sink grounds g_j (b_{R-1,j} itself when
R_sink = 0); the Schur complement S of the nodal matrix onto them gives the currents into the
terminals, so G_eff = -S[sources, sinks]. A domain (a rectangle of cells) owns its nodes, the
word-line segments leaving it to the right and the bit-line segments leaving it upwards; its
boundary is its left column of a nodes, the right neighbours' a nodes, the upper neighbours' b
nodes and its bottom row of b nodes (terminals at the grid's edges). Each domain is cut in half
across its longer side; the two halves share exactly the nodes on the cut (a vertical cut shares
one a node per row, a horizontal cut one b node per column). Their Schur complements onto their
boundaries are added into the parent's frontal matrix and the shared nodes eliminated: a
Cholesky factor (LAPACK potrf), a triangular solve (trsm) and the Schur update (syrk, gemm),
all on SPD matrices, so nothing grows. Frontal matrices keep only their upper triangle, and
terminal-terminal blocks other than sources x sinks are needed nowhere, so never updated.
Domains of at most LEAF_CELLS cells are eliminated from their own Laplacian, small merges by
plain loops (BLAS calls cost more than they save there).
Cost: O(n^3) for an n x n grid, about 32 n^3 flops (6.6e7 at 128 x 128, where a row-by-row
block elimination with dense C x C blocks needs R C^3 + R^2 C^2 = 5.4e8); memory: one frontal
matrix per depth of the recursion, 4 MB at 128 x 128, 16 MB at 256 x 256, O(n^2).
R_sink = 0 or R_source = 0 only change which nodes are terminals; r_wire = 0 makes every line
one node (a small dense system).
"""

from __future__ import annotations

import llvmlite.binding
import numba
import numpy as np
from numba import types
from numba.extending import get_cython_function_address

from xcompile.runtime.threads import single_threaded_blas


def _lapack_routine(module: str, name: str, arguments: int):
    """A BLAS/LAPACK routine of SciPy's OpenBLAS callable from numba. Bound by symbol name rather
    than by address, so numba can cache the callers. Every argument is a pointer (Fortran ABI);
    pointers pass as intp, the same register on x86-64 and aarch64."""
    symbol = f"xcompile_{name}"
    llvmlite.binding.add_symbol(symbol, get_cython_function_address(f"scipy.linalg.cython_{module}", name))
    return types.ExternalFunction(symbol, types.void(*[types.intp] * arguments))


_dpotrf = _lapack_routine("lapack", "dpotrf", 5)
_dtrsm = _lapack_routine("blas", "dtrsm", 11)
_dgemm = _lapack_routine("blas", "dgemm", 13)
_dsyrk = _lapack_routine("blas", "dsyrk", 10)

LEAF_CELLS = 16  # domains of at most this many cells are eliminated from their own Laplacian
BLAS_WORK = 20000  # eliminations of m nodes from k with m k^2 below this run as plain loops


def effective_conductance(G, r_wire: float, r_source: float = 0.0, r_sink: float = 0.0) -> np.ndarray:
    """Exact R x C matrix G_eff (S) with I = v @ G_eff for the crossbar network above."""
    G = check_network(G, r_wire, r_source, r_sink)
    if r_wire == 0:
        return _lumped(G, r_source, r_sink)
    rows, cols = G.shape
    # wire, source and sink conductances; 0 marks a pinned source / grounded sink (a terminal node)
    conductances = np.array([1.0 / r_wire, 1.0 / r_source if r_source else 0.0, 1.0 / r_sink if r_sink else 0.0])
    frontal_sizes = np.zeros(2 * (rows + cols).bit_length() + 2, np.int64)  # per depth of the recursion
    _frontal_sizes(0, rows, 0, cols, rows, cols, 0, frontal_sizes)
    starts = np.cumsum(frontal_sizes) - frontal_sizes  # one frontal matrix per depth, one after the other
    arena = np.empty(frontal_sizes.sum())
    with single_threaded_blas():  # blocks of a few hundred rows: threads would only spin
        m, k = _domain(0, rows, 0, cols, G, conductances, arena, starts, 0, _blas_arguments())
    root = arena[: (m + k) ** 2].reshape(m + k, m + k)
    return -root[m : m + rows, m + rows :].copy()


def _blas_arguments() -> np.ndarray:
    """Scratch for the Fortran by-reference arguments: the doubles 1 and -1, 8 int32 (filled
    per call) and the option characters L, N, T, R."""
    scratch = np.zeros(7, np.float64)
    scratch[:2] = 1.0, -1.0
    scratch.view(np.uint8)[48:52] = np.frombuffer(b"LNTR", np.uint8)
    return scratch


@numba.njit(cache=True)
def _boundary(r0, r1, c0, c1, rows, cols):
    """Offsets of a domain's boundary sides (left, right, top, bottom; -1 when absent), the
    boundary size and how many of its nodes are free (not terminals). Free sides come first, in
    that order, then the source terminals (left at column 0), then the sinks (bottom at row R)."""
    h, w = r1 - r0, c1 - c0
    sources, sinks = c0 == 0, r1 == rows  # the left side holds sources, the bottom side sinks
    free_left = 0 if sources else h
    right_length = h if c1 < cols else 0
    top_length = w if r0 > 0 else 0
    free = free_left + right_length + top_length + (0 if sinks else w)
    left = free if sources else 0
    right = free_left if right_length else -1
    top = free_left + right_length if top_length else -1
    bottom = free + (h if sources else 0) if sinks else free - w
    size = free + (h if sources else 0) + (w if sinks else 0)
    return (left, right, top, bottom), size, free


@numba.njit(cache=True, nogil=True)  # the runtime solves the tiles of a layer on its threads
def _domain(r0, r1, c0, c1, G, conductances, arena, starts, depth, blas):
    """Write the frontal matrix of cells [r0, r1) x [c0, c1) into the arena at starts[depth];
    return (m, k): its trailing k x k block is the Schur complement onto the boundary (m nodes
    before it eliminated). Each half in turn is computed at depth + 1 and added in."""
    rows, cols = G.shape
    h = r1 - r0
    w = c1 - c0
    if h * w <= LEAF_CELLS:
        return _leaf(r0, r1, c0, c1, G, conductances, arena[starts[depth] :])
    sides, k, free = _boundary(r0, r1, c0, c1, rows, cols)
    left, right, top, bottom = sides
    if w > h:  # vertical cut: the halves share a_{i,cut}, the right half's left side
        cut = c0 + w // 2
        first = (r0, r1, c0, cut)
        second = (r0, r1, cut, c1)
        m = h
        w1 = cut - c0
        # where each side of each half lands in the parent's frontal matrix, and its length
        first_to = (m + left, 0, m + top, m + bottom)
        second_to = (0, m + right, m + top + w1, m + bottom + w1)
        first_len = (h, h, w1, w1)
        second_len = (h, h, w - w1, w - w1)
    else:  # horizontal cut: the halves share b_{cut-1,j}, the upper half's bottom side
        cut = r0 + h // 2
        first = (r0, cut, c0, c1)
        second = (cut, r1, c0, c1)
        m = w
        h1 = cut - r0
        first_to = (m + left, m + right, m + top, 0)
        second_to = (m + left + h1, m + right + h1, 0, m + bottom)
        first_len = (h1, h1, w, w)
        second_len = (h - h1, h - h1, w, w)
    F = _frontal(arena, starts[depth], m + k)
    for i in range(np.uint64(m + k)):  # the upper triangle
        for j in range(i, np.uint64(m + k)):
            F[i, j] = 0.0
    for half, half_to, half_len in ((first, first_to, first_len), (second, second_to, second_len)):
        m_half, k_half = _domain(half[0], half[1], half[2], half[3], G, conductances, arena, starts, depth + 1, blas)
        frontal = _frontal(arena, starts[depth + 1], m_half + k_half)
        half_sides = _boundary(half[0], half[1], half[2], half[3], rows, cols)[0]
        _add_half(F, frontal, m_half, half_sides, half_to, half_len, half[2] == 0, half[1] == rows)
    sources = h if c0 == 0 else 0
    if m * k * k < BLAS_WORK:
        _eliminate_by_loops(F, m)
    else:
        _eliminate_by_blas(F, m, k, free, sources, blas)
    return m, k


@numba.njit(cache=True)
def _frontal(arena, start, n):
    """The n x n frontal matrix stored in the arena from start on."""
    return arena[start : start + n * n].reshape((n, n))


@numba.njit(cache=True)
def _add_half(F, frontal, m_half, sides, to, length, sources_on_left, sinks_at_bottom):
    """Add a half's Schur complement, side by side, into the parent's frontal matrix F. Both hold
    only their upper triangle (row-major); a block that lies below the half's diagonal is read
    from its transpose. Source x source and sink x sink blocks are needed nowhere: skipped."""
    for s in range(4):
        for t in range(4):
            if sides[s] < 0 or sides[t] < 0 or to[s] > to[t]:
                continue
            if s == t and ((s == 0 and sources_on_left) or (s == 3 and sinks_at_bottom)):
                continue
            # unsigned indices: no negative-index wraparound, so the inner loops vectorise
            row, column = np.uint64(to[s]), np.uint64(to[t])
            half_s, half_t = np.uint64(m_half + sides[s]), np.uint64(m_half + sides[t])
            if s == t:
                for p in range(np.uint64(length[s])):
                    for q in range(p, np.uint64(length[t])):
                        F[row + p, column + q] += frontal[half_s + p, half_t + q]
            elif sides[s] < sides[t]:
                for p in range(np.uint64(length[s])):
                    for q in range(np.uint64(length[t])):
                        F[row + p, column + q] += frontal[half_s + p, half_t + q]
            else:
                for p in range(np.uint64(length[s])):
                    for q in range(np.uint64(length[t])):
                        F[row + p, column + q] += frontal[half_t + q, half_s + p]


@numba.njit(cache=True)
def _eliminate_by_loops(F, m):
    """Gaussian elimination of the first m nodes of the symmetric F on its upper triangle,
    skipping zero couplings."""
    n = F.shape[0]
    for p in range(m):
        pivot = F[p, p]
        if not pivot > 0:
            raise np.linalg.LinAlgError("line-resistance frontal matrix not positive definite")
        for i in range(np.uint64(p + 1), np.uint64(n)):
            factor = F[p, i] / pivot
            if factor != 0.0:
                for j in range(i, np.uint64(n)):  # unsigned indices: no wraparound, vectorises
                    F[i, j] -= factor * F[p, j]


@numba.njit(cache=True)
def _eliminate_by_blas(F, m, k, free, sources, blas):
    """Eliminate the first m nodes of the symmetric F (m + k square): F = L L^T on the m block
    (potrf), X = F[m:, :m] L^-T (trsm), then F[m:, m:] -= X X^T on the free x free triangle
    (syrk), the terminal x free and the sinks x sources blocks (gemm). Fortran reads the
    row-major F as its transpose, so its lower triangle is the row-major upper one, the only
    triangle read and written here."""
    sinks = k - free - sources
    integers = blas[2:6].view(np.int32)
    integers[0] = m + k  # leading dimension
    integers[1] = m
    integers[2] = k
    integers[3] = free
    integers[4] = sources
    integers[5] = sinks
    integers[7] = k - free
    one, minus_one = blas.ctypes.data, blas.ctypes.data + 8
    ld, m_, k_, free_, sources_, sinks_, info, terminals_ = [integers.ctypes.data + 4 * i for i in range(8)]
    lower, no, transposed, right = [blas.ctypes.data + 48 + i for i in range(4)]
    _dpotrf(lower, m_, F.ctypes.data, ld, info)
    if integers[6] != 0:
        raise np.linalg.LinAlgError("line-resistance frontal matrix not positive definite")
    X = F[:m, m:]  # Fortran's k x m block below the factor
    _dtrsm(right, lower, transposed, no, k_, m_, one, F.ctypes.data, ld, X.ctypes.data, ld)
    S = F[m:, m:]
    terminals_X = F[:m, m + free :]
    if free > 0:  # row-major: the upper triangle of free x free and the free x terminal rows
        _dsyrk(lower, no, free_, m_, minus_one, X.ctypes.data, ld, one, S.ctypes.data, ld)
        if free < k:
            terminals_by_free = F[m:, m + free :]
            _dgemm(no, transposed, terminals_, free_, m_, minus_one, terminals_X.ctypes.data, ld, X.ctypes.data, ld,
                   one, terminals_by_free.ctypes.data, ld)
    if sources > 0 and sinks > 0:  # row-major: sources x sinks
        sinks_X = F[:m, m + free + sources :]
        sinks_by_sources = F[m + free :, m + free + sources :]
        _dgemm(no, transposed, sinks_, sources_, m_, minus_one, sinks_X.ctypes.data, ld, terminals_X.ctypes.data, ld,
               one, sinks_by_sources.ctypes.data, ld)


@numba.njit(cache=True)
def _couple(F, p, q, g):
    """Add a conductance g between nodes p and q to the Laplacian F."""
    F[p, p] += g
    F[q, q] += g
    F[p, q] -= g
    F[q, p] -= g


@numba.njit(cache=True)
def _leaf(r0, r1, c0, c1, G, conductances, arena):
    """A small domain's frontal matrix from its own Laplacian: interior nodes first (row by row),
    then the boundary; the interior eliminated by loops."""
    rows, cols = G.shape
    gw, gs, gk = conductances[0], conductances[1], conductances[2]
    sides, k, _ = _boundary(r0, r1, c0, c1, rows, cols)
    left, right, top, bottom = sides
    h = r1 - r0
    w = c1 - c0
    source_behind_a = c0 == 0 and gs > 0  # the left column's a nodes are interior, v_i the boundary
    sink_behind_b = r1 == rows and gk > 0
    m = 2 * h * w - (0 if source_behind_a else h) - (0 if sink_behind_b else w)
    F = _frontal(arena, 0, m + k)
    F[:, :] = 0.0
    node = np.empty((2, h, w), np.int64)  # frontal index of a_ij (node[0]) and b_ij (node[1])
    interior = 0
    for i in range(h):
        for j in range(w):
            if j == 0 and not source_behind_a:
                node[0, i, j] = m + left + i
            else:
                node[0, i, j] = interior
                interior += 1
            if i == h - 1 and not sink_behind_b:
                node[1, i, j] = m + bottom + j
            else:
                node[1, i, j] = interior
                interior += 1
    for i in range(h):
        for j in range(w):
            a, b = node[0, i, j], node[1, i, j]
            _couple(F, a, b, G[r0 + i, c0 + j])
            if j + 1 < w:
                _couple(F, a, node[0, i, j + 1], gw)
            elif right >= 0:
                _couple(F, a, m + right + i, gw)
            if i > 0:
                _couple(F, b, node[1, i - 1, j], gw)
            elif top >= 0:
                _couple(F, b, m + top + j, gw)
            if j == 0 and source_behind_a:
                _couple(F, a, m + left + i, gs)
            if i == h - 1 and sink_behind_b:
                _couple(F, b, m + bottom + j, gk)
    _eliminate_by_loops(F, m)
    return m, k


@numba.njit(cache=True)
def _frontal_sizes(r0, r1, c0, c1, rows, cols, depth, sizes):
    """Largest frontal matrix (entries) at each depth of the recursion, for the arena."""
    h = r1 - r0
    w = c1 - c0
    if h * w <= LEAF_CELLS:
        n = 2 * h * w + 2 * h + 2 * w
    else:
        n = min(h, w) + _boundary(r0, r1, c0, c1, rows, cols)[1]
        if w > h:
            cut = c0 + w // 2
            _frontal_sizes(r0, r1, c0, cut, rows, cols, depth + 1, sizes)
            _frontal_sizes(r0, r1, cut, c1, rows, cols, depth + 1, sizes)
        else:
            cut = r0 + h // 2
            _frontal_sizes(r0, cut, c0, c1, rows, cols, depth + 1, sizes)
            _frontal_sizes(cut, r1, c0, c1, rows, cols, depth + 1, sizes)
    sizes[depth] = max(sizes[depth], n * n)
    return 0


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


def check_network(G, r_wire, r_source, r_sink) -> np.ndarray:
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
    I = O @ solve(M, B @ v). Predistortion differentiates through it (runtime/compensation.py);
    tests and benchmarks solve it directly as the slow, obviously-right reference.
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
