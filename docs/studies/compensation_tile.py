"""Array error of one 128 x 128 tile per compensation mode (docs/hardware.md's table).

A 128 -> 64 dense layer (one dual-array tile, 8-bit weights, g_on 1 mS), 256 uniform input
vectors, rms column-current error relative to the currents of the target cells.
Run: python docs/studies/compensation_tile.py  (about a minute)
"""

import sys
from pathlib import Path

import numpy as np

import xcompile
from xcompile.runtime.devices import level_conductance

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from builders import dense  # noqa: E402


def array_error(session, v):
    crossbar = session._layers[0].crossbar
    (block,) = crossbar.blocks
    used = block.conductance.shape[1]
    hw = session.hardware
    target = level_conductance(crossbar.layer.levels[0][:, :used], session.program.options.level_max, hw) * hw.v_read
    scaled = v if block.row_scale is None else v * block.row_scale
    measured = (scaled @ block.conductance.astype(np.float64)) * block.gain
    return np.linalg.norm(measured - v @ target) / np.linalg.norm(v @ target)


mapping = xcompile.compile_model(dense(128, 64, seed=0, bias=False), progress=False)
v = np.random.default_rng(5).random((256, 128))
for wires in (dict(r_wire=1.0), dict(r_wire=2.5, r_source=100.0, r_sink=100.0)):
    row = [f"{array_error(xcompile.Session(mapping, g_on=1e-3, compensation=mode, **wires), v):.1%}"
           for mode in ("none", "column", "row-column", "predistort")]
    print(wires, "none / column / row-column / predistort:", " | ".join(row))
