"""Coverage said loudly: the share of weights on crossbars, every weight-bearing op left digital
named with its reason (a warning, an error with strict), and nothing-to-map is an error."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import xcompile
from builders import model, tensor
from xcompile.cli import main


def _half_mapped():
    """A Gemm (mapped) feeding an Einsum that sums an index of the activation alone (left digital:
    frontend_einsum.py maps products whose activation indices all reach the output)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")
    per_head = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "per_head_w")
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Reshape", ["h", "shape"], ["r"]),
        helper.make_node("Einsum", ["r", "per_head_w"], ["y"], equation="bni,ij->bj", name="per_head"),
    ]
    shape = numpy_helper.from_array(np.array([-1, 2, 4], np.int64), "shape")
    return model(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 3])], [w, per_head, shape], opset=13)


def test_weights_left_digital_are_named_with_their_reason_and_counted():
    with pytest.warns(UserWarning, match=r"per_head \(Einsum, 12 weights\): index 'n' is summed in the activation operand alone"):
        mapping = xcompile.compile_model(_half_mapped(), ideal=True, progress=False)
    info = mapping.summary()["coverage"]
    assert info["weights_on_crossbars"] == 64 and info["weights_digital"] == 12
    assert info["fraction_on_crossbars"] == pytest.approx(64 / 76, abs=1e-6)
    assert [e["node"] for e in info["left_digital"]] == ["per_head"]
    x = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    import onnxruntime as ort

    expected = ort.InferenceSession(_half_mapped().SerializeToString()).run(None, {"x": x})[0]
    got = xcompile.Session(mapping).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_strict_makes_a_weight_left_digital_an_error():
    with pytest.raises(xcompile.XCompileError, match="strict: .*per_head"):
        xcompile.compile_model(_half_mapped(), ideal=True, progress=False, strict=True)


def test_a_model_with_nothing_to_map_is_an_error_unless_allowed(tmp_path, capsys):
    relu = model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 4])], [tensor("y", ["N", 4])])
    with pytest.raises(xcompile.XCompileError, match="no MVM layer.*allow_empty"):
        xcompile.compile_model(relu, progress=False)
    onnx.save(relu, tmp_path / "relu.onnx")
    assert main(["compile", str(tmp_path / "relu.onnx"), "-o", str(tmp_path / "m.bin")]) == 2
    assert not (tmp_path / "m.bin").exists()
    assert main(["compile", str(tmp_path / "relu.onnx"), "-o", str(tmp_path / "m.bin"), "--allow-empty", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m.bin")]) == 0
    assert "nothing is mapped" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "m.bin"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["coverage"]["fraction_on_crossbars"] is None


def test_compile_line_and_inspect_report_coverage(tmp_path, capsys):
    onnx.save(_half_mapped(), tmp_path / "half.onnx")
    assert main(["compile", str(tmp_path / "half.onnx"), "-o", str(tmp_path / "m.bin"), "--ideal"]) == 0
    captured = capsys.readouterr()
    assert "84.2% of weights on crossbars, 1 weight-bearing op(s) left digital" in captured.out
    assert "warning" in captured.err and "per_head" in captured.err
    assert main(["inspect", str(tmp_path / "m.bin")]) == 0
    assert "LEFT DIGITAL per_head (Einsum, 12 weights)" in capsys.readouterr().out
    assert main(["compile", str(tmp_path / "half.onnx"), "-o", str(tmp_path / "s.bin"), "--strict"]) == 2
    assert not (tmp_path / "s.bin").exists()


def test_weights_inside_a_body_xcompile_does_not_run_are_reported_not_skipped_in_silence():
    """A SequenceMap body (not If / Loop / Scan) keeps its MatMul on ONNX Runtime: said so."""
    w = numpy_helper.from_array(np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32), "w_body")
    body = helper.make_graph([helper.make_node("MatMul", ["item", "w_body"], ["out"], name="per_item")], "body",
                             [tensor("item", None)], [tensor("out", None)])
    nodes = [
        helper.make_node("Gemm", ["x", "w0"], ["h"], name="fc"),
        helper.make_node("SplitToSequence", ["x"], ["seq"], axis=0),
        helper.make_node("SequenceMap", ["seq"], ["mapped"], body=body, name="each"),
        helper.make_node("ConcatFromSequence", ["mapped"], ["y"], axis=0),
    ]
    w0 = numpy_helper.from_array(np.ones((4, 2), np.float32), "w0")
    m = model(nodes, [tensor("x", [3, 4])], [tensor("y", None), tensor("h", [3, 2])], [w, w0])
    with pytest.warns(UserWarning, match=r"each/body/per_item \(MatMul, 12 weights\)"):
        mapping = xcompile.compile_model(m, ideal=True, progress=False)
    assert mapping.summary()["coverage"]["weights_digital"] == 12


def test_an_einsum_xcompile_cannot_map_is_counted_as_left_digital():
    w = numpy_helper.from_array(np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32), "w")
    node = helper.make_node("Einsum", ["x", "w"], ["y"], equation="bni,ij->bj", name="contract")
    m = model([node], [tensor("x", ["N", 5, 4])], [tensor("y", ["N", 3])], [w])
    with pytest.raises(xcompile.XCompileError, match=r"contract \(Einsum, 12 weights\): index 'n' is summed in the activation operand alone"):
        xcompile.compile_model(m, progress=False)
