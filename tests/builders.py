"""Small ONNX models built in the tests (no torch): named so a failing test says what it ran."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def tensor(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def small_cnn(seed: int = 0, channels: int = 6, classes: int = 5) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Flatten -> Gemm on [N, 3, 10, 10]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(channels, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(size=channels).astype(np.float32)
    w2 = rng.normal(size=(classes, channels * 5 * 5)).astype(np.float32)
    b2 = rng.normal(size=classes).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="fc"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    return model(nodes, [tensor("x", ["N", 3, 10, 10])], [tensor("y", ["N", classes])], inits)


def dense(k: int, n: int, seed: int = 0, bias: bool = True) -> onnx.ModelProto:
    """One Gemm y = x @ W + b on [N, k]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=n).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Gemm", inputs, ["y"], name="fc")
    return model([node], [tensor("x", ["N", k])], [tensor("y", ["N", n])], inits)
