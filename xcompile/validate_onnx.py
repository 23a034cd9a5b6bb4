"""Load = validate, the ONNX members (docs/format.md): model.onnx and graph.onnx parse, hold only
UTF-8 text and no external data, and graph.onnx's crossbar nodes are well-formed and run every
layer of the mapping exactly once."""

from __future__ import annotations

import math

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper

from xcompile.ir import CUSTOM_DOMAIN, MVM_OP, RECURRENT_OP, Layer
from xcompile.validate_values import GEOMETRY_INT_MAX, fail

RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
RECURRENT_ACTIVATIONS = {"LSTM": 3, "GRU": 2, "RNN": 1}
ACTIVATIONS = ("Sigmoid", "Tanh", "Relu", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid", "Elu", "Softsign", "Softplus")
_RECURRENT_TYPES = {
    "op": onnx.AttributeProto.STRING, "hidden_size": onnx.AttributeProto.INT, "directions": onnx.AttributeProto.INT,
    "direction": onnx.AttributeProto.STRING, "layout": onnx.AttributeProto.INT, "linear_before_reset": onnx.AttributeProto.INT,
    "input_forget": onnx.AttributeProto.INT, "activations": onnx.AttributeProto.STRINGS, "w_layers": onnx.AttributeProto.INTS,
    "r_layers": onnx.AttributeProto.INTS, "activation_alpha": onnx.AttributeProto.FLOATS, "activation_beta": onnx.AttributeProto.FLOATS,
}


def parse_onnx(name: str, data: bytes) -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        fail(name, f"not a readable ONNX model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    bad_text = _undecodable_text(model)
    if bad_text:
        fail(name, f"{bad_text} is not valid UTF-8 text")
    for tensor, where in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            fail(name, f"tensor '{tensor.name}' ({where}) refers to external data; a mapping is self-contained and external data is never read")
    return model


def _undecodable_text(message) -> str | None:
    """The first text field (names, op types, doc strings, ...) whose bytes are not UTF-8, or None.

    ONNX's protobuf is proto2, which does not check text when parsing: such a field reads as bytes,
    and a UnicodeDecodeError surfaces wherever it is used later (graph building, ONNX Runtime)."""
    stack = [(message, type(message).__name__)]
    while stack:
        current, where = stack.pop()
        for field in current.DESCRIPTOR.fields:
            if field.type == field.TYPE_STRING:
                values = getattr(current, field.name)
                if any(isinstance(v, bytes) for v in (values if field.is_repeated else [values])):
                    return f"{where}.{field.name}"
            elif field.type == field.TYPE_MESSAGE:
                value = getattr(current, field.name)
                if field.is_repeated:
                    stack.extend((item, f"{where}.{field.name}[{i}]") for i, item in enumerate(value))
                elif current.HasField(field.name):
                    stack.append((value, f"{where}.{field.name}"))
    return None


def _tensors(model: onnx.ModelProto):
    """Every TensorProto of a model: initializers, sparse ones, node attributes, in every subgraph and function."""
    graphs = [(model.graph, "graph")]
    nodes = [(node, f"function {f.name}") for f in model.functions for node in f.node]
    while graphs or nodes:
        if graphs:
            graph, where = graphs.pop()
            yield from ((t, f"initializer of {where}") for t in graph.initializer)
            for sparse in graph.sparse_initializer:
                yield from ((t, f"sparse initializer of {where}") for t in (sparse.values, sparse.indices))
            nodes.extend((node, where) for node in graph.node)
            continue
        node, where = nodes.pop()
        for attr in node.attribute:
            inside = f"attribute {attr.name} of node '{node.name or node.op_type}' in {where}"
            if attr.HasField("t"):
                yield attr.t, inside
            yield from ((t, inside) for t in attr.tensors)
            if attr.HasField("sparse_tensor"):
                yield from ((t, inside) for t in (attr.sparse_tensor.values, attr.sparse_tensor.indices))
            for sparse in attr.sparse_tensors:
                yield from ((t, inside) for t in (sparse.values, sparse.indices))
            if attr.HasField("g"):
                graphs.append((attr.g, inside))
            graphs.extend((g, inside) for g in attr.graphs)


def check_runtime_graph(graph: onnx.ModelProto, layers: tuple[Layer, ...]) -> None:
    """The graph's inputs and outputs have known tensor types (the session reports them); every
    crossbar node (CrossbarMVM, CrossbarRecurrent; at the top level or inside If / Loop / Scan
    bodies, never in a function) is well-formed and names layers that fit it, each layer once."""
    known = set(onnx.TensorProto.DataType.values())
    for value in list(graph.graph.input) + list(graph.graph.output):
        kind = value.type.WhichOneof("value")
        if kind == "tensor_type" and value.type.tensor_type.elem_type not in known:
            fail("graph.onnx", f"graph input/output '{value.name}' has element type {value.type.tensor_type.elem_type}, not an ONNX tensor type")
    referenced: list[int] = []
    stack = [graph.graph]
    while stack:
        inner = stack.pop()
        for node in inner.node:
            for attr in node.attribute:
                stack.extend(([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
            if node.domain != CUSTOM_DOMAIN:
                continue
            what = f"node '{node.name}'"
            if node.op_type == MVM_OP:
                referenced.append(_mvm_node(node, what, len(layers)))
            elif node.op_type == RECURRENT_OP:
                referenced.extend(_recurrent_node(node, what, layers))
            else:
                fail("graph.onnx", f"{what} is {CUSTOM_DOMAIN}::{node.op_type}; that domain has only {MVM_OP} and {RECURRENT_OP}")
    counts = np.bincount(np.array(referenced, dtype=np.int64), minlength=len(layers))
    if layers and (counts != 1).any():
        index = int(np.flatnonzero(counts != 1)[0])
        fail("graph.onnx", f"layer {index} is run by {int(counts[index])} crossbar nodes; each layer runs exactly once")
    functions = [f for f in graph.functions]
    while functions:
        inner = functions.pop()
        for node in inner.node:
            if node.domain == CUSTOM_DOMAIN:
                fail("graph.onnx", f"crossbar node '{node.name}' inside a function; the runtime runs them in graphs only")
            for attr in node.attribute:
                functions.extend(([attr.g] if attr.HasField("g") else []) + list(attr.graphs))


def _mvm_node(node: onnx.NodeProto, what: str, layers: int) -> int:
    attrs = {a.name: a for a in node.attribute}
    layer = attrs.get("layer")
    if set(attrs) != {"layer"} or layer.type != onnx.AttributeProto.INT:
        fail("graph.onnx", f"{what} ({MVM_OP}) must have exactly one attribute, the integer 'layer'")
    if not 0 <= layer.i < layers:
        fail("graph.onnx", f"{what} ({MVM_OP}) has layer={layer.i}; the mapping has layers 0..{layers - 1}")
    if len(node.input) != 1 or len(node.output) != 1 or not node.input[0] or not node.output[0]:
        fail("graph.onnx", f"{what} ({MVM_OP}) must have one input and one output")
    return layer.i


def _recurrent_node(node: onnx.NodeProto, what: str, layers: tuple[Layer, ...]) -> list[int]:
    """A CrossbarRecurrent node: attributes of the types and ranges runtime/recurrent.py reads, and
    W / R layers of the shapes its gates need. Returns the layers it runs."""
    attrs = {a.name: a for a in node.attribute}
    optional = {"clip": onnx.AttributeProto.FLOAT, "dynamic_quantize": onnx.AttributeProto.INT}
    if not set(_RECURRENT_TYPES) <= set(attrs) <= set(_RECURRENT_TYPES) | set(optional):
        fail("graph.onnx", f"{what} ({RECURRENT_OP}) must have exactly the attributes {sorted(_RECURRENT_TYPES)} (and clip, dynamic_quantize)")
    for name, kind in {**_RECURRENT_TYPES, **optional}.items():
        if name in attrs and attrs[name].type != kind:
            fail("graph.onnx", f"{what} ({RECURRENT_OP}): attribute '{name}' has the wrong type")
    value = {name: helper.get_attribute_value(a) for name, a in attrs.items()}
    op = value["op"].decode(errors="replace")
    hidden, directions = value["hidden_size"], value["directions"]
    direction = value["direction"].decode(errors="replace")
    rule = None
    if op not in RECURRENT_GATES:
        rule = f"op must be one of {sorted(RECURRENT_GATES)}"
    elif not 1 <= hidden <= GEOMETRY_INT_MAX or directions not in (1, 2):
        rule = "hidden_size must be in 1..65536 and directions 1 or 2"
    elif direction not in ("forward", "reverse", "bidirectional") or (direction == "bidirectional") != (directions == 2):
        rule = "direction must be forward, reverse or bidirectional, and bidirectional exactly when directions is 2"
    elif any(value[k] not in (0, 1) for k in ("layout", "linear_before_reset", "input_forget")):
        rule = "layout, linear_before_reset and input_forget must be 0 or 1"
    elif not len(value["activations"]) == len(value["activation_alpha"]) == len(value["activation_beta"]) == RECURRENT_ACTIVATIONS[op] * directions:
        rule = f"{op} needs {RECURRENT_ACTIVATIONS[op]} activations per direction, each with an alpha and a beta"
    elif any(a.decode(errors="replace") not in ACTIVATIONS for a in value["activations"]):
        rule = f"activations must be among {', '.join(ACTIVATIONS)}"
    elif not all(math.isfinite(v) for v in [*value["activation_alpha"], *value["activation_beta"]]):
        rule = "activation_alpha and activation_beta must be finite"
    elif "clip" in value and not 0 < value["clip"] < math.inf:
        rule = "clip must be a finite number > 0"
    elif value.get("dynamic_quantize", 0) not in (0, 1) or (value.get("dynamic_quantize") and op != "LSTM"):
        rule = "dynamic_quantize must be 0 or 1, and 1 only for an LSTM"
    elif not 1 <= len(node.input) <= 5 or not node.input[0] or not 1 <= len(node.output) <= 3:
        rule = "inputs must be X (given), then optionally sequence_lens, initial_h, initial_c, P; and 1 to 3 outputs"
    if rule:
        fail("graph.onnx", f"{what} ({RECURRENT_OP}): {rule}")
    gates = RECURRENT_GATES[op]
    split = op == "GRU" and not value["linear_before_reset"]  # R_zr and R_h: R_h multiplies r * h
    r_outputs = [2 * hidden, hidden] if split else [gates * hidden]
    w_layers, r_layers = list(value["w_layers"]), list(value["r_layers"])
    if len(w_layers) != directions or len(r_layers) != directions * len(r_outputs):
        fail("graph.onnx", f"{what} ({RECURRENT_OP}): needs {directions} W layer(s) and {directions * len(r_outputs)} R layer(s)")
    expected = [(w, None, gates * hidden) for w in w_layers]
    expected += [(r, hidden, r_outputs[i % len(r_outputs)]) for i, r in enumerate(r_layers)]
    for index, rows, outputs in expected:
        if not 0 <= index < len(layers):
            fail("graph.onnx", f"{what} ({RECURRENT_OP}) names layer {index}; the mapping has layers 0..{len(layers) - 1}")
        layer = layers[index]
        groups, k, n = layer.weight.shape
        if layer.kind != "dense" or groups != 1 or n != outputs or (rows is not None and k != rows):
            fail("graph.onnx", f"{what} ({RECURRENT_OP}): layer {index} has shape {[groups, k, n]}; its gates need "
                 f"[1, {rows if rows is not None else 'inputs'}, {outputs}] (dense)")
    return w_layers + r_layers
