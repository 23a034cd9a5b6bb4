"""ONNX Runtime's MatMulNBits (weights of 2, 4 or 8 bits with a scale and zero point per block along
K, what its weight-only quantiser writes for language models): mapped with the weights ONNX Runtime
dequantises, equal to it in ideal mode; malformed variants named and left on ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import assume, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import xcompile
from builders import tensor

DATA = Path(__file__).resolve().parent / "data"


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Rows of small unsigned integers into bytes, first value in the lowest bits (ONNX Runtime's order)."""
    per = 8 // bits
    padded = np.zeros((values.shape[0], -(-values.shape[1] // per) * per), np.uint8)
    padded[:, : values.shape[1]] = values
    grouped = padded.reshape(values.shape[0], -1, per).astype(np.uint16)
    return (grouped << (np.arange(per) * bits)).sum(axis=-1).astype(np.uint8)


def _nbits_model(k, n, bits, block, zeros, bias, seed):
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    q = rng.integers(0, 2**bits, size=(n, blocks * block), dtype=np.uint8)
    inits = [
        numpy_helper.from_array(_pack(q, bits).reshape(n, blocks, block * bits // 8), "b"),
        numpy_helper.from_array(rng.uniform(0.01, 0.2, size=n * blocks).astype(np.float32), "scales"),
    ]
    inputs = ["x", "b", "scales"]
    if zeros == "packed":
        inits.append(numpy_helper.from_array(_pack(rng.integers(0, 2**bits, size=(n, blocks), dtype=np.uint8), bits), "zeros"))
    elif zeros == "float":
        inits.append(numpy_helper.from_array(rng.uniform(0, 2**bits - 1, size=n * blocks).astype(np.float32), "zeros"))
    inputs.append("zeros" if zeros != "none" else "")
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=n).astype(np.float32), "bias"))
        inputs += ["", "bias"]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", name="nbits", K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph([node], "nbits", [tensor("x", ["B", "M", k])], [tensor("y", ["B", "M", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _equal_to_onnxruntime(m: onnx.ModelProto, mapping, x: np.ndarray) -> None:
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for fused in (True, False):
        session = xcompile.Session(mapping)
        session._fused = fused
        got = session.run(None, {"x": x})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 80), n=st.integers(1, 12), bits=st.sampled_from([2, 4, 8]), block=st.sampled_from([16, 32, 64]),
    zeros=st.sampled_from(["none", "packed", "float"]), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_matmul_nbits_maps_every_weight_and_equals_onnxruntime(k, n, bits, block, zeros, bias, seed):
    assume(not (bits == 8 and zeros == "float"))  # no ONNX Runtime CPU kernel to compare with
    m = _nbits_model(k, n, bits, block, zeros, bias, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left digital
        mapping = xcompile.compile_model(m, ideal=True, progress=False)
    coverage = mapping.summary()["coverage"]
    assert coverage["fraction_on_crossbars"] == 1.0 and coverage["weights_on_crossbars"] == k * n
    _equal_to_onnxruntime(m, mapping, np.random.default_rng(seed + 1).normal(size=(2, 3, k)).astype(np.float32))


def test_a_transformer_quantised_by_onnxruntimes_weight_only_quantiser_is_fully_mapped(tmp_path):
    """torch's TransformerEncoder (tests/data) with its MatMuls made 4-bit by MatMulNBitsQuantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantiser = MatMulNBitsQuantizer(onnx.load(DATA / "torch_transformer_encoder.onnx"), block_size=16, is_symmetric=False)
    quantiser.process()
    m = quantiser.model.model
    assert sum(node.op_type == "MatMulNBits" for node in m.graph.node) >= 3
    mapping = xcompile.compile_model(m, ideal=True, progress=False)
    assert mapping.summary()["coverage"]["fraction_on_crossbars"] == 1.0
    x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = xcompile.Session(mapping).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def _malformed(kind: str) -> onnx.ModelProto:
    m = _nbits_model(32, 4, 4, 16, "packed", False, 0)
    node = m.graph.node[0]
    if kind == "bits 3":
        next(a for a in node.attribute if a.name == "bits").i = 3
    elif kind == "blocks of a power of 2":
        next(a for a in node.attribute if a.name == "block_size").i = 1  # would pack no bytes at all
    elif kind == "do not hold N x ceil":
        b = numpy_helper.to_array(m.graph.initializer[0])
        m.graph.initializer[0].CopyFrom(numpy_helper.from_array(b[:, :, :7].copy(), "b"))
    else:
        m.graph.initializer.append(numpy_helper.from_array(np.zeros(32, np.int32), "g_idx"))
        node.input.extend(["g_idx"])
    return m


@pytest.mark.parametrize("reason", ["bits 3", "blocks of a power of 2", "do not hold N x ceil", "g_idx"])
def test_a_malformed_matmul_nbits_is_named_and_left_to_onnxruntime(reason):
    with pytest.warns(UserWarning, match=reason):
        mapping = xcompile.compile_model(_malformed(reason), ideal=True, progress=False, allow_empty=True)
    assert mapping.layers == ()
    left = mapping.summary()["coverage"]["left_digital"]
    assert [entry["op_type"] for entry in left] == ["com.microsoft::MatMulNBits"] and reason in left[0]["reason"]


def test_matmul_nbits_on_an_integer_input_is_named_not_guessed():
    m = _nbits_model(32, 4, 4, 16, "none", False, 0)
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.INT32
    with pytest.warns(UserWarning, match="input A is INT32"):
        mapping = xcompile.compile_model(m, ideal=True, progress=False, allow_empty=True)
    assert mapping.layers == ()
