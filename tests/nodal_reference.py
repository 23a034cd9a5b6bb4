"""The slow, obviously-right line-resistance reference: the full 2*R*C nodal system, solved directly.

Tests and benchmarks check runtime/physics.py's nested dissection against it (and it against
ngspice); the product never runs it.
"""

from __future__ import annotations

import numpy as np

from xcompile.runtime.physics import nodal_system


def effective_conductance_reference(G, r_wire: float, r_source: float, r_sink: float) -> np.ndarray:
    """G_eff by a sparse direct (SuperLU) solve of the full nodal system: slow, for checking."""
    from scipy.sparse.linalg import splu

    matrix, inputs, outputs = nodal_system(G, r_wire, r_source, r_sink)
    voltages = splu(matrix).solve(inputs.toarray())
    return np.asarray(outputs @ voltages).T
