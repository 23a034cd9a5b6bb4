"""Signed-weight encoding and bit slicing: how a signed output lives on non-negative cells.

Every encoding turns a tile's signed integer block q [rows, n] (|q| < 2^B, B = weight_bits) into
non-negative logical cell values in [0, 2^B - 1], then bit slicing splits each value into
S = ceil(B / b) slices of b = cell_bits bits, w = sum_s 2^(b s) w_s, each slice its own column.

- dual:   W = W+ - W-; output j on logical columns 2j (+) and 2j+1 (-): y_j = I_2j - I_2j+1.
- acm:    (Kazemi et al., DAC 2020) n outputs on n + 1 columns, w_ij = g_ij - g_i,j+1, built from
          per-row suffix sums g_ij = c_i + sum_{k>=j} q_ik; y_j = I_j - I_j+1. A row whose suffix
          sums span more than the cell range is either rescaled (acm_fit="scale": the layer is
          requantised on a coarser step so every row fits) or clipped (acm_fit="clip", counted).
- offset: g_ij = q_ij + 2^(B-1) with one shared reference column g_ref = 2^(B-1) first in the
          tile: y_j = I_j - I_ref. The layer is requantised to |q| <= 2^(B-1) - 1.

Physical layout: logical column m holds its slices at m*S .. m*S + S - 1, so the recombination
terms (ir.Encoding) do not depend on how many outputs a tile holds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from xcompile.errors import XCompileError
from xcompile.ir import Encoding, Layer, Program, frozen_array
from xcompile.passes.infra import Pass, PassContext, PassResult
from xcompile.passes.quantize import quantise

# logical layout per encoding: (columns per output, shared columns, terms (offset, step, coeff))
_LOGICAL = {
    "dual": (2, 0, ((0, 2, 1.0), (1, 2, -1.0))),
    "acm": (1, 1, ((0, 1, 1.0), (1, 1, -1.0))),
    "offset": (1, 1, ((1, 1, 1.0), (0, 0, -1.0))),
}


class Encode(Pass):
    name = "encode"
    options = ("encoding", "acm_fit", "cell_bits")
    lowers = True

    def requires(self, program: Program) -> None:
        for layer in program.layers:
            if layer.scale is None:
                self.fail(f"layer '{layer.name}' is not quantised (run quantize first)")

    def call(self, program: Program, context: PassContext) -> PassResult:
        opts, hw = program.options, program.hardware
        encoding = encoding_for(opts)
        _check_fits(encoding, opts, hw.cols)
        top = 2**opts.weight_bits - 1
        per_channel = opts.weight_scale == "channel"
        layers = []
        for layer in program.layers:
            layer = dataclasses.replace(layer, encoding=encoding)
            if opts.encoding == "offset":
                layer = quantise(layer, (top + 1) // 2 - 1, opts.ideal, per_channel)
            elif opts.encoding == "acm":
                layer = _fit_acm(layer, top, encoding.outputs_per_tile(hw.cols), opts.acm_fit, opts.ideal, per_channel)
            layers.append(layer)
            context.step()
        return PassResult(program.replace_layers(layers), changed=bool(layers))


def encoding_for(options) -> Encoding:
    """The encoding the compile options ask for (one slice in ideal mode)."""
    slices = 1 if options.ideal else math.ceil(options.weight_bits / options.cell_bits)
    return make_encoding(options.encoding, slices, options.cell_bits)


def _check_fits(encoding: Encoding, opts, cols: int) -> None:
    """A crossbar must hold at least one output: its columns and the shared ones, every slice."""
    needed = encoding.columns_used(1)
    if cols < needed:
        slices = slices_of(encoding)
        raise XCompileError(
            f"a crossbar of {cols} columns cannot hold one output: the {encoding.name} encoding with {slices} "
            f"slice(s) of {opts.cell_bits} bit(s) needs {needed} columns; give cols >= {needed}"
            + (" or more bits per cell (cell_bits)" if slices > 1 else "")
        )


def make_encoding(name: str, slices: int = 1, cell_bits: int = 8) -> Encoding:
    per_output, shared, terms = _LOGICAL[name]
    expanded = [
        (offset * slices + s, step * slices, coeff * 2.0 ** (cell_bits * s))
        for offset, step, coeff in terms
        for s in range(slices)
    ]
    offsets, steps, coeffs = zip(*expanded)
    return Encoding(
        name=name,
        columns_per_output=per_output * slices,
        shared_columns=shared * slices,
        term_offset=frozen_array(np.array(offsets), np.int64),
        term_step=frozen_array(np.array(steps), np.int64),
        term_coeff=frozen_array(np.array(coeffs), np.float64),
    )


def slices_of(encoding: Encoding) -> int:
    return encoding.columns_per_output // _LOGICAL[encoding.name][0]


def logical_cells(name: str, block: np.ndarray, top: float) -> np.ndarray:
    """Non-negative logical cell values [rows, logical columns] for a signed block [rows, n]."""
    rows, n = block.shape
    if name == "dual":
        cells = np.zeros((rows, 2 * n), dtype=block.dtype)
        cells[:, 0::2] = np.maximum(block, 0)
        cells[:, 1::2] = np.maximum(-block, 0)
        return cells
    if name == "offset":
        half = (top + 1) // 2 if np.issubdtype(block.dtype, np.integer) else (top + 1) / 2
        return np.concatenate([np.full((rows, 1), half, dtype=block.dtype), block + half], axis=1)
    suffix = _suffix_sums(block)  # acm
    lift = np.maximum(0, -suffix.min(axis=1, keepdims=True))
    return np.clip(suffix + lift, 0, top)


def physical_cells(encoding: Encoding, logical: np.ndarray, cell_bits: int) -> np.ndarray:
    """Slice logical values into physical columns: logical m -> columns m*S .. m*S + S - 1."""
    slices = slices_of(encoding)
    if slices == 1:
        return logical
    mask = (1 << cell_bits) - 1
    values = logical.astype(np.int64)
    parts = [(values >> (cell_bits * s)) & mask for s in range(slices)]
    return np.stack(parts, axis=-1).reshape(logical.shape[0], -1)


def _suffix_sums(block: np.ndarray) -> np.ndarray:
    """[rows, n + 1]: S_ij = sum_{k >= j} block_ik, with S_in = 0 (the extra column)."""
    zero = np.zeros((block.shape[0], 1), dtype=block.dtype)
    return np.concatenate([np.cumsum(block[:, ::-1], axis=1)[:, ::-1], zero], axis=1)


def _acm_span(layer: Layer, signed: np.ndarray, per_tile: int) -> float:
    """The largest range of a row's suffix sums over any tile's outputs."""
    span = 0.0
    for c0 in range(0, layer.outputs, per_tile):
        block = layer.block((0, layer.rows_in), (c0, min(c0 + per_tile, layer.outputs)), signed)
        suffix = _suffix_sums(block)
        span = max(span, float((suffix.max(axis=1) - np.minimum(suffix.min(axis=1), 0)).max(initial=0.0)))
    return span


def _fit_acm(layer: Layer, top: int, per_tile: int, fit: str, ideal: bool, per_channel: bool) -> Layer:
    """Make every row's suffix sums fit the cell range, by a coarser scale or by counted clipping."""
    signed = layer.in_level_steps()
    span = _acm_span(layer, signed, per_tile)
    if span <= top:
        return layer
    if fit == "scale":
        limit = int(top * top / span)
        while limit >= 1:  # rounding can push a row over again: widen the step until all fit
            scaled = quantise(layer, limit, ideal, per_channel)
            check = scaled.in_level_steps()
            if _acm_span(scaled, check, per_tile) <= top:
                notes = {**layer.notes, "acm_rescaled_by": round(scaled.scale / layer.scale, 6)}
                return dataclasses.replace(scaled, notes=notes)
            limit = min(limit - 1, int(limit / 1.05))
        raise XCompileError(
            f"layer '{layer.name}': ACM cannot hold its rows' suffix sums in {top + 1} cell levels even with "
            f"one level per weight step ({per_tile} outputs per tile); use more weight bits, fewer columns "
            "per crossbar, or acm_fit='clip'"
        )
    clipped, squared, count = 0, 0.0, 0
    for c0 in range(0, layer.outputs, per_tile):
        block = layer.block((0, layer.rows_in), (c0, min(c0 + per_tile, layer.outputs)), signed).astype(np.float64)
        suffix = _suffix_sums(block)
        cells = suffix + np.maximum(0, -suffix.min(axis=1, keepdims=True))
        clipped += int((cells > top).sum())
        realised = np.diff(-np.clip(cells, 0, top), axis=1)  # w_ij = g_ij - g_i,j+1
        step = layer.scale if layer.channel_scale is None else layer.scale * layer.to_crossbar_order(layer.channel_scale)[c0 : c0 + block.shape[1]]
        squared += float(np.square((realised - block) * step).sum())
        count += block.size
    notes = {**layer.notes, "acm_clipped_cells": clipped, "acm_weight_rmse": math.sqrt(squared / max(count, 1))}
    return dataclasses.replace(layer, notes=notes)
