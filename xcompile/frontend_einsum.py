"""Einsum with one constant operand, and MatMul with a batch of constant matrices, as one MVM layer.

For y = einsum(x, W) the indices of the constant W fall into three kinds: contracted k (in x, not
in y), output n (in y, not in x) and shared g (in x, W and y: a batch of matrices, one per g).
The indices only x has (in y, not in W) number the input vectors. The node becomes

    Transpose(x -> [v..., g..., k...]) -> Reshape([V, G*K]) -> CrossbarMVM -> Reshape([v..., g..., n...]) -> Transpose(-> y)

with the layer's weight per group [G, K, N]: a block-diagonal (grouped) dense layer, so the
zeros between the G matrices never take a tile. The sums are the einsum's own, so ideal mode
equals ONNX Runtime. A MatMul whose constant operand has more than two dimensions is the einsum
of its broadcast ("bmk,bkn->bmn"): a batch dimension of x that is missing shares nothing (its index
is an output index of W), one of size 1 on either side broadcasts. Where x's size of a shared index
is not known, an Expand to the constant's size comes first: a 1 then broadcasts as ONNX says, an
equal size passes, and any other fails in ONNX Runtime as the original node would (never a wrong
grouping by the Reshape). Refused, with the reason (the node stays on ONNX Runtime): repeated indices in one
operand, indices summed in x alone (but for size 1), '...' in the constant operand.
"""

from __future__ import annotations

import string

import numpy as np
import onnx_ir as ir

from xcompile.coverage import Unsupported
from xcompile.frontend_mvm import constant_of as _const
from xcompile.ir import CUSTOM_DOMAIN, MVM_OP, Layer, frozen_array


def batched(node: ir.Node) -> bool:
    """An Einsum, or a MatMul with a constant operand of more than two dimensions."""
    if node.op_type == "Einsum":
        return True
    return node.op_type == "MatMul" and any(_const(v) is not None and _const(v).ndim > 2 for v in node.inputs[:2])


def lower_batched(graph: ir.Graph, node: ir.Node, index: int, name: str) -> Layer | None:
    """Replace `node` by the layer's CrossbarMVM and the reshapes around it; return the layer, or
    None for an Einsum of activations only (it stays digital). Raises Unsupported."""
    operands = list(node.inputs)
    constant = [_const(v) for v in operands]
    if len(operands) != 2 or sum(c is not None for c in constant) != 1:
        if node.op_type == "Einsum" and all(c is None for c in constant):
            return None
        raise Unsupported("xcompile maps an Einsum of two operands, one of them constant")
    w_position = 0 if constant[0] is not None else 1
    weight, x = constant[w_position], operands[1 - w_position]
    x_rank = None if x.shape is None else len(x.shape)
    if node.op_type == "Einsum":
        equation = node.attributes["equation"].value
        terms, output = _parse(equation, x_rank, weight.ndim, w_position)
    else:
        terms, output = _matmul_equation(x, weight, w_position)
    w_terms, x_terms = terms[w_position], terms[1 - w_position]
    weight = _summed(weight, w_terms, set(x_terms) | set(output))
    w_terms = "".join(c for c in w_terms if c in set(x_terms) | set(output))
    shared = [c for c in w_terms if c in x_terms and c in output]
    contracted = [c for c in w_terms if c in x_terms and c not in output]
    produced = [c for c in w_terms if c not in x_terms]
    x_dims = list(x.shape) if x.shape is not None else [None] * len(x_terms)
    ones = [c for c in x_terms if c not in w_terms and c not in output]  # summed alone: only a size 1 (a broadcast) is
    if any(x_dims[x_terms.index(c)] != 1 for c in ones):
        raise Unsupported(f"index '{next(c for c in ones if x_dims[x_terms.index(c)] != 1)}' is summed in the activation operand alone")
    vectors = [c for c in x_terms if c not in w_terms and c in output]
    size = dict(zip(w_terms, weight.shape))
    for c, dim in zip(x_terms, x.shape or ()):
        if c in size and isinstance(dim, int) and dim != size[c]:
            raise Unsupported(f"index '{c}' has size {dim} in the activation and {size[c]} in the constant operand")
    groups = int(np.prod([size[c] for c in shared], dtype=np.int64))
    k = int(np.prod([size[c] for c in contracted], dtype=np.int64))
    n = int(np.prod([size[c] for c in produced], dtype=np.int64))
    matrix = np.transpose(weight, [w_terms.index(c) for c in shared + contracted + produced]).reshape(groups, k, n)

    prefix = f"xcompile/{name}"
    nodes = []

    def add(op: str, inputs: list, attributes: dict | None = None, label: str = "") -> ir.Value:
        made = ir.node(op, inputs, attributes or {}, name=f"{prefix}/{label}")
        made.outputs[0].name = f"{prefix}/{label}"
        nodes.append(made)
        return made.outputs[0]

    def const(label: str, value: np.ndarray) -> ir.Value:
        made = ir.Value(name=f"{prefix}/{label}", const_value=ir.tensor(value))
        graph.register_initializer(made)
        return made

    unknown = [c for c in shared if not isinstance(x_dims[x_terms.index(c)], int)]
    if unknown:  # 1 broadcasts, the constant's size passes, anything else fails as the original node would
        target = np.array([size[c] if c in unknown else 1 for c in x_terms], np.int64)
        x = add("Expand", [x, const("expanded_shape", target)], label="expanded")
    order = ones + vectors + shared + contracted
    moved = add("Transpose", [x], {"perm": [x_terms.index(c) for c in order]}, "inputs_vgk")
    rows = add("Reshape", [moved, const("rows_shape", np.array([-1, groups * k], np.int64))], label="rows")
    mvm = ir.node(MVM_OP, [rows], {"layer": index}, domain=CUSTOM_DOMAIN, name=f"xcompile/{name}")
    mvm.outputs[0].name = f"{prefix}/crossbar"
    nodes.append(mvm)
    tail = np.array([size[c] for c in shared + produced], np.int64)
    if vectors:
        leading = add("Gather", [add("Shape", [moved], label="input_shape"), const("vector_axes", len(ones) + np.arange(len(vectors), dtype=np.int64))], label="vector_shape")
        shape = add("Concat", [leading, const("output_tail", tail)], {"axis": 0}, "output_shape")
    else:
        shape = const("output_shape", tail)
    grouped = add("Reshape", [mvm.outputs[0], shape], label="outputs_vgn")
    produced_order = vectors + shared + produced
    result = add("Transpose", [grouped], {"perm": [produced_order.index(c) for c in output]}, "outputs")
    ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [node.outputs[0]], [result])
    return Layer(
        index=index, name=name, node_name=node.name or "", op_type=node.op_type, kind="dense",
        geometry={"weight_left": False, "transpose_input": False, "squeeze": False},
        weight=frozen_array(matrix, np.float32), bias=None, input_name=rows.name, output_name=mvm.outputs[0].name,
        notes={"vectors_per_sample": None, "einsum": ",".join(terms) + "->" + output},
    )


def _parse(equation: str, x_rank: int | None, w_rank: int, w_position: int) -> tuple[list[str], str]:
    """The operands' index strings and the output's, with '...' spelled out as letters."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if len(terms) != 2 or not all(c.isalpha() or c in ".," for c in inputs + output):
        raise Unsupported(f"equation '{equation}' is not one of two operands with letter indices")
    if "..." in terms[w_position]:
        raise Unsupported(f"equation '{equation}': '...' in the constant operand")
    if "..." in terms[1 - w_position]:
        if x_rank is None:
            raise Unsupported(f"equation '{equation}': the activation's rank is not known, so '...' cannot be spelled out")
        free = [c for c in string.ascii_letters if c not in equation]
        spelled = "".join(free[: x_rank - (len(terms[1 - w_position]) - 3)])
        terms[1 - w_position] = terms[1 - w_position].replace("...", spelled)
        output = output.replace("...", spelled) if arrow else output
    if not arrow:  # implicit output: the indices seen once, in alphabetical order
        letters = terms[0] + terms[1]
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    for term in terms + [output]:
        if len(set(term)) != len(term):
            raise Unsupported(f"equation '{equation}': an index repeats within one operand (a diagonal)")
    if len(terms[w_position]) != w_rank or (x_rank is not None and len(terms[1 - w_position]) != x_rank):
        raise Unsupported(f"equation '{equation}' does not match the operands' ranks")
    if any(c not in terms[0] + terms[1] for c in output):
        raise Unsupported(f"equation '{equation}': an output index is in neither operand")
    return terms, output


def _matmul_equation(x: ir.Value, weight: np.ndarray, w_position: int) -> tuple[list[str], str]:
    """MatMul's broadcast as an einsum: batch dimensions aligned from the right."""
    if x.shape is None or len(x.shape) < 2:
        raise Unsupported(f"the constant operand has shape {list(weight.shape)}, a batch of matrices, and the activation's rank is not known or below 2")
    x_dims = list(x.shape)
    batch = max(len(x_dims), weight.ndim) - 2
    if 2 * batch + 3 > len(string.ascii_letters):  # a letter per batch dimension, a fresh one per broadcast
        raise Unsupported(f"the operands have {batch} batch dimensions; xcompile maps up to {(len(string.ascii_letters) - 3) // 2}")
    letters = iter(string.ascii_letters)
    batch_letters = [next(letters) for _ in range(batch)]
    row, inner, column = next(letters), next(letters), next(letters)
    w_batch, x_batch = batch_letters[batch - (weight.ndim - 2):], batch_letters[batch - (len(x_dims) - 2):]  # lists: a broadcast gets its own letter
    common = min(len(x_batch), len(w_batch))
    for offset in range(1, common + 1):  # aligned batch dimensions; a size 1 broadcasts: its own letter, summed alone
        c, dim, w_dim = x_batch[-offset], x_dims[-2 - offset], weight.shape[-2 - offset]
        if w_dim == 1 and dim != 1:
            w_batch[-offset] = next(letters)
        elif dim == 1 and w_dim != 1:
            x_batch[-offset] = next(letters)
        elif isinstance(dim, int) and dim != w_dim:
            raise Unsupported(f"the activation's batch dimension of size {dim} does not broadcast against the constant's {w_dim}")
    if w_position == 1:  # x[..., m, k] @ W[..., k, n]
        terms = ["".join(x_batch) + row + inner, "".join(w_batch) + inner + column]
    else:  # W[..., m, k] @ x[..., k, n]
        terms = ["".join(w_batch) + row + inner, "".join(x_batch) + inner + column]
    return terms, "".join(batch_letters) + row + column


def _summed(weight: np.ndarray, terms: str, kept: set) -> np.ndarray:
    """The constant with the indices nobody else reads summed out (einsum sums them first)."""
    axes = tuple(i for i, c in enumerate(terms) if c not in kept)
    return weight.sum(axis=axes) if axes else weight
