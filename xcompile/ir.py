"""The crossbar program: MVM layers, their tiles and cell levels, and the reprogramming schedule.

Every object here is immutable (frozen dataclasses, read-only arrays), so a pass can only make a
new program from an old one: `dataclasses.replace` on what it changes, sharing the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from xcompile.config import CompileOptions, Hardware
from xcompile.reprogramming import Schedule


def frozen_array(array: np.ndarray | None, dtype=None) -> np.ndarray | None:
    """A read-only (C-contiguous) copy-if-needed of `array`, so nobody mutates shared data."""
    if array is None:
        return None
    out = np.ascontiguousarray(array, dtype=dtype)
    if out is array and out.flags.writeable:
        out = out.copy()
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)
class Encoding:
    """How a signed output is spread over non-negative cell columns of one tile.

    A tile holding n outputs uses `columns_per_output * n + shared_columns` physical columns.
    The digital recombination after the ADC is a sum of affine terms: for every term k and
    tile-local output j < n, output[j] += term_coeff[k] * column[term_offset[k] + term_step[k] * j].
    Layouts keep offsets independent of n, so one set of terms serves full and edge tiles.
    """

    name: str
    columns_per_output: int
    shared_columns: int
    term_offset: np.ndarray  # int64 [terms]
    term_step: np.ndarray  # int64 [terms]
    term_coeff: np.ndarray  # float64 [terms]

    def outputs_per_tile(self, cols: int) -> int:
        return (cols - self.shared_columns) // self.columns_per_output

    def columns_used(self, outputs: int) -> int:
        return outputs * self.columns_per_output + self.shared_columns

    def combine(self, cells: np.ndarray, outputs: int) -> np.ndarray:
        """The signed outputs [..., outputs] that columns `cells` [..., columns] stand for."""
        j = np.arange(outputs)
        result = np.zeros(cells.shape[:-1] + (outputs,), dtype=np.result_type(cells.dtype, np.float64))
        for offset, step, coeff in zip(self.term_offset, self.term_step, self.term_coeff):
            result += coeff * cells[..., offset + step * j]
        return result


@dataclass(frozen=True, eq=False)
class Tiling:
    """Where each tile of a layer's (block-diagonal) matrix sits.

    Row/column ranges index the layer's virtual matrix of K = groups*Kg rows and N = groups*Ng
    outputs; tiles that would only hold structural zeros of a grouped layer are not placed.
    """

    rows: int
    cols: int
    grid: np.ndarray  # [T, 2] (row block, column block)
    row_range: np.ndarray  # [T, 2] start, stop in K
    out_range: np.ndarray  # [T, 2] start, stop in N
    crossbar: np.ndarray  # [T] physical crossbar id

    @property
    def count(self) -> int:
        return int(self.grid.shape[0])


@dataclass(frozen=True, eq=False)
class Layer:
    """One MVM layer: y[P, N] = x[P, K] @ blockdiag(weight) + bias, and how x and y are formed.

    kind is 'dense' (Gemm / MatMul) or 'conv' / 'conv_transpose'; `geometry` holds the ONNX
    attributes the runtime needs to form input vectors and outputs (JSON-able).
    """

    index: int
    name: str
    node_name: str
    op_type: str
    kind: str
    geometry: dict[str, Any]
    weight: np.ndarray  # float32 [groups, Kg, Ng]
    bias: np.ndarray | None  # float32 [N]
    input_name: str
    output_name: str
    scale: float | None = None  # weight value of one level step (the largest channel's, with channel scales)
    weight_q: np.ndarray | None = None  # int32 [groups, Kg, Ng], |weight_q| < 2**weight_bits
    encoding: Encoding | None = None
    tiling: Tiling | None = None
    levels: np.ndarray | None = None  # [T, rows, cols] cell levels (float32 in ideal mode)
    notes: dict[str, Any] = field(default_factory=dict)
    output_order: np.ndarray | None = None  # int64 [N]: crossbar output q holds layer output output_order[q]
    input_order: np.ndarray | None = None  # int64 [K]: crossbar row r holds layer input input_order[r] (sorted sections)
    stale_cells: np.ndarray | None = None  # int64: flat indices into levels of cells a skipped write left stale
    stale_levels: np.ndarray | None = None  # the levels those cells actually hold when the tile computes
    channel_scale: np.ndarray | None = None  # float64 [N], layer order: per-output step / scale (weight_scale='channel')
    row_sort: np.ndarray | None = None  # int64 [K], compile-time only: row r was row row_sort[r] before sorted sections

    def output_step(self):
        """The weight value of one level step, per output in crossbar order, shaped [groups, 1, Ng]
        to divide or multiply `weight`; the one layer scale without channel scales."""
        if self.channel_scale is None:
            return self.scale
        groups, _, per_group = self.weight.shape
        return self.scale * self.to_crossbar_order(self.channel_scale).reshape(groups, 1, per_group)

    def order_inputs(self, rows: np.ndarray) -> np.ndarray:
        """Input vectors [..., K] in the layer's own order, put in crossbar row order."""
        return rows if self.input_order is None else rows[..., self.input_order]

    def as_loaded(self) -> "Layer":
        """This layer with the levels its cells actually hold under the reprogramming schedule
        (stale where bit stucking skipped a write): what the hardware computes with."""
        if self.stale_cells is None or self.levels is None:
            return self
        loaded = self.levels.copy()
        loaded.reshape(-1)[self.stale_cells] = self.stale_levels
        return dataclasses.replace(self, levels=frozen_array(loaded), stale_cells=None, stale_levels=None)

    def to_crossbar_order(self, values: np.ndarray) -> np.ndarray:
        """Per-output values [..., N] in the layer's own order, put in crossbar output order."""
        return values if self.output_order is None else values[..., self.output_order]

    def restore_order(self, y: np.ndarray) -> np.ndarray:
        """Outputs [..., N] computed in crossbar order, back in the layer's own order."""
        if self.output_order is None:
            return y
        restored = np.empty_like(y)
        restored[..., self.output_order] = y
        return restored

    def tiles(self):
        """(index, (r0, r1), (c0, c1)) of every placed tile: its rows of K and outputs of N."""
        t = self.tiling
        for i in range(t.count):
            (r0, r1), (c0, c1) = t.row_range[i], t.out_range[i]
            yield i, (int(r0), int(r1)), (int(c0), int(c1))

    def in_level_steps(self) -> np.ndarray:
        """The weights [groups, Kg, Ng] in level steps: weight_q, or in ideal mode (float weights)
        weight / step in float32 (dividing float32 weights stays float32)."""
        if self.weight_q is not None:
            return self.weight_q
        step = self.output_step()
        return self.weight / (np.float32(step) if self.channel_scale is None else step.astype(np.float32))

    def level_weights(self) -> np.ndarray:
        """The signed weights [groups, Kg, Ng], in level steps, that the target levels encode."""
        target = np.zeros(self.weight.shape, dtype=np.float64)
        for i, (r0, r1), (c0, c1) in self.tiles():
            self.add_block(target, (r0, r1), (c0, c1), self.encoding.combine(self.levels[i, : r1 - r0].astype(np.float64), c1 - c0))
        return target

    @property
    def groups(self) -> int:
        return int(self.weight.shape[0])

    @property
    def rows_in(self) -> int:
        """K: inputs of the (block-diagonal) matrix = crossbar rows it needs."""
        return int(self.weight.shape[0] * self.weight.shape[1])

    @property
    def outputs(self) -> int:
        """N: outputs of the layer = logical crossbar columns before encoding."""
        return int(self.weight.shape[0] * self.weight.shape[2])

    def block(self, row_range, out_range, source: np.ndarray | None = None) -> np.ndarray:
        """The dense sub-matrix rows [r0, r1) x outputs [c0, c1) of blockdiag(source or weight)."""
        source = self.weight if source is None else source
        groups, kg, ng = source.shape
        (r0, r1), (c0, c1) = row_range, out_range
        out = np.zeros((r1 - r0, c1 - c0), dtype=source.dtype)
        for g in range(r0 // kg, (r1 - 1) // kg + 1):
            gr0, gr1 = max(r0, g * kg), min(r1, (g + 1) * kg)
            gc0, gc1 = max(c0, g * ng), min(c1, (g + 1) * ng)
            if gc0 < gc1:
                out[gr0 - r0 : gr1 - r0, gc0 - c0 : gc1 - c0] = source[g, gr0 - g * kg : gr1 - g * kg, gc0 - g * ng : gc1 - g * ng]
        return out

    def add_block(self, target: np.ndarray, row_range, out_range, block: np.ndarray) -> None:
        """The inverse of `block`: add a dense tile block into per-group matrices `target`."""
        groups, kg, ng = target.shape
        (r0, r1), (c0, c1) = row_range, out_range
        for g in range(r0 // kg, (r1 - 1) // kg + 1):
            gr0, gr1 = max(r0, g * kg), min(r1, (g + 1) * kg)
            gc0, gc1 = max(c0, g * ng), min(c1, (g + 1) * ng)
            if gc0 < gc1:
                target[g, gr0 - g * kg : gr1 - g * kg, gc0 - g * ng : gc1 - g * ng] += block[gr0 - r0 : gr1 - r0, gc0 - c0 : gc1 - c0]


@dataclass(frozen=True)
class PassRecord:
    """What ran: the pass, its options, whether it changed the program, and how long it took."""

    name: str
    options: dict[str, Any]
    changed: bool
    seconds: float


@dataclass(frozen=True)
class Program:
    """The crossbar program a compile produces and mapping.bin stores.

    model: the original ONNX bytes, kept verbatim. graph: the runtime graph, in which every MVM
    layer is one `ai.xcompile::CrossbarMVM` node (its weights live in `layers`, not here).
    """

    model: bytes
    graph: onnx.ModelProto
    layers: tuple[Layer, ...]
    options: CompileOptions
    hardware: Hardware
    history: tuple[PassRecord, ...] = ()
    digital_ops: tuple[str, ...] = ()  # op types left to ONNX Runtime
    schedule: Schedule | None = None  # reprogramming schedule, when the chip has fewer crossbars than tiles

    def replace_layers(self, layers) -> "Program":
        return dataclasses.replace(self, layers=tuple(layers))


@dataclass(frozen=True)
class PassResult:
    """A pass's answer: the new program and whether anything changed (onnx_ir's shape)."""

    program: Program
    changed: bool


CUSTOM_DOMAIN = "ai.xcompile"
MVM_OP = "CrossbarMVM"
RECURRENT_OP = "CrossbarRecurrent"  # an LSTM / GRU / RNN whose W and R are MVM layers (runtime/recurrent.py)
