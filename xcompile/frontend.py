"""ONNX front end: load and check a model, fold constant weight subgraphs, and cut out MVM layers.

Every Gemm / MatMul with one constant operand, Conv and ConvTranspose becomes a `Layer` and, in
the runtime graph, one `ai.xcompile::CrossbarMVM` node; so do the W and R of LSTM / GRU / RNN
(frontend_recurrent.py) and the integer weights of quantised ops (lowered first,
frontend_quant.py), in the main graph and in If / Loop / Scan bodies. Everything else stays
ONNX; a weight-bearing node that stays carries the reason in its metadata (coverage.py).
Constant folding (Constant nodes, Transpose / Reshape / Cast / DequantizeLinear of constants,
ConstantOfShape, ...) is onnxscript's optimizer over onnx_ir, not ours.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import fold_constants

from xcompile.coverage import CONTROL_FLOW, REASON_KEY, WEIGHT_OPERANDS, Unsupported
from xcompile.frontend_quant import INTEGER_KEY, SOURCE_KEY, lower_quantized, subgraphs
from xcompile.frontend_recurrent import RECURRENT_OPS, build_recurrent
from xcompile import checks
from xcompile.errors import XCompileError
from xcompile.ir import CUSTOM_DOMAIN, MVM_OP, Layer, frozen_array

MIN_OPSET = 9
MVM_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose")
WEIGHT_OPS = MVM_OPS + RECURRENT_OPS  # ops that become crossbar layers here
_NO_LIMIT = 1 << 62


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read and check an ONNX model (external data read from beside the file: xcompile/checks.py)."""
    if isinstance(source, onnx.ModelProto):
        model, where = source, "the model"
        checks.refuse_external_data(model, where)
    else:
        path = Path(source)
        where = f"'{path}'"
        if not path.exists():
            raise XCompileError(f"model file {where} does not exist")
        if path.is_dir():
            raise XCompileError(f"model file {where} is a directory, expected an .onnx file")
        model = checks.read_model(path, where)
    if not model.HasField("graph") or model.ir_version < 3:
        raise XCompileError(f"{where} is not an ONNX model (no graph or IR version {model.ir_version})")
    model = _with_output_types(model)
    try:
        onnx.checker.check_model(_without_untyped_outputs(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise XCompileError(f"{where} is not a valid ONNX model: {_first_line(exc)}") from None
    checks.check_operators(model, where)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise XCompileError(f"{where} imports no default ONNX opset")
    if opset < MIN_OPSET:  # older exporters: ONNX's own version converter brings them up
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors and C++ errors
            raise XCompileError(
                f"{where} uses ONNX opset {opset}; xcompile reads opset {MIN_OPSET} onward and "
                f"ONNX's version converter could not upgrade it: {_first_line(exc)}"
            ) from None
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        raise XCompileError(f"{where}: shapes do not fit: {_first_line(exc)}") from None
    return model


def _untyped(value: onnx.ValueInfoProto) -> bool:
    kind = value.type.WhichOneof("value")
    return kind is None or (kind == "tensor_type" and not value.type.tensor_type.HasField("shape"))


def _with_output_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Graph outputs declared without a type or shape (ONNX Runtime runs such models; ONNX's
    checker refuses them) get what shape inference finds for them."""
    if not any(_untyped(o) for o in model.graph.output):
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # C++ inference errors; the checks below name the real problem
        return model
    model = copy.deepcopy(model)
    for output, found in zip(model.graph.output, inferred.graph.output):
        if _untyped(output) and not _untyped(found):
            output.CopyFrom(found)
    return model


def _without_untyped_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as the checker sees it: outputs nothing could type are left out of its view."""
    if not any(_untyped(o) for o in model.graph.output):
        return model
    view = copy.deepcopy(model)
    keep = [o for o in view.graph.output if not _untyped(o)]
    del view.graph.output[:]
    view.graph.output.extend(keep)
    return view


def extract_layers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Layer], list[str]]:
    """Fold constants, turn every MVM node into a Layer; return (runtime graph, layers, digital ops)."""
    model_ir = ir.serde.deserialize_model(model)
    common_passes.RemoveInitializersFromInputsPass()(model_ir)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model_ir)
    weight_makers = _weight_subgraph(model_ir.graph)
    fold_constants(
        model_ir,
        onnx_shape_inference=True,
        input_size_limit=_NO_LIMIT,
        output_size_limit=_NO_LIMIT,
        should_fold=lambda node: True if node in weight_makers else None,
    )
    _fold_with_onnxruntime(model_ir)
    lower_quantized(model_ir.graph)
    checks.check_finite_weights(model_ir.graph)  # after lowering: dequantised weights are checked too

    layers: list[Layer] = []
    _extract(model_ir.graph, layers, set())

    model_ir.opset_imports[CUSTOM_DOMAIN] = 1
    common_passes.RemoveUnusedNodesPass()(model_ir)
    runtime_graph = ir.serde.serialize_model(model_ir)
    digital = sorted({n.op_type for n in runtime_graph.graph.node if n.domain != CUSTOM_DOMAIN})
    return runtime_graph, layers, digital


def _extract(graph: ir.Graph, layers: list[Layer], names: set[str]) -> None:
    """Turn the MVM and recurrent nodes of `graph`, and of the If / Loop / Scan bodies in it, into layers."""
    for position, node in enumerate(list(graph)):
        if node.domain in ("", "ai.onnx") and node.op_type in CONTROL_FLOW:  # both If branches, Loop and Scan bodies
            for body in subgraphs(node):
                _extract(body, layers, names)
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_OPS:
            continue
        name = _unique(node.name or f"{node.op_type}_{position}", names)
        if node.op_type in RECURRENT_OPS:
            try:
                recurrent_layers, runtime_node = build_recurrent(node, len(layers), name)
            except Unsupported as exc:
                node.metadata_props[REASON_KEY] = str(exc)
                continue
            layers.extend(recurrent_layers)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [runtime_node], list(node.outputs), list(runtime_node.outputs))
            continue
        try:
            built = _build_layer(node, len(layers), name)
        except Unsupported as exc:  # stays on ONNX Runtime; coverage reports it with this reason
            node.metadata_props[REASON_KEY] = str(exc)
            continue
        if built is None:  # an activation x activation product: stays digital
            continue
        layer, digital_bias = built
        if SOURCE_KEY in node.metadata_props:  # lowered from a quantised or fused op (frontend_quant.py)
            notes = {**layer.notes, **({"integer_weights": True} if node.metadata_props.get(INTEGER_KEY) == "1" else {})}
            layer = dataclasses.replace(layer, op_type=node.metadata_props[SOURCE_KEY], notes=notes)
        layers.append(layer)
        _replace_with_mvm(graph, node, layer, digital_bias)


def _bears_weights(node: ir.Node) -> bool:
    return ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type) in WEIGHT_OPERANDS


def _weight_subgraph(graph: ir.Graph) -> set:
    """Nodes upstream of an MVM operand: folded even where the folder's defaults would not
    (ConstantOfShape, DequantizeLinear), since a crossbar needs the weights as numbers."""
    found: set = set()
    stack = [v for node in graph if _bears_weights(node) for v in node.inputs if v is not None]
    while stack:
        producer = stack.pop().producer()
        if producer is not None and producer not in found:
            found.add(producer)
            stack.extend(v for v in producer.inputs if v is not None)
    return found


def _fold_with_onnxruntime(model_ir: ir.Model) -> None:
    """Evaluate, with ONNX Runtime, weight subgraphs the folder left (ops ONNX's reference
    evaluator lacks at the model's opset, e.g. DequantizeLinear-13), and make them initializers."""
    graph = model_ir.graph
    pending = {  # by identity, in graph order: a weight several layers share is folded once
        id(v): v for node in graph if _bears_weights(node)
        for v in node.inputs if v is not None and v.const_value is None and v.producer() is not None
    }
    for value in pending.values():
        nodes = _constant_producers(value)
        if nodes is None:
            continue
        order = {node: i for i, node in enumerate(graph)}
        proto_nodes = [ir.serde.serialize_node(n) for n in sorted(nodes, key=order.get)]
        feeds = {v.name: v for n in nodes for v in n.inputs if v is not None and v.const_value is not None}
        model = onnx.helper.make_model(
            onnx.helper.make_graph(
                proto_nodes, "fold", [], [onnx.helper.make_empty_tensor_value_info(value.name)],
                [ir.serde.serialize_tensor(v.const_value) for v in feeds.values()],
            ),
            opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model_ir.opset_imports.items()],
        )
        for init, name in zip(model.graph.initializer, feeds):
            init.name = name
        try:
            import onnxruntime

            result = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
        except Exception:  # left as it is: _build_layer then names the non-constant weight
            continue
        folded = ir.Value(name=f"{value.name}_folded", const_value=ir.tensor(result))
        graph.register_initializer(folded)
        ir.convenience.replace_all_uses_with(value, folded)


def _constant_producers(value: ir.Value) -> set | None:
    """The nodes computing `value` from constants only, or None if a graph input is reached."""
    nodes: set = set()
    stack = [value]
    while stack:
        current = stack.pop()
        if current.const_value is not None and not current.is_graph_input():
            continue
        producer = current.producer()
        if producer is None or current.is_graph_input():
            return None
        if producer not in nodes:
            nodes.add(producer)
            stack.extend(v for v in producer.inputs if v is not None)
    return nodes


def _build_layer(node: ir.Node, index: int, name: str):
    op = node.op_type
    where = f"node '{node.name or name}' ({op})"
    inputs = list(node.inputs) + [None] * 3
    if op in ("Conv", "ConvTranspose"):
        x, w, b = inputs[:3]
        weight = _const(w)
        if weight is None:
            raise Unsupported(f"the weight input '{_vname(w)}' is not a constant; a crossbar needs constant weights")
        bias = None
        if b is not None:
            bias = _const(b)
            if bias is None:
                raise Unsupported(f"the bias input '{_vname(b)}' is not a constant")
        matrix, geometry, bias = _conv_layer(node, where, weight, bias, _static_shape(x))
        return _layer(index, name, node, "conv" if op == "Conv" else "conv_transpose", geometry, matrix, bias, x), None
    if op == "MatMul":
        a, b = inputs[:2]
        wa, wb = _const(a), _const(b)
        if wb is not None and wa is None:
            return _dense_from_matmul(node, index, name, where, wb, a, weight_left=False), None
        if wa is not None and wb is None:
            return _dense_from_matmul(node, index, name, where, wa, b, weight_left=True), None
        return None
    # Gemm: Y = alpha * A' @ B' + beta * C
    a, b, c = inputs[:3]
    alpha = _attr(node, "alpha", 1.0)
    beta = _attr(node, "beta", 1.0)
    trans_a, trans_b = bool(_attr(node, "transA", 0)), bool(_attr(node, "transB", 0))
    wa, wb = _const(a), _const(b)
    if wb is not None and wa is None:
        weight = (wb.T if trans_b else wb) * np.float32(alpha)
        geometry = {"weight_left": False, "transpose_input": trans_a, "squeeze": False}
        x = a
    elif wa is not None and wb is None:
        # Y = A' @ B': every column of B' is an input vector, Y^T = B'^T @ A'^T
        weight = (wa if trans_a else wa.T) * np.float32(alpha)
        geometry = {"weight_left": True, "transpose_input": trans_b, "squeeze": False}
        x = b
    else:
        return None
    if weight.ndim != 2:
        raise Unsupported(f"Gemm operands must be 2-D, the constant one has shape {list(weight.shape)}")
    bias, digital_bias = None, None
    if c is not None:
        cval = _const(c)
        n_out = weight.shape[1]
        if cval is not None and not geometry["weight_left"] and cval.size in (1, n_out) and cval.ndim <= 2 and (cval.ndim < 2 or cval.shape[0] == 1):
            if beta != 0:  # beta 0: C is not read (ONNX Runtime: a NaN in it stays out of Y)
                bias = np.broadcast_to(cval.reshape(-1) * np.float32(beta), (n_out,)).astype(np.float32)
        else:
            x_shape = _static_shape(x)
            x_size = None if x_shape is None or len(x_shape) != 2 else x_shape[0 if geometry["transpose_input"] == geometry["weight_left"] else 1]
            y_shape = (n_out, x_size) if geometry["weight_left"] else (x_size, n_out)
            known = checks.check_gemm_bias(where, list(cval.shape) if cval is not None else _static_shape(c), y_shape)
            digital_bias = (c, float(beta), known)
    return _layer(index, name, node, "dense", geometry, weight[None].astype(np.float32), bias, x), digital_bias


def _dense_from_matmul(node, index, name, where, weight, x, weight_left: bool) -> Layer:
    if weight.ndim > 2:
        raise Unsupported(
            f"the constant operand has shape {list(weight.shape)}, a batch of matrices; "
            "xcompile maps 1-D and 2-D constant MatMul operands"
        )
    squeeze = weight.ndim == 1
    if weight_left:  # Y = W[M, K] @ X[..., K, N]  ->  Y^T = X^T @ W^T
        matrix = weight.reshape(1, -1).T if squeeze else weight.T
    else:  # Y = X[..., K] @ W[K, N]
        matrix = weight.reshape(-1, 1) if squeeze else weight
    geometry = {"weight_left": weight_left, "transpose_input": False, "squeeze": squeeze}
    return _layer(index, name, node, "dense", geometry, matrix[None].astype(np.float32), None, x)


def _conv_layer(node, where, weight, bias, x_shape):
    if weight.ndim < 3:
        raise XCompileError(f"{where}: weight has shape {list(weight.shape)}, expected [out, in/group, k1, ...]")
    rank = weight.ndim - 2
    group = int(_attr(node, "group", 1))
    kernel = list(_attr(node, "kernel_shape", weight.shape[2:]))
    if [int(k) for k in kernel] != list(weight.shape[2:]):
        raise XCompileError(f"{where}: kernel_shape {kernel} does not match the weight's {list(weight.shape[2:])}")
    geometry = {
        "rank": rank,
        "kernel": [int(k) for k in weight.shape[2:]],
        "strides": [int(s) for s in _attr(node, "strides", [1] * rank)],
        "dilations": [int(d) for d in _attr(node, "dilations", [1] * rank)],
        "pads": [int(p) for p in _attr(node, "pads", [0] * (2 * rank))],
        "auto_pad": _attr(node, "auto_pad", "NOTSET"),
        "group": group,
    }
    if any(len(geometry[k]) != n for k, n in (("strides", rank), ("dilations", rank), ("pads", 2 * rank))):
        raise XCompileError(f"{where}: strides, dilations and pads must have {rank}, {rank} and {2 * rank} entries")
    checks.check_conv_window(where, node.op_type, geometry, x_shape)
    kprod = int(np.prod(geometry["kernel"]))
    if node.op_type == "Conv":
        cout, cin_g = weight.shape[:2]
        if group < 1 or cout % group:
            raise XCompileError(f"{where}: group={group} must divide the {cout} output channels")
        # rows in (kernel offset, channel) order within each group: im2col then gathers whole
        # channel runs of a channels-last input (runtime/digital.py)
        matrix = weight.reshape(group, cout // group, cin_g, kprod).transpose(0, 3, 2, 1).reshape(group, kprod * cin_g, cout // group)
        channels_in = cin_g * group
    else:
        cin, cout_g = weight.shape[:2]
        if group < 1 or cin % group:
            raise XCompileError(f"{where}: group={group} must divide the {cin} input channels")
        matrix = weight.reshape(group, cin // group, cout_g * kprod)
        cout, channels_in = cout_g * group, cin
        geometry["output_padding"] = [int(p) for p in _attr(node, "output_padding", [0] * rank)]
        geometry["output_shape"] = [int(s) for s in _attr(node, "output_shape", [])]
        geometry["channels_out"] = int(cout)
    if x_shape is not None and len(x_shape) == rank + 2 and isinstance(x_shape[1], int) and x_shape[1] != channels_in:
        raise XCompileError(f"{where}: input has {x_shape[1]} channels, the weight expects {channels_in}")
    if bias is not None and bias.size != cout:
        raise XCompileError(f"{where}: bias has {bias.size} values, expected one per output channel ({cout})")
    return np.ascontiguousarray(matrix, dtype=np.float32), geometry, None if bias is None else bias.reshape(-1).astype(np.float32)


def _layer(index, name, node, kind, geometry, matrix, bias, x) -> Layer:
    return Layer(
        index=index,
        name=name,
        node_name=node.name or "",
        op_type=node.op_type,
        kind=kind,
        geometry=geometry,
        weight=frozen_array(matrix, np.float32),
        bias=frozen_array(bias, np.float32),
        input_name=_vname(x),
        output_name=node.outputs[0].name or "",
        notes={"vectors_per_sample": _vectors_per_sample(kind, geometry, _static_shape(x), _static_shape(node.outputs[0]))},
    )


def _vectors_per_sample(kind, geometry, x_shape, y_shape) -> int | None:
    """Input vectors one sample (batch item) sends through the layer, when shapes say so."""
    if kind == "conv":
        dims = None if y_shape is None else y_shape[2:]
    elif kind == "conv_transpose":
        dims = None if x_shape is None else x_shape[2:]
    elif x_shape is None or geometry["transpose_input"]:
        dims = None
    elif geometry["weight_left"]:
        dims = x_shape[1:-2] + x_shape[-1:] if len(x_shape) > 1 else []
    else:
        dims = x_shape[1:-1]
    if dims is None or any(d is None for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64))


def _replace_with_mvm(graph: ir.Graph, node: ir.Node, layer: Layer, digital_bias) -> None:
    x = next(v for v in node.inputs if v is not None and v.name == layer.input_name)
    mvm = ir.node(MVM_OP, [x], {"layer": layer.index}, domain=CUSTOM_DOMAIN, name=f"xcompile/{layer.name}")
    new_nodes = [mvm]
    result = mvm.outputs[0]
    if digital_bias is not None:  # a Gemm C that is not one bias per output stays an ONNX Add
        c, beta, known = digital_bias
        if beta == 0.0:  # C is not read, only its shape (ONNX Runtime: a NaN in it stays out of Y)
            shape = ir.node("Shape", [c], name=f"xcompile/{layer.name}/bias_shape")
            zeros = ir.node("ConstantOfShape", [shape.outputs[0]], {"value": ir.tensor(np.zeros(1, np.float32))}, name=f"xcompile/{layer.name}/no_bias")
            new_nodes += [shape, zeros]
            c = zeros.outputs[0]
        elif beta != 1.0:
            factor = ir.Value(name=f"{layer.name}/beta", const_value=ir.tensor(np.array(beta, dtype=np.float32)))
            graph.register_initializer(factor)
            scaled = ir.node("Mul", [c, factor], name=f"xcompile/{layer.name}/beta")
            new_nodes.append(scaled)
            c = scaled.outputs[0]
        if not known:  # Add broadcasts both ways, Gemm's C one way: Expand refuses a C that does not
            # broadcast with Y, the Reshape one that grew Y
            shape = ir.node("Shape", [result], name=f"xcompile/{layer.name}/output_shape")
            spread = ir.node("Expand", [c, shape.outputs[0]], name=f"xcompile/{layer.name}/bias_must_broadcast_to_output")
            new_nodes += [shape, spread]
            c = spread.outputs[0]
        add = ir.node("Add", [result, c], name=f"xcompile/{layer.name}/bias")
        new_nodes.append(add)
        result = add.outputs[0]
        if not known:
            fits = ir.node("Reshape", [result, shape.outputs[0]], name=f"xcompile/{layer.name}/bias_must_not_grow_output")
            new_nodes.append(fits)
            result = fits.outputs[0]
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [result])


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return np.asarray(value.const_value.numpy())


def _static_shape(value: ir.Value | None):
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    return list(value) if isinstance(value, (tuple, list)) or hasattr(value, "__iter__") and not isinstance(value, str) else value


def _vname(value: ir.Value | None) -> str:
    return "" if value is None else (value.name or "")


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]
