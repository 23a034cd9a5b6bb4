"""Conductance assignment: the cell level of every cell of every tile.

Levels are integers in [0, 2**cell_bits - 1] (float in ideal mode); the runtime turns a level L
into G = g_off + L / (2**cell_bits - 1) * (g_on - g_off). Unused cells of an edge tile are 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xcompile.ir import Layer, PassResult, Program, frozen_array
from xcompile.passes.encode import cell_values

NAME = "assign"


def run(program: Program, progress=None) -> PassResult:
    hw, opts = program.hardware, program.options
    dtype = np.float32 if opts.ideal else (np.uint8 if opts.cell_bits <= 8 else np.uint16)
    layers = []
    for layer in program.layers:
        layers.append(_assign(layer, hw.rows, hw.cols, dtype))
        if progress:
            progress()
    return PassResult(program.replace_layers(layers), changed=True)


def _assign(layer: Layer, rows: int, cols: int, dtype) -> Layer:
    if layer.tiling is None or layer.encoding is None or layer.scale is None:
        raise ValueError(f"layer '{layer.name}': assignment needs quantisation, encoding and tiling first")
    signed = layer.weight_q if layer.weight_q is not None else layer.weight / np.float32(layer.scale)
    t = layer.tiling
    levels = np.zeros((t.count, rows, cols), dtype=dtype)
    for i in range(t.count):
        cells = cell_values(layer.encoding, layer.block(t.row_range[i], t.out_range[i], signed))
        levels[i, : cells.shape[0], : cells.shape[1]] = cells
    return dataclasses.replace(layer, levels=frozen_array(levels))
