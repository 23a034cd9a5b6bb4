"""The step-by-step executor: a graph cut into ONNX Runtime segments, crossbar MVM steps,
recurrent steps and control flow with crossbar layers in its bodies (runtime/session.py runs it).

Each run of consecutive ONNX nodes between crossbar nodes is one ONNX Runtime session of its own
(ORT's kernels, ORT's optimiser); values are dropped from the environment after their last read.
"""

from __future__ import annotations

import re
from collections import ChainMap
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from xcompile.errors import XCompileError
from xcompile.ir import CUSTOM_DOMAIN, MVM_OP, RECURRENT_OP
from xcompile.runtime import control_flow, recurrent
from xcompile.runtime.ort_session import inference_session


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


class Plan:
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

    def __init__(self, node: onnx.NodeProto, model: onnx.ModelProto, outer: "Plan"):
        self.op = node.op_type
        self.attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.type != onnx.AttributeProto.GRAPH}
        self.bodies = {a.name: Plan(model, a.g, outer.constants, outer.types) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        self.inputs = list(node.input)
        self.outputs = list(node.output)
        self._reads = _reads(node)

    @property
    def reads(self):
        return self._reads

    def run(self, env, outer: "Plan", layers: dict, run_options) -> list:
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
        # errors are raised as XCompileError, not logged as well; ORT's pool would otherwise spin
        # after each segment and fight the crossbar kernels' cores
        return inference_session(model.SerializeToString(), log_level=4, spinning=False)

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


def _partition(model: onnx.ModelProto, graph: onnx.GraphProto, plan: Plan) -> list:
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


def inferred(model: onnx.ModelProto) -> onnx.ModelProto:
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
