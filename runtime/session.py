"""The compiled model as one session with ONNX Runtime's `run` signature.

Partitioned executor: the runtime graph is cut at its `ai.xcompile::CrossbarMVM` nodes; each run
of consecutive ONNX nodes between them is an ONNX Runtime session of its own (ORT's kernels,
ORT's optimiser), and each MVM node runs on the crossbar runtime. docs/runtime.md says why this
and not an ORT custom-op library, with the measured per-node overhead.
"""

from __future__ import annotations

import dataclasses
import os
from collections import ChainMap
import re
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from xcompile.config import Hardware, runtime_hardware
from xcompile.data import NodeArg, check_feeds, node_arg
from xcompile.errors import XCompileError
from xcompile.ir import CUSTOM_DOMAIN, MVM_OP, RECURRENT_OP, Layer, Program
from xcompile.runtime.fused import fused_model
from xcompile.runtime import control_flow, digital, recurrent
from xcompile.runtime.crossbar import ProgrammedLayer, read_energy


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
        if isinstance(mapping, (str, os.PathLike)):
            from xcompile.artifact import load

            mapping = load(mapping)
        program: Program = getattr(mapping, "program", mapping)
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
        typed = _inferred(program.graph)
        self._plan = _Plan(typed, typed.graph, {}, {})
        self._calibrated = not any(r.crossbar.needs_calibration for r in self._layers.values())
        # built on first run; not for a model that quantises activations: a float-rounding difference
        # between the fused graph and the layer-by-layer path would flip its roundings
        self._fused: ort.InferenceSession | None | bool = None if self.hardware.ideal and not _quantises(program.graph) else False
        refits = any(r.crossbar.fits_on_data for r in self._layers.values())
        if calibration is not None and (not self._calibrated or refits):
            self.calibrate(calibration)

    def reprogram(self, layer: Layer, calibration: dict | None = None) -> None:
        """Program `layer` in place of the layer with its index (same trial draws), then
        recalibrate on `calibration`: how an in-the-loop compiler tries one layer's placements
        without reprogramming the rest."""
        if layer.index not in self._layers:
            raise XCompileError(f"layer index {layer.index} is not in this session's program")
        self._layers[layer.index] = _LayerRunner(layer, ProgrammedLayer(layer, self.hardware, self._level_max, self.seed))
        if self._fused is not False:
            self._fused = None  # rebuilt with the new layer's weights
        crossbar = self._layers[layer.index].crossbar
        if calibration is not None and (crossbar.needs_calibration or crossbar.fits_on_data):
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

    def trace(self, feeds: dict[str, Any]) -> tuple[list, dict[int, tuple[np.ndarray, np.ndarray]]]:
        """Run `feeds`; return the outputs and, per layer index, its input vectors [P, K] and
        outputs before bias [P, N] as the crossbars computed them (what remapping measures)."""
        traces: dict[int, list] = {index: [] for index in self._layers}
        for index, runner in self._layers.items():
            runner.tap = lambda rows, y, seen=traces[index]: seen.append((rows, y.copy()))  # y gets its bias in place
        try:
            outputs = self.run(None, feeds)
        finally:
            for runner in self._layers.values():
                runner.tap = None
        return outputs, {i: (np.concatenate([r for r, _ in t]), np.concatenate([y for _, y in t])) for i, t in traces.items() if t}

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
        layer is being traced or cannot be expressed; then the step-by-step path."""
        if self._fused is False or any(r.recorder is not None or r.tap is not None for r in self._layers.values()):
            return None
        if self._fused is None:
            layers = {i: (r.layer, r.crossbar.weights, r.crossbar.bias) for i, r in self._layers.items()}
            model = fused_model(self.program.graph, layers)
            options = ort.SessionOptions()
            options.log_severity_level = 4  # a failed run falls back to the step path, which explains it
            try:
                self._fused = False if model is None else ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
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
        self.tap = None  # called with (input vectors, outputs before bias) of every batch (trace)

    def run(self, x) -> np.ndarray:
        layer, geometry = self.layer, self.layer.geometry
        x = np.asarray(x)
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
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
        if self.tap is None:
            return self.crossbar.forward(rows, add_bias)
        y = self.crossbar.forward(rows, add_bias=False)
        self.tap(rows, y)
        return self.crossbar.add_bias(y) if add_bias else y


@dataclass
class _Mvm:
    layer: int
    input: str
    output: str

    @property
    def reads(self):
        return [self.input]


@dataclass
class _Recurrent:
    """An LSTM / GRU / RNN: its recurrence runs here, its W and R layers on the crossbars."""

    attributes: dict
    inputs: list  # X, sequence_lens, initial_h, initial_c, P ('' when absent)
    outputs: list

    @property
    def reads(self):
        return [n for n in self.inputs if n]


class _Plan:
    """The steps of one graph (the model's, or an If / Loop / Scan body with crossbar layers in it),
    the constants it sees (its own and its enclosing graphs') and when each value is last read."""

    def __init__(self, model: onnx.ModelProto, graph: onnx.GraphProto, outer_constants: dict, outer_types: dict):
        self.constants = {**outer_constants, **{t.name: t for t in graph.initializer}}
        values = list(graph.value_info) + list(graph.input) + list(graph.output)
        self.types = {**outer_types, **{v.name: v.type for v in values if v.HasField("type")}}
        self.inputs = [v.name for v in graph.input]
        self.outputs = [v.name for v in graph.output]
        self.steps = _partition(model, graph, self)
        self.last_use = _last_uses(self.steps, self.outputs)

    def run(self, env, wanted: set, layers: dict, run_options=None) -> None:
        """Compute the graph's values into `env` (a dict, or a ChainMap over the enclosing scope)."""
        for position, step in enumerate(self.steps):
            if isinstance(step, _Segment):
                values = step.run([self.value(env, n) for n in step.inputs], run_options)
                env.update(zip(step.outputs, values))
            elif isinstance(step, _Recurrent):
                values = [None if not n else self.value(env, n) for n in step.inputs]
                results = recurrent.run(step.attributes, *values, mvm=lambda index, x: layers[index].run(x))
                env.update((name, value) for name, value in zip(step.outputs, results) if name)
            elif isinstance(step, _ControlFlow):
                results = step.run(env, self, layers, run_options)
                env.update((name, value) for name, value in zip(step.outputs, results) if name)
            else:
                env[step.output] = layers[step.layer].run(self.value(env, step.input))
            for name in self.last_use.get(position, ()):
                if name not in wanted:
                    env.pop(name, None)

    def value(self, env, name: str):
        if name in env:
            return env[name]
        if name in self.constants:
            return numpy_helper.to_array(self.constants[name])
        raise XCompileError(f"value '{name}' was not computed; the graph is not in topological order")


class _ControlFlow:
    """An If / Loop / Scan with crossbar layers in a body: the control flow runs here
    (runtime/control_flow.py), each body as a plan of its own over the enclosing scope."""

    def __init__(self, node: onnx.NodeProto, model: onnx.ModelProto, outer: "_Plan"):
        self.op = node.op_type
        self.attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.type != onnx.AttributeProto.GRAPH}
        self.bodies = {a.name: _Plan(model, a.g, outer.constants, outer.types) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        self.inputs = list(node.input)
        self.outputs = list(node.output)
        self._reads = _reads(node)

    @property
    def reads(self):
        return self._reads

    def run(self, env, outer: "_Plan", layers: dict, run_options) -> list:
        def run_body(name: str, inputs: list) -> list:
            body = self.bodies[name]
            scope = ChainMap(dict(zip(body.inputs, inputs)), env)
            body.run(scope, set(body.outputs), layers, run_options)
            return [body.value(scope, n) for n in body.outputs]

        values = [None if not n else outer.value(env, n) for n in self.inputs]
        return control_flow.RUN[self.op](self.attributes, values, run_body, self.bodies)


class _Segment:
    """A run of ONNX nodes executed by one ONNX Runtime session (built on first use per input types)."""

    def __init__(self, model: onnx.ModelProto, nodes: list, inputs: list[str], outputs: list[str], constants: dict, types: dict):
        self._model, self._nodes = model, nodes
        self.inputs, self.outputs = inputs, outputs
        self._constants, self._types = constants, types
        self._sessions: dict[tuple, ort.InferenceSession] = {}

    @property
    def reads(self):
        return self.inputs

    def run(self, values: list, run_options=None) -> list:
        key = tuple((type(v).__name__, getattr(v, "dtype", None), getattr(v, "ndim", None)) for v in values)
        session = self._sessions.get(key)
        if session is None:
            try:
                session = self._build(values)
            except XCompileError:
                raise
            except Exception as exc:  # ONNX Runtime's own exception types
                raise XCompileError(f"ONNX Runtime cannot load the digital ops {self._ops()}: {_ort_message(exc)}") from None
            self._sessions[key] = session
        try:
            return session.run(self.outputs, dict(zip(self.inputs, values)), run_options)
        except Exception as exc:  # ONNX Runtime's own exception types
            raise XCompileError(f"ONNX Runtime failed {_ort_message(exc)}") from None

    def _ops(self) -> str:
        names = [f"'{n.name}' ({n.op_type})" if n.name else n.op_type for n in self._nodes[:3]]
        return ", ".join(names) + (f" and {len(self._nodes) - 3} more" if len(self._nodes) > 3 else "")

    def _build(self, values: list) -> ort.InferenceSession:
        used = {name for node in self._nodes for name in _reads(node)}
        inputs = [self._input_info(name, value) for name, value in zip(self.inputs, values)]
        initializers = [self._constants[n] for n in sorted(used) if n in self._constants and n not in self.inputs]
        sub = helper.make_graph(
            self._nodes, "xcompile_segment", inputs, [onnx.ValueInfoProto(name=n) for n in self.outputs], initializers
        )
        opsets = [o for o in self._model.opset_import if o.domain != CUSTOM_DOMAIN]
        model = helper.make_model(sub, opset_imports=opsets, ir_version=self._model.ir_version)
        model.functions.extend(self._model.functions)
        options = ort.SessionOptions()
        options.log_severity_level = 4  # its errors are raised as XCompileError, not logged as well
        # ORT's pool would otherwise spin after each segment and fight the crossbar kernels' cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def _input_info(self, name: str, value) -> onnx.ValueInfoProto:
        if isinstance(value, np.ndarray):
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            return helper.make_tensor_value_info(name, elem, [None] * value.ndim)
        if name in self._types:
            return helper.make_value_info(name, self._types[name])
        raise XCompileError(f"cannot pass value '{name}' of type {type(value).__name__} between runtime segments")


def _ort_message(exc: Exception) -> str:
    """ONNX Runtime's error on one line, without its status prefix and source locations:
    'running node 'NAME' (OP): what went wrong' when it names the node."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+ [^\n]*?\) ", "", text)
    found = re.match(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if found:
        op, name, message = found.groups()
        text = f"running node '{name}' ({op}): {message}"
    return text[:500]


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


def _partition(model: onnx.ModelProto, graph: onnx.GraphProto, plan: _Plan) -> list:
    """Cut the graph's nodes (topological order) into ORT segments, MVM and recurrent steps, and
    control-flow steps for If / Loop / Scan nodes with crossbar layers in their bodies."""
    steps: list = []
    run: list = []
    produced_by_step: list[set[str]] = []

    def close_run():
        if run:
            steps.append(list(run))
            produced_by_step.append({o for n in run for o in n.output if o})
            run.clear()

    for node in graph.node:
        if node.domain == CUSTOM_DOMAIN and node.op_type == MVM_OP:
            close_run()
            layer = next(a.i for a in node.attribute if a.name == "layer")
            steps.append(_Mvm(int(layer), node.input[0], node.output[0]))
            produced_by_step.append({node.output[0]})
        elif node.domain == CUSTOM_DOMAIN and node.op_type == RECURRENT_OP:
            close_run()
            inputs = (list(node.input) + [""] * 5)[:5]
            steps.append(_Recurrent({a.name: _decoded(helper.get_attribute_value(a)) for a in node.attribute}, inputs, list(node.output)))
            produced_by_step.append({o for o in node.output if o})
        elif _has_crossbar_layers(node):
            close_run()
            steps.append(_ControlFlow(node, model, plan))
            produced_by_step.append({o for o in node.output if o})
        else:
            run.append(node)
    close_run()

    needed_later: list[set[str]] = [set() for _ in steps]
    wanted = {o.name for o in graph.output}
    for position in range(len(steps) - 1, -1, -1):
        needed_later[position] = set(wanted)
        step = steps[position]
        wanted |= set(step.reads if not isinstance(step, list) else (n for node in step for n in _reads(node)))

    done = []
    for position, step in enumerate(steps):
        if not isinstance(step, list):
            done.append(step)
            continue
        produced = produced_by_step[position]
        reads = []
        for node in step:
            for name in _reads(node):
                if name not in produced and name not in plan.constants and name not in reads:
                    reads.append(name)
        outputs = [o for node in step for o in node.output if o and o in needed_later[position]]
        done.append(_Segment(model, step, reads, outputs, plan.constants, plan.types))
    return done


def _quantises(model: onnx.ModelProto) -> bool:
    return any(node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for node in model.graph.node)


def _has_crossbar_layers(node: onnx.NodeProto) -> bool:
    for attr in node.attribute:
        for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            if any(inner.domain == CUSTOM_DOMAIN or _has_crossbar_layers(inner) for inner in body.node):
                return True
    return False


def _decoded(value):
    """An attribute value with ONNX's byte strings as str."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """The runtime graph with inferred value types (used for non-tensor values between segments)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):
        return model


def _reads(node: onnx.NodeProto) -> list[str]:
    """Names a node reads, including outer-scope names used inside its subgraphs."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for inner_node in sub.node:
                names.extend(n for n in _reads(inner_node) if n not in inner)
                inner.update(inner_node.output)
    return names


def _last_uses(steps: list, outputs: list[str]) -> dict[int, list[str]]:
    last: dict[str, int] = {}
    for position, step in enumerate(steps):
        for name in step.reads:
            last[name] = position
    by_step: dict[int, list[str]] = {}
    for name, position in last.items():
        if name not in outputs:
            by_step.setdefault(position, []).append(name)
    return by_step
