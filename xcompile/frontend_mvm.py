"""Gemm / MatMul / Conv / ConvTranspose nodes with a constant weight as crossbar layers.

`build_mvm` turns one node into a `Layer`: its weight matrix per group ([groups, K, N]), the
geometry the runtime needs to form input vectors (dense: which operand is the weight, transposes;
conv: kernel, strides, pads, ...), a bias when it is one value per output, and what does not fit
a crossbar as `Unsupported` (the node then stays on ONNX Runtime, frontend.py records why).
`replace_with_mvm` puts the `ai.xcompile::CrossbarMVM` node in its place, with a Gemm's C that is
not a per-output bias kept as ONNX ops after it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from xcompile import checks
from xcompile.coverage import Unsupported
from xcompile.errors import XCompileError
from xcompile.ir import CUSTOM_DOMAIN, MVM_OP, Layer, frozen_array


def build_mvm(node: ir.Node, index: int, name: str) -> tuple[Layer, tuple | None] | None:
    """(layer, digital bias or None) for an MVM node, or None for a product of two activations
    (no constant operand: it stays digital). Raises Unsupported for what a crossbar cannot hold,
    XCompileError for a malformed node."""
    op = node.op_type
    where = f"node '{node.name or name}' ({op})"
    inputs = list(node.inputs) + [None] * 3
    if op in ("Conv", "ConvTranspose"):
        x, w, b = inputs[:3]
        weight = constant_of(w)
        if weight is None:
            raise Unsupported(f"the weight input '{_vname(w)}' is not a constant; a crossbar needs constant weights")
        bias = None
        if b is not None:
            bias = constant_of(b)
            if bias is None:
                raise Unsupported(f"the bias input '{_vname(b)}' is not a constant")
        matrix, geometry, bias = _conv_layer(node, where, weight, bias, _static_shape(x))
        return _layer(index, name, node, "conv" if op == "Conv" else "conv_transpose", geometry, matrix, bias, x), None
    if op == "MatMul":
        a, b = inputs[:2]
        wa, wb = constant_of(a), constant_of(b)
        if wb is not None and wa is None:
            return _dense_from_matmul(node, index, name, wb, a, weight_left=False), None
        if wa is not None and wb is None:
            return _dense_from_matmul(node, index, name, wa, b, weight_left=True), None
        return None
    # Gemm: Y = alpha * A' @ B' + beta * C
    a, b, c = inputs[:3]
    alpha = _attr(node, "alpha", 1.0)
    beta = _attr(node, "beta", 1.0)
    trans_a, trans_b = bool(_attr(node, "transA", 0)), bool(_attr(node, "transB", 0))
    wa, wb = constant_of(a), constant_of(b)
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
        cval = constant_of(c)
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


def _dense_from_matmul(node, index, name, weight, x, weight_left: bool) -> Layer:
    """A 1-D or 2-D constant operand (a batch of matrices is frontend_einsum.py's)."""
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


def replace_with_mvm(graph: ir.Graph, node: ir.Node, layer: Layer, digital_bias) -> None:
    """The node becomes a CrossbarMVM of the layer, then the digital bias (if any) as ONNX ops."""
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


def constant_of(value: ir.Value | None) -> np.ndarray | None:
    """The value of a constant operand (initializer or folded), None for an activation."""
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
    return list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else value


def _vname(value: ir.Value | None) -> str:
    return "" if value is None else (value.name or "")
