"""Cut each layer's (block-diagonal) matrix into crossbar tiles.

A layer of K inputs and N outputs takes ceil(K / rows) x ceil(N / n) tiles, n the outputs one
tile holds after encoding. Tiles of a grouped layer that would hold only structural zeros (off the
block diagonal) are not placed. Without a schedule every tile has a physical crossbar of its own.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xcompile.errors import XCompileError
from xcompile.ir import Layer, Program, Tiling, frozen_array
from xcompile.passes.infra import Pass, PassContext, PassResult


class Tile(Pass):
    name = "tile"
    options = ("rows", "cols")
    lowers = True

    def requires(self, program: Program) -> None:
        for layer in program.layers:
            if layer.encoding is None:
                self.fail(f"layer '{layer.name}': tiling needs an encoding first")

    def call(self, program: Program, context: PassContext) -> PassResult:
        hw = program.hardware
        layers, next_crossbar = [], 0
        for layer in program.layers:
            tiling = _tile(layer, hw.rows, layer.encoding.outputs_per_tile(hw.cols), next_crossbar, hw.cols)
            if tiling.count == 0 and layer.weight.size > 0:
                raise XCompileError(f"layer '{layer.name}': its {layer.rows_in} x {layer.outputs} weights fit on no {hw.rows} x {hw.cols} tile")
            next_crossbar += tiling.count
            layers.append(dataclasses.replace(layer, tiling=tiling, levels=None))
            context.step()
        return PassResult(program.replace_layers(layers), changed=True)


def _tile(layer: Layer, rows: int, per_tile: int, first_crossbar: int, cols: int) -> Tiling:
    k, n = layer.rows_in, layer.outputs
    _, kg, ng = layer.weight.shape
    row_starts = np.arange(0, k, rows)
    out_starts = np.arange(0, n, per_tile)
    rb, cb = np.meshgrid(np.arange(row_starts.size), np.arange(out_starts.size), indexing="ij")
    rb, cb = rb.reshape(-1), cb.reshape(-1)
    r0 = row_starts[rb]
    r1 = np.minimum(r0 + rows, k)
    c0 = out_starts[cb]
    c1 = np.minimum(c0 + per_tile, n)
    # a tile is needed when its row groups and output groups overlap (always, for one group)
    keep = np.maximum(r0 // kg, c0 // ng) <= np.minimum((r1 - 1) // kg, (c1 - 1) // ng)
    count = int(keep.sum())
    return Tiling(
        rows=rows,
        cols=cols,
        grid=frozen_array(np.stack([rb[keep], cb[keep]], axis=1), np.int64),
        row_range=frozen_array(np.stack([r0[keep], r1[keep]], axis=1), np.int64),
        out_range=frozen_array(np.stack([c0[keep], c1[keep]], axis=1), np.int64),
        crossbar=frozen_array(first_crossbar + np.arange(count), np.int64),
    )
