"""MVM layers inside If / Loop / Scan bodies: compiled like any other (both If branches), the
executor runs the control flow with the crossbar layers inside, ideal mode equals ONNX Runtime."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import xcompile
from builders import model, tensor

RNG = np.random.default_rng(0)


def _init(name, shape):
    return numpy_helper.from_array(RNG.normal(0, 0.5, shape).astype(np.float32), name)


def _check(m, feeds_list, layers):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapping = xcompile.compile_model(m, ideal=True, progress=False)
    assert not caught, [str(w.message) for w in caught]
    assert len(mapping.layers) == layers
    assert mapping.summary()["coverage"]["fraction_on_crossbars"] == 1.0
    session = xcompile.Session(mapping)
    reference = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for feeds in feeds_list:
        for got, want in zip(session.run(None, feeds), reference.run(None, feeds)):
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-30)
    return mapping


def _if_model():
    """Both branches hold a dense layer on an outer value; the else branch a Conv as well."""
    then = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w_then"], ["t"], name="then_fc"), helper.make_node("Relu", ["t"], ["then_y"])],
        "then", [], [tensor("then_y", None)], [_init("w_then", (4, 3))],
    )
    other = helper.make_graph(
        [
            helper.make_node("Reshape", ["h", "shape"], ["img"]),
            helper.make_node("Conv", ["img", "w_conv"], ["c"], name="else_conv", pads=[1, 1]),
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("Gemm", ["f", "w_else"], ["else_y"], name="else_fc"),
        ],
        "else", [], [tensor("else_y", None)], [_init("w_conv", (2, 1, 3)), numpy_helper.from_array(np.array([-1, 1, 4], np.int64), "shape")],
    )
    nodes = [
        helper.make_node("Gemm", ["x", "w0"], ["h"], name="stem"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=then, else_branch=other, name="choose"),
    ]
    inits = [_init("w0", (5, 4)), _init("w_else", (8, 3)), numpy_helper.from_array(np.array(0, np.float32), "zero")]
    return model(nodes, [tensor("x", [2, 5])], [tensor("y", None)], inits, opset=13)


def test_both_if_branches_are_compiled_and_each_runs_on_crossbars():
    x = RNG.normal(size=(2, 5)).astype(np.float32)
    mapping = _check(_if_model(), [{"x": np.abs(x)}, {"x": -np.abs(x)}], layers=4)
    assert {"then_fc", "else_conv", "else_fc"} <= {layer.name for layer in mapping.layers}


def test_loop_with_a_dense_layer_in_its_body_and_scan_outputs():
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w_rec"], ["r"], name="loop_fc"),
            helper.make_node("Add", ["r", "x"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["h_out"], ["trace"]),
        ],
        "body",
        [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("h_in", None)],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("h_out", None), tensor("trace", None)],
    )
    nodes = [helper.make_node("Loop", ["trips", "", "h0"], ["h_final", "all_h"], body=body, name="unroll")]
    m = model(nodes, [tensor("x", [2, 4]), tensor("h0", [2, 4]), tensor("trips", [], TensorProto.INT64)],
              [tensor("h_final", None), tensor("all_h", None)], [_init("w_rec", (4, 4))], opset=13)
    feeds = {"x": RNG.normal(size=(2, 4)).astype(np.float32), "h0": RNG.normal(size=(2, 4)).astype(np.float32)}
    _check(m, [{**feeds, "trips": np.array(n, np.int64)} for n in (1, 5)], layers=1)


@pytest.mark.parametrize("reverse", [0, 1])
def test_scan_as_a_recurrent_cell_with_layers_on_the_step_and_the_state(reverse):
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "w_in"], ["a"], name="scan_in"),
            helper.make_node("Gemm", ["h_in", "w_state", "b"], ["b_"], name="scan_state"),
            helper.make_node("Add", ["a", "b_"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_out"]),
            helper.make_node("Identity", ["h_out"], ["y_t"]),
        ],
        "body", [tensor("h_in", [2, 3]), tensor("x_t", [2, 5])], [tensor("h_out", [2, 3]), tensor("y_t", [2, 3])],
    )
    nodes = [helper.make_node("Scan", ["h0", "xs"], ["h_last", "ys"], body=body, num_scan_inputs=1,
                              scan_input_axes=[1], scan_input_directions=[reverse], scan_output_axes=[-1], name="scan")]
    inits = [_init("w_in", (5, 3)), _init("w_state", (3, 3)), _init("b", (3,))]
    m = model(nodes, [tensor("h0", [2, 3]), tensor("xs", [2, 6, 5])], [tensor("h_last", None), tensor("ys", None)], inits, opset=13)
    feeds = {"h0": RNG.normal(size=(2, 3)).astype(np.float32), "xs": RNG.normal(size=(2, 6, 5)).astype(np.float32)}
    _check(m, [feeds], layers=2)


def test_an_if_inside_a_loop_body():
    inner_then = helper.make_graph([helper.make_node("MatMul", ["h_in", "w_a"], ["ya"], name="inner_a")], "a", [], [tensor("ya", None)])
    inner_else = helper.make_graph([helper.make_node("MatMul", ["h_in", "w_b"], ["yb"], name="inner_b")], "b", [], [tensor("yb", None)])
    body = helper.make_graph(
        [
            helper.make_node("Mod", ["i", "two"], ["parity"]),
            helper.make_node("Equal", ["parity", "zero"], ["even"]),
            helper.make_node("If", ["even"], ["z"], then_branch=inner_then, else_branch=inner_else),
            helper.make_node("Tanh", ["z"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("h_in", None)],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("h_out", None)],
    )
    inits = [_init("w_a", (3, 3)), _init("w_b", (3, 3)), numpy_helper.from_array(np.array(2, np.int64), "two"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(4, np.int64), "trips")]
    m = model([helper.make_node("Loop", ["trips", "", "h0"], ["h"], body=body)], [tensor("h0", [1, 3])], [tensor("h", None)], inits, opset=13)
    _check(m, [{"h0": RNG.normal(size=(1, 3)).astype(np.float32)}], layers=2)


def test_a_mapping_with_control_flow_survives_mapping_bin(tmp_path):
    m = _if_model()
    mapping = xcompile.compile_model(m, ideal=True, progress=False)
    mapping.save(tmp_path / "m.bin")
    x = RNG.normal(size=(2, 5)).astype(np.float32)
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = xcompile.Session(tmp_path / "m.bin").run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_recurrent_layers_inside_if_branches_and_an_omitted_output():
    w, r = _init("W", (1, 16, 3)), _init("R", (1, 16, 4))
    branches = [
        helper.make_graph([helper.make_node("LSTM", ["X", "W", "R"], ["", f"{name}_h"], hidden_size=4, direction=direction)],
                          name, [], [tensor(f"{name}_h", None)])
        for name, direction in (("then", "forward"), ("else", "reverse"))
    ]
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branches[0], else_branch=branches[1])]
    m = model(nodes, [tensor("X", [5, 2, 3]), tensor("c", [], TensorProto.BOOL)], [tensor("y", None)], [w, r], opset=13)
    x = RNG.normal(size=(5, 2, 3)).astype(np.float32)
    _check(m, [{"X": x, "c": np.array(True)}, {"X": x, "c": np.array(False)}], layers=4)


def test_layers_inside_model_local_functions_are_mapped():
    """Exporters (torch's dynamo exporter among them) write model-local functions: they are
    inlined before extraction, so the MatMuls inside are layers, not a silent skip."""
    inner = helper.make_function("custom", "Linear", ["x", "w"], ["y"],
                                 [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                                 [helper.make_opsetid("", 17)])
    outer = helper.make_function("custom", "Block", ["x", "w1", "w2"], ["y"],
                                 [helper.make_node("Linear", ["x", "w1"], ["h"], domain="custom"),
                                  helper.make_node("Linear", ["h", "w2"], ["y"], domain="custom")],
                                 [helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name) for name, shape in (("w1", (6, 8)), ("w2", (8, 3)))]
    graph = helper.make_graph([helper.make_node("Block", ["x", "w1", "w2"], ["y"], domain="custom", name="block")], "g",
                              [tensor("x", ["N", 6])], [tensor("y", ["N", 3])], weights)
    m = helper.make_model(graph, functions=[inner, outer], opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapping = xcompile.compile_model(m, ideal=True, progress=False)
    assert len(mapping.layers) == 2 and mapping.summary()["coverage"]["fraction_on_crossbars"] == 1.0
    x = rng.normal(size=(4, 6)).astype(np.float32)
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(xcompile.Session(mapping).run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)


class _Nested:
    """Random control flow (If, Loop, Scan, nested) around dense layers that map [B, D] -> [B, D];
    each body's weights drawn either into the body or from an enclosing graph."""

    def __init__(self, draw, width: int):
        self.draw, self.width, self.count, self.layers = draw, width, 0, 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def block(self, source: str, depth: int, outer: list) -> tuple[list, list, str]:
        """Nodes computing a new [B, D] value from `source`; initializers local to this graph; the output name."""
        kinds = ["dense", "gemm"] + (["if", "loop", "scan"] if depth < 2 else [])
        kind = self.draw(st.sampled_from(kinds))
        out = self.name("h")
        if kind in ("dense", "gemm"):
            self.layers += 1
            weight = _init(self.name("w"), (self.width, self.width))
            local = [] if self.draw(st.booleans()) else [weight]
            outer.extend([weight] if not local else [])
            if kind == "dense":
                return [helper.make_node("MatMul", [source, weight.name], [out], name=self.name("fc"))], local, out
            bias = _init(self.name("b"), (self.width,))
            local.append(bias)
            return [helper.make_node("Gemm", [source, weight.name, bias.name], [out], transB=1, name=self.name("gemm"))], local, out
        if kind == "if":
            total, positive = self.name("sum"), self.name("positive")
            branches = []
            for label in ("then", "else"):
                nodes, local, result = self.block(source, depth + 1, outer)
                nodes.append(helper.make_node("Tanh", [result], [self.name(label)]))
                branches.append(helper.make_graph(nodes, label, [], [tensor(nodes[-1].output[0], None)], local))
            zero = numpy_helper.from_array(np.array(0, np.float32), self.name("zero"))
            return [
                helper.make_node("ReduceSum", [source], [total], keepdims=0),
                helper.make_node("Greater", [total, zero.name], [positive]),
                helper.make_node("If", [positive], [out], then_branch=branches[0], else_branch=branches[1], name=self.name("if")),
            ], [zero], out
        state, cond_in, cond_out = self.name("state"), self.name("cond_in"), self.name("cond_out")
        nodes, local, result = self.block(state, depth + 1, outer)
        nodes.append(helper.make_node("Tanh", [result], [self.name("next")]))
        if kind == "loop":
            nodes.append(helper.make_node("Identity", [cond_in], [cond_out]))
            body = helper.make_graph(
                nodes, "loop_body", [tensor(self.name("i"), [], TensorProto.INT64), tensor(cond_in, [], TensorProto.BOOL), tensor(state, None)],
                [tensor(cond_out, [], TensorProto.BOOL), tensor(nodes[-2].output[0], None)], local,
            )
            trips = numpy_helper.from_array(np.array(self.draw(st.integers(0, 3)), np.int64), self.name("trips"))
            return [helper.make_node("Loop", [trips.name, "", source], [out], body=body, name=self.name("loop"))], [trips], out
        step, step_out = self.name("x_t"), self.name("y_t")
        nodes.insert(0, helper.make_node("Add", [self.name("in_state"), step], [state]))
        nodes.append(helper.make_node("Identity", [nodes[-1].output[0]], [step_out]))
        body = helper.make_graph(
            nodes, "scan_body", [tensor(nodes[0].input[0], [None, self.width]), tensor(step, [None, self.width])],
            [tensor(nodes[-2].output[0], [None, self.width]), tensor(step_out, [None, self.width])], local,
        )
        reverse = self.draw(st.integers(0, 1))
        return [helper.make_node("Scan", [source, "xs"], [out, self.name("ys")], body=body, num_scan_inputs=1,
                                 scan_input_directions=[reverse], name=self.name("scan"))], [], out


@settings(max_examples=30, deadline=None)
@given(data=st.data(), width=st.integers(1, 4), batch=st.integers(1, 3), steps=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_random_nested_control_flow_with_layers_inside_equals_onnxruntime(data, width, batch, steps, seed):
    nested = _Nested(data.draw, width)
    outer: list = []
    nodes, local, result = nested.block("x", 0, outer)
    nodes.append(helper.make_node("Identity", [result], ["y"]))
    m = model(nodes, [tensor("x", ["B", width]), tensor("xs", [steps, "B", width])], [tensor("y", None)], local + outer, opset=13)
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.normal(size=(batch, width)).astype(np.float32), "xs": rng.normal(size=(steps, batch, width)).astype(np.float32)}
    _check(m, [feeds, {**feeds, "x": -feeds["x"]}], layers=nested.layers)
