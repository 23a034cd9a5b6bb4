"""A programmed layer: its tiles' cells turned into what one MVM of the layer computes.

Ideal hardware (no wire resistance, device effects or converters): every tile and the digital
recombination are linear, so the layer collapses once to one effective matrix per group and an
MVM is one GEMM. Otherwise each row block of tiles is one matrix of exact effective conductances
G_eff (devices drawn for this trial, then the wire network solved), computed once and reused for
every input: an MVM is DAC -> GEMM per row block (and per input pass / bit) -> ADC + combine.
The GEMMs run in ONNX Runtime (one small graph per layer, the conductances its constants): its
MatMul packs constant weights once and is faster than numpy's BLAS on these shapes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from xcompile.config import Hardware
from xcompile.errors import XCompileError
from xcompile.ir import Layer
from xcompile.runtime import compensation, devices, kernels
from xcompile.runtime.physics import effective_conductance
from xcompile.runtime.threads import pool, single_threaded_blas


@dataclass
class _RowBlock:
    """The tiles of one row block side by side: one GEMM, then ADC + combine per column."""

    rows: tuple[int, int]
    conductance: np.ndarray  # float32 [rows, columns]: V_read * G_eff (so currents are in A)
    noise_variance: np.ndarray | None  # float32 (read_noise * V_read * G_eff)^2
    tile_base: np.ndarray  # int64 [tiles]: first column of each tile in `conductance`
    tile_acc: np.ndarray  # int64 [tiles]: first column of its column block in the accumulator
    tile_columns: np.ndarray  # int64 [tiles]: physical columns each tile uses
    tile_of_column: np.ndarray  # int64 [columns]
    fixed_scale: np.ndarray  # float64 [columns]: the largest current a column can carry
    seen_max: np.ndarray  # float64 [columns]: largest current seen while calibrating
    gain: np.ndarray  # float32 [columns]: digital gain after the ADC (compensation; 1 without)
    row_scale: np.ndarray | None  # float64 [rows]: digital input scale before the DAC (row-column)
    fit: tuple | None = None  # (G_eff, target) of the used columns, float64, to refit on data
    moment_sum: np.ndarray | None = None  # sum of v v^T over calibration reads (data-fitted compensation)
    moment_count: int = 0
    inverse_full_scale: np.ndarray = None  # float32 [columns]: 1 / ADC range in use
    step: np.ndarray = None  # float32 [columns]: ADC range / levels

    def set_full_scale(self, full_scale: np.ndarray, levels: float) -> None:
        self.inverse_full_scale = (1.0 / full_scale).astype(np.float32)
        self.step = (full_scale / max(levels, 1.0)).astype(np.float32)


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
        self.block_acc, self.block_out, self.block_outputs = _column_blocks(layer)
        self.acc_columns = int(self.block_acc[-1] + layer.encoding.columns_used(int(self.block_outputs[-1])))
        self.blocks, self.compensation = _program_blocks(layer, hardware, level_max, self.block_acc, np.random.default_rng([seed, layer.index]))
        self.row_scale = _row_scales(self.blocks)
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
            gain, block.row_scale = _fit(self.hw.compensation, [block.fit[0]], [block.fit[1]], report, moment)
            block.gain = gain.astype(np.float32)
            block.moment_sum, block.moment_count = None, 0
        self.row_scale = _row_scales(self.blocks)
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

    def __init__(self, blocks: list[_RowBlock]):
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._groups = []
        for first, last in _byte_groups([block.conductance.nbytes for block in blocks], self.GROUP_BYTES):
            group = blocks[first:last]
            model = _reads_model(group)
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
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


def _reads_model(blocks: list[_RowBlock]):
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


def _column_blocks(layer: Layer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column block: its first accumulator column, first output, and number of outputs."""
    tiling, enc = layer.tiling, layer.encoding
    blocks = sorted({(int(cb), int(c0), int(c1)) for (_, cb), (c0, c1) in zip(tiling.grid, tiling.out_range)})
    outputs = np.array([c1 - c0 for _, c0, c1 in blocks], dtype=np.int64)
    widths = np.array([enc.columns_used(int(n)) for n in outputs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
    return starts, np.array([c0 for _, c0, _ in blocks], dtype=np.int64), outputs


def _program_blocks(
    layer: Layer, hw: Hardware, level_max: float, block_acc: np.ndarray, rng: np.random.Generator
) -> tuple[list[_RowBlock], dict]:
    """Program every tile (device effects, then G_eff of the whole physical array) by row block,
    then fit its compensation (runtime/compensation.py); returns the blocks and what the fits did.

    Devices are drawn tile by tile in one order (same seed, same cells); the wire networks are
    then solved on the runtime's threads, as the solver releases the GIL."""
    tiling, enc = layer.tiling, layer.encoding
    per_block: dict[int, list[int]] = {}
    for i, (rb, _) in enumerate(tiling.grid):
        per_block.setdefault(int(rb), []).append(i)
    order = [i for rb in sorted(per_block) for i in per_block[rb]]

    def used(i: int) -> tuple[int, int]:
        (r0, r1), (c0, c1) = tiling.row_range[i], tiling.out_range[i]
        return int(r1 - r0), enc.columns_used(int(c1 - c0))

    targets = {i: devices.level_conductance(layer.levels[i], level_max, hw) for i in order}
    report = {"mode": hw.compensation, "fitted_on": "probe", "misfit_before": 0.0, "misfit_after": 0.0, "seconds": 0.0}
    started = time.perf_counter()
    written = targets
    if hw.compensation == "predistort" and not hw.wires_ideal:
        with single_threaded_blas():
            solved = list(pool().map(lambda i: compensation.predistorted(targets[i], used(i), hw, compensation.probe_moment(used(i)[0])), order))
        written = {i: g for i, (g, _) in zip(order, solved)}
        report["predistort_seconds"] = sum(info["seconds"] for _, info in solved)
    drawn = [devices.perturb(written[i], hw, rng) for i in order]
    if not hw.wires_ideal:
        with single_threaded_blas():
            drawn = list(pool().map(lambda g: effective_conductance(g, hw.r_wire, hw.r_source, hw.r_sink), drawn))
    programmed = dict(zip(order, drawn))
    blocks = []
    for rb in sorted(per_block):
        tiles = per_block[rb]
        r0, r1 = (int(v) for v in tiling.row_range[tiles[0]])
        columns, owner, fixed, base, acc_start, widths, goals = [], [], [], [], [], [], []
        for i in tiles:
            c0, c1 = (int(v) for v in tiling.out_range[i])
            used_columns = enc.columns_used(c1 - c0)
            base.append(sum(c.shape[1] for c in columns))
            acc_start.append(int(block_acc[int(tiling.grid[i][1])]))
            widths.append(used_columns)
            columns.append(programmed[i][: r1 - r0, :used_columns])
            goals.append(targets[i][: r1 - r0, :used_columns])
            owner.extend([i] * used_columns)
            fixed.extend([hw.v_read * hw.g_on * (r1 - r0)] * used_columns)
        gain, row_scale = _fit(hw.compensation, columns, goals, report)
        fit = None if hw.compensation == "none" else (np.concatenate(columns, axis=1), np.concatenate(goals, axis=1))
        conductance = (np.concatenate(columns, axis=1) * hw.v_read).astype(np.float32)
        fixed_scale = np.array(fixed, dtype=np.float64)
        block = _RowBlock(
            rows=(r0, r1),
            conductance=conductance,
            noise_variance=np.square(conductance * np.float32(hw.read_noise)) if hw.read_noise > 0 else None,
            tile_base=np.array(base, dtype=np.int64),
            tile_acc=np.array(acc_start, dtype=np.int64),
            tile_columns=np.array(widths, dtype=np.int64),
            tile_of_column=np.array(owner, dtype=np.int64),
            fixed_scale=fixed_scale,
            seen_max=np.zeros_like(fixed_scale),
            gain=gain.astype(np.float32),
            row_scale=row_scale,
            fit=fit,
        )
        block.set_full_scale(fixed_scale, float(2**hw.adc_bits - 1))
        blocks.append(block)
    report["seconds"] = time.perf_counter() - started
    signal = max(report.pop("signal", 0.0), 1e-300)
    report["error_before"] = float(np.sqrt(report.pop("misfit_before") / signal))  # rms current error / rms current
    report["error_after"] = float(np.sqrt(report.pop("misfit_after") / signal))
    return blocks, report


def _row_scales(blocks: list[_RowBlock]) -> np.ndarray | None:
    """The row-column input scales of all the layer's rows (float32), or None without any."""
    if all(block.row_scale is None for block in blocks):
        return None
    return np.concatenate([b.row_scale if b.row_scale is not None else np.ones(b.rows[1] - b.rows[0]) for b in blocks]).astype(np.float32)


def _fit(mode: str, columns: list, goals: list, report: dict, moment: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Column gains (one per physical column) and, for row-column, the row block's row scales,
    on the inputs' second moment (the probe distribution's without one). Adds the misfit before
    and after, and the signal, to `report`."""
    effective, target = np.concatenate(columns, axis=1), np.concatenate(goals, axis=1)
    moment = compensation.probe_moment(effective.shape[0]) if moment is None else moment
    report["signal"] = report.get("signal", 0.0) + compensation.misfit(np.zeros_like(target), target, moment)
    report["misfit_before"] += compensation.misfit(effective, target, moment)
    row_scale = None
    if mode == "none":
        gain = np.ones(effective.shape[1])
    elif mode == "row-column":
        row_scale, gain = compensation.row_column(effective, target, moment)
    else:  # column, predistort
        gain = compensation.column_gains(effective, target, moment)
    realised = effective * gain if row_scale is None else effective * row_scale[:, None] * gain
    report["misfit_after"] += compensation.misfit(realised, target, moment)
    return gain, row_scale


def effective_weights(layer: Layer) -> np.ndarray:
    """The weight matrix the programmed cells realise: sum over tiles of combine(levels) * scale."""
    enc, tiling = layer.encoding, layer.tiling
    target = np.zeros(layer.weight.shape, dtype=np.float64)
    for i in range(tiling.count):
        (r0, r1), (c0, c1) = tiling.row_range[i], tiling.out_range[i]
        block = enc.combine(layer.levels[i, : r1 - r0].astype(np.float64), c1 - c0)
        layer.add_block(target, (r0, r1), (c0, c1), block)
    return target * layer.output_step()


def read_energy(layer: Layer, hw: Hardware, options, rows: np.ndarray) -> float:
    """sum_p sum_i v_pi^2 sum_j G_ij over the layer's tiles (target conductances, ideal DAC)."""
    x = layer.order_inputs(np.asarray(rows, dtype=np.float64))
    scale = np.abs(x).max(axis=1, keepdims=True)
    v_squared = np.square(np.divide(np.abs(x), scale, out=np.zeros_like(x), where=scale > 0) * hw.v_read)
    level_max = options.level_max
    tiling, enc = layer.tiling, layer.encoding
    total = 0.0
    for i in range(tiling.count):
        (r0, r1), (c0, c1) = tiling.row_range[i], tiling.out_range[i]
        g = devices.level_conductance(layer.levels[i, : r1 - r0, : enc.columns_used(int(c1 - c0))], level_max, hw)
        total += float(v_squared[:, r0:r1].sum(axis=0) @ g.sum(axis=1))
    return total


def _chunks(rows: int, size: int = 256) -> list[slice]:
    """Batch slices for the worker threads, of a fixed size so that results (and read-noise
    draws, one generator per chunk) do not depend on how many cores the machine has."""
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]
