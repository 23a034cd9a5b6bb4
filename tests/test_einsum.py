"""Einsum with one constant operand and MatMul with a batch of constant matrices map as one
(grouped) crossbar layer: ideal mode equals ONNX Runtime; what cannot map is named and stays."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import xcompile
from builders import model, tensor

CASES = [  # (equation or None for MatMul, x shape, weight shape, y shape, weight first, groups, K, N)
    ("bmk,bkn->bmn", [4, "M", 6], [4, 6, 5], [4, "M", 5], False, 4, 6, 5),
    ("abc,cde->abde", ["N", 7, 8], [8, 2, 3], ["N", 7, 2, 3], False, 1, 8, 6),  # a Keras-style projection to heads
    ("...k,kn->...n", ["N", 3, 8], [8, 5], ["N", 3, 5], False, 1, 8, 5),
    ("bnk,hkd->bnhd", ["B", 5, 8], [2, 8, 4], ["B", 5, 2, 4], False, 1, 8, 8),
    ("bmk,bkn->bnm", [4, "M", 6], [4, 6, 5], [4, 5, "M"], False, 4, 6, 5),  # output transposed
    ("ij,jk", ["N", 8], [8, 5], ["N", 5], False, 1, 8, 5),  # implicit output
    ("kn,bmk->bmn", [3, "M", 4], [4, 6], [3, "M", 6], True, 1, 4, 6),  # constant first
    ("bkc,bk->bc", [5, 7], [5, 7, 3], [5, 3], True, 5, 7, 3),
    (None, ["N", 4, 3, 6], [4, 6, 5], ["N", 4, 3, 5], False, 4, 6, 5),  # MatMul: x batch equals W batch
    (None, ["M", 6], [4, 6, 5], [4, "M", 5], False, 1, 6, 20),  # x without a batch: W's batch is output
    (None, [4, 6, "M"], [4, 5, 6], [4, 5, "M"], True, 4, 6, 5),  # W @ x
    (None, ["N", 1, 3, 6], [4, 6, 5], ["N", 4, 3, 5], False, 1, 6, 20),  # x's batch of 1 broadcasts: every matrix
    (None, [4, "M", 6], [1, 6, 5], [4, "M", 5], False, 1, 6, 5),  # W's batch of 1 broadcasts: one matrix
    (None, [1, 4, 3, 6], [2, 1, 6, 5], [2, 4, 3, 5], False, 1, 6, 10),  # both
]


def _model(equation, x_shape, w_shape, y_shape, weight_first, seed=0):
    w = numpy_helper.from_array(np.random.default_rng(seed).normal(size=w_shape).astype(np.float32), "w")
    inputs = ["w", "x"] if weight_first else ["x", "w"]
    node = helper.make_node("Einsum", inputs, ["y"], equation=equation, name="op") if equation else helper.make_node("MatMul", inputs, ["y"], name="op")
    return model([node], [tensor("x", x_shape)], [tensor("y", y_shape)], [w], opset=13)


def _input(x_shape, seed=1):
    return np.random.default_rng(seed).normal(size=[3 if isinstance(d, str) else d for d in x_shape]).astype(np.float32)


@pytest.mark.parametrize("equation, x_shape, w_shape, y_shape, weight_first, groups, k, n", CASES)
def test_batched_constants_map_as_one_grouped_layer_equal_to_onnxruntime(equation, x_shape, w_shape, y_shape, weight_first, groups, k, n):
    m = _model(equation, x_shape, w_shape, y_shape, weight_first)
    x = _input(x_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left digital, nothing to warn about
        mapping = xcompile.compile_model(m, ideal=True, progress=False)
    assert [layer.weight.shape for layer in mapping.layers] == [(groups, k, n)]
    assert mapping.summary()["coverage"]["fraction_on_crossbars"] == 1.0
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    session = xcompile.Session(mapping)
    got = session.run(None, {"x": x})[0]
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert session._fused, "ideal hardware still runs as one ONNX Runtime graph"
    session._fused = False  # the crossbar runtime's own step path
    stepped = session.run(None, {"x": x})[0]
    assert np.abs(stepped - expected).max() <= 1e-5 * np.abs(expected).max()


def test_groups_take_only_their_own_tiles_and_see_only_their_own_inputs():
    """8 matrices of 16 x 8 on 16 x 16 crossbars: one tile per matrix (the zeros between them take
    none); with line resistance each group computes what the same matrix compiled alone does (the
    same cells on the same kind of tile; one scale per output, so that the levels are the same too)."""
    m = _model("bmk,bkn->bmn", [8, "M", 16], [8, 16, 8], [8, "M", 8], False)
    mapping = xcompile.compile_model(m, progress=False, rows=16, cols=16, weight_scale="channel")
    assert mapping.layers[0].tiling.count == 8
    x = _input([8, "M", 16])
    hardware = dict(r_wire=1.0, r_source=10.0, r_sink=10.0)
    got = xcompile.Session(mapping, **hardware).run(None, {"x": x})[0]
    weights = numpy_helper.to_array(m.graph.initializer[0])
    for g in (0, 5):
        alone = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", ["M", 16])], [tensor("y", ["M", 8])],
                      [numpy_helper.from_array(weights[g], "w")], opset=13)
        single = xcompile.Session(xcompile.compile_model(alone, progress=False, rows=16, cols=16, weight_scale="channel"), **hardware).run(None, {"x": x[g]})[0]
        np.testing.assert_allclose(got[g], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("equation, x_shape, w_shape, y_shape, weight_first, reason", [
    ("bni,ij->bj", ["N", 5, 4], [4, 3], ["N", 3], False, "index 'n' is summed in the activation operand alone"),
    ("ii,ij->ij", [4, 4], [4, 3], [4, 3], False, "an index repeats within one operand"),
    ("bk,...kn->b...n", ["N", 4], [2, 4, 3], ["N", 2, 3], False, "'...' in the constant operand"),
])
def test_what_cannot_map_is_named_and_stays_exact_on_onnxruntime(equation, x_shape, w_shape, y_shape, weight_first, reason):
    m = _model(equation, x_shape, w_shape, y_shape, weight_first)
    with pytest.warns(UserWarning, match=reason):
        mapping = xcompile.compile_model(m, ideal=True, progress=False, allow_empty=True)
    assert mapping.layers == ()
    x = _input(x_shape)
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(xcompile.Session(mapping).run(None, {"x": x})[0], expected, rtol=1e-6)


@pytest.mark.parametrize("equation, x_shape, w_shape, y_shape", [
    (None, ["N", "H", 2, 4], [3, 4, 5], ["N", 3, 2, 5]),  # MatMul: H of 1 broadcasts, H of 3 pairs
    ("bmk,bkn->bmn", ["B", "M", 6], [4, 6, 5], ["B", "M", 5]),
])
def test_a_batch_of_unknown_size_against_a_batch_of_matrices_follows_onnx(equation, x_shape, w_shape, y_shape):
    """The graph does not say whether the activation's batch is 1 (broadcast) or B (pairs); both
    run as ONNX Runtime runs them, and a size that is neither fails as it fails there."""
    m = _model(equation, x_shape, w_shape, y_shape, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapping = xcompile.compile_model(m, ideal=True, progress=False)
    assert mapping.summary()["coverage"]["fraction_on_crossbars"] == 1.0
    reference = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    sizes = [1, w_shape[0]] if equation is None else [w_shape[0]]
    for size in sizes:
        x = _input([size if d in ("H", "B") else d for d in x_shape])
        expected = reference.run(None, {"x": x})[0]
        for fused in (True, False):
            session = xcompile.Session(mapping)
            session._fused = fused
            got = session.run(None, {"x": x})[0]
            assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    x = _input([2 if d in ("H", "B") else d for d in x_shape])
    with pytest.raises(Exception):
        reference.run(None, {"x": x})
    with pytest.raises(xcompile.XCompileError):
        xcompile.Session(mapping).run(None, {"x": x})


@pytest.mark.parametrize("equation", [None, "bi,ij->bj"])
def test_integer_products_keep_their_integer_type_and_values(equation):
    """ONNX's MatMul / Einsum of int32 operands give int32: so does the crossbar layer (ideal)."""
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.integers(-9, 9, size=(4, 3)).astype(np.int32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"]) if equation is None else helper.make_node("Einsum", ["x", "w"], ["y"], equation=equation)
    m = model([node], [tensor("x", ["N", 4], TensorProto.INT32)], [tensor("y", ["N", 3], TensorProto.INT32)], [w], opset=13)
    x = rng.integers(-9, 9, size=(5, 4)).astype(np.int32)
    mapping = xcompile.compile_model(m, ideal=True, progress=False)
    assert len(mapping.layers) == 1
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = xcompile.Session(mapping).run(None, {"x": x})[0]
    assert got.dtype == expected.dtype == np.int32
    np.testing.assert_array_equal(got, expected)


def test_a_crafted_rank_beyond_the_letters_is_refused_by_name():
    w = numpy_helper.from_array(np.ones((1,) * 58 + (4, 3), np.float32), "w")
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"], name="deep")], [tensor("x", ["N", 4])], [tensor("y", None)], [w], opset=13)
    with pytest.warns(UserWarning, match=r"deep \(MatMul, 12 weights\): the operands have 58 batch dimensions"):
        mapping = xcompile.compile_model(m, ideal=True, progress=False, allow_empty=True)
    assert mapping.layers == ()
