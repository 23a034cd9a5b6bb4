"""Conductance assignment: the cell level of every cell of every tile.

The encoding's logical cell values of each tile, sliced into cell_bits-bit levels: integers in
[0, 2**cell_bits - 1] (float in ideal mode, one slice); the runtime turns a level L into
G = g_off + L / (2**cell_bits - 1) * (g_on - g_off). Unused cells of an edge tile are 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xcompile.ir import Layer, PassResult, Program, frozen_array
from xcompile.passes.encode import logical_cells, physical_cells

NAME = "assign"


def run(program: Program, progress=None) -> PassResult:
    hw, opts = program.hardware, program.options
    dtype = np.float32 if opts.ideal else (np.uint8 if opts.cell_bits <= 8 else np.uint16)
    top = 2**opts.weight_bits - 1
    layers = []
    for layer in program.layers:
        layers.append(_assign(layer, hw.rows, hw.cols, dtype, top, opts.cell_bits))
        if progress:
            progress()
    return PassResult(program.replace_layers(layers), changed=True)


def _assign(layer: Layer, rows: int, cols: int, dtype, top: int, cell_bits: int) -> Layer:
    if layer.tiling is None or layer.encoding is None or layer.scale is None:
        raise ValueError(f"layer '{layer.name}': assignment needs quantisation, encoding and tiling first")
    step = layer.output_step()
    signed = layer.weight_q if layer.weight_q is not None else layer.weight / (np.float32(step) if layer.channel_scale is None else step)
    t = layer.tiling
    levels = np.zeros((t.count, rows, cols), dtype=dtype)
    for i in range(t.count):
        logical = logical_cells(layer.encoding.name, layer.block(t.row_range[i], t.out_range[i], signed), top)
        cells = physical_cells(layer.encoding, logical, cell_bits)
        levels[i, : cells.shape[0], : cells.shape[1]] = cells
    return dataclasses.replace(layer, levels=frozen_array(levels))
