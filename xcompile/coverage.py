"""Coverage: which share of the model's weights sits on crossbars, and which weight-bearing ops
stayed digital and why.

Read from the runtime graph itself: every node that multiplies an activation by constant weights
and was not turned into a crossbar layer is listed with the reason the front end recorded on it
(node metadata `xcompile.left_digital`), including such nodes inside If / Loop / Scan bodies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from xcompile.ir import Program

REASON_KEY = "xcompile.left_digital"
PROJECTED_KEY = "xcompile.projected"  # an Attention whose projection xcompile moved onto crossbars: identity weights

# op type -> positions of its weight operands (an op bears weights when one of them is a constant)
WEIGHT_OPERANDS: dict[tuple[str, str], tuple[int, ...]] = {
    **{("", op): positions for op, positions in {
        "Gemm": (0, 1), "MatMul": (0, 1), "Conv": (1,), "ConvTranspose": (1,), "Einsum": (0, 1, 2),
        "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2),
        "MatMulInteger": (0, 1), "ConvInteger": (1,), "QLinearMatMul": (0, 3), "QLinearConv": (3,),
    }.items()},
    **{("com.microsoft", op): positions for op, positions in {
        "DynamicQuantizeMatMul": (1,), "MatMulIntegerToFloat": (0, 1), "QGemm": (0, 3), "FusedConv": (1,),
        "FusedMatMul": (0, 1), "DynamicQuantizeLSTM": (1, 2), "Attention": (1,), "QAttention": (1,),
        "QLinearConv": (3,), "NhwcConv": (1,), "QLinearMatMul": (0, 3), "FusedGemm": (0, 1),
        "GemmFastGelu": (1,), "MatMulNBits": (1,), "MatMulBnb4": (1,), "DecoderAttention": (4,),
    }.items()},
}
CONTROL_FLOW = ("If", "Loop", "Scan")
PACKED = ("MatMulNBits", "MatMulBnb4")  # several weights per stored element: K x N counted from the attributes


class Unsupported(Exception):
    """A weight-bearing node xcompile cannot map: it stays on ONNX Runtime, the message says why."""


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def left_digital(graph: onnx.GraphProto) -> list[dict[str, Any]]:
    """Weight-bearing nodes left to ONNX Runtime: node, op_type, weights (constant elements), reason."""
    return _scan(graph, _constants(graph, {}), where="")


def _constants(graph: onnx.GraphProto, outer: dict[str, int]) -> dict[str, int]:
    """Names of constant values visible in `graph` -> element count."""
    sizes = dict(outer)
    for init in graph.initializer:
        sizes[init.name] = int(np.prod(init.dims, dtype=np.int64))
    for node in graph.node:
        if node.op_type == "Constant" and _domain(node) == "":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            sizes[node.output[0]] = 1 if value is None else int(np.prod(value.dims, dtype=np.int64))
    return sizes


def _scan(graph: onnx.GraphProto, constants: dict[str, int], where: str) -> list[dict[str, Any]]:
    found = []
    producers = {o: node for node in graph.node for o in node.output if o}
    for position, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{position}"
        operands = WEIGHT_OPERANDS.get((_domain(node), node.op_type))
        if operands is not None and not _projected(node, graph):
            weights = sum(_constant_size(node.input[i], constants, producers) for i in operands if i < len(node.input) and node.input[i])
            if weights and node.op_type in PACKED:
                sizes = {a.name: a.i for a in node.attribute if a.name in ("K", "N")}
                weights = sizes.get("K", 0) * sizes.get("N", 0) or weights
            reason = _reason(node)
            if weights or reason:
                found.append({
                    "node": where + name,
                    "op_type": node.op_type if not _domain(node) else f"{node.domain}::{node.op_type}",
                    "weights": weights,
                    "reason": reason or _default_reason(node, operands, constants),
                })
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                inner = _scan(body, _constants(body, constants), f"{where}{name}/{attr.name}/")
                for entry in inner:
                    if node.op_type not in CONTROL_FLOW:
                        entry["reason"] = f"inside the {node.op_type} body '{attr.name}': xcompile maps layers in If / Loop / Scan bodies only"
                found.extend(inner)
    return found


def _projected(node: onnx.NodeProto, graph: onnx.GraphProto) -> bool:
    """An Attention whose projection xcompile moved onto crossbars: marked so, with an identity
    of its own as weights. The mark alone is not believed: a crafted file could hide weights."""
    if not any(p.key == PROJECTED_KEY for p in node.metadata_props) or len(node.input) < 2:
        return False
    weights = next((init for init in graph.initializer if init.name == node.input[1]), None)
    if weights is None or len(weights.dims) != 2 or weights.dims[0] != weights.dims[1] or weights.data_location != onnx.TensorProto.DEFAULT:
        return False
    array = numpy_helper.to_array(weights)
    return array.dtype == np.float32 and np.array_equal(array, np.eye(array.shape[0], dtype=np.float32))


def _constant_size(name: str, constants: dict[str, int], producers: dict) -> int:
    """Elements of the constants `name` is computed from (0 if it depends on an input)."""
    total, stack, seen = 0, [name], set()
    while stack:
        current = stack.pop()
        if current in seen or not current:
            continue
        seen.add(current)
        if current in constants:
            total += constants[current]
        elif current in producers:
            stack.extend(producers[current].input)
        else:  # a graph input or an outer-scope activation
            return 0
    return total


def _reason(node: onnx.NodeProto) -> str:
    return next((p.value for p in node.metadata_props if p.key == REASON_KEY), "")


def _default_reason(node: onnx.NodeProto, operands, constants) -> str:
    if node.op_type in ("MatMul", "Gemm", "Einsum") and all(
        i >= len(node.input) or node.input[i] in constants for i in operands
    ):
        return "all operands are constants (ONNX Runtime computes it once)"
    return f"xcompile does not map {node.op_type} onto crossbars"




def coverage(program: Program) -> dict[str, Any]:
    """Weight elements on crossbars vs. left digital, and the list of what stayed digital."""
    mapped = int(sum(layer.weight.size for layer in program.layers))
    left = left_digital(program.graph.graph)
    digital = int(sum(entry["weights"] for entry in left))
    total = mapped + digital
    return {
        "weights_on_crossbars": mapped,
        "weights_digital": digital,
        "fraction_on_crossbars": round(mapped / total, 6) if total else None,
        "left_digital": left,
    }


def describe(info: dict[str, Any]) -> str:
    """One line: the share of weights on crossbars (and how many weight-bearing ops stayed digital)."""
    fraction = info["fraction_on_crossbars"]
    if fraction is None:
        return "no weights to map"
    text = f"{fraction:.1%} of weights on crossbars"
    if info["left_digital"]:
        text += f", {len(info['left_digital'])} weight-bearing op(s) left digital"
    return text
