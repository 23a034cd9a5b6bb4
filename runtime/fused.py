"""Ideal hardware as one ONNX Runtime graph: every MVM node back as a standard ONNX operator.

With every non-ideality off, a programmed layer is linear in its input: one effective matrix per
group (the cells' levels recombined and scaled, runtime/programming.py). A convolution on such
crossbars is then a convolution with the effective weights, and a Gemm / MatMul a MatMul. Putting
those operators back in place of the CrossbarMVM nodes lets ONNX Runtime run the whole model in
one session, with its own Conv kernels (no im2col in numpy, no Python per node), so an ideal
Session costs what the original model costs. The weights are those the cells hold — quantised,
remapped, stale where a schedule left cells stale — so the answer equals the step-by-step path to
float rounding (tests/test_runtime.py compares the two).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from xcompile.ir import CUSTOM_DOMAIN, MVM_OP, Layer


def fused_model(model: onnx.ModelProto, layers: dict[int, tuple[Layer, np.ndarray, np.ndarray | None]]) -> onnx.ModelProto | None:
    """`model` with each CrossbarMVM node replaced by ONNX operators, or None where one cannot be.

    layers: index -> (layer, effective weights [groups, Kg, Ng] in crossbar order, bias [N] or None).
    """
    if any(_has_custom_node(g) for node in model.graph.node for a in node.attribute for g in _subgraphs(a)):
        return None  # crossbar layers inside control flow run step by step
    nodes, initializers = [], []
    for node in model.graph.node:
        if node.domain != CUSTOM_DOMAIN:
            nodes.append(node)
            continue
        index = next((a.i for a in node.attribute if a.name == "layer"), None)
        if node.op_type != MVM_OP or index not in layers:
            return None
        layer, weights, bias = layers[index]
        weights = _layer_order(layer, weights)
        if weights is None:
            return None
        replacement = _operators(layer, weights, bias, node.input[0], node.output[0], f"{layer.name}/fused")
        if replacement is None:
            return None
        nodes.extend(replacement[0])
        initializers.extend(replacement[1])
    graph = helper.make_graph(
        nodes, model.graph.name, model.graph.input, model.graph.output, [*model.graph.initializer, *initializers],
        value_info=model.graph.value_info,
    )
    opsets = [o for o in model.opset_import if o.domain != CUSTOM_DOMAIN]
    fused = helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    fused.functions.extend(model.functions)
    return fused


def _subgraphs(attribute: onnx.AttributeProto) -> list[onnx.GraphProto]:
    return [attribute.g] if attribute.HasField("g") else list(attribute.graphs)


def _has_custom_node(graph: onnx.GraphProto) -> bool:
    return any(
        node.domain == CUSTOM_DOMAIN or any(_has_custom_node(g) for a in node.attribute for g in _subgraphs(a))
        for node in graph.node
    )


def _layer_order(layer: Layer, weights: np.ndarray) -> np.ndarray | None:
    """Effective weights in the layer's own input and output order (None if a permutation
    crosses groups, which no standard operator can express)."""
    groups, kg, ng = weights.shape
    out = np.array(weights, dtype=np.float32)
    for order, axis, size in ((layer.input_order, 1, kg), (layer.output_order, 2, ng)):
        if order is None:
            continue
        order = np.asarray(order).reshape(groups, size)
        local = order - (np.arange(groups) * size)[:, None]
        if (local < 0).any() or (local >= size).any():
            return None
        placed = np.empty_like(out)
        for g in range(groups):
            if axis == 1:
                placed[g][local[g], :] = out[g]
            else:
                placed[g][:, local[g]] = out[g]
        out = placed
    return out


def _operators(layer: Layer, weights: np.ndarray, bias, x: str, y: str, prefix: str):
    """(nodes, initializers) computing the layer's output `y` from its input `x`."""
    geometry = layer.geometry
    inits = []

    def constant(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), f"{prefix}/{name}"))
        return f"{prefix}/{name}"

    groups, kg, ng = weights.shape
    if layer.kind == "conv":
        kernel = list(geometry["kernel"])
        k = int(np.prod(kernel))
        w = weights.reshape(groups, k, kg // k, ng).transpose(0, 3, 2, 1).reshape(groups * ng, kg // k, *kernel)
        inputs = [x, constant("W", w)] + ([constant("B", bias)] if bias is not None else [])
        return [helper.make_node("Conv", inputs, [y], name=prefix, **_conv_attributes(geometry))], inits
    if layer.kind == "conv_transpose":
        kernel = list(geometry["kernel"])
        cout_g = ng // int(np.prod(kernel))
        w = weights.reshape(groups * kg, cout_g, *kernel)
        attributes = _conv_attributes(geometry)
        attributes["output_padding"] = geometry["output_padding"]
        if geometry["output_shape"]:
            attributes["output_shape"] = geometry["output_shape"]
        inputs = [x, constant("W", w)] + ([constant("B", bias)] if bias is not None else [])
        return [helper.make_node("ConvTranspose", inputs, [y], name=prefix, **attributes)], inits
    if layer.kind != "dense":
        return None
    if groups != 1:  # a batch of matrices (frontend_einsum.py): rows [V, G*Kg] -> [V, G*Ng]
        if geometry["transpose_input"] or geometry["weight_left"] or geometry["squeeze"]:
            return None
        return _grouped_dense(weights, bias, x, y, prefix, constant, inits)
    nodes = []
    if geometry["transpose_input"]:
        nodes.append(helper.make_node("Transpose", [x], [f"{prefix}/xT"], name=f"{prefix}/transpose", perm=[1, 0]))
        x = f"{prefix}/xT"
    w = weights[0]  # [K, N]
    product = f"{prefix}/product" if bias is not None else y
    if geometry["squeeze"]:
        operands = [x, constant("W", w[:, 0])] if not geometry["weight_left"] else [constant("W", w[:, 0]), x]
    elif geometry["weight_left"]:  # Y[..., N, M] = W^T[N, K] @ X[..., K, M]
        operands = [constant("W", w.T), x]
    else:
        operands = [x, constant("W", w)]
    nodes.append(helper.make_node("MatMul", operands, [product], name=f"{prefix}/matmul"))
    if bias is not None:
        shaped = bias.reshape(-1, 1) if geometry["weight_left"] and not geometry["squeeze"] else bias
        nodes.append(helper.make_node("Add", [product, constant("B", shaped)], [y], name=f"{prefix}/bias"))
    return nodes, inits


def _grouped_dense(weights: np.ndarray, bias, x: str, y: str, prefix: str, constant, inits: list):
    """Block-diagonal weights [G, Kg, Ng] as one batched MatMul over the groups."""
    groups, kg, ng = weights.shape

    def shape(name: str, dims: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.array(dims, dtype=np.int64), f"{prefix}/{name}"))
        return f"{prefix}/{name}"

    product = f"{prefix}/product" if bias is not None else y
    nodes = [
        helper.make_node("Reshape", [x, shape("groups_in", [-1, groups, kg])], [f"{prefix}/vgk"], name=f"{prefix}/split_groups"),
        helper.make_node("Transpose", [f"{prefix}/vgk"], [f"{prefix}/gvk"], name=f"{prefix}/groups_first", perm=[1, 0, 2]),
        helper.make_node("MatMul", [f"{prefix}/gvk", constant("W", weights)], [f"{prefix}/gvn"], name=f"{prefix}/matmul"),
        helper.make_node("Transpose", [f"{prefix}/gvn"], [f"{prefix}/vgn"], name=f"{prefix}/vectors_first", perm=[1, 0, 2]),
        helper.make_node("Reshape", [f"{prefix}/vgn", shape("groups_out", [-1, groups * ng])], [product], name=f"{prefix}/join_groups"),
    ]
    if bias is not None:
        nodes.append(helper.make_node("Add", [product, constant("B", bias)], [y], name=f"{prefix}/bias"))
    return nodes, inits


def _conv_attributes(geometry: dict) -> dict:
    attributes = {
        "kernel_shape": list(geometry["kernel"]),
        "strides": list(geometry["strides"]),
        "dilations": list(geometry["dilations"]),
        "group": int(geometry["group"]),
    }
    if geometry["auto_pad"] in ("", "NOTSET"):
        attributes["pads"] = list(geometry["pads"])
    else:
        attributes["auto_pad"] = geometry["auto_pad"]
    return attributes
