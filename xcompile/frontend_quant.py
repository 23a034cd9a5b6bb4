"""Quantised ONNX ops lowered to an MVM on integers, with the model's own quantisation kept digital.

`MatMulInteger`, `ConvInteger`, `QLinearMatMul`, `QLinearConv` and ONNX Runtime's
`com.microsoft` `QGemm`, `MatMulIntegerToFloat`, `DynamicQuantizeMatMul` with constant weights
become

    Cast(x, double) - x_zero  ->  MatMul / Conv with weights (w - w_zero)  ->  Round  ->  ...

where the weights are the model's integers (exact in a cell level when the levels hold them) and
the MVM accumulates in double, exact for any int32 sum, like ONNX Runtime's int32 accumulator.
What follows is what ONNX Runtime does after its integer GEMM: Cast to int32, or float(acc) times
the float32 output scale it computes (same operand order), then QuantizeLinear(scale 1, y_zero)
for the round-half-even and saturation of its requantisation. QDQ weights (DequantizeLinear of
constants, per tensor or per axis) are folded to float weights before this (frontend.py).
ONNX Runtime's float fusions `FusedConv`, `FusedGemm`, `FusedMatMul` become the plain op and
their activation. Its fused `Attention` keeps running as itself, on the projected input: the
projection `input @ weights` becomes a MatMul (a crossbar layer) and the Attention node gets
identity weights, through which a float value passes unchanged (x * 1 + 0 * ...), so
`Attention(input @ W, I, bias, ...)` is the original node, with every option it has. Its int8
`QAttention` becomes the integer MVM of its projection, dequantised, and the same float Attention.
`MatMulNBits` (2-, 4- or 8-bit weights with a scale and zero point per block of `block_size` along
K) becomes a float MatMul with the weights dequantised as ONNX Runtime dequantises them: one cell
level cannot hold a scale that changes along a column, so the quantise pass maps the floats.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from xcompile.coverage import PROJECTED_KEY, REASON_KEY, WEIGHT_OPERANDS, Unsupported
from xcompile.frontend_mvm import constant_of as _const

SOURCE_KEY = "xcompile.source_op"  # on the lowered MatMul / Conv: the op it came from
INTEGER_KEY = "xcompile.integer_weights"  # "1" when its weights are the model's integers
MS = "com.microsoft"
QUANTISED = {
    ("", "MatMulInteger"), ("", "ConvInteger"), ("", "QLinearMatMul"), ("", "QLinearConv"),
    (MS, "QGemm"), (MS, "MatMulIntegerToFloat"), (MS, "DynamicQuantizeMatMul"), (MS, "FusedConv"), (MS, "FusedMatMul"),
    (MS, "FusedGemm"), (MS, "Attention"), (MS, "QAttention"), (MS, "MatMulNBits"),
}
_ACTIVATIONS = {"Relu": (), "Tanh": (), "Sigmoid": (), "LeakyRelu": ("alpha",), "HardSigmoid": ("alpha", "beta")}


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The bodies of an If / Loop / Scan (any graph attribute)."""
    found = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            found.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend(attr.value)
    return found


def lower_quantized(graph: ir.Graph) -> None:
    """Rewrite every quantised op with constant weights in place (see the module docstring),
    in `graph` and the bodies of its control-flow nodes."""
    for node in list(graph):
        for body in subgraphs(node):
            lower_quantized(body)
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if (domain, node.op_type) not in QUANTISED:
            continue
        operands = [node.inputs[i] for i in WEIGHT_OPERANDS[(domain, node.op_type)] if i < len(node.inputs)]
        if not any(_from_constants(v) for v in operands):  # activations only (attention scores): nothing to map
            continue
        try:
            new_nodes, outputs = _LOWER[node.op_type](graph, node)
        except Unsupported as exc:
            node.metadata_props[REASON_KEY] = str(exc)
            continue
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, list(node.outputs), outputs)


class _Builder:
    """Appends nodes and constants for one lowered op, named after it."""

    def __init__(self, graph: ir.Graph, node: ir.Node):
        self.graph, self.node, self.nodes = graph, node, []
        self.prefix = f"xcompile/{node.name or node.op_type}"

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=f"{self.prefix}/{name}", const_value=ir.tensor(np.asarray(array)))
        self.graph.register_initializer(value)
        return value

    def add(self, op: str, inputs, attributes=None, **meta) -> ir.Value:
        name = self.node.name if SOURCE_KEY in meta and self.node.name else f"{self.prefix}/{op}_{len(self.nodes)}"
        made = ir.node(op, list(inputs), attributes or {}, name=name)  # the MVM keeps the node's name
        made.metadata_props.update(meta)
        self.nodes.append(made)
        return made.outputs[0]

    def centred(self, x: ir.Value, zero: ir.Value | None) -> ir.Value:
        """x - zero in double (exact for every integer input)."""
        x = self.add("Cast", [x], {"to": ir.DataType.DOUBLE})
        if zero is None:
            return x
        z = _const(zero)
        if z is not None and z.size != 1 or zero.shape is not None and zero.shape.rank() and any(d != 1 for d in zero.shape):
            raise Unsupported("the input zero point is not one value; xcompile lowers per-tensor input zero points")
        zero_d = self.const("x_zero", z.astype(np.float64)) if z is not None else self.add("Cast", [zero], {"to": ir.DataType.DOUBLE})
        return self.add("Sub", [x, zero_d])

    def mvm(self, op: str, inputs, attributes=None) -> ir.Value:
        return self.add(op, inputs, attributes, **{SOURCE_KEY: self.node.op_type, INTEGER_KEY: "1"})


def _from_constants(value: ir.Value | None) -> bool:
    """Whether `value` is a constant or computed from constants only (no graph or outer input)."""
    stack, seen = [value], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.const_value is not None and not current.is_graph_input():
            continue
        producer = current.producer()
        if producer is None:
            return False
        stack.extend(producer.inputs)
    return value is not None


def _inputs(node: ir.Node, count: int) -> list:
    return (list(node.inputs) + [None] * count)[:count]


def _weight(value, what: str = "weight") -> np.ndarray:
    array = _const(value)
    if array is None:
        raise Unsupported(f"the {what} input '{value.name if value is not None else ''}' is not a constant; a crossbar needs constant weights")
    return array


def _zero(value, default=0) -> np.ndarray:
    if value is None:
        return np.array(default)
    array = _const(value)
    if array is None:
        raise Unsupported(f"the weight zero point '{value.name}' is not a constant")
    return array


def _scale(value, what: str) -> np.ndarray:
    array = _const(value)
    if array is None:
        raise Unsupported(f"the {what} '{value.name if value is not None else ''}' is not a constant")
    if array.dtype not in (np.float32, np.float16):
        raise Unsupported(f"the {what} is {array.dtype}; xcompile lowers float32 and float16 scales")
    return array.astype(np.float32)  # exact; ONNX Runtime computes its output scale in float32


def _output_scale(*factors: np.ndarray, divide: np.ndarray | None = None) -> np.ndarray:
    """ONNX Runtime's float32 output scale: the product left to right, then / y_scale."""
    result = np.float32(1) * factors[0].astype(np.float32)
    for factor in factors[1:]:
        result = (result * factor.astype(np.float32)).astype(np.float32)
    if divide is not None:
        result = (result / divide.astype(np.float32)).astype(np.float32)
    return result


def _per_column(zero: np.ndarray, n: int, what: str) -> np.ndarray:
    if zero.size not in (1, n) or zero.ndim > 1:
        raise Unsupported(f"the {what} has shape {list(zero.shape)}; xcompile lowers one per tensor or one per output column ({n})")
    return zero.reshape(-1).astype(np.float64)


def _finish(b: _Builder, acc: ir.Value, scale, y_zero: ir.Value | None, bias: ir.Value | None = None):
    """Round the exact accumulator; then int32, or float32 x scale (+ float bias), or requantised."""
    acc = b.add("Floor", [b.add("Add", [acc, b.const("half", np.array(0.5))])])  # Round needs opset 11
    if scale is None:
        return b.nodes, [b.add("Cast", [acc], {"to": ir.DataType.INT32})]
    scaled = b.add("Mul", [b.add("Cast", [acc], {"to": ir.DataType.FLOAT}), scale if isinstance(scale, ir.Value) else b.const("scale", scale)])
    if bias is not None:
        scaled = b.add("Add", [scaled, bias])
    if y_zero is None:
        return b.nodes, [scaled]
    return b.nodes, [b.add("QuantizeLinear", [scaled, b.const("unit", np.array(1.0, np.float32)), y_zero])]


def _matmul_weight(b_int: np.ndarray, b_zero: np.ndarray) -> np.ndarray:
    if b_int.ndim != 2:
        raise Unsupported(f"the constant operand has shape {list(b_int.shape)}; xcompile lowers 2-D integer weights")
    return b_int.astype(np.float64) - _per_column(b_zero, b_int.shape[1], "weight zero point")


def _matmul_integer(graph, node):
    a, bw, a_zero, b_zero = _inputs(node, 4)
    weight = _matmul_weight(_weight(bw), _zero(b_zero))
    b = _Builder(graph, node)
    return _finish(b, b.mvm("MatMul", [b.centred(a, a_zero), b.const("weight", weight)]), None, None)


def _conv_weight(w_int: np.ndarray, w_zero: np.ndarray) -> np.ndarray:
    if w_zero.size not in (1, w_int.shape[0]):
        raise Unsupported(f"the weight zero point has {w_zero.size} values; expected 1 or one per output channel ({w_int.shape[0]})")
    return w_int.astype(np.float64) - w_zero.reshape((-1,) + (1,) * (w_int.ndim - 1)).astype(np.float64)


def _conv_attributes(node: ir.Node) -> dict:
    return {k: v for k, v in node.attributes.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}


def _conv_integer(graph, node):
    x, w, x_zero, w_zero = _inputs(node, 4)
    weight = _conv_weight(_weight(w), _zero(w_zero))
    b = _Builder(graph, node)
    return _finish(b, b.mvm("Conv", [b.centred(x, x_zero), b.const("weight", weight)], _conv_attributes(node)), None, None)


def _qlinear_matmul(graph, node):
    a, a_scale, a_zero, bw, b_scale, b_zero, y_scale, y_zero = _inputs(node, 8)
    weight = _matmul_weight(_weight(bw), _zero(b_zero))
    n = weight.shape[1]
    scale = _output_scale(_scale(a_scale, "input scale").reshape(-1), _per_column(_scale(b_scale, "weight scale"), n, "weight scale").astype(np.float32),
                          divide=_scale(y_scale, "output scale").reshape(-1))
    b = _Builder(graph, node)
    return _finish(b, b.mvm("MatMul", [b.centred(a, a_zero), b.const("weight", weight)]), scale, y_zero)


def _qlinear_conv(graph, node):
    x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero, bias = _inputs(node, 9)
    w_int = _weight(w)
    weight = _conv_weight(w_int, _zero(w_zero))
    channels = w_int.shape[0]
    w_scale_value = _scale(w_scale, "weight scale").reshape(-1)
    if w_scale_value.size not in (1, channels):
        raise Unsupported(f"the weight scale has {w_scale_value.size} values; expected 1 or {channels}")
    scale = _output_scale(_scale(x_scale, "input scale").reshape(-1), w_scale_value, divide=_scale(y_scale, "output scale").reshape(-1))
    b = _Builder(graph, node)
    inputs = [b.centred(x, x_zero), b.const("weight", weight)]
    if bias is not None:
        inputs.append(b.const("bias", _weight(bias, "bias").astype(np.float64)))
    acc = b.mvm("Conv", inputs, _conv_attributes(node))
    return _finish(b, acc, scale.reshape((-1,) + (1,) * (w_int.ndim - 2)), y_zero)


def _qgemm(graph, node):
    a, a_scale, a_zero, bw, b_scale, b_zero, c, y_scale, y_zero = _inputs(node, 9)
    alpha = node.attributes.get("alpha")
    alpha = np.float32(1.0 if alpha is None else alpha.value)
    trans_a, trans_b = (bool(node.attributes[k].value) if k in node.attributes else False for k in ("transA", "transB"))
    b_int = _weight(bw)
    if b_int.ndim != 2:
        raise Unsupported(f"the constant operand has shape {list(b_int.shape)}; expected 2-D")
    b_int = b_int.T if trans_b else b_int
    weight = _matmul_weight(b_int, _zero(b_zero))
    n = weight.shape[1]
    b_scale_value = _per_column(_scale(b_scale, "weight scale"), n, "weight scale").astype(np.float32)
    scale = _output_scale(np.array([alpha]), _scale(a_scale, "input scale").reshape(-1), b_scale_value,
                          divide=None if y_scale is None else _scale(y_scale, "output scale").reshape(-1))
    b = _Builder(graph, node)
    x = b.centred(a, a_zero)
    if trans_a:
        x = b.add("Transpose", [x], {"perm": [1, 0]})
    acc = b.mvm("MatMul", [x, b.const("weight", weight)])
    if c is not None:
        acc = b.add("Add", [acc, b.add("Cast", [c], {"to": ir.DataType.DOUBLE})])
    return _finish(b, acc, scale, y_zero)


def _matmul_integer_to_float(graph, node):
    a, bw, a_scale, b_scale, a_zero, b_zero, bias = _inputs(node, 7)
    weight = _matmul_weight(_weight(bw), _zero(b_zero))
    b = _Builder(graph, node)
    b_scale_value = _per_column(_scale(b_scale, "weight scale"), weight.shape[1], "weight scale").astype(np.float32)
    scale = b.add("Mul", [a_scale, b.const("b_scale", b_scale_value)])
    acc = b.mvm("MatMul", [b.centred(a, a_zero), b.const("weight", weight)])
    return _finish(b, acc, scale, None, bias)


def _dynamic_quantize_matmul(graph, node):
    a, bw, b_scale, b_zero, bias = _inputs(node, 5)
    weight = _matmul_weight(_weight(bw), _zero(b_zero))
    b = _Builder(graph, node)
    quantised = ir.node("DynamicQuantizeLinear", [a], name=f"{b.prefix}/DynamicQuantizeLinear", num_outputs=3)
    b.nodes.append(quantised)
    aq, a_scale, a_zero = quantised.outputs
    b_scale_value = _per_column(_scale(b_scale, "weight scale"), weight.shape[1], "weight scale").astype(np.float32)
    scale = b.add("Mul", [a_scale, b.const("b_scale", b_scale_value)])
    acc = b.mvm("MatMul", [b.centred(aq, a_zero), b.const("weight", weight)])
    return _finish(b, acc, scale, None, bias)


def _fused_conv(graph, node):
    x, w, bias, z = _inputs(node, 4)
    _weight(w)
    activation = node.attributes.get("activation")
    activation = "" if activation is None else activation.value
    params = list(node.attributes["activation_params"].value) if "activation_params" in node.attributes else []
    if activation and activation not in _ACTIVATIONS and activation != "Clip":
        raise Unsupported(f"activation '{activation}' of FusedConv is not one xcompile lowers")
    b = _Builder(graph, node)
    y = b.add("Conv", [x, w] + ([bias] if bias is not None else []), _conv_attributes(node), **{SOURCE_KEY: "FusedConv"})
    if z is not None:
        y = b.add("Add", [y, z])
    if activation == "Clip":
        low, high = (params + [float("-inf"), float("inf")])[:2] if params else (float("-inf"), float("inf"))
        y = b.add("Clip", [y, b.const("min", np.array(low, np.float32)), b.const("max", np.array(high, np.float32))])
    elif activation:
        y = b.add(activation, [y], dict(zip(_ACTIVATIONS[activation], params)))
    return b.nodes, [y]


def _fused_gemm(graph, node):
    attrs = {k: v.value for k, v in node.attributes.items()}
    activation = attrs.get("activation", "")
    if activation and activation not in _ACTIVATIONS:
        raise Unsupported(f"activation '{activation}' of FusedGemm is not one xcompile lowers")
    b = _Builder(graph, node)
    gemm = {k: attrs[k] for k in ("alpha", "beta", "transA", "transB") if k in attrs}
    y = b.add("Gemm", [v for v in node.inputs], gemm, **{SOURCE_KEY: "FusedGemm"})
    if activation:
        params = {name: attrs[f"activation_{name}"] for name in _ACTIVATIONS[activation] if f"activation_{name}" in attrs}
        y = b.add(activation, [y], params)
    return b.nodes, [y]


def _fused_matmul(graph, node):
    a, bw = _inputs(node, 2)
    weight = _weight(bw).astype(np.float32)
    attrs = {k: v.value for k, v in node.attributes.items()}
    if attrs.get("transBatchA") or attrs.get("transBatchB") or weight.ndim != 2:
        raise Unsupported("batch transposes or a constant operand that is not 2-D are not lowered")
    if attrs.get("transB"):
        weight = weight.T
    weight = weight * np.float32(attrs.get("alpha", 1.0))
    b = _Builder(graph, node)
    if attrs.get("transA"):
        rank = a.shape.rank() if a.shape is not None else None
        if rank is None:
            raise Unsupported("transA needs the input's rank")
        a = b.add("Transpose", [a], {"perm": list(range(rank - 2)) + [rank - 1, rank - 2]})
    return b.nodes, [b.add("MatMul", [a, b.const("weight", weight)], **{SOURCE_KEY: "FusedMatMul"})]


def _attention(graph, node):
    x, w = _inputs(node, 2)
    weight = _weight(w)
    if weight.ndim != 2 or weight.dtype != np.float32:
        raise Unsupported(f"the weights have shape {list(weight.shape)} and type {weight.dtype}; xcompile lowers 2-D float32 Attention weights")
    b = _Builder(graph, node)
    qkv = b.add("MatMul", [x, b.const("weights", weight)], **{SOURCE_KEY: "Attention"})
    return b.nodes, _projected_attention(b, node, qkv, weight.shape[1], list(node.inputs)[2:])


def _qattention(graph, node):
    x, w, bias, x_scale, w_scale, mask, x_zero, w_zero, past = _inputs(node, 9)
    if x_scale is None or bias is None:
        raise Unsupported("QAttention without its input scale or bias is not one xcompile lowers")
    weight = _matmul_weight(_weight(w), _zero(w_zero))
    b = _Builder(graph, node)
    w_scale_value = _per_column(_scale(w_scale, "weight scale"), weight.shape[1], "weight scale").astype(np.float32)
    acc = b.mvm("MatMul", [b.centred(x, x_zero), b.const("weight", weight)])
    qkv = _finish(b, acc, b.add("Mul", [x_scale, b.const("w_scale", w_scale_value)]), None)[1][0]
    return b.nodes, _projected_attention(b, node, qkv, weight.shape[1], [bias, mask, past])


def _projected_attention(b: "_Builder", node, qkv: ir.Value, width: int, rest: list) -> list:
    """An ORT Attention on the already projected input: identity weights, the node's other inputs
    and attributes; xcompile's identity is marked so that coverage does not count it."""
    while rest and rest[-1] is None:
        rest = rest[:-1]
    identity = b.const("identity_weights", np.eye(width, dtype=np.float32))
    attention = ir.node("Attention", [qkv, identity] + rest, {a.name: a for a in node.attributes.values()},
                        domain=MS, num_outputs=len(node.outputs), name=f"{b.prefix}/attention")
    attention.metadata_props[PROJECTED_KEY] = "1"
    b.nodes.append(attention)
    return list(attention.outputs)


def _matmul_nbits(graph, node):
    a, packed, scales, zeros, g_idx, bias = _inputs(node, 6)
    attrs = {k: v.value for k, v in node.attributes.items()}
    k, n, bits, block = (int(attrs.get(key, 0)) for key in ("K", "N", "bits", "block_size"))
    if g_idx is not None:
        raise Unsupported("a g_idx input (act-order) is not lowered")
    if a.dtype is not None and a.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        raise Unsupported(f"input A is {a.dtype.name}; MatMulNBits takes float or float16")
    if bits not in (2, 4, 8) or block < 16 or block & (block - 1) or k < 1 or n < 1:
        raise Unsupported(f"bits {bits}, block_size {block}, K {k}, N {n}: xcompile lowers 2, 4 or 8 bits in blocks of a power of 2 >= 16 along K")
    blocks = -(-k // block)
    q = _weight(packed)
    scale = _weight(scales, "scales")
    if q.dtype != np.uint8 or q.shape != (n, blocks, block * bits // 8) or scale.size != n * blocks or scale.dtype not in (np.float32, np.float16):
        raise Unsupported(f"B {q.dtype} {list(q.shape)} and scales {scale.dtype} {list(scale.shape)} do not hold N x ceil(K / block_size) = {n} x {blocks} blocks of {bits}-bit weights")
    scale = scale.reshape(n, blocks)
    if zeros is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    else:
        zero = _zero(zeros)
        if zero.dtype == np.uint8 and zero.size == n * (-(-blocks * bits // 8)):
            zero = _unpacked(zero.reshape(n, -1), bits)[:, :blocks].astype(np.float32)
        elif zero.dtype == scale.dtype and zero.size == n * blocks:
            zero = zero.reshape(n, blocks).astype(np.float32)
        else:
            raise Unsupported(f"zero points {zero.dtype} {list(zero.shape)} are neither packed {bits}-bit nor one per block in the scales' type")
    per_k = np.arange(k) // block
    weight = (_unpacked(q.reshape(n, -1), bits)[:, :k].astype(np.float32) - zero[:, per_k]) * scale[:, per_k].astype(np.float32)
    b = _Builder(graph, node)
    y = b.add("MatMul", [a, b.const("weight", weight.T.astype(scale.dtype))], **{SOURCE_KEY: "MatMulNBits"})
    return b.nodes, [b.add("Add", [y, bias]) if bias is not None else y]


def _unpacked(packed: np.ndarray, bits: int) -> np.ndarray:
    """Each byte's values, lowest bits first, along the last axis."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((packed[..., None] >> shifts) & np.uint8(2**bits - 1)).reshape(*packed.shape[:-1], -1)


_LOWER = {
    "MatMulInteger": _matmul_integer, "ConvInteger": _conv_integer, "QLinearMatMul": _qlinear_matmul,
    "QLinearConv": _qlinear_conv, "QGemm": _qgemm, "MatMulIntegerToFloat": _matmul_integer_to_float,
    "DynamicQuantizeMatMul": _dynamic_quantize_matmul, "FusedConv": _fused_conv, "FusedMatMul": _fused_matmul,
    "FusedGemm": _fused_gemm, "Attention": _attention, "QAttention": _qattention, "MatMulNBits": _matmul_nbits,
}
