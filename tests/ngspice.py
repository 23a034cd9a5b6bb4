"""Run a crossbar netlist in ngspice: the independent circuit simulator the solver is checked on."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np


def netlist(G: np.ndarray, r_wire: float, r_source: float, r_sink: float, v: np.ndarray) -> str:
    """The crossbar of docs/hardware.md: sources at column 0 through r_source, sinks at the last row through
    r_sink into 0 V ammeters, r_wire between neighbouring cells on both lines."""
    rows, cols = G.shape
    lines = ["* xcompile crossbar"]
    for i in range(rows):
        lines.append(f"vin{i} in{i} 0 dc {v[i]:.17g}")
        lines.append(f"rs{i} in{i} a{i}_0 {r_source:.17g}")
        for j in range(cols - 1):
            lines.append(f"rwa{i}_{j} a{i}_{j} a{i}_{j + 1} {r_wire:.17g}")
        for j in range(cols):
            lines.append(f"rc{i}_{j} a{i}_{j} b{i}_{j} {1.0 / G[i, j]:.17g}")
    for j in range(cols):
        for i in range(rows - 1):
            lines.append(f"rwb{i}_{j} b{i}_{j} b{i + 1}_{j} {r_wire:.17g}")
        lines.append(f"rk{j} b{rows - 1}_{j} s{j} {r_sink:.17g}")
        lines.append(f"vm{j} s{j} 0 dc 0")
    lines += [".options numdgt=15", ".control", "op", "set numdgt=15"]
    lines += [f"print i(vm{j})" for j in range(cols)]
    lines += [".endc", ".end"]
    return "\n".join(lines) + "\n"


def column_currents(G, r_wire, r_source, r_sink, v) -> np.ndarray:
    """Column currents (A) that ngspice computes for the crossbar netlist."""
    binary = shutil.which("ngspice")
    if binary is None:
        raise RuntimeError("ngspice is not installed (apt-get install -y ngspice)")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "crossbar.cir"
        path.write_text(netlist(np.asarray(G), r_wire, r_source, r_sink, np.asarray(v)))
        result = subprocess.run([binary, "-b", str(path)], capture_output=True, text=True, timeout=300)
    values = dict(re.findall(r"i\(vm(\d+)\)\s*=\s*([-+0-9.eE]+)", result.stdout))
    if len(values) != G.shape[1]:
        raise RuntimeError(f"ngspice did not report every column current:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return np.array([float(values[str(j)]) for j in range(G.shape[1])])
