"""Fuzzing the ONNX front end: small random Gemm / MatMul / Conv graphs, attributes and weights
drawn with bad values too (NaN weights, zero strides, biases that do not broadcast, kernels over
the input, empty weights, unknown opsets), and broken now and then.

The promise for every graph: compiled in ideal mode and run, xcompile gives what ONNX Runtime
gives (<= 1e-5 relative); or it refuses with its own XCompileError, and then only for a reason
ONNX Runtime refuses too or one of the documented refusals (REFUSALS); never another exception.
A quantised compile runs to ONNX Runtime's output shape, or refuses the same way.

XCOMPILE_FUZZ_EXAMPLES sets the number of graphs (benchmarks/fuzz_campaign.py raises it).
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import xcompile
from xcompile.runtime.simulator import Simulator
from builders import tensor

EXAMPLES = int(os.environ.get("XCOMPILE_FUZZ_EXAMPLES", "200"))

# What xcompile refuses although ONNX Runtime runs it (docs/errors.md)
REFUSALS = re.compile(
    r"must be finite|the weight is empty|is not a constant|a batch of matrices|has no known size|broadcasts against|must be 2-D|kernel_shape .* does not match"
)

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same graphs on every run; the campaign raises the count to see more
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@st.composite
def weights(draw, shape):
    """Normal weights, now and then with a NaN or an infinity in them."""
    seed = draw(st.integers(0, 2**16))
    values = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    if values.size and draw(st.integers(0, 9)) == 0:
        values.reshape(-1)[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return values


@st.composite
def gemm_graphs(draw):
    k, n = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    m = draw(st.sampled_from(["N", 1, 3]))
    trans_a, trans_b = draw(st.booleans()), draw(st.booleans())
    weight_left = draw(st.integers(0, 4)) == 0  # the constant is A: Y = A' @ x'
    attrs = {"transA": int(trans_a), "transB": int(trans_b)}
    if draw(st.booleans()):
        attrs["alpha"] = draw(st.sampled_from([0.0, -1.5, 0.25, 2.0]))
    if draw(st.booleans()):
        attrs["beta"] = draw(st.sampled_from([0.0, -1.0, 0.5]))
    if weight_left:  # A' [n, k] constant, B' [k, m] the input
        w = draw(weights((k, n) if trans_a else (n, k)))
        x_shape = [m, k] if trans_b else [k, m]
        inputs, y_shape = ["w", "x"], [n, m]
    else:  # A' [m, k] the input, B' [k, n] constant
        w = draw(weights((n, k) if trans_b else (k, n)))
        x_shape = [k, m] if trans_a else [m, k]
        inputs, y_shape = ["x", "w"], [m, n]
    initializers = [numpy_helper.from_array(w, "w")]
    bias = draw(st.sampled_from([None, "n", "1n", "1", "m1", "bad", "rank3"]))
    if bias is not None:
        last = y_shape[1] if isinstance(y_shape[1], int) else 2
        first = y_shape[0] if isinstance(y_shape[0], int) else 2
        shape = {"n": [last], "1n": [1, last], "1": [1], "m1": [first, 1], "bad": [last + 2], "rank3": [1, 1, last]}[bias]
        initializers.append(numpy_helper.from_array(draw(weights(shape)), "b"))
        inputs.append("b")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", **attrs)
    return [node], [tensor("x", x_shape)], y_shape, initializers


@st.composite
def matmul_graphs(draw):
    k, n = draw(st.integers(0, 5)), draw(st.integers(1, 5))
    lead = draw(st.sampled_from([[], ["N"], ["N", 2], [2, 3]]))
    w_shape = draw(st.sampled_from([(k, n), (k,), (2, k, n)]))
    w = draw(weights(w_shape))
    if draw(st.integers(0, 3)) == 0:  # the constant on the left: Y = W @ x
        w_left = draw(weights((n, k)))
        inputs, x_shape = ["w", "x"], lead + [k, n]
        initializers = [numpy_helper.from_array(w_left, "w")]
    else:
        inputs, x_shape = ["x", "w"], lead + [k]
        initializers = [numpy_helper.from_array(w, "w")]
    return [helper.make_node("MatMul", inputs, ["y"], name="matmul")], [tensor("x", x_shape)], None, initializers


@st.composite
def conv_graphs(draw):
    rank = draw(st.integers(1, 2))
    transpose = draw(st.integers(0, 4)) == 0
    group = draw(st.integers(1, 2))
    cin = group * draw(st.integers(1, 2))
    cout = group * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 4)) for _ in range(rank)]
    size = [draw(st.integers(1, 6)) for _ in range(rank)]
    attrs = {"group": group}
    if draw(st.booleans()):
        attrs["strides"] = [draw(st.integers(0, 3)) for _ in range(rank)]
    if draw(st.booleans()):
        attrs["dilations"] = [draw(st.integers(0, 2)) for _ in range(rank)]
    padding = draw(st.sampled_from(["pads", "none", "SAME_UPPER", "VALID"]))
    if padding == "pads":
        attrs["pads"] = [draw(st.integers(0, 2)) for _ in range(2 * rank)]
    elif padding != "none":
        attrs["auto_pad"] = padding
    if draw(st.integers(0, 9)) == 0:  # a kernel_shape that may disagree with the weight
        attrs["kernel_shape"] = [draw(st.integers(1, 4)) for _ in range(rank)]
    w_shape = (cin, cout // group, *kernel) if transpose else (cout, cin // group, *kernel)
    initializers = [numpy_helper.from_array(draw(weights(w_shape)), "w")]
    inputs = ["x", "w"]
    if draw(st.booleans()):
        initializers.append(numpy_helper.from_array(draw(weights((cout + draw(st.sampled_from([0, 0, 0, 1])),))), "b"))
        inputs.append("b")
    x_channels = cin + draw(st.sampled_from([0, 0, 0, 0, 1]))  # now and then the wrong channel count
    op = "ConvTranspose" if transpose else "Conv"
    node = helper.make_node(op, inputs, ["y"], name=op.lower(), **attrs)
    return [node], [tensor("x", [draw(st.sampled_from(["N", 1, 2])), x_channels, *size])], None, initializers


@st.composite
def models(draw):
    nodes, inputs, y_shape, initializers = draw(st.one_of(gemm_graphs(), matmul_graphs(), conv_graphs()))
    if draw(st.booleans()):  # a digital op after the layer
        nodes = nodes + [helper.make_node(draw(st.sampled_from(["Relu", "Sigmoid", "Neg"])), ["y"], ["z"], name="act")]
        out = "z"
    else:
        out = "y"
    output = tensor(out, y_shape) if y_shape is not None and draw(st.booleans()) else helper.make_empty_tensor_value_info(out)
    opset = draw(st.sampled_from([13, 17, 17, 17, 21, 99]))
    graph = helper.make_graph(nodes, "fuzz", inputs, [output], initializers)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m, draw(st.integers(0, 3)), draw(st.integers(0, 2**16))


def _feeds(m: onnx.ModelProto, batch: int, seed: int) -> dict:
    x = m.graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") else batch for d in x.type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).normal(size=shape).astype(np.float32)}


def _onnxruntime(m: onnx.ModelProto, feeds: dict):
    try:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds), None
    except Exception as exc:  # ONNX Runtime's own exception types
        return None, exc


def _xcompile(m: onnx.ModelProto, feeds: dict, step_by_step: bool = False, **options):
    """(outputs, error); step_by_step: run every layer on the crossbar runtime's own kernels, as
    tracing does, in place of ideal mode's one fused ONNX Runtime graph."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. ACM clipping or calibration on the first batch
            mapping = xcompile.compile_model(m, progress=False, **options)
            if step_by_step:
                return Simulator(mapping.program, feeds).outputs(), None
            return xcompile.Session(mapping).run(None, feeds), None
    except xcompile.XCompileError as exc:
        return None, exc


@FUZZ
@given(models())
def test_random_graphs_match_onnxruntime_or_are_refused_with_one_clear_line(case):
    m, batch, seed = case
    feeds = _feeds(m, batch, seed)
    note(f"{onnx.printer.to_text(m)}\ninput shape {feeds['x'].shape}")
    expected, ort_error = _onnxruntime(m, feeds)
    got, error = _xcompile(m, feeds, ideal=True)
    if error is not None:
        message = str(error)
        assert message and "\n" not in message
        assert ort_error is not None or REFUSALS.search(message), f"ONNX Runtime runs it, xcompile refused: {message}"
        event("refused; ONNX Runtime refuses it too" if ort_error is not None else "refused; ONNX Runtime runs it")
        return
    assert ort_error is None, f"xcompile ran a model ONNX Runtime refuses: {ort_error}"
    event("ran to ONNX Runtime's output")
    stepped, error = _xcompile(m, feeds, step_by_step=True, ideal=True)
    assert error is None, f"the fused graph ran, step by step refused: {error}"
    for g, e in zip(got + stepped, expected + expected, strict=True):
        g = np.asarray(g)
        assert g.shape == e.shape and g.dtype == e.dtype
        finite = np.isfinite(e)
        assert np.array_equal(g[~finite], e[~finite], equal_nan=True)  # infinities (an infinite bias) and NaN where ORT has them
        scale = float(np.abs(e[finite]).max(initial=0.0))
        # float32 sums whose terms cancel: their rounding is relative to the terms, not the result
        w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w"))
        terms = float(np.abs(feeds["x"]).max(initial=0.0)) * float(np.abs(w).sum())
        assert np.abs(g[finite] - e[finite]).max(initial=0.0) <= 1e-5 * max(scale, 1e-30) + 1e-6 * terms
    quantised, error = _xcompile(m, feeds, weight_bits=6, cell_bits=3, cols=8, rows=4, r_wire=1.0, adc_bits=6)
    if error is not None:  # e.g. a crossbar too narrow for the slices: still one line
        assert "\n" not in str(error)
    else:
        assert [np.asarray(q).shape for q in quantised] == [e.shape for e in expected]


def test_the_strategies_reach_both_outcomes():
    """The generated graphs are not all refused (nor all accepted): the fuzz test checks both paths."""
    outcomes = set()

    @settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(models())
    def collect(case):
        m, batch, seed = case
        outcomes.add(_xcompile(m, _feeds(m, batch, seed), ideal=True)[1] is None)

    collect()
    assert outcomes == {True, False}
