"""Quantised ONNX on crossbars: integer weights map to levels, the model's own quantisation stays
digital, and ideal mode equals ONNX Runtime exactly (integer outputs bit for bit)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_node_cases
import xcompile
from builders import model, tensor

MODELS = Path(__file__).resolve().parents[1] / "models"
QUANT_WEIGHTS = {  # op -> positions of its weight, weight scale and zero point inputs
    "QLinearMatMul": (1, 2, 3, 4, 5, 6, 7), "QLinearConv": (1, 2, 3, 4, 5, 6, 7, 8),
    "ConvInteger": (1, 2, 3), "MatMulInteger": (1, 2, 3),
}


def _reference(m: onnx.ModelProto, feeds: dict) -> list:
    """ONNX Runtime with exact integer GEMMs where it has them: without the option, its uint8 x int8
    kernels saturate 16-bit pair sums on x86 CPUs without VNNI, off the ONNX specification
    (docs/coverage.md). Kernels the option does not cover load only without it."""
    exact = ort.SessionOptions()
    exact.add_session_config_entry("session.x64quantprecision", "1")
    for options in (exact, ort.SessionOptions()):
        try:
            session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except (ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.Fail):
            continue
        return session.run(None, feeds)
    raise AssertionError("ONNX Runtime cannot load the model")


def _compiled(m, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapping = xcompile.compile_model(m, progress=False, **options)
    return mapping, [str(w.message) for w in caught]


def _close(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Elementwise: integers equal, floats within 1e-5 of the output's largest magnitude."""
    if np.issubdtype(expected.dtype, np.integer):
        return got == expected
    return np.abs(got.astype(np.float64) - expected) <= 1e-5 * np.abs(expected).max()


def _assert_equal_to_ort(m, feeds, **options):
    """Ideal mode equals ONNX Runtime. Where it does not, ONNX Runtime must be the one off the ONNX
    specification, as the onnx package's reference evaluator computes it (e.g. its QLinearMatMul
    with float16 scales), and there xcompile must equal the specification."""
    mapping, caught = _compiled(m, ideal=True, **options)
    got_all, ort_all, spec_all = xcompile.Session(mapping).run(None, feeds), _reference(m, feeds), None
    for position, (got, expected) in enumerate(zip(got_all, ort_all)):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if _close(got, expected).all():
            continue
        if spec_all is None:
            spec_all = ReferenceEvaluator(m).run(None, feeds)
        spec = np.asarray(spec_all[position])
        ort_off_spec = ~_close(expected, spec)
        assert _close(got, spec)[ort_off_spec].all() and _close(got, expected)[~ort_off_spec].all()
    return mapping, caught


# ONNX Runtime's CPU ConvInteger refuses the padded case, so there is nothing to equal
NODE_CASES = [n for n in onnx_node_cases.names("test_qlinear", "test_convinteger", "test_matmulinteger") if n != "test_convinteger_with_padding"]


@pytest.mark.parametrize("name", NODE_CASES)
def test_onnx_node_cases_with_constant_weights(name):
    m, feeds = onnx_node_cases.with_constant_weights(name, QUANT_WEIGHTS)
    mapping, caught = _assert_equal_to_ort(m, feeds, allow_empty=True)
    coverage = mapping.summary()["coverage"]
    if mapping.layers:
        assert coverage["fraction_on_crossbars"] == 1.0 and not caught
        assert all(layer.notes["integer_weights"] for layer in mapping.layers)
    else:  # batches of matrices stay digital, said so
        assert "3D" in name
        assert coverage["left_digital"] and caught and coverage["left_digital"][0]["reason"] in caught[0]


class _Reader:
    def __init__(self, name, shape=(4, 1, 8, 8), count=8):
        self.batches = iter([{name: np.random.default_rng(i).uniform(0, 16, shape).astype(np.float32)} for i in range(count)])

    def get_next(self):
        return next(self.batches, None)


def _quantized(source: Path, kind: str, folder: Path, shape=(4, 1, 8, 8)) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    target = folder / f"{source.stem}_{kind}.onnx"
    source = _private_copy(source, folder)
    name = onnx.load(source).graph.input[0].name
    if kind == "dynamic":
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    else:
        quantize_static(
            source, target, _Reader(name, shape), quant_format=QuantFormat.QOperator if kind == "qoperator" else QuantFormat.QDQ,
            per_channel=kind == "qdq_per_channel",
        )
    return target


def _private_copy(source: Path, folder: Path) -> Path:
    """The model copied into the test's own folder: ONNX Runtime's quantisers write a temporary
    '<model>-inferred.onnx' beside their input, which races between parallel test workers."""
    copy = folder / f"source_{source.name}"
    if not copy.exists():
        shutil.copyfile(source, copy)
    return copy


def _optimized(path: Path, folder: Path) -> Path:
    """The model as ONNX Runtime's extended optimiser writes it (com.microsoft fused ops)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / f"{path.stem}_optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Path(options.optimized_model_filepath)


@pytest.mark.parametrize("kind", ["dynamic", "qdq", "qdq_per_channel", "qoperator"])
@pytest.mark.parametrize("source", ["digits_cnn", "digits_mlp"])
def test_models_quantised_by_onnxruntime_are_fully_mapped_and_exact(source, kind, tmp_path):
    path = _quantized(MODELS / f"{source}.onnx", kind, tmp_path)
    x = np.random.default_rng(7).uniform(0, 16, (32, 1, 8, 8)).astype(np.float32)
    m = onnx.load(path)
    for variant in (m, onnx.load(_optimized(path, tmp_path))):
        mapping, caught = _assert_equal_to_ort(variant, {m.graph.input[0].name: x})
        assert not caught and mapping.summary()["coverage"]["fraction_on_crossbars"] == 1.0
        assert len(mapping.layers) == (5 if source == "digits_cnn" else 3)


@pytest.mark.parametrize("kind", ["float", "dynamic", "qdq", "qoperator"])
def test_a_transformer_encoder_quantised_by_onnxruntime_has_every_weight_on_crossbars(kind, tmp_path):
    """torch's TransformerEncoder (tests/data/make_torch_recurrent.py): projections and feed-forward
    mapped; attention scores (activation x activation, float or QLinearMatMul) stay digital, unflagged."""
    source = Path(__file__).parent / "data" / "torch_transformer_encoder.onnx"
    path = source if kind == "float" else _quantized(source, kind, tmp_path, shape=(2, 5, 16))
    x = np.random.default_rng(9).normal(size=(3, 5, 16)).astype(np.float32)
    for variant in (onnx.load(path), onnx.load(_optimized(path, tmp_path))):
        mapping, caught = _assert_equal_to_ort(variant, {"x": x})
        assert not caught and mapping.summary()["coverage"]["fraction_on_crossbars"] == 1.0
        assert len(mapping.layers) == 9  # per encoder layer: in-projection, out-projection, two feed-forward; the head


def test_float_fusions_of_onnxruntime_are_mapped(tmp_path):
    path = _optimized(MODELS / "digits_cnn.onnx", tmp_path)
    fused = {n.op_type for n in onnx.load(path).graph.node if n.domain == "com.microsoft"}
    assert {"FusedConv", "FusedGemm"} <= fused
    x = np.random.default_rng(8).uniform(0, 16, (16, 1, 8, 8)).astype(np.float32)
    m = onnx.load(path)
    mapping, caught = _assert_equal_to_ort(m, {m.graph.input[0].name: x})
    assert not caught and {"FusedConv", "FusedGemm"} <= {l.op_type for l in mapping.layers}


def test_integer_weights_are_the_cell_levels_themselves(tmp_path):
    path = _quantized(MODELS / "digits_mlp.onnx", "qoperator", tmp_path)
    mapping, _ = _compiled(path, weight_bits=8)
    for layer in mapping.layers:
        assert layer.scale == 1.0
        np.testing.assert_array_equal(layer.weight_q, layer.weight)  # no re-quantisation


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    k=st.integers(1, 40), n=st.integers(1, 12), signed=st.booleans(), per_column=st.booleans(),
    half=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_qlinear_matmul_requantises_like_onnxruntime(k, n, signed, per_column, half, seed):
    rng = np.random.default_rng(seed)
    scale_type = np.float16 if half else np.float32
    a_type, a_np = (TensorProto.INT8, np.int8) if signed else (TensorProto.UINT8, np.uint8)
    info = np.iinfo(a_np)
    b = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    scales = {
        "a_scale": scale_type(rng.uniform(0.001, 0.1)), "y_scale": scale_type(rng.uniform(0.05, 2.0)),
        "b_scale": rng.uniform(0.001, 0.1, size=n if per_column else ()).astype(scale_type),
        "a_zero": np.array(rng.integers(info.min, info.max), a_np), "y_zero": np.array(rng.integers(info.min, info.max), a_np),
        "b_zero": np.zeros(n if per_column else (), np.int8), "b": b,
    }
    inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in scales.items()]
    node = helper.make_node("QLinearMatMul", ["a", "a_scale", "a_zero", "b", "b_scale", "b_zero", "y_scale", "y_zero"], ["y"])
    m = model([node], [tensor("a", ["M", k], a_type)], [tensor("y", ["M", n], a_type)], inits, opset=21 if half else 13)
    a = rng.integers(info.min, info.max + 1, size=(5, k)).astype(a_np)
    mapping, _ = _assert_equal_to_ort(m, {"a": a})
    assert len(mapping.layers) == 1


def test_unsupported_quantised_variant_is_named_and_stays_digital():
    rng = np.random.default_rng(3)
    b = numpy_helper.from_array(rng.integers(-5, 5, size=(2, 4, 3)).astype(np.int8), "b")  # a batch of matrices
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="batched")
    m = model([node], [tensor("a", [2, 5, 4], TensorProto.UINT8)], [tensor("y", [2, 5, 3], TensorProto.INT32)], [b], opset=13)
    with pytest.raises(xcompile.XCompileError, match=r"batched \(MatMulInteger, 24 weights\): the constant operand has shape \[2, 4, 3\]"):
        xcompile.compile_model(m, progress=False)
    mapping, _ = _assert_equal_to_ort(m, {"a": rng.integers(0, 9, size=(2, 5, 4)).astype(np.uint8)}, allow_empty=True)
    assert mapping.summary()["coverage"]["weights_digital"] == 24


@pytest.mark.parametrize("source, shape", [("torch_lstm_forward", (7, 2, 6)), ("torch_lstm_bidirectional_2layers_batch_first", (3, 7, 6))])
def test_dynamic_quantize_lstm_maps_and_equals_onnxruntime_on_one_thread(source, shape, tmp_path):
    """quantize_dynamic's DynamicQuantizeLSTM: W and R on crossbars, each product's input quantised
    as the kernel does. ONNX Runtime quantises h over each of its threads' share of the batch, so its
    own outputs change with its thread count; with one thread (and with a batch of one) they are ours."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(_private_copy(Path(__file__).parent / "data" / f"{source}.onnx", tmp_path), tmp_path / "q.onnx", weight_type=QuantType.QInt8)
    m = onnx.load(tmp_path / "q.onnx")
    assert "DynamicQuantizeLSTM" in {n.op_type for n in m.graph.node}
    mapping, caught = _compiled(m, ideal=True)
    assert not caught and mapping.summary()["coverage"]["fraction_on_crossbars"] == 1.0
    assert "DynamicQuantizeLSTM" in {layer.op_type for layer in mapping.layers}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.x64quantprecision", "1")
    reference = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for x in (np.random.default_rng(4).normal(size=shape).astype(np.float32), np.random.default_rng(5).normal(size=(1,) * 2 + shape[2:]).astype(np.float32)):
        for got, expected in zip(xcompile.Session(mapping).run(None, {"x": x}), reference.run(None, {"x": x})):
            assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    channels=st.integers(1, 4), out_channels=st.integers(1, 5), kernel=st.integers(1, 3), stride=st.integers(1, 2),
    pad=st.integers(0, 1), per_channel=st.booleans(), bias=st.booleans(), signed=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_qlinear_conv_requantises_like_onnxruntime(channels, out_channels, kernel, stride, pad, per_channel, bias, signed, seed):
    rng = np.random.default_rng(seed)
    x_type, x_np = (TensorProto.INT8, np.int8) if signed else (TensorProto.UINT8, np.uint8)
    info = np.iinfo(x_np)
    values = {
        "x_scale": np.float32(rng.uniform(0.01, 0.1)), "x_zero": np.array(rng.integers(info.min, info.max), x_np),
        "w": rng.integers(-127, 128, size=(out_channels, channels, kernel, kernel)).astype(np.int8),
        "w_scale": rng.uniform(0.001, 0.05, size=out_channels if per_channel else ()).astype(np.float32),
        "w_zero": np.zeros(out_channels if per_channel else (), np.int8),
        "y_scale": np.float32(rng.uniform(0.05, 1.0)), "y_zero": np.array(rng.integers(info.min, info.max), x_np),
    }
    names = ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"]
    if bias:
        values["b"] = rng.integers(-2000, 2000, size=out_channels).astype(np.int32)
        names.append("b")
    inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in values.items()]
    node = helper.make_node("QLinearConv", names, ["y"], strides=[stride, stride], pads=[pad] * 4)
    m = model([node], [tensor("x", ["N", channels, 6, 6], x_type)], [tensor("y", None, x_type)], inits, opset=13)
    x = rng.integers(info.min, info.max + 1, size=(2, channels, 6, 6)).astype(x_np)
    mapping, _ = _assert_equal_to_ort(m, {"x": x})
    assert len(mapping.layers) == 1


def _attention_model(mask: bool, unidirectional: int = 0, qkv_sizes=None):
    """One ORT Attention node (its transformer optimiser writes it for BERT-like models), and feeds."""
    rng = np.random.default_rng(5)
    hidden_in, heads = 12, 2
    width = sum(qkv_sizes) if qkv_sizes else 24
    weights = numpy_helper.from_array(rng.normal(size=(hidden_in, width)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(size=width).astype(np.float32), "b")
    attributes = {"num_heads": heads, "unidirectional": unidirectional, **({"qkv_hidden_sizes": qkv_sizes} if qkv_sizes else {})}
    node = helper.make_node("Attention", ["x", "w", "b"] + (["mask"] if mask else []), ["y"], domain="com.microsoft", name="attention", **attributes)
    inputs = [tensor("x", ["B", "S", hidden_in])] + ([tensor("mask", ["B", "S"], TensorProto.INT32)] if mask else [])
    m = model([node], inputs, [tensor("y", ["B", "S", qkv_sizes[2] if qkv_sizes else 8])], [weights, bias], opset=17)
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    feeds = {"x": rng.normal(size=(2, 5, hidden_in)).astype(np.float32)}
    if mask:
        feeds["mask"] = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    return m, feeds, hidden_in, width


@pytest.mark.parametrize("mask, unidirectional, qkv_sizes", [(False, 0, None), (True, 0, None), (True, 1, None), (False, 0, [8, 8, 4])])
def test_onnxruntime_attention_projects_its_input_on_crossbars(mask, unidirectional, qkv_sizes, tmp_path):
    """The input projection becomes a crossbar layer, the attention itself runs on ONNX Runtime as before."""
    m, feeds, hidden_in, width = _attention_model(mask, unidirectional, qkv_sizes)
    mapping, caught = _assert_equal_to_ort(m, feeds)
    assert not caught and [layer.op_type for layer in mapping.layers] == ["Attention"]
    assert mapping.layers[0].weight.shape == (1, hidden_in, width)
    assert mapping.summary()["coverage"] == {**mapping.summary()["coverage"], "fraction_on_crossbars": 1.0, "left_digital": []}
    mapping.save(tmp_path / "m.bin")  # the Attention node and its identity weights pass the loader's checks
    loaded = xcompile.load(tmp_path / "m.bin")
    np.testing.assert_array_equal(xcompile.Session(loaded).run(None, feeds)[0], xcompile.Session(mapping).run(None, feeds)[0])
    assert loaded.summary()["coverage"]["left_digital"] == []


def test_a_projected_mark_on_an_attention_with_real_weights_does_not_hide_them():
    """The mark that keeps xcompile's identity Attention out of the report is believed only with the
    identity (tested with its own identity above, also after save and load): an Attention marked so
    with model weights is still reported as left digital."""
    from xcompile.coverage import PROJECTED_KEY, left_digital

    m, _, hidden_in, width = _attention_model(False)
    m.graph.node[0].metadata_props.add(key=PROJECTED_KEY, value="1")
    assert [(entry["op_type"], entry["weights"]) for entry in left_digital(m.graph)] == [("com.microsoft::Attention", hidden_in * width)]


@pytest.mark.parametrize("mask", [False, True])
def test_quantize_dynamic_attention_maps_its_integer_projection(mask, tmp_path):
    """quantize_dynamic turns the Attention into DynamicQuantizeLinear + QAttention: the int8
    weights are the cell levels, the float attention is ONNX Runtime's."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    m, feeds, hidden_in, width = _attention_model(mask)
    onnx.save(m, tmp_path / "float.onnx")
    quantize_dynamic(tmp_path / "float.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8, op_types_to_quantize=["Attention"])
    q = onnx.load(tmp_path / "q.onnx")
    assert "QAttention" in {n.op_type for n in q.graph.node}
    mapping, caught = _assert_equal_to_ort(q, feeds)
    assert not caught and [layer.op_type for layer in mapping.layers] == ["QAttention"]
    assert mapping.layers[0].notes.get("integer_weights") and mapping.summary()["coverage"]["left_digital"] == []
