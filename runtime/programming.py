"""Programming a layer's tiles, and what their cells hold without running them.

`program_blocks` turns the levels into conductances the way a chip would hold them: target
conductances, device effects drawn tile by tile, then the exact effective conductances G_eff of
each physical array with its wires, grouped by row block (one GEMM each, runtime/crossbar.py) and
with the compensation fitted per block (runtime/compensation.py). `effective_weights` is the
matrix ideal cells realise (ideal mode, and the reference tests compare against);
`read_energy` the read-energy proxy from the target conductances.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from xcompile.config import Hardware
from xcompile.ir import Layer
from xcompile.runtime import compensation, devices
from xcompile.runtime.physics import effective_conductance
from xcompile.runtime.threads import pool, single_threaded_blas


@dataclass
class RowBlock:
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


def column_blocks(layer: Layer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column block: its first accumulator column, first output, and number of outputs."""
    tiling, enc = layer.tiling, layer.encoding
    blocks = sorted({(int(cb), int(c0), int(c1)) for (_, cb), (c0, c1) in zip(tiling.grid, tiling.out_range)})
    outputs = np.array([c1 - c0 for _, c0, c1 in blocks], dtype=np.int64)
    widths = np.array([enc.columns_used(int(n)) for n in outputs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
    return starts, np.array([c0 for _, c0, _ in blocks], dtype=np.int64), outputs


def program_blocks(
    layer: Layer, hw: Hardware, level_max: float, block_acc: np.ndarray, rng: np.random.Generator
) -> tuple[list[RowBlock], dict]:
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
        gain, row_scale = fit_compensation(hw.compensation, columns, goals, report)
        fit = None if hw.compensation == "none" else (np.concatenate(columns, axis=1), np.concatenate(goals, axis=1))
        conductance = (np.concatenate(columns, axis=1) * hw.v_read).astype(np.float32)
        fixed_scale = np.array(fixed, dtype=np.float64)
        block = RowBlock(
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


def row_scales(blocks: list[RowBlock]) -> np.ndarray | None:
    """The row-column input scales of all the layer's rows (float32), or None without any."""
    if all(block.row_scale is None for block in blocks):
        return None
    return np.concatenate([b.row_scale if b.row_scale is not None else np.ones(b.rows[1] - b.rows[0]) for b in blocks]).astype(np.float32)


def fit_compensation(mode: str, columns: list, goals: list, report: dict, moment: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
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
    """The weight matrix the programmed cells realise: the levels' signed weights times the step."""
    return layer.level_weights() * layer.output_step()


def read_energy(layer: Layer, hw: Hardware, options, rows: np.ndarray) -> float:
    """sum_p sum_i v_pi^2 sum_j G_ij over the layer's tiles (target conductances, ideal DAC)."""
    x = layer.order_inputs(np.asarray(rows, dtype=np.float64))
    scale = np.abs(x).max(axis=1, keepdims=True)
    v_squared = np.square(np.divide(np.abs(x), scale, out=np.zeros_like(x), where=scale > 0) * hw.v_read)
    level_max = options.level_max
    total = 0.0
    for i, (r0, r1), (c0, c1) in layer.tiles():
        g = devices.level_conductance(layer.levels[i, : r1 - r0, : layer.encoding.columns_used(c1 - c0)], level_max, hw)
        total += float(v_squared[:, r0:r1].sum(axis=0) @ g.sum(axis=1))
    return total
