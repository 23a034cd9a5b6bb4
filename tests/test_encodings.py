"""Signed-weight encodings and bit slicing: exact on ideal hardware, by their definitions."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import xcompile
from xcompile.runtime.crossbar import effective_weights
from builders import model, small_cnn, tensor

CASES = [(enc, wb, cb) for enc in ("dual", "acm", "offset") for wb, cb in ((8, 8), (8, 2), (6, 4), (4, 1))]


def _grouped_and_transposed():
    rng = np.random.default_rng(9)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 1, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 4, 2, 2)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], group=8, pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["a", "w2"], ["y"], strides=[2, 2]),
    ]
    return model(nodes, [tensor("x", ["N", 8, 5, 5])], [tensor("y", ["N", 4, 10, 10])], [w1, w2])


@pytest.mark.parametrize("encoding, weight_bits, cell_bits", CASES)
@pytest.mark.parametrize("build", [small_cnn, _grouped_and_transposed], ids=["cnn", "depthwise+convT"])
def test_cells_realise_the_quantised_weights_exactly(build, encoding, weight_bits, cell_bits):
    onnx_model = build()
    mapping = xcompile.compile_model(
        onnx_model, progress=False, encoding=encoding, weight_bits=weight_bits, cell_bits=cell_bits, rows=24, cols=16
    )
    slices = math.ceil(weight_bits / cell_bits)
    for layer in mapping.layers:
        assert layer.levels.max() <= 2**cell_bits - 1
        # the quantised model is round(W / scale) on the layer's own step
        np.testing.assert_array_equal(layer.weight_q, np.rint(layer.weight / layer.scale))
        assert np.abs(layer.weight_q).max() <= 2**weight_bits - 1
        # cells -> recombination terms -> weights: exact integer arithmetic
        np.testing.assert_array_equal(np.rint(effective_weights(layer) / layer.scale), layer.weight_q)
        assert layer.encoding.columns_per_output % slices == 0
    x = np.random.default_rng(1).normal(size=(4,) + tuple(d.dim_value or 1 for d in onnx_model.graph.input[0].type.tensor_type.shape.dim[1:])).astype(np.float32)
    got = xcompile.Session(mapping).run(None, {"x": x})[0]
    # the same model with the quantised weights, run by ONNX Runtime
    quantised = _with_weights(onnx_model, mapping)
    expected = ort.InferenceSession(quantised.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def _with_weights(onnx_model, mapping):
    """Replace every MVM weight initializer by weight_q * scale, in its ONNX layout."""
    import copy

    result = copy.deepcopy(onnx_model)
    inits = {t.name: t for t in result.graph.initializer}
    for layer, node in zip(mapping.layers, [n for n in result.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]):
        original = numpy_helper.to_array(inits[node.input[1]])
        q = layer.weight_q.astype(np.float32) * np.float32(layer.scale)
        groups = q.shape[0]
        if node.op_type == "Conv":
            kprod = int(np.prod(original.shape[2:]))
            value = q.reshape(groups, kprod, original.shape[1], -1).transpose(0, 3, 2, 1).reshape(original.shape)
        elif node.op_type == "ConvTranspose":
            value = q.reshape(original.shape)
        else:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            value = q[0].T if trans_b else q[0]
        assert groups >= 1
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(value.astype(np.float32), node.input[1]))
    return result


@pytest.mark.parametrize("encoding, weight_bits, cell_bits", CASES)
def test_ideal_mode_matches_onnxruntime_for_every_encoding(encoding, weight_bits, cell_bits):
    onnx_model = small_cnn(seed=3)
    x = np.random.default_rng(2).normal(size=(8, 3, 10, 10)).astype(np.float32)
    expected = ort.InferenceSession(onnx_model.SerializeToString()).run(None, {"x": x})[0]
    mapping = xcompile.compile_model(onnx_model, progress=False, ideal=True, encoding=encoding, weight_bits=weight_bits, cell_bits=cell_bits)
    got = xcompile.Session(mapping).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_acm_uses_n_plus_one_columns_and_dual_two_n():
    onnx_model = small_cnn()
    for encoding, columns in (("acm", 6 + 1), ("dual", 12), ("offset", 6 + 1)):
        mapping = xcompile.compile_model(onnx_model, progress=False, encoding=encoding)
        conv = mapping.summary()["layers"][0]
        assert conv["cells_used"] == 27 * columns


def test_acm_clip_reports_what_it_clipped_and_scale_does_not_clip():
    onnx_model = small_cnn()
    with pytest.warns(UserWarning, match="ACM clipped"):
        clipped = xcompile.compile_model(onnx_model, progress=False, encoding="acm", acm_fit="clip")
    scaled = xcompile.compile_model(onnx_model, progress=False, encoding="acm", acm_fit="scale")
    notes = clipped.layers[1].notes
    assert notes["acm_clipped_cells"] > 0 and notes["acm_weight_rmse"] > 0
    assert "acm_clipped_cells" not in scaled.layers[1].notes and scaled.layers[1].notes["acm_rescaled_by"] > 1
    # the clipped mapping really is less exact than the rescaled one on the same data
    x = np.random.default_rng(0).normal(size=(32, 3, 10, 10)).astype(np.float32)
    expected = ort.InferenceSession(onnx_model.SerializeToString()).run(None, {"x": x})[0]
    err = lambda m: np.abs(xcompile.Session(m).run(None, {"x": x})[0] - expected).max()
    assert err(clipped) > err(scaled)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"weight_bits": 4, "cell_bits": 6}, "cell_bits"),
        ({"weight_bits": 17}, "weight_bits"),
        ({"encoding": "ternary"}, "encoding"),
        ({"encoding": "acm", "acm_fit": "squeeze"}, "acm_fit"),
        ({"encoding": "offset", "weight_bits": 1, "cell_bits": 1}, "offset"),
    ],
)
def test_bad_encoding_options_are_named(options, message):
    with pytest.raises(xcompile.XCompileError, match=message):
        xcompile.compile_model(small_cnn(), progress=False, **options)


@pytest.mark.parametrize("encoding", ["dual", "acm", "offset"])
@pytest.mark.parametrize("input_mode", ["analog", "bit_serial"])
def test_every_encoding_with_slicing_runs_on_the_converter_path(encoding, input_mode):
    """The per-tile path (ADC per slice column, shift-and-add, bit-serial inputs) with fine
    converters agrees with the exact quantised model."""
    onnx_model = _grouped_and_transposed()
    mapping = xcompile.compile_model(onnx_model, progress=False, encoding=encoding, weight_bits=6, cell_bits=2, rows=24, cols=16)
    x = np.random.default_rng(4).normal(size=(6, 8, 5, 5)).astype(np.float32)
    exact = xcompile.Session(mapping).run(None, {"x": x})[0]
    fine = xcompile.Session(mapping, dac_bits=20, adc_bits=22, input_mode=input_mode, calibration={"x": x}).run(None, {"x": x})[0]
    assert np.abs(fine - exact).max() <= 1e-4 * np.abs(exact).max()


def test_inspect_counts_columns_and_adc_conversions_per_inference():
    onnx_model = small_cnn()  # conv: 6 outputs at 10 x 10 positions; fc: 5 outputs, one vector
    info = xcompile.compile_model(onnx_model, progress=False, encoding="dual", weight_bits=8, cell_bits=4).summary()
    conv, fc = info["layers"]
    assert conv["columns"] == 6 * 2 * 2  # two slices of both polarities per output
    assert conv["vectors_per_sample"] == 100 and fc["vectors_per_sample"] == 1
    assert conv["adc_conversions_per_inference"] == 24 * 100
    assert fc["adc_conversions_per_inference"] == 2 * 5 * 2 * 2  # two row blocks of 128
    assert info["totals"]["adc_conversions_per_inference"] == 2400 + 40


def test_read_energy_follows_the_conductances():
    onnx_model = small_cnn()
    x = np.random.default_rng(0).normal(size=(16, 3, 10, 10)).astype(np.float32)
    energies = {}
    for encoding in ("dual", "acm", "offset"):
        mapping = xcompile.compile_model(onnx_model, progress=False, encoding=encoding)
        energies[encoding] = sum(xcompile.Session(mapping).read_energy({"x": x}).values())
    # offset keeps every cell at or above half the window: the most read power
    assert energies["offset"] > energies["dual"] and energies["offset"] > energies["acm"]
    low = xcompile.compile_model(onnx_model, progress=False, g_on=1e-4, g_off=1e-6)
    assert sum(xcompile.Session(low).read_energy({"x": x}).values()) < energies["dual"] / 5


def test_acm_that_cannot_fit_even_after_scaling_is_an_error():
    from builders import dense

    with pytest.raises(xcompile.XCompileError, match="ACM cannot hold"):
        xcompile.compile_model(dense(8, 120, seed=1), progress=False, encoding="acm", weight_bits=1, cell_bits=1)
