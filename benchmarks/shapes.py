"""Network-shaped ONNX graphs with seeded random weights, built with onnx.helper (no torch).

resnet50(): the ResNet-50 v1.5 layout (BatchNorm folded into conv biases), 25.5 M weights,
input [N, 3, 224, 224] -> logits [N, 1000]. Weights are He-normal, seeded.
mobilenet(): a MobileNetV2/V3-style classifier at 224 x 224: inverted residuals with depthwise
3 x 3 convs, HardSwish, squeeze-and-excitation, 1000 classes.
detector(): a YOLO-style one-stage detector at 640 x 640: SiLU conv stages with split-concat
blocks, an upsampling neck and three detection heads (box + class convs) concatenated.
encoder(): a BERT-style transformer encoder (6 layers, width 384, 12 heads, sequence 128):
MatMuls with constant weights, LayerNormalization, softmax attention between activations, GELU.
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

    def weight(self, shape, fan_in: int, bias_size: int | None = None) -> list[str]:
        w = self.name("w")
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32), w))
        if bias_size is None:
            return [w]
        b = self.name("b")
        self.inits.append(numpy_helper.from_array(np.zeros(bias_size, np.float32), b))
        return [w, b]

    def op(self, op_type: str, inputs: list[str], **attributes) -> str:
        y = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [y], **attributes))
        return y

    def conv(self, x, cin, cout, k, stride=1, relu=True, group=1, activation=None):
        fan_in = cin // group * k * k
        wb = self.weight((cout, cin // group, k, k), fan_in, cout)
        y = self.op("Conv", [x, *wb], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)
        activation = activation or ("Relu" if relu else None)
        if activation == "SiLU":
            return self.op("Mul", [y, self.op("Sigmoid", [y])])
        return self.op(activation, [y]) if activation else y

    def constant(self, value) -> str:
        c = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value), c))
        return c

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


def _model(b: _Builder, name: str, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, name, inputs, outputs, b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mobilenet(seed: int = 0) -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.conv("input", 3, 16, 3, 2, activation="HardSwish")
    channels = 16
    # (expansion, out channels, stride, squeeze-excite, activation) per inverted residual block
    blocks = [(1, 16, 1, True, "Relu"), (4, 24, 2, False, "Relu"), (3, 24, 1, False, "Relu"),
              (3, 40, 2, True, "HardSwish"), (3, 40, 1, True, "HardSwish"), (6, 80, 2, False, "HardSwish"),
              (2.5, 80, 1, False, "HardSwish"), (6, 112, 1, True, "HardSwish"), (6, 160, 2, True, "HardSwish"),
              (6, 160, 1, True, "HardSwish")]
    for expansion, out, stride, squeeze, activation in blocks:
        hidden = int(channels * expansion)
        y = b.conv(x, channels, hidden, 1, activation=activation) if hidden != channels else x
        y = b.conv(y, hidden, hidden, 3, stride, group=hidden, activation=activation)
        if squeeze:
            s = b.op("GlobalAveragePool", [y])
            s = b.conv(s, hidden, max(8, hidden // 4), 1)
            s = b.conv(s, max(8, hidden // 4), hidden, 1, activation="HardSigmoid")
            y = b.op("Mul", [y, s])
        y = b.conv(y, hidden, out, 1, relu=False)
        x = b.op("Add", [x, y]) if stride == 1 and out == channels else y
        channels = out
    x = b.conv(x, channels, 960, 1, activation="HardSwish")
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    x = b.op("HardSwish", [b.op("Gemm", [x, *b.weight((1280, 960), 960, 1280)], transB=1)])
    b.nodes.append(helper.make_node("Gemm", [x, *b.weight((1000, 1280), 1280, 1000)], ["logits"], transB=1))
    return _model(b, "mobilenet", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])])


def detector(seed: int = 0, size: int = 640, classes: int = 80) -> onnx.ModelProto:
    b = _Builder(seed)

    def stage(x, cin, cout):  # a strided conv, then a split-concat block (YOLOv8's C2f, one bottleneck)
        x = b.conv(x, cin, cout, 3, 2, activation="SiLU")
        half = cout // 2
        left, right = b.name("split"), b.name("split")
        b.nodes.append(helper.make_node("Split", [x, b.constant(np.array([half, half], np.int64))], [left, right], axis=1))
        y = b.conv(b.conv(right, half, half, 3, activation="SiLU"), half, half, 3, activation="SiLU")
        return b.conv(b.op("Concat", [left, right, y], axis=1), 3 * half, cout, 1, activation="SiLU")

    x = b.conv("input", 3, 16, 3, 2, activation="SiLU")
    p3 = stage(stage(x, 16, 32), 32, 64)
    p4 = stage(p3, 64, 128)
    p5 = stage(p4, 128, 256)
    up = b.op("Resize", [p5, "", b.constant(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    n4 = b.conv(b.op("Concat", [up, p4], axis=1), 384, 128, 1, activation="SiLU")
    up = b.op("Resize", [n4, "", b.constant(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    n3 = b.conv(b.op("Concat", [up, p3], axis=1), 192, 64, 1, activation="SiLU")
    heads = []
    for feature, channels in ((n3, 64), (n4, 128), (p5, 256)):
        box = b.conv(b.conv(feature, channels, 64, 3, activation="SiLU"), 64, 64, 1, relu=False)
        cls = b.conv(b.conv(feature, channels, 80, 3, activation="SiLU"), 80, classes, 1, relu=False)
        heads.append(b.op("Reshape", [b.op("Concat", [box, cls], axis=1), b.constant(np.array([0, 64 + classes, -1], np.int64))]))
    b.nodes.append(helper.make_node("Concat", heads, ["detections"], axis=2))
    return _model(b, "detector", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                  [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["N", 64 + classes, None])])


def encoder(seed: int = 0, layers: int = 6, width: int = 384, heads: int = 12, sequence: int = 128) -> onnx.ModelProto:
    b = _Builder(seed)
    head = width // heads

    def dense(x, cin, cout):
        w, bias = b.weight((cin, cout), cin, cout)
        return b.op("Add", [b.op("MatMul", [x, w]), bias])

    def norm(x):
        gamma, beta = b.constant(np.ones(width, np.float32)), b.constant(np.zeros(width, np.float32))
        return b.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-12)

    def split_heads(x):  # [N, S, W] -> [N, H, S, W/H]
        return b.op("Transpose", [b.op("Reshape", [x, b.constant(np.array([0, sequence, heads, head], np.int64))])], perm=[0, 2, 1, 3])

    x = "input"
    for _ in range(layers):
        q, k, v = (split_heads(dense(x, width, width)) for _ in range(3))
        scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]), b.constant(np.float32(head**-0.5))])
        context = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
        context = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]), b.constant(np.array([0, sequence, width], np.int64))])
        x = norm(b.op("Add", [x, dense(context, width, width)]))
        inner = dense(x, width, 4 * width)
        gelu = b.op("Mul", [b.op("Mul", [inner, b.constant(np.float32(0.5))]),
                            b.op("Add", [b.op("Erf", [b.op("Mul", [inner, b.constant(np.float32(2**-0.5))])]), b.constant(np.float32(1.0))])])
        x = norm(b.op("Add", [x, dense(gelu, 4 * width, width)]))
    b.nodes.append(helper.make_node("Identity", [x], ["embeddings"]))
    return _model(b, "encoder", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", sequence, width])],
                  [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", sequence, width])])
