"""ONNX front end: load and check a model, fold constant weight subgraphs, and cut out MVM layers.

Every Gemm / MatMul with one constant operand, Conv and ConvTranspose becomes a `Layer` and, in
the runtime graph, one `ai.xcompile::CrossbarMVM` node (frontend_mvm.py); so do the W and R of
LSTM / GRU / RNN (frontend_recurrent.py) and the integer weights of quantised ops (lowered first,
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

import onnx
import onnx.inliner
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import fold_constants

from xcompile.coverage import CONTROL_FLOW, REASON_KEY, WEIGHT_OPERANDS, Unsupported
from xcompile.frontend_einsum import batched, lower_batched
from xcompile.frontend_mvm import build_mvm, replace_with_mvm
from xcompile.frontend_quant import INTEGER_KEY, SOURCE_KEY, lower_quantized, subgraphs
from xcompile.frontend_recurrent import DYNAMIC_LSTM, RECURRENT_OPS, build_recurrent
from xcompile import checks
from xcompile.errors import XCompileError
from xcompile.ir import CUSTOM_DOMAIN, Layer

MIN_OPSET = 9
WEIGHT_OPS = checks.MVM_OPS + RECURRENT_OPS  # ops that become crossbar layers here
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
    """Fold constants, turn every MVM node into a Layer; return (runtime graph, layers, digital ops).
    Model-local functions are inlined first, so that the layers inside them are seen and mapped."""
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
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
        dynamic_lstm = node.domain == "com.microsoft" and node.op_type == DYNAMIC_LSTM
        if not dynamic_lstm and (node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_OPS + ("Einsum",)):
            continue
        name = _unique(node.name or f"{node.op_type}_{position}", names)
        if batched(node):
            try:
                layer = lower_batched(graph, node, len(layers), name)
            except Unsupported as exc:
                node.metadata_props[REASON_KEY] = str(exc)
                continue
            if layer is not None:
                layers.append(layer)
            continue
        if node.op_type in RECURRENT_OPS or dynamic_lstm:
            try:
                recurrent_layers, runtime_node = build_recurrent(node, len(layers), name)
            except Unsupported as exc:
                node.metadata_props[REASON_KEY] = str(exc)
                continue
            layers.extend(recurrent_layers)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [runtime_node], list(node.outputs), list(runtime_node.outputs))
            continue
        try:
            built = build_mvm(node, len(layers), name)
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
        replace_with_mvm(graph, node, layer, digital_bias)


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
            from xcompile.runtime.ort_session import inference_session

            result = inference_session(model.SerializeToString()).run(None, {})[0]
        except Exception:  # left as it is: build_mvm then names the non-constant weight
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
