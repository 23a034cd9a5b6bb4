"""A programmed layer: its tiles' cells turned into what one MVM of the layer computes.

Ideal hardware (no wire resistance, device effects or converters): every tile and the digital
recombination are linear, so the layer collapses once to one effective matrix per group and an
MVM is one GEMM. Otherwise each row block of tiles is one matrix of exact effective conductances
G_eff (devices drawn for this trial, then the wire network solved), computed once and reused for
every input: an MVM is DAC -> GEMM per row block (and per input pass / bit) -> ADC + combine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xcompile.config import Hardware
from xcompile.errors import XCompileError
from xcompile.ir import Layer
from xcompile.runtime import devices, kernels


@dataclass
class _RowBlock:
    """The tiles of one row block side by side: one GEMM, then ADC + combine per column."""

    rows: tuple[int, int]
    conductance: np.ndarray  # float32 [rows, columns]: V_read * G_eff (so currents are in A)
    noise_variance: np.ndarray | None  # float32 (read_noise * V_read * G_eff)^2
    col_ptr: np.ndarray  # int64 [columns + 1], entries of each column in dst / coeff
    dst: np.ndarray  # int64: output index
    coeff: np.ndarray  # float64
    tile_of_column: np.ndarray  # int64 [columns]
    fixed_scale: np.ndarray  # float64 [columns]: the largest current a column can carry
    full_scale: np.ndarray  # float64 [columns]: ADC range in use
    seen_max: np.ndarray  # float64 [columns]: largest current seen while calibrating


class ProgrammedLayer:
    """What the runtime executes for one layer: rows [P, K] -> outputs [P, N] (bias added)."""

    def __init__(self, layer: Layer, hardware: Hardware, cell_bits: int, level_max: float, seed: int = 0):
        self.layer, self.hw = layer, hardware
        self.bias = None if layer.bias is None else layer.bias.astype(np.float64)
        self.ideal = hardware.ideal
        self.clipped = 0
        self.conversions = 0
        self.calibrating = False
        self.input_range = 0.0
        if self.ideal:
            self.weights = effective_weights(layer)
            return
        self.level_max = level_max
        self._noise_rng = np.random.default_rng([seed, layer.index, 1])
        self.blocks = _program_blocks(layer, hardware, level_max, np.random.default_rng([seed, layer.index]))
        # y = s * sum(coeff * I) * this, s the input vector's range (see runtime/converters.py)
        self.output_factor = level_max * layer.scale / (hardware.v_read * (hardware.g_on - hardware.g_off))

    @property
    def needs_calibration(self) -> bool:
        hw = self.hw
        return not self.ideal and ((hw.adc_bits > 0 and hw.adc_range != "fixed") or hw.dac_range == "calibrated")

    def start_calibration(self) -> None:
        self.calibrating = True

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
                block.full_scale = seen
        if self.input_range <= 0:
            self.input_range = 1.0

    def forward(self, rows: np.ndarray, add_bias: bool = True) -> np.ndarray:
        y = self._collapsed(rows) if self.ideal else self._crossbar(rows)
        if add_bias and self.bias is not None:
            y += self.bias
        return y

    def _collapsed(self, rows: np.ndarray) -> np.ndarray:
        groups, kg, ng = self.weights.shape
        x = np.asarray(rows, dtype=np.float64)
        if groups == 1:
            return x @ self.weights[0]
        y = np.matmul(x.reshape(-1, groups, kg).transpose(1, 0, 2), self.weights)
        return y.transpose(1, 0, 2).reshape(x.shape[0], groups * ng)

    def _crossbar(self, rows: np.ndarray) -> np.ndarray:
        hw = self.hw
        x = np.ascontiguousarray(rows, dtype=np.float64)
        if not np.isfinite(x).all():
            raise XCompileError(f"layer '{self.layer.name}': the input holds NaN or infinite values")
        scale = self._input_scale(x)
        out = np.zeros((x.shape[0], self.layer.outputs), dtype=np.float64)
        clipped = np.zeros(x.shape[0], dtype=np.int64)
        dac_levels = float(2**hw.dac_bits - 1) if hw.dac_bits else 0.0
        if hw.input_mode == "bit_serial":
            plane = np.empty(x.shape, dtype=np.float32)
            for sign in (1.0, -1.0):
                if sign < 0 and not (x < 0).any():
                    continue
                for bit in range(hw.dac_bits):
                    kernels.bit_plane(x, scale, dac_levels, sign, bit, plane)
                    self._read(plane, sign * 2.0**bit / dac_levels, out, clipped)
        else:
            positive = np.empty(x.shape, dtype=np.float32)
            negative = np.empty(x.shape, dtype=np.float32)
            any_negative = kernels.dac_split(x, scale, dac_levels, positive, negative)
            self._read(positive, 1.0, out, clipped)
            if any_negative:
                self._read(negative, -1.0, out, clipped)
        self.clipped += int(clipped.sum())
        out *= (scale * self.output_factor)[:, None]
        return out

    def _input_scale(self, x: np.ndarray) -> np.ndarray:
        """The range s of every input vector: its own max |x|, or the calibrated layer range."""
        per_vector = np.abs(x).max(axis=1)
        if self.hw.dac_range == "absmax" or self.calibrating:
            if self.calibrating:
                self.input_range = max(self.input_range, float(per_vector.max(initial=0.0)))
            return per_vector
        return np.full(x.shape[0], self.input_range)

    def _read(self, voltages: np.ndarray, weight: float, out: np.ndarray, clipped: np.ndarray) -> None:
        """One array read of every row block with these normalised voltages, then ADC + combine."""
        hw = self.hw
        adc_levels = 0.0 if (hw.adc_bits == 0 or self.calibrating) else float(2**hw.adc_bits - 1)
        for block in self.blocks:
            v = voltages[:, block.rows[0] : block.rows[1]]
            currents = v @ block.conductance
            if block.noise_variance is not None:
                spread = np.sqrt(np.square(v) @ block.noise_variance)
                currents += spread * self._noise_rng.standard_normal(currents.shape, dtype=np.float32)
            if self.calibrating:
                np.maximum(block.seen_max, currents.max(axis=0, initial=0.0), out=block.seen_max)
            elif adc_levels:
                self.conversions += currents.size
            kernels.adc_accumulate(
                currents, block.full_scale, adc_levels, hw.adc_nonlinearity,
                block.col_ptr, block.dst, block.coeff, weight, out, clipped,
            )


def _program_blocks(layer: Layer, hw: Hardware, level_max: float, rng: np.random.Generator) -> list[_RowBlock]:
    """Program every tile (device effects, then G_eff of the whole physical array) by row block."""
    tiling, enc = layer.tiling, layer.encoding
    per_block: dict[int, list[int]] = {}
    for i, (rb, _) in enumerate(tiling.grid):
        per_block.setdefault(int(rb), []).append(i)
    blocks = []
    for rb in sorted(per_block):
        tiles = per_block[rb]
        r0, r1 = (int(v) for v in tiling.row_range[tiles[0]])
        columns, ptr, dst, coeff, owner, fixed = [], [0], [], [], [], []
        for i in tiles:
            c0, c1 = (int(v) for v in tiling.out_range[i])
            used = (c1 - c0) * enc.columns_per_output + enc.shared_columns
            g = devices.program(layer.levels[i], level_max, hw, rng)
            if not hw.wires_ideal:
                from xcompile.runtime.physics import effective_conductance

                g = effective_conductance(g, hw.r_wire, hw.r_source, hw.r_sink)
            columns.append(g[: r1 - r0, :used])
            keep = (enc.combine_src < used) & (enc.combine_dst < c1 - c0)
            src, d, k = enc.combine_src[keep], enc.combine_dst[keep], enc.combine_coeff[keep]
            for c in range(used):
                entries = src == c
                dst.extend((c0 + d[entries]).tolist())
                coeff.extend(k[entries].tolist())
                ptr.append(len(dst))
            owner.extend([i] * used)
            fixed.extend([hw.v_read * hw.g_on * (r1 - r0)] * used)
        conductance = (np.concatenate(columns, axis=1) * hw.v_read).astype(np.float32)
        fixed_scale = np.array(fixed, dtype=np.float64)
        blocks.append(
            _RowBlock(
                rows=(r0, r1),
                conductance=conductance,
                noise_variance=np.square(conductance * np.float32(hw.read_noise)) if hw.read_noise > 0 else None,
                col_ptr=np.array(ptr, dtype=np.int64),
                dst=np.array(dst, dtype=np.int64),
                coeff=np.array(coeff, dtype=np.float64),
                tile_of_column=np.array(owner, dtype=np.int64),
                fixed_scale=fixed_scale,
                full_scale=fixed_scale.copy(),
                seen_max=np.zeros_like(fixed_scale),
            )
        )
    return blocks


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
