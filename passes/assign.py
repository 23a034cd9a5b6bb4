"""Conductance assignment: the cell level of every cell of every tile.

The encoding's logical cell values of each tile, sliced into cell_bits-bit levels: integers in
[0, 2**cell_bits - 1] (float in ideal mode, one slice); the runtime turns a level L into
G = g_off + L / (2**cell_bits - 1) * (g_on - g_off). Unused cells of an edge tile are 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xcompile.ir import Layer, Program, frozen_array
from xcompile.passes.encode import logical_cells, physical_cells
from xcompile.passes.infra import Pass, PassContext, PassResult


class Assign(Pass):
    name = "assign"
    options = ("cell_bits", "g_on", "g_off")
    lowers = True

    def requires(self, program: Program) -> None:
        for layer in program.layers:
            if layer.tiling is None or layer.encoding is None or layer.scale is None:
                self.fail(f"layer '{layer.name}': assignment needs quantisation, encoding and tiling first")

    def call(self, program: Program, context: PassContext) -> PassResult:
        opts = program.options
        dtype = np.float32 if opts.ideal else (np.uint8 if opts.cell_bits <= 8 else np.uint16)
        top = 2**opts.weight_bits - 1
        layers = []
        for layer in program.layers:
            layers.append(_assign(layer, dtype, top, opts.cell_bits))
            context.step()
        return PassResult(program.replace_layers(layers), changed=True)


def _assign(layer: Layer, dtype, top: int, cell_bits: int) -> Layer:
    signed = layer.in_level_steps()
    t = layer.tiling
    levels = np.zeros((t.count, t.rows, t.cols), dtype=dtype)
    for i, row_range, out_range in layer.tiles():
        logical = logical_cells(layer.encoding.name, layer.block(row_range, out_range, signed), top)
        cells = physical_cells(layer.encoding, logical, cell_bits)
        levels[i, : cells.shape[0], : cells.shape[1]] = cells
    return dataclasses.replace(layer, levels=frozen_array(levels))
