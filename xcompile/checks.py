"""Checks on ONNX input that cannot be right, made before anything is computed from it.

An ONNX file is untrusted: its size is capped before it is read, its external data is read only
from files inside the model's own folder (never through `..`, an absolute path or a symlink out
of it, and never more bytes than the tensor's shape declares), and a ModelProto given in memory
must carry its data (external references in it would resolve against the working directory).
Weights a crossbar holds must be finite and there must be some; operators and shapes ONNX
Runtime would refuse only when the model runs are refused at compile where they can be seen.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from xcompile.errors import XCompileError

MAX_MODEL_BYTES = (2 << 30) - 1  # protobuf's own limit for one message: larger weights go to external data
MVM_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose")
ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training")
_NIBBLE_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


def read_model(path: Path, where: str) -> onnx.ModelProto:
    """Parse the ONNX file at `path` (a regular file under the size cap) and read its external
    data from the files beside it."""
    if not path.is_file():
        raise XCompileError(f"model file {where} is not a regular file")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise XCompileError(
            f"model file {where} is {size} bytes, over the {MAX_MODEL_BYTES} bytes an ONNX protobuf can hold; "
            "large weights belong in external data files"
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise XCompileError(f"{where} is not a readable ONNX model: {_first_line(exc)}") from None
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise XCompileError(f"{where} is not a readable ONNX model: {_first_line(exc)}") from None
    for tensor, owner in _tensors(model):
        if _is_external(tensor):
            _load_external(tensor, owner, path.parent, where)
    return model


def refuse_external_data(model: onnx.ModelProto, where: str) -> None:
    """A ModelProto in memory has no folder: its external references cannot be resolved safely."""
    for tensor, owner in _tensors(model):
        if _is_external(tensor):
            location = _external_fields(tensor).get("location", "")
            raise XCompileError(
                f"{where}: tensor '{tensor.name}' ({owner}) keeps its data in an external file '{location}'; "
                "a model in memory must hold its data: pass the .onnx path, or load it with onnx.load(path)"
            )


def check_operators(model: onnx.ModelProto, where: str) -> None:
    """Every operator must be one ONNX Runtime can run: ONNX's own (at an opset this onnx knows),
    ONNX Runtime's com.microsoft ones, or a function the model defines. Custom-op libraries are
    not loaded, so their operators would fail only when run."""
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise XCompileError(f"{where} imports ONNX opset {opset.version}; the newest this onnx knows is {newest}")
    functions = {(f.domain, f.name) for f in model.functions}
    for graph in _graphs(model.graph):
        for node in graph.node:
            domain = node.domain or ""
            if (domain, node.op_type) in functions or domain == "com.microsoft":
                continue
            if domain in ONNX_DOMAINS and onnx.defs.has(node.op_type, domain):
                continue
            raise XCompileError(
                f"{where}: node '{node.name}' uses operator '{node.op_type}' of domain '{domain or 'ai.onnx'}', which "
                "neither ONNX nor ONNX Runtime defines (custom-op libraries are not loaded)"
            )


def check_gemm_bias(where: str, bias_shape: list | None, output_shape: tuple) -> bool:
    """Gemm's C must broadcast one way to Y [M, N] (None: a size not known before run time);
    returns whether that is settled, False when it depends on sizes known only at run time."""
    if bias_shape is None:
        return False
    fits = len(bias_shape) <= 2 and all(
        c is None or y is None or c in (1, y) for c, y in zip(reversed(bias_shape), reversed(output_shape))
    )
    if not fits:
        shown = ["?" if d is None else d for d in output_shape]
        raise XCompileError(f"{where}: the bias C has shape {list(bias_shape)}, which does not broadcast to the output's {shown}")
    return all(c == 1 or y is not None for c, y in zip(reversed(bias_shape), reversed(output_shape)))


def check_conv_window(where: str, op_type: str, geometry: dict, x_shape: list | None) -> None:
    """Strides and dilations of at least 1, pads of at least 0; for a Conv no dilation with SAME
    padding (ONNX Runtime, the reference, refuses it) and, when the input's size is known, a
    padded input at least as large as the kernel's span."""
    for key, low in (("strides", 1), ("dilations", 1), ("pads", 0)):
        if any(v < low for v in geometry[key]):
            raise XCompileError(f"{where}: {key} {geometry[key]} must all be >= {low}")
    if op_type == "Conv" and geometry["auto_pad"].startswith("SAME") and any(d != 1 for d in geometry["dilations"]):
        raise XCompileError(f"{where}: auto_pad {geometry['auto_pad']} with dilations {geometry['dilations']}: ONNX Runtime defines a Conv's SAME padding for dilation 1 only")
    if op_type != "Conv" or geometry["auto_pad"] not in ("NOTSET", "VALID") or x_shape is None or len(x_shape) != geometry["rank"] + 2:
        return
    rank, pads = geometry["rank"], geometry["pads"] if geometry["auto_pad"] == "NOTSET" else [0] * (2 * geometry["rank"])
    sizes = x_shape[2:]
    spans = [d * (k - 1) + 1 for k, d in zip(geometry["kernel"], geometry["dilations"])]
    padded = [None if s is None else s + pads[i] + pads[i + rank] for i, s in enumerate(sizes)]
    if any(p is not None and p < span for p, span in zip(padded, spans)):
        raise XCompileError(f"{where}: the kernel spans {spans}, more than the padded input {['?' if p is None else p for p in padded]}")


def check_layer_has_weights(layer) -> None:
    """A Gemm / MatMul / Conv with no weights (K = 0 or N = 0) has nothing to put on a crossbar."""
    if layer.weight.size == 0:
        raise XCompileError(
            f"node '{layer.node_name or layer.name}' ({layer.op_type}): the weight is empty "
            f"({layer.rows_in} inputs x {layer.outputs} outputs); there is nothing to put on a crossbar"
        )


def check_finite_weights(graph: ir.Graph) -> None:
    """Constant operands of the MVM nodes (the weights crossbars would hold) must be finite:
    NaN and infinity have no conductance."""
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in MVM_OPS:
            continue
        for position, value in enumerate(list(node.inputs)[:2]):
            if value is None or value.const_value is None or value.is_graph_input():
                continue
            array = np.asarray(value.const_value.numpy())
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                bad = array[~np.isfinite(array)]
                raise XCompileError(
                    f"node '{node.name}' ({node.op_type}): weight tensor '{value.name}' (input {position}) holds "
                    f"{int(np.isnan(bad).sum())} NaN and {int(np.isinf(bad).sum())} infinite value(s); "
                    "crossbar weights must be finite"
                )


def _tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every TensorProto of the model, with where it sits: initializers, sparse initializers and
    tensor attributes, in the main graph, every subgraph and every function."""
    for graph in _graphs(model.graph):
        yield from ((t, "initializer") for t in graph.initializer)
        for sparse in graph.sparse_initializer:
            yield sparse.values, "sparse initializer"
            yield sparse.indices, "sparse initializer indices"
        for node in graph.node:
            yield from _attribute_tensors(node)
    for function in model.functions:
        for node in function.node:
            for inner in _node_graphs(node):
                for graph in _graphs(inner):
                    yield from ((t, f"initializer in function '{function.name}'") for t in graph.initializer)
                    for n in graph.node:
                        yield from _attribute_tensors(n)
            yield from _attribute_tensors(node)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for inner in _node_graphs(node):
            yield from _graphs(inner)


def _node_graphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    owner = f"attribute of node '{node.name or node.op_type}'"
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t, owner
        yield from ((t, owner) for t in attr.tensors)
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values, owner
            yield attr.sparse_tensor.indices, owner


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def _external_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _load_external(tensor: onnx.TensorProto, owner: str, folder: Path, where: str) -> None:
    """Read a tensor's external data from a file inside `folder`, exactly the bytes its shape
    declares, into the tensor itself."""
    what = f"{where}: tensor '{tensor.name}' ({owner})"
    fields = _external_fields(tensor)
    location = fields.get("location", "")
    if not location:
        raise XCompileError(f"{what} is marked as external data but names no file")
    if any(p.is_absolute() or ".." in p.parts or p.drive for p in (PurePosixPath(location), PureWindowsPath(location))):
        raise XCompileError(
            f"{what}: external data file '{location}' must be a relative path inside the model's folder (no '..', no absolute path)"
        )
    root = folder.resolve()
    file = (folder / location).resolve()
    if not file.is_relative_to(root):
        raise XCompileError(f"{what}: external data file '{location}' leads outside the model's folder (a symlink)")
    if not file.is_file():
        raise XCompileError(f"{what}: external data file '{location}' does not exist beside the model")
    offset, length = (_whole(fields.get(key, "0" if key == "offset" else ""), key, what) for key in ("offset", "length"))
    needed = _data_bytes(tensor, what)
    if length is not None and length != needed:
        raise XCompileError(f"{what}: external data length {length} does not match its shape {list(tensor.dims)} ({needed} bytes)")
    size = file.stat().st_size
    if offset + needed > size:
        raise XCompileError(f"{what}: external data '{location}' holds {size} bytes, the tensor needs {needed} from offset {offset}")
    with open(file, "rb") as handle:
        handle.seek(offset)
        tensor.raw_data = handle.read(needed)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def _whole(text: str, key: str, what: str) -> int | None:
    if text == "":
        return None
    if not text.isdigit():
        raise XCompileError(f"{what}: external data {key} must be a whole number >= 0, got {text!r}")
    return int(text)


def _data_bytes(tensor: onnx.TensorProto, what: str) -> int:
    """Bytes of a tensor's raw data, from its shape and element type."""
    if any(d < 0 for d in tensor.dims):
        raise XCompileError(f"{what} has a negative dimension in its shape {list(tensor.dims)}")
    count = math.prod(tensor.dims)
    if tensor.data_type in _NIBBLE_TYPES:
        return (count + 1) // 2
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 0
    if tensor.data_type == onnx.TensorProto.STRING or itemsize == 0:
        raise XCompileError(f"{what}: element type {tensor.data_type} cannot be stored as external data")
    return count * itemsize


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]
