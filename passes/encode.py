"""Signed-weight encoding: how a signed output is carried by non-negative cell columns.

dual: W = W+ - W-, outputs j on the neighbouring columns 2j (+) and 2j+1 (-); y_j = I_2j - I_2j+1.
The pass fixes the encoding of every layer; `cell_values` builds a tile's cells from its signed
block and is used by conductance assignment once the tiles are cut.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xcompile.ir import Encoding, PassResult, Program, frozen_array

NAME = "encode"


def run(program: Program, progress=None) -> PassResult:
    encoding = make_encoding(program.options.encoding, program.hardware.cols)
    layers = [dataclasses.replace(layer, encoding=encoding) for layer in program.layers]
    return PassResult(program.replace_layers(layers), changed=bool(layers))


def make_encoding(name: str, cols: int) -> Encoding:
    if name != "dual":
        raise ValueError(f"unknown encoding {name!r}")
    return Encoding(
        name="dual",
        columns_per_output=2,
        shared_columns=0,
        term_offset=frozen_array(np.array([0, 1]), np.int64),
        term_step=frozen_array(np.array([2, 2]), np.int64),
        term_coeff=frozen_array(np.array([1.0, -1.0]), np.float64),
    )


def cell_values(encoding: Encoding, block: np.ndarray) -> np.ndarray:
    """Non-negative cell values [rows, physical columns] holding the signed block [rows, outputs]."""
    rows, outputs = block.shape
    cells = np.zeros((rows, outputs * encoding.columns_per_output + encoding.shared_columns), dtype=block.dtype)
    cells[:, 0::2] = np.maximum(block, 0)
    cells[:, 1::2] = np.maximum(-block, 0)
    return cells
