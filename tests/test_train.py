"""Weight-constrained training: what it refuses and measures without torch, and the install hint.

Training itself needs torch (the `train` extra), which CI does not install (a CPU wheel is
~900 MB); docs/training.md gives the command that measures what WCT does to the shipped models."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from xcompile.cli import main
from xcompile.errors import XCompileError
from xcompile.train import low_conductance_share, plan, train_wct
from builders import model, small_cnn, tensor

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_plan_names_the_mvm_weights_and_biases_of_the_shipped_cnn():
    steps = plan(onnx.load(str(MODELS / "digits_cnn.onnx")))
    assert steps.weights == ("0.weight", "2.weight", "5.weight", "8.weight", "10.weight")
    assert steps.biases == ("0.bias", "2.bias", "5.bias", "8.bias", "10.bias")


def test_plan_refuses_an_op_the_interpreter_does_not_run_by_name():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sigmoid", ["h"], ["y"], name="squash")],
                  [tensor("x", ["N", 4])], [tensor("y", ["N", 4])], [w])
    with pytest.raises(XCompileError, match="node 'squash' is a Sigmoid"):
        plan(graph)


def test_low_conductance_share_counts_weights_near_zero_per_layer():
    weights = np.array([[1.0, -0.05], [0.0, 0.5]], np.float32)  # max 1: 0.05 and 0 are within 10%
    graph = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", ["N", 2])], [tensor("y", ["N", 2])],
                  [numpy_helper.from_array(weights, "w")])
    share = low_conductance_share(graph)["w"]
    assert share["low_share"] == 0.5
    assert share["mean_over_max"] == pytest.approx((1.0 + 0.05 + 0.0 + 0.5) / 4)


def test_without_torch_train_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    x, y = np.zeros((4, 3, 10, 10), np.float32), np.zeros(4, np.int64)
    with pytest.raises(XCompileError, match=r"pip install 'xcompile\[train\]'"):
        train_wct(small_cnn(), x, y)
    out = tmp_path / "out.onnx"
    assert main(["train", str(MODELS / "digits_cnn.onnx"), "--wct", "--dataset", "digits", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'xcompile[train]'" in err[0]
    assert not out.exists()


def test_train_needs_a_method_and_sane_settings(tmp_path, capsys):
    assert main(["train", str(MODELS / "digits_cnn.onnx"), "--dataset", "digits", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "--wct" in capsys.readouterr().err
    with pytest.raises(XCompileError, match="epochs"):
        train_wct(small_cnn(), np.zeros((1, 3, 10, 10), np.float32), np.zeros(1, np.int64), epochs=0)


def test_shipped_mnist_cnn_on_its_held_out_digits_keeps_its_float_accuracy_on_ideal_crossbars():
    import xcompile
    from xcompile.data import builtin_split
    from xcompile.evaluate import evaluate

    x, y = builtin_split("mnist", "test")
    assert x.shape == (1000, 1, 28, 28) and x.dtype == np.float32 and set(np.unique(y)) == set(range(10))
    calibration_x, _ = builtin_split("mnist", "calib")
    assert not (calibration_x[:, None] == x[None]).all(axis=(2, 3, 4)).any()  # no test digit among the training ones
    result = evaluate(xcompile.compile_model(MODELS / "mnist_cnn.onnx", ideal=True, progress=False), "mnist", progress=False)
    assert result["float_accuracy"] >= 0.95
    assert result["crossbar_accuracy_mean"] == result["float_accuracy"]
