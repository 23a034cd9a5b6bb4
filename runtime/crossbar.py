"""A programmed layer: its tiles' cells turned into what one MVM of the layer computes.

Ideal hardware (no wire resistance, device effects or converters): every tile and the digital
recombination are linear, so the layer collapses once to one effective matrix per group and an
MVM is one GEMM. Otherwise each row block of tiles is one matrix of exact effective conductances
G_eff (devices drawn for this trial, then the wire network solved; runtime/programming.py),
computed once and reused for every input: an MVM is DAC -> GEMM per row block (and per input
pass / bit) -> ADC + combine. The GEMMs run in ONNX Runtime (one small graph per layer, the
conductances its constants): its MatMul packs constant weights once and is faster than numpy's
BLAS on these shapes.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from xcompile.config import Hardware
from xcompile.errors import XCompileError
from xcompile.ir import Layer
from xcompile.runtime import kernels
from xcompile.runtime.programming import (
    RowBlock, column_blocks, effective_weights, fit_compensation, program_blocks, read_energy, row_scales,
)
from xcompile.runtime.ort_session import inference_session
from xcompile.runtime.threads import pool, single_threaded_blas

__all__ = ["ProgrammedLayer", "effective_weights", "read_energy"]  # the last two live in runtime/programming.py


class ProgrammedLayer:
    """What the runtime executes for one layer: rows [P, K] -> outputs [P, N] (bias added)."""

    def __init__(self, layer: Layer, hardware: Hardware, level_max: float, seed: int = 0):
        layer = layer.as_loaded()  # cells a reprogramming schedule left stale are what computes
        self.layer, self.hw = layer, hardware
        self.bias = None if layer.bias is None else layer.bias.astype(np.float64)
        self.ideal = hardware.ideal
        self.clipped = 0
        self.conversions = 0
        self.calibrating = False
        self.input_range = 0.0
        self.compensation = None  # what the compensation fits did (programmed layers only)
        if self.ideal:
            self.weights = effective_weights(layer)
            self.weights32 = self.weights.astype(np.float32)
            return
        self.level_max = level_max
        self.adc_levels = float(2**hardware.adc_bits - 1)
        self._noise_rng = np.random.default_rng([seed, layer.index, 1])
        self.block_acc, self.block_out, self.block_outputs = column_blocks(layer)
        self.acc_columns = int(self.block_acc[-1] + layer.encoding.columns_used(int(self.block_outputs[-1])))
        self.blocks, self.compensation = program_blocks(layer, hardware, level_max, self.block_acc, np.random.default_rng([seed, layer.index]))
        self.row_scale = row_scales(self.blocks)
        self._array_reads = _ArrayReads(self.blocks)
        self._no_bias = np.zeros(layer.outputs)
        self._crossbar_bias = self._no_bias if self.bias is None else layer.to_crossbar_order(self.bias)
        # y = s * sum(coeff * I) * this, s the input vector's range (see runtime/converters.py)
        self.output_factor = level_max * layer.scale / (hardware.v_read * (hardware.g_on - hardware.g_off))
        # per-channel weight scales: each output times its own step, digitally, before the bias
        self.channel = None if layer.channel_scale is None else layer.to_crossbar_order(layer.channel_scale).astype(np.float64)

    @property
    def needs_calibration(self) -> bool:
        hw = self.hw
        return not self.ideal and ((hw.adc_bits > 0 and hw.adc_range != "fixed") or hw.dac_range == "calibrated")

    @property
    def fits_on_data(self) -> bool:
        """Whether calibration data should refit this layer's compensation."""
        return not self.ideal and self.hw.compensation != "none"

    def collect_moments(self) -> None:
        """From now on record E[v v^T] of the unscaled row voltages of every read, per row block."""
        for block in self.blocks:
            rows = block.rows[1] - block.rows[0]
            block.moment_sum, block.moment_count = np.zeros((rows, rows)), 0

    def refit(self) -> None:
        """Fit the compensation again on the recorded voltages in place of the probe distribution."""
        report = {"mode": self.hw.compensation, "misfit_before": 0.0, "misfit_after": 0.0}
        for block in self.blocks:
            if block.moment_sum is None or block.moment_count == 0:
                moment = None
            else:
                moment = block.moment_sum / block.moment_count
            gain, block.row_scale = fit_compensation(self.hw.compensation, [block.fit[0]], [block.fit[1]], report, moment)
            block.gain = gain.astype(np.float32)
            block.moment_sum, block.moment_count = None, 0
        self.row_scale = row_scales(self.blocks)
        signal = max(report.pop("signal", 0.0), 1e-300)
        self.compensation = {
            **self.compensation, "fitted_on": "calibration data",
            "error_before": float(np.sqrt(report.pop("misfit_before") / signal)),
            "error_after": float(np.sqrt(report.pop("misfit_after") / signal)),
        }

    def start_calibration(self) -> None:
        """Forget what earlier calibrations saw: ranges come from this run alone."""
        self.calibrating = True
        self.input_range = 0.0
        for block in getattr(self, "blocks", ()):
            block.seen_max[:] = 0.0

    def finish_calibration(self) -> None:
        """Set ADC ranges per tile or per column, and the DAC range, from what calibration saw."""
        self.calibrating = False
        for block in self.blocks:
            seen = np.where(block.seen_max > 0, block.seen_max, block.fixed_scale)
            if self.hw.adc_range == "calibrated":
                per_tile = np.zeros(block.tile_of_column.max(initial=-1) + 1)
                np.maximum.at(per_tile, block.tile_of_column, seen)
                seen = per_tile[block.tile_of_column]
            if self.hw.adc_range != "fixed":
                block.set_full_scale(seen, self.adc_levels)
        if self.input_range <= 0:
            self.input_range = 1.0

    def forward(self, rows: np.ndarray, add_bias: bool = True) -> np.ndarray:
        """Outputs [P, N] in the rows' precision (float32 like ONNX Runtime, or float64)."""
        if rows.shape[-1] != self.layer.rows_in:  # what the graph feeds must fit the crossbar rows
            raise XCompileError(f"layer '{self.layer.name}': input vectors have {rows.shape[-1]} values, the layer's crossbars take {self.layer.rows_in}")
        rows = self.layer.order_inputs(rows)  # sorted weight sections: inputs in crossbar row order
        if self.ideal:
            y = self.layer.restore_order(self._collapsed(rows))
            return self.add_bias(y) if add_bias else y
        return self.layer.restore_order(self._crossbar(rows, self._crossbar_bias if add_bias else self._no_bias))

    def add_bias(self, y: np.ndarray) -> np.ndarray:
        """y + bias, in place, in y's precision."""
        if self.bias is not None:
            y += self.bias.astype(y.dtype, copy=False)
        return y

    def _collapsed(self, rows: np.ndarray) -> np.ndarray:
        """One GEMM per group, in the input's precision (float32 like ONNX Runtime, or float64)."""
        weights = self.weights32 if rows.dtype == np.float32 else self.weights
        groups, kg, ng = weights.shape
        x = rows if rows.dtype in (np.float32, np.float64) else rows.astype(np.float64)
        if groups == 1:
            return x @ weights[0]
        y = np.matmul(x.reshape(-1, groups, kg).transpose(1, 0, 2), weights)
        return y.transpose(1, 0, 2).reshape(x.shape[0], groups * ng)

    def _crossbar(self, rows: np.ndarray, bias: np.ndarray) -> np.ndarray:
        x = rows if rows.dtype in (np.float32, np.float64) else rows.astype(np.float64)
        out = np.empty((x.shape[0], self.layer.outputs), dtype=x.dtype)
        noise = self._noise_rng.spawn(1)[0] if self.hw.read_noise > 0 else None
        chunks = _chunks(x.shape[0])
        if not chunks:  # an empty batch
            return out
        if len(chunks) == 1 or self.calibrating:  # calibration sees the whole batch at once
            counts = [self._chunk(x, bias, out, noise)]
        else:
            seeds = noise.spawn(len(chunks)) if noise is not None else [None] * len(chunks)
            with single_threaded_blas():
                counts = list(pool().map(lambda c, r: self._chunk(x[c], bias, out[c], r), chunks, seeds))
        reads, clipped = (sum(column) for column in zip(*counts))
        self.clipped += int(clipped)
        if self.hw.adc_bits > 0 and not self.calibrating:
            self.conversions += reads * sum(block.conductance.shape[1] for block in self.blocks)
        return out

    def _chunk(self, x, bias, out, noise) -> tuple[int, int]:
        """DAC, array reads, ADC and recombination for a slice of the batch (on a worker thread),
        written into out; returns the vector reads it took (vectors x input passes) and how many
        conversions clipped."""
        hw = self.hw
        scale = self._input_scale(x)
        if self.row_scale is not None:  # row-column compensation: scaled digitally before the DAC
            x = x * self.row_scale.astype(x.dtype, copy=False)
        acc = np.zeros((x.shape[0], self.acc_columns), dtype=np.float32)
        dac_levels = float(2**hw.dac_bits - 1) if hw.dac_bits else 0.0
        passes = clipped = 0
        if hw.input_mode == "bit_serial":
            plane = np.empty(x.shape, dtype=np.float32)
            for sign in (1.0, -1.0):
                if sign < 0 and not (x < 0).any():
                    continue
                for bit in range(hw.dac_bits):
                    kernels.bit_plane(x, scale, dac_levels, sign, bit, plane)
                    clipped += self._read(plane, sign * 2.0**bit / dac_levels, acc, noise)
                    passes += 1
        else:
            positive = np.empty(x.shape, dtype=np.float32)
            if kernels.dac(x, scale, dac_levels, 1.0, positive):  # a negative pass only if needed
                negative = np.empty(x.shape, dtype=np.float32)
                kernels.dac(x, scale, dac_levels, -1.0, negative)
                clipped += self._read(negative, -1.0, acc, noise)
                passes += 1
            clipped += self._read(positive, 1.0, acc, noise)
            passes += 1
        enc = self.layer.encoding
        kernels.combine(
            acc, self.block_acc, self.block_out, self.block_outputs, enc.term_offset, enc.term_step, enc.term_coeff,
            scale * self.output_factor, bias if self.channel is None else self._no_bias, out,
        )
        if self.channel is not None:
            out *= self.channel.astype(out.dtype, copy=False)
            out += bias.astype(out.dtype, copy=False)
        return passes * x.shape[0], clipped

    def _input_scale(self, x: np.ndarray) -> np.ndarray:
        """The range s of every input vector: its own max |x|, or the calibrated layer range."""
        per_vector = np.abs(x).max(axis=1).astype(np.float64)
        if not np.isfinite(per_vector).all():  # max propagates NaN and inf
            raise XCompileError(f"layer '{self.layer.name}': the input holds NaN or infinite values")
        if self.hw.dac_range == "absmax" or self.calibrating:
            if self.calibrating:
                self.input_range = max(self.input_range, float(per_vector.max(initial=0.0)))
            return per_vector
        return np.full(x.shape[0], self.input_range)

    def _read(self, voltages, weight, acc, noise) -> int:
        """One array read of every row block with these normalised voltages, then the ADC;
        returns how many conversions clipped."""
        convert = self.hw.adc_bits > 0 and not self.calibrating
        clipped = 0
        for block, currents in zip(self.blocks, self._array_reads(voltages)):
            if block.moment_sum is not None:
                v = voltages[:, block.rows[0] : block.rows[1]].astype(np.float64)
                if block.row_scale is not None:
                    v = v / block.row_scale
                block.moment_sum += v.T @ v
                block.moment_count += v.shape[0]
            if block.noise_variance is not None:
                v = voltages[:, block.rows[0] : block.rows[1]]
                spread = np.sqrt(np.square(v) @ block.noise_variance)
                currents += spread * noise.standard_normal(currents.shape, dtype=np.float32)
            if self.calibrating:
                np.maximum(block.seen_max, currents.max(axis=0, initial=0.0), out=block.seen_max)
            clipped += kernels.convert_accumulate(
                currents, convert, block.inverse_full_scale, block.step, np.float32(self.adc_levels),
                self.hw.adc_nonlinearity, block.gain, block.tile_base, block.tile_acc, block.tile_columns, np.float32(weight), acc,
            )
        return clipped


class _ArrayReads:
    """The array reads of a layer's row blocks: voltages [P, K] -> one current matrix per row
    block, as ONNX Runtime graphs (Split, then a MatMul per block with its conductances as a
    constant). Blocks are grouped so that no graph passes protobuf's 2 GB limit. Single-threaded
    sessions: the runtime's own threads run batch chunks side by side."""

    GROUP_BYTES = 2**30

    def __init__(self, blocks: list[RowBlock]):
        self._groups = []
        for first, last in _byte_groups([block.conductance.nbytes for block in blocks], self.GROUP_BYTES):
            group = blocks[first:last]
            model = _reads_model(group)
            session = inference_session(model.SerializeToString(), threads=1)
            self._groups.append((session, group[0].rows[0], group[-1].rows[1]))

    def __call__(self, voltages: np.ndarray) -> list[np.ndarray]:
        currents = []
        for session, r0, r1 in self._groups:
            currents += session.run(None, {"v": np.ascontiguousarray(voltages[:, r0:r1])})
        return currents


def _byte_groups(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive [first, last) index ranges whose sizes add up to at most `limit` (at least one each)."""
    groups, first, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > first and total + size > limit:
            groups.append((first, i))
            first, total = i, 0
        total += size
    return groups + [(first, len(sizes))]


def _reads_model(blocks: list[RowBlock]):
    """v [P, rows of the blocks] -> currents i0, i1, ... [P, columns of each block]."""
    rows = [block.rows[1] - block.rows[0] for block in blocks]
    constants = [numpy_helper.from_array(block.conductance, f"g{b}") for b, block in enumerate(blocks)]
    if len(blocks) == 1:
        nodes, voltages = [], ["v"]
    else:
        voltages = [f"v{b}" for b in range(len(blocks))]
        nodes = [helper.make_node("Split", ["v", "rows"], voltages, axis=1)]
        constants.append(numpy_helper.from_array(np.array(rows, dtype=np.int64), "rows"))
    nodes += [helper.make_node("MatMul", [v, f"g{b}"], [f"i{b}"]) for b, v in enumerate(voltages)]
    currents = [helper.make_tensor_value_info(f"i{b}", TensorProto.FLOAT, ["P", block.conductance.shape[1]]) for b, block in enumerate(blocks)]
    graph = helper.make_graph(
        nodes, "xcompile_array_reads", [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["P", sum(rows)])], currents, constants
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _chunks(rows: int, size: int = 256) -> list[slice]:
    """Batch slices for the worker threads, of a fixed size so that results (and read-noise
    draws, one generator per chunk) do not depend on how many cores the machine has."""
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]
