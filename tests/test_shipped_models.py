"""The shipped digits models: ideal mode equals ONNX Runtime, default hardware keeps accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import xcompile
from xcompile.data import load_dataset

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def digits():
    x, y, _ = load_dataset("digits")
    return x, y


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_cnn_pruned"])
def test_ideal_mode_equals_onnxruntime_on_the_test_split(name, digits):
    x, y = digits
    path = MODELS / f"{name}.onnx"
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = xcompile.Session(xcompile.compile_model(path, ideal=True, progress=False)).run(None, {"input": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert (expected.argmax(1) == y).mean() > 0.95  # the shipped model is a real, trained one


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_default_8_bit_mapping_keeps_the_accuracy(name, digits):
    x, y = digits
    path = MODELS / f"{name}.onnx"
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = xcompile.Session(xcompile.compile_model(path, progress=False)).run(None, {"input": x})[0]
    assert abs((got.argmax(1) == y).mean() - (expected.argmax(1) == y).mean()) <= 0.01
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


def test_pruned_cnn_has_most_crossbar_columns_empty():
    """The pruned CNN is what `--remap sparse` is shown on: >= 70% of every hidden layer's
    outputs (crossbar columns) are all zero; the last layer keeps all of its classes."""
    mapping = xcompile.compile_model(MODELS / "digits_cnn_pruned.onnx", progress=False)
    empty = [float((~np.abs(layer.weight[0]).any(axis=0)).mean()) for layer in mapping.layers]
    assert min(empty[:-1]) >= 0.7 and empty[-1] == 0.0
