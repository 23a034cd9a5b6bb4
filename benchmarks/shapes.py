"""Network-shaped ONNX graphs with seeded random weights, built with onnx.helper (no torch).

resnet50(): the ResNet-50 v1.5 layout (BatchNorm folded into conv biases), 25.5 M weights,
input [N, 3, 224, 224] -> logits [N, 1000]. Weights are He-normal, seeded.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def conv(self, x, cin, cout, k, stride=1, relu=True):
        w = self.name("w")
        b = self.name("b")
        fan_in = cin * k * k
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / fan_in)).astype(np.float32), w))
        self.inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), b))
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        if relu:
            r = self.name("relu")
            self.nodes.append(helper.make_node("Relu", [y], [r]))
            return r
        return y

    def bottleneck(self, x, cin, width, stride):
        cout = width * 4
        y = self.conv(x, cin, width, 1)
        y = self.conv(y, width, width, 3, stride)
        y = self.conv(y, width, cout, 1, relu=False)
        shortcut = self.conv(x, cin, cout, 1, stride, relu=False) if (stride != 1 or cin != cout) else x
        s = self.name("add")
        self.nodes.append(helper.make_node("Add", [y, shortcut], [s]))
        r = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [s], [r]))
        return r, cout


def resnet50(seed: int = 0) -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.conv("input", 3, 64, 7, 2)
    p = b.name("pool")
    b.nodes.append(helper.make_node("MaxPool", [x], [p], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, channels = p, 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            x, channels = b.bottleneck(x, channels, width, stride if i == 0 else 1)
    g = b.name("gap")
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], [g]))
    f = b.name("flat")
    b.nodes.append(helper.make_node("Flatten", [g], [f]))
    b.inits.append(numpy_helper.from_array((b.rng.standard_normal((1000, 2048)) * np.sqrt(1 / 2048)).astype(np.float32), "fc_w"))
    b.inits.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b"))
    b.nodes.append(helper.make_node("Gemm", [f, "fc_w", "fc_b"], ["logits"], transB=1))
    graph = helper.make_graph(
        b.nodes, "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        b.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def weight_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) > 1)
