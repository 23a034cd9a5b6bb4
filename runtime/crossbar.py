"""A programmed layer: its tiles' cells turned into what one MVM of the layer computes.

With ideal devices, wires and converters every tile is linear and the digital recombination is
linear, so the whole layer collapses, once, to one effective matrix per group; an MVM is then one
GEMM. The non-ideal model (device effects, G_eff, DAC / ADC) plugs in here per tile.
"""

from __future__ import annotations

import numpy as np

from xcompile.ir import Layer


class ProgrammedLayer:
    """What the runtime executes for one layer: rows [P, K] -> outputs [P, N] (bias added)."""

    def __init__(self, layer: Layer):
        self.layer = layer
        self.weights = effective_weights(layer)  # float64 [groups, Kg, Ng]
        self.bias = None if layer.bias is None else layer.bias.astype(np.float64)

    def forward(self, rows: np.ndarray, add_bias: bool = True) -> np.ndarray:
        groups, kg, ng = self.weights.shape
        x = np.asarray(rows, dtype=np.float64)
        if groups == 1:
            y = x @ self.weights[0]
        else:
            y = np.matmul(x.reshape(-1, groups, kg).transpose(1, 0, 2), self.weights)
            y = y.transpose(1, 0, 2).reshape(x.shape[0], groups * ng)
        if add_bias and self.bias is not None:
            y += self.bias
        return y


def effective_weights(layer: Layer) -> np.ndarray:
    """The weight matrix the programmed cells realise: sum over tiles of combine(levels) * scale."""
    enc, tiling = layer.encoding, layer.tiling
    target = np.zeros(layer.weight.shape, dtype=np.float64)
    for i in range(tiling.count):
        (r0, r1), (c0, c1) = tiling.row_range[i], tiling.out_range[i]
        cells = layer.levels[i, : r1 - r0].astype(np.float64)
        block = np.zeros((r1 - r0, enc.outputs_per_tile(tiling.cols)), dtype=np.float64)
        np.add.at(block.T, enc.combine_dst, cells[:, enc.combine_src].T * enc.combine_coeff[:, None])
        layer.add_block(target, (r0, r1), (c0, c1), block[:, : c1 - c0])
    return target * layer.scale
