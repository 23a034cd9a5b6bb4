"""The compiled model as one session with ONNX Runtime's `run` signature.

Ideal hardware runs the whole model as one ONNX Runtime graph (runtime/fused.py). Otherwise the
partitioned executor (runtime/executor.py): the runtime graph is cut at its crossbar nodes; each
run of consecutive ONNX nodes between them is an ONNX Runtime session of its own, and each MVM
node runs on the crossbar runtime. docs/runtime.md says why this and not an ORT custom-op
library, with the measured per-node overhead.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from xcompile.config import Hardware, runtime_hardware
from xcompile.data import NodeArg, check_feeds, node_arg
from xcompile.errors import XCompileError
from xcompile.ir import Layer, Program
from xcompile.runtime import digital
from xcompile.runtime.crossbar import ProgrammedLayer, read_energy
from xcompile.runtime.executor import Plan, inferred
from xcompile.runtime.fused import fused_model
from xcompile.runtime.ort_session import inference_session


class Session:
    """Run a compiled mapping: `Session(mapping_or_path).run(output_names, feeds)`.

    seed: the Monte-Carlo trial (device draws, read noise); the same seed gives the same outputs.
    calibration: feeds (dict name -> array) to set calibrated ADC / DAC ranges from; without
    them, ranges are calibrated on the first batch passed to `run` (and a warning says so).
    hardware / keyword options: hardware to run on instead of the one compiled for (a preset
    name, dict, TOML path or Hardware, then single options on top); the array size is always the
    mapping's, and only an explicit rows= / cols= that differs from it is an error.
    """

    def __init__(self, mapping, *, seed: int = 0, calibration: dict | None = None, hardware=None, **hardware_options: Any):
        from xcompile.artifact import Mapping, load

        if isinstance(mapping, (str, os.PathLike)):
            mapping = load(mapping)
        if isinstance(mapping, Mapping):
            program = mapping.program
        elif isinstance(mapping, Program):
            program = mapping
        else:
            raise XCompileError(f"Session takes a mapping.bin path, a Mapping or a Program, got {type(mapping).__name__}")
        self.program = program
        self.hardware = _runtime_hardware(program, hardware, hardware_options)
        self.seed = _seed(seed)
        graph = program.graph.graph
        self._inputs = [node_arg(v) for v in graph.input]
        self._outputs = [node_arg(v) for v in graph.output]
        opts = program.options
        self._level_max = opts.level_max
        self._layers = {
            layer.index: _LayerRunner(layer, ProgrammedLayer(layer, self.hardware, self._level_max, self.seed))
            for layer in program.layers
        }
        typed = inferred(program.graph)
        self._plan = Plan(typed, typed.graph, {}, {})
        self._calibrated = not any(r.crossbar.needs_calibration for r in self._layers.values())
        # built on first run; not for a model that quantises activations: a float-rounding difference
        # between the fused graph and the layer-by-layer path would flip its roundings
        self._fused: ort.InferenceSession | None | bool = None if self.hardware.ideal and not _quantises(program.graph) else False
        refits = any(r.crossbar.fits_on_data for r in self._layers.values())
        if calibration is not None and (not self._calibrated or refits):
            self.calibrate(calibration)

    def calibrate(self, feeds: dict[str, Any]) -> None:
        """Run `feeds` once with ideal ADCs and set every calibrated converter range from it.
        With compensation, a first run records the voltages each tile's rows see and refits
        the compensation on them, so the ranges then follow the compensated currents."""
        programmed = [r.crossbar for r in self._layers.values()]
        fitting = [layer for layer in programmed if layer.fits_on_data]
        if fitting:
            for layer in programmed:
                layer.start_calibration()
            for layer in fitting:
                layer.collect_moments()
            try:
                self._execute(None, feeds)
            finally:
                for layer in fitting:
                    layer.refit()
        for layer in programmed:
            layer.start_calibration()
        try:
            self._execute(None, feeds)
        finally:
            for layer in programmed:
                layer.finish_calibration()
        self._calibrated = True

    def read_energy(self, feeds: dict[str, Any]) -> dict[str, float]:
        """Read-energy proxy per layer: sum over reads of G V^2 (W per read time), per sample.

        Every input vector the feeds send through a layer drives its tiles' rows with the DAC
        voltages v (|x| / max|x| V_read, both signs) against the programmed target conductances.
        """
        recorded: dict[int, list[np.ndarray]] = {}
        for runner in self._layers.values():
            runner.recorder = recorded.setdefault(runner.layer.index, []).append
        try:
            self._execute(None, feeds)
        finally:
            for runner in self._layers.values():
                runner.recorder = None
        samples = next(iter(np.asarray(v).shape[0] for v in feeds.values()), 1) or 1
        return {
            runner.layer.name: float(sum(read_energy(runner.layer, self.hardware, self.program.options, rows) for rows in recorded[index])) / samples
            for index, runner in self._layers.items()
        }

    @property
    def adc_clipped(self) -> int:
        """ADC conversions above full scale (clipped) since the session was made."""
        return sum(r.crossbar.clipped for r in self._layers.values())

    @property
    def compensation(self) -> dict[str, dict]:
        """Per programmed layer, what programming and compensation did: the mode, the rms array
        error on the probe inputs before and after the fit (relative), and seconds spent."""
        return {r.layer.name: r.crossbar.compensation for r in self._layers.values() if r.crossbar.compensation is not None}

    @property
    def adc_conversions(self) -> int:
        return sum(r.crossbar.conversions for r in self._layers.values())

    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any], run_options=None) -> list:
        if not self._calibrated:
            warnings.warn(
                "calibrating ADC/DAC ranges on the first batch run; pass calibration= for ranges that do not depend on it",
                stacklevel=2,
            )
            self.calibrate(input_feed)
        return self._execute(output_names, input_feed, run_options)

    def _execute(self, output_names, input_feed, run_options=None) -> list:
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        unknown = [n for n in names if n not in {o.name for o in self._outputs}]
        if unknown:
            raise XCompileError(f"unknown output name(s) {unknown}; the model has {[o.name for o in self._outputs]}")
        env = check_feeds(input_feed, self._inputs)
        fused = self._fused_session()
        if fused is not None:
            try:
                return fused.run(names, env, run_options)
            except Exception:  # ONNX Runtime's own exception types: the step path says which node and why
                pass
        self._plan.run(env, set(names), self._layers, run_options)
        return [self._plan.value(env, n) for n in names]

    def _fused_session(self) -> ort.InferenceSession | None:
        """Ideal hardware: the whole model in one ONNX Runtime session (runtime/fused.py), unless a
        layer's inputs are being recorded or it cannot be expressed; then the step-by-step path."""
        if self._fused is False or any(r.recorder is not None for r in self._layers.values()):
            return None
        if self._fused is None:
            layers = {i: (r.layer, r.crossbar.weights, r.crossbar.bias) for i, r in self._layers.items()}
            model = fused_model(self.program.graph, layers)
            try:  # log level 4: a failed run falls back to the step path, which explains it
                self._fused = False if model is None else inference_session(model.SerializeToString(), log_level=4)
            except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                    ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.NotImplemented):
                self._fused = False  # e.g. a layer fed float64 or integers: the step path handles every type
        return self._fused or None


class _LayerRunner:
    """One MVM node: form input vectors, run the programmed layer, shape the output."""

    def __init__(self, layer: Layer, crossbar: ProgrammedLayer):
        self.layer = layer
        self.crossbar = crossbar
        self.recorder = None  # called with every batch of input vectors (read_energy)

    def run(self, x) -> np.ndarray:
        layer, geometry = self.layer, self.layer.geometry
        x = np.asarray(x)
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) else np.float32
        where = f"node '{layer.node_name or layer.name}' ({layer.op_type})"
        if x.ndim < (3 if layer.kind != "dense" else 1):
            raise XCompileError(f"{where}: its input has shape {list(x.shape)}, too few dimensions")
        if layer.kind == "dense":
            rows, info = digital.dense_input(x, geometry)
            self._check_width(rows, where, x)
            self._record(rows)
            y = digital.dense_output(self._forward(rows), info, geometry)
        elif layer.kind == "conv":
            try:
                rows, out_shape = digital.im2col(x, geometry)
            except ValueError as exc:  # a kernel larger than the padded input
                raise XCompileError(f"{where}: input of shape {list(x.shape)}: {exc}") from None
            self._check_width(rows, where, x)
            self._record(rows)
            y = digital.conv_output(self._forward(rows), x.shape[0], out_shape)
        else:
            out_shape = digital.conv_transpose_geometry(x.shape[2:], geometry)[1]
            if any(d <= 0 for d in out_shape):
                raise XCompileError(f"{where}: an input of shape {list(x.shape)} gives an output of spatial shape {out_shape}, sizes must be >= 1")
            rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
            self._check_width(rows, where, x)
            self._record(rows)
            cols = self._forward(rows, add_bias=False)
            y = digital.col2im(cols, x.shape[0], x.shape[2:], geometry, geometry["channels_out"])
            if layer.bias is not None:
                y = y + layer.bias.reshape((1, -1) + (1,) * geometry["rank"])
        if np.issubdtype(dtype, np.integer):  # an integer MatMul / Einsum: ONNX's output type is its input's
            y = np.rint(y)
        return np.require(y, dtype, "C")  # ascontiguousarray would make a 0-d result 1-d


    def _check_width(self, rows: np.ndarray, where: str, x: np.ndarray) -> None:
        """Input vectors must be as long as the weights have rows (a shape ONNX could not check
        before run time, e.g. after Flatten with axis 0 on a batch)."""
        if rows.shape[1] != self.layer.rows_in:
            raise XCompileError(
                f"{where}: its input of shape {list(x.shape)} gives vectors of {rows.shape[1]} values, "
                f"the weights take {self.layer.rows_in}"
            )

    def _record(self, rows: np.ndarray) -> None:
        if self.recorder is not None:
            self.recorder(rows)

    def _forward(self, rows: np.ndarray, add_bias: bool = True) -> np.ndarray:
        return self.crossbar.forward(rows, add_bias)


def _runtime_hardware(program: Program, hardware, options: dict) -> Hardware:
    """The hardware to run on: compiled-for, or replaced / overridden; the array size stays the mapping's."""
    known = {f.name for f in dataclasses.fields(Hardware)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise XCompileError(f"unknown runtime option(s) {', '.join(map(repr, unknown))}; known: seed, calibration, hardware, {', '.join(sorted(known))}")
    hw = runtime_hardware(program.hardware, hardware, options)
    wires = ("r_wire", "r_source", "r_sink")
    remapped = sorted({layer.notes.get("remap") for layer in program.layers if layer.output_order is not None} - {None})
    if remapped and any(getattr(hw, name) != getattr(program.hardware, name) for name in wires):
        warnings.warn(
            f"remap {', '.join(remapped)} placed the outputs for the compiled wires "
            f"({', '.join(f'{n} {getattr(program.hardware, n):g}' for n in wires)}); this run uses "
            f"{', '.join(f'{n} {getattr(hw, n):g}' for n in wires)}: recompile to place for them",
            stacklevel=3,
        )
    return hw


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise XCompileError(f"seed must be a whole number >= 0, got {seed!r}")
    return int(seed)


def _quantises(model: onnx.ModelProto) -> bool:
    return any(node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for node in model.graph.node)
