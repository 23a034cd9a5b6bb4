"""The compiled model as one session with ONNX Runtime's `run` signature.

Partitioned executor: the runtime graph is cut at its `ai.xcompile::CrossbarMVM` nodes; each run
of consecutive ONNX nodes between them is an ONNX Runtime session of its own (ORT's kernels,
ORT's optimiser), and each MVM node runs on the crossbar runtime. docs/runtime.md says why this
and not an ORT custom-op library, with the measured per-node overhead.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from xcompile.config import Hardware, hardware_from
from xcompile.errors import XCompileError
from xcompile.ir import CUSTOM_DOMAIN, MVM_OP, Layer, Program
from xcompile.runtime import digital
from xcompile.runtime.crossbar import ProgrammedLayer, read_energy


@dataclass(frozen=True)
class NodeArg:
    """What `onnxruntime.NodeArg` tells: name, type string, shape (ints, names or None)."""

    name: str
    type: str
    shape: list


class Session:
    """Run a compiled mapping: `Session(mapping_or_path).run(output_names, feeds)`.

    seed: the Monte-Carlo trial (device draws, read noise); the same seed gives the same outputs.
    calibration: feeds (dict name -> array) to set calibrated ADC / DAC ranges from; without
    them, ranges are calibrated on the first batch passed to `run` (and a warning says so).
    hardware / keyword options: hardware to run on instead of the one compiled for (a preset
    name, dict, TOML path or Hardware, then single options on top); the array size must match.
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
        self._inputs = [_node_arg(v) for v in graph.input]
        self._outputs = [_node_arg(v) for v in graph.output]
        opts = program.options
        self._level_max = opts.level_max
        self._layers = {
            layer.index: _LayerRunner(layer, ProgrammedLayer(layer, self.hardware, self._level_max, self.seed))
            for layer in program.layers
        }
        self._steps = _partition(program.graph)
        self._constants = {t.name: t for t in graph.initializer}
        self._last_use = _last_uses(self._steps, [o.name for o in graph.output])
        self._calibrated = not any(r.crossbar.needs_calibration for r in self._layers.values())
        if calibration is not None and not self._calibrated:
            self.calibrate(calibration)

    def reprogram(self, layer: Layer, calibration: dict | None = None) -> None:
        """Program `layer` in place of the layer with its index (same trial draws), then
        recalibrate on `calibration`: how an in-the-loop compiler tries one layer's placements
        without reprogramming the rest."""
        if layer.index not in self._layers:
            raise XCompileError(f"layer index {layer.index} is not in this session's program")
        self._layers[layer.index] = _LayerRunner(layer, ProgrammedLayer(layer, self.hardware, self._level_max, self.seed))
        if calibration is not None and self._layers[layer.index].crossbar.needs_calibration:
            self.calibrate(calibration)

    def calibrate(self, feeds: dict[str, Any]) -> None:
        """Run `feeds` once with ideal ADCs and set every calibrated converter range from it."""
        programmed = [r.crossbar for r in self._layers.values()]
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
        env = self._check_feeds(input_feed)
        for position, step in enumerate(self._steps):
            if isinstance(step, _Segment):
                values = step.run([self._value(env, n) for n in step.inputs], run_options)
                env.update(zip(step.outputs, values))
            else:
                env[step.output] = self._layers[step.layer].run(self._value(env, step.input))
            for name in self._last_use.get(position, ()):
                if name not in names:
                    env.pop(name, None)
        return [self._value(env, n) for n in names]

    def _check_feeds(self, feeds: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(feeds, dict):
            raise XCompileError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
        expected = {i.name: i for i in self._inputs}
        extra = sorted(set(feeds) - set(expected))
        if extra:
            raise XCompileError(f"unknown input name(s) {extra}; the model takes {sorted(expected)}")
        missing = sorted(set(expected) - set(feeds))
        if missing:
            raise XCompileError(f"missing input(s) {missing}; the model takes {sorted(expected)}")
        env = {}
        for name, value in feeds.items():
            arg = expected[name]
            if arg.type.startswith("tensor("):
                value = np.asarray(value)
                want = _numpy_dtype(arg.type)
                if want is not None and value.dtype != want:
                    raise XCompileError(f"input '{name}' has dtype {value.dtype}, the model expects {want} ({arg.type})")
                if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                    raise XCompileError(f"input '{name}' holds NaN or infinite values")
                if len(arg.shape) != value.ndim or any(
                    isinstance(d, int) and d != s for d, s in zip(arg.shape, value.shape)
                ):
                    raise XCompileError(f"input '{name}' has shape {list(value.shape)}, the model expects {arg.shape}")
            env[name] = value
        return env

    def _value(self, env: dict, name: str):
        if name in env:
            return env[name]
        if name in self._constants:
            return numpy_helper.to_array(self._constants[name])
        raise XCompileError(f"value '{name}' was not computed; the graph is not in topological order")


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
        if layer.kind == "dense":
            rows, info = digital.dense_input(x, geometry)
            self._record(rows)
            y = digital.dense_output(self._forward(rows), info, geometry)
        elif layer.kind == "conv":
            rows, out_shape = digital.im2col(x, geometry)
            self._record(rows)
            y = digital.conv_output(self._forward(rows), x.shape[0], out_shape)
        else:
            rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
            self._record(rows)
            cols = self._forward(rows, add_bias=False)
            y = digital.col2im(cols, x.shape[0], x.shape[2:], geometry, geometry["channels_out"])
            if layer.bias is not None:
                y = y + layer.bias.reshape((1, -1) + (1,) * geometry["rank"])
        return np.ascontiguousarray(y, dtype=dtype)


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


class _Segment:
    """A run of ONNX nodes executed by one ONNX Runtime session (built on first use per input types)."""

    def __init__(self, model: onnx.ModelProto, nodes: list, inputs: list[str], outputs: list[str]):
        self._model, self._nodes = model, nodes
        self.inputs, self.outputs = inputs, outputs
        self._types = {v.name: v.type for v in list(model.graph.value_info) + list(model.graph.input)}
        self._sessions: dict[tuple, ort.InferenceSession] = {}

    @property
    def reads(self):
        return self.inputs

    def run(self, values: list, run_options=None) -> list:
        key = tuple((type(v).__name__, getattr(v, "dtype", None), getattr(v, "ndim", None)) for v in values)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = self._build(values)
        return session.run(self.outputs, dict(zip(self.inputs, values)), run_options)

    def _build(self, values: list) -> ort.InferenceSession:
        graph = self._model.graph
        used = {name for node in self._nodes for name in _reads(node)}
        inputs = [self._input_info(name, value) for name, value in zip(self.inputs, values)]
        initializers = [t for t in graph.initializer if t.name in used and t.name not in self.inputs]
        sub = helper.make_graph(
            self._nodes, "xcompile_segment", inputs, [onnx.ValueInfoProto(name=n) for n in self.outputs], initializers
        )
        opsets = [o for o in self._model.opset_import if o.domain != CUSTOM_DOMAIN]
        model = helper.make_model(sub, opset_imports=opsets, ir_version=self._model.ir_version)
        model.functions.extend(self._model.functions)
        options = ort.SessionOptions()
        options.log_severity_level = 3
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


def _runtime_hardware(program: Program, hardware, options: dict) -> Hardware:
    """The hardware to run on: compiled-for, or replaced / overridden; the array size must match."""
    base = program.hardware if hardware is None else hardware_from(hardware)
    known = {f.name for f in dataclasses.fields(Hardware)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise XCompileError(f"unknown runtime option(s) {', '.join(map(repr, unknown))}; known: seed, calibration, hardware, {', '.join(sorted(known))}")
    hw = dataclasses.replace(base, **options)
    for name in ("rows", "cols"):
        if getattr(hw, name) != getattr(program.hardware, name):
            raise XCompileError(
                f"hardware option '{name}' is {getattr(hw, name)} but the mapping was compiled for "
                f"{getattr(program.hardware, name)}: recompile to change the array size"
            )
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


def _partition(model: onnx.ModelProto) -> list:
    """Cut the graph's nodes (topological order) into ORT segments and MVM steps."""
    graph = model.graph
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
        else:
            run.append(node)
    close_run()

    needed_later: list[set[str]] = [set() for _ in steps]
    wanted = {o.name for o in graph.output}
    for position in range(len(steps) - 1, -1, -1):
        needed_later[position] = set(wanted)
        step = steps[position]
        wanted |= set(step.reads if isinstance(step, _Mvm) else (n for node in step for n in _reads(node)))

    initializers = {t.name for t in graph.initializer}
    typed = _inferred(model)
    done = []
    for position, step in enumerate(steps):
        if isinstance(step, _Mvm):
            done.append(step)
            continue
        produced = produced_by_step[position]
        reads = []
        for node in step:
            for name in _reads(node):
                if name not in produced and name not in initializers and name not in reads:
                    reads.append(name)
        outputs = [o for node in step for o in node.output if o and o in needed_later[position]]
        done.append(_Segment(typed, step, reads, outputs))
    return done


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


def _node_arg(value: onnx.ValueInfoProto) -> NodeArg:
    t = value.type
    if t.HasField("tensor_type"):
        type_name = onnx.TensorProto.DataType.Name(t.tensor_type.elem_type).lower()
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim
        ]
        return NodeArg(value.name, f"tensor({type_name})", shape)
    return NodeArg(value.name, t.WhichOneof("value") or "unknown", [])


def _numpy_dtype(type_name: str):
    elem = type_name[len("tensor(") : -1].upper()
    try:
        return helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, elem))
    except (AttributeError, KeyError, TypeError):
        return None
