"""LSTM / GRU / RNN on crossbars: W and R are MVM layers, the recurrence digital, ideal mode equal
to ONNX Runtime (or, for layout 1, which ONNX Runtime's CPU kernels refuse, to ONNX's reference
implementation)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_node_cases
import xcompile
from builders import model, tensor

DATA = Path(__file__).parent / "data"
WEIGHTS = {"LSTM": (1, 2, 3, 7), "GRU": (1, 2, 3), "RNN": (1, 2, 3)}  # W, R, B (and P) made initializers
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _relative(got, expected) -> float:
    return float(np.abs(np.asarray(got) - expected).max() / max(np.abs(expected).max(), 1e-30))


def _compile(m, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapping = xcompile.compile_model(m, progress=False, **options)
    assert not caught, [str(w.message) for w in caught]
    return mapping


def _ort(m, feeds) -> list:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _reference(m, feeds) -> list:
    """ONNX Runtime's outputs; for layout 1, which its CPU kernels refuse, those of the same node
    with layout 0 on transposed inputs, transposed back."""
    node = m.graph.node[0]
    if not any(a.name == "layout" and a.i == 1 for a in node.attribute):
        return _ort(m, feeds)
    time_major = onnx.ModelProto()
    time_major.CopyFrom(m)
    kept = [a for a in time_major.graph.node[0].attribute if a.name != "layout"]
    del time_major.graph.node[0].attribute[:]
    time_major.graph.node[0].attribute.extend(kept)
    for value in time_major.graph.input:
        value.type.tensor_type.ClearField("shape")
    swapped = {k: (v.transpose(1, 0, 2) if v.ndim == 3 else v) for k, v in feeds.items()}
    outputs = _ort(time_major, swapped)
    return [y.transpose(2, 0, 1, 3) if y.ndim == 4 else y.transpose(1, 0, 2) for y in outputs]


@pytest.mark.parametrize("name", onnx_node_cases.names("test_lstm", "test_gru", "test_simple_rnn", "test_rnn_seq"))
def test_onnx_node_cases_with_constant_weights(name):
    m, feeds = onnx_node_cases.with_constant_weights(name, WEIGHTS)
    expected = onnx_node_cases.expected(name) if "batchwise" in name else _reference(m, feeds)
    mapping = _compile(m, ideal=True)
    node = m.graph.node[0]
    directions = 2 if any(a.name == "direction" and a.s == b"bidirectional" for a in node.attribute) else 1
    assert len(mapping.layers) == directions * (3 if node.op_type == "GRU" and not any(a.name == "linear_before_reset" and a.i for a in node.attribute) else 2)
    assert mapping.summary()["coverage"]["fraction_on_crossbars"] == 1.0
    for got, want in zip(xcompile.Session(mapping).run(None, feeds), expected):
        assert got.shape == want.shape and _relative(got, want) <= 1e-5


def _recurrent_model(op, direction, layout, hidden, inputs, batch, steps, seed, *, lbr=0, peepholes=False, clip=None,
                     activations=None, alphas=None, betas=None, initial=True, seq_lens=True, outputs=3):
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (d, g * hidden, inputs)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 0.5, (d, g * hidden, hidden)).astype(np.float32), "R"),
        numpy_helper.from_array(rng.normal(0, 0.5, (d, 2 * g * hidden)).astype(np.float32), "B"),
    ]
    names = ["X", "W", "R", "B", "seq_lens" if seq_lens else "", "initial_h" if initial else ""]
    feeds = {"X": rng.normal(size=(batch, steps, inputs) if layout else (steps, batch, inputs)).astype(np.float32)}
    graph_inputs = [tensor("X", list(feeds["X"].shape))]
    state_shape = (batch, d, hidden) if layout else (d, batch, hidden)
    if seq_lens:
        feeds["seq_lens"] = rng.integers(1, steps + 1, size=batch).astype(np.int32)
        graph_inputs.append(tensor("seq_lens", [batch], TensorProto.INT32))
    if initial:
        feeds["initial_h"] = rng.normal(size=state_shape).astype(np.float32)
        graph_inputs.append(tensor("initial_h", list(state_shape)))
    if op == "LSTM":
        names.append("initial_c" if initial else "")
        if initial:
            feeds["initial_c"] = rng.normal(size=state_shape).astype(np.float32)
            graph_inputs.append(tensor("initial_c", list(state_shape)))
        if peepholes:
            names.append("P")
            inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (d, 3 * hidden)).astype(np.float32), "P"))
    while names and not names[-1]:
        names.pop()
    attrs = {"hidden_size": hidden, "direction": direction}
    if layout:
        attrs["layout"] = 1
    if lbr and op == "GRU":
        attrs["linear_before_reset"] = 1
    if clip is not None:
        attrs["clip"] = clip
    for key, value in (("activations", activations), ("activation_alpha", alphas), ("activation_beta", betas)):
        if value:
            attrs[key] = value
    out_names = ["Y", "Y_h", "Y_c"][: (outputs if op == "LSTM" else min(outputs, 2))]
    node = helper.make_node(op, names, out_names, name=f"{op.lower()}_node", **attrs)
    nodes = [node] + [helper.make_node("Identity", [o], [f"{o}_out"]) for o in out_names]
    m = model(nodes, graph_inputs, [tensor(f"{o}_out", None) for o in out_names], inits, opset=14 if layout else 13)
    return m, feeds


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    op=st.sampled_from(["LSTM", "GRU", "RNN"]), direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
    layout=st.sampled_from([0, 0, 1]), hidden=st.integers(1, 6), inputs=st.integers(1, 5), batch=st.integers(1, 3),
    steps=st.integers(1, 5), seed=st.integers(0, 2**16), lbr=st.integers(0, 1), peepholes=st.booleans(),
    clip=st.sampled_from([None, 0.7, 3.0]), initial=st.booleans(), seq_lens=st.booleans(), outputs=st.integers(1, 3),
)
def test_random_recurrent_graphs(op, direction, layout, hidden, inputs, batch, steps, seed, lbr, peepholes, clip, initial, seq_lens, outputs):
    m, feeds = _recurrent_model(op, direction, layout, hidden, inputs, batch, steps, seed, lbr=lbr, peepholes=peepholes,
                                clip=clip, initial=initial, seq_lens=seq_lens, outputs=outputs)
    expected = _reference(m, feeds)
    mapping = _compile(m, ideal=True, rows=8, cols=8)
    for got, want in zip(xcompile.Session(mapping).run(None, feeds), expected):
        assert got.shape == want.shape and _relative(got, want) <= 1e-5


@pytest.mark.parametrize(
    "op, activations, alphas, betas",
    [
        ("LSTM", ["HardSigmoid", "LeakyRelu", "Tanh"], [0.3, 0.05], [0.4]),
        ("GRU", ["Sigmoid", "ScaledTanh"], [1.5], [0.8]),
        ("RNN", ["Affine"], [0.5], [0.1]),
        ("RNN", ["Relu"], None, None),
        ("GRU", ["HardSigmoid", "Softsign"], None, None),
    ],
)
def test_activations_with_alpha_and_beta_as_onnx_defines_them(op, activations, alphas, betas):
    m, feeds = _recurrent_model(op, "forward", 0, 4, 3, 2, 5, 11, activations=activations, alphas=alphas, betas=betas, seq_lens=False)
    expected = _ort(m, feeds)
    mapping = _compile(m, ideal=True)
    for got, want in zip(xcompile.Session(mapping).run(None, feeds), expected):
        assert _relative(got, want) <= 1e-5


@pytest.mark.parametrize("path", sorted(p for p in DATA.glob("torch_*.onnx") if "transformer" not in p.name), ids=lambda p: p.stem)
def test_recurrent_models_exported_by_torch(path, tmp_path):
    """Tiny models torch 2.13 exported (tests/data/make_torch_recurrent.py): LSTM, GRU, RNN stacks."""
    m = onnx.load(path)
    inits = {t.name for t in m.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for value in m.graph.input:
        if value.name not in inits:
            shape = [d.dim_value or 3 for d in value.type.tensor_type.shape.dim]
            feeds[value.name] = rng.normal(size=shape).astype(np.float32)
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    mapping = _compile(m, ideal=True)
    assert mapping.summary()["coverage"]["fraction_on_crossbars"] == 1.0
    assert any(layer.op_type in ("LSTM", "GRU", "RNN") for layer in mapping.layers)
    mapping.save(tmp_path / "m.bin")  # the recurrent node and its layers survive mapping.bin
    for got, want in zip(xcompile.Session(tmp_path / "m.bin").run(None, feeds), expected):
        assert _relative(got, want) <= 1e-5


def test_recurrent_layers_run_on_non_ideal_crossbars_with_their_calibration():
    m, feeds = _recurrent_model("LSTM", "bidirectional", 0, 8, 6, 4, 7, 3)
    expected = _reference(m, feeds)
    mapping = _compile(m)
    session = xcompile.Session(mapping, adc_bits=8, dac_bits=8, calibration=feeds, seed=1)
    got = session.run(None, feeds)
    assert 0 < _relative(got[0], expected[0]) < 0.2  # crossbar error, not a different function
    again = xcompile.Session(mapping, adc_bits=8, dac_bits=8, calibration=feeds, seed=1).run(None, feeds)
    np.testing.assert_array_equal(got[0], again[0])


def test_unsupported_recurrent_variant_is_named_and_stays_digital():
    m, feeds = _recurrent_model("RNN", "forward", 0, 3, 2, 2, 4, 5)
    m.graph.node[0].attribute.append(helper.make_attribute("activations", ["Gelu"]))
    with pytest.raises(xcompile.XCompileError, match=r"rnn_node \(RNN, \d+ weights\): activation\(s\) \['Gelu'\]"):
        xcompile.compile_model(m, progress=False)
