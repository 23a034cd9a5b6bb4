"""Weight-constrained training (WCT, after Bhattacharjee et al., DATE 2022): ONNX in, ONNX out.

Pruned networks on non-ideal crossbars suffer because their few remaining columns carry many
high-conductance cells, which draw the most current through the wires. WCT fine-tunes the
trained model so that more cells sit at low conductance. Our reading of the constraint: the
compiler maps each layer's largest |w| to the top conductance, so every MVM weight is clamped
to its layer's original range [-m, m] (the scale, and with it the conductance of a given
weight, stays where it was) while a penalty `strength * mean(|W|) / m` per layer pulls the
rest towards zero, i.e. towards G_off; weights that are exactly zero (pruned) stay zero.

The ONNX graph is interpreted with torch ops for the ops the shipped CNN / MLP use (`OPS`);
anything else is refused by name. torch is optional (`pip install 'xcompile[train]'`) and
imported only here, only when training runs: compiling and running never need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from xcompile.errors import XCompileError

OPS = ("Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool", "AveragePool", "Flatten", "Reshape", "Identity", "Dropout")
MVM_OPS = ("Conv", "Gemm", "MatMul")
LOW_SHARE = 0.1  # a weight within 10% of its layer's largest |w| counts as a low-conductance cell
INSTALL = "training needs PyTorch, an optional extra: pip install 'xcompile[train]' (torch==2.13.0)"


@dataclass(frozen=True)
class Plan:
    """What training will touch: the MVM weights (clamped and penalised) and their biases."""

    weights: tuple[str, ...]  # initializer names of Conv / Gemm / MatMul weights
    biases: tuple[str, ...]


def plan(model: onnx.ModelProto) -> Plan:
    """Check that every node is one the interpreter knows; name the trainable initializers."""
    graph = model.graph
    if len(graph.input) - len({i.name for i in graph.initializer} & {i.name for i in graph.input}) != 1 or len(graph.output) != 1:
        raise XCompileError("train: the model must have one input and one output (a classifier's logits)")
    initializers = {i.name for i in graph.initializer}
    weights, biases = [], []
    for node in graph.node:
        if node.op_type not in OPS or node.domain not in ("", "ai.onnx"):
            raise XCompileError(
                f"train: node '{node.name or node.output[0]}' is a {node.op_type}, which the training interpreter does not run; "
                f"it runs {', '.join(OPS)}"
            )
        if node.op_type in MVM_OPS:
            if len(node.input) < 2 or node.input[1] not in initializers:
                raise XCompileError(f"train: {node.op_type} node '{node.name or node.output[0]}' must take its weight from an initializer")
            weights.append(node.input[1])
            if len(node.input) > 2 and node.input[2] in initializers:
                biases.append(node.input[2])
    if not weights:
        raise XCompileError("train: the model has no Conv, Gemm or MatMul weights to train")
    return Plan(tuple(dict.fromkeys(weights)), tuple(dict.fromkeys(biases)))


def low_conductance_share(model: onnx.ModelProto, names: tuple[str, ...] | None = None) -> dict[str, dict[str, float]]:
    """Per MVM weight: the share of weights within LOW_SHARE of the layer's largest |w| (cells
    near G_off) and mean |w| / max |w| (the mean conductance in units of the window)."""
    names = plan(model).weights if names is None else names
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for name in names:
        w = np.abs(arrays[name].astype(np.float64))
        top = float(w.max())
        out[name] = {
            "low_share": float(np.mean(w <= LOW_SHARE * top)) if top > 0 else 1.0,
            "mean_over_max": float(w.mean() / top) if top > 0 else 0.0,
        }
    return out


def train_wct(
    model: str | os.PathLike | onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 30,
    strength: float = 1.0,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> onnx.ModelProto:
    """The model fine-tuned on (x, y) under WCT's constraint: same graph, new weights."""
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise XCompileError(f"train: {name} must be a whole number >= {low}, got {value!r}")
    if not (isinstance(strength, (int, float)) and strength >= 0 and np.isfinite(strength)):
        raise XCompileError(f"train: strength must be a finite number >= 0, got {strength!r}")
    try:
        import torch
    except ImportError:
        raise XCompileError(INSTALL) from None
    source = model if isinstance(model, onnx.ModelProto) else _load(model)
    steps = plan(source)
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # one thread: the same seed gives the same weights (and these models are small)
    generator = np.random.default_rng(seed)
    net = _Interpreter(source, steps, torch)
    optimiser = torch.optim.Adam(net.parameters.values(), lr=learning_rate)
    tops = {name: float(net.parameters[name].detach().abs().max()) for name in steps.weights}
    masks = {name: net.parameters[name].detach() != 0 for name in steps.weights}
    inputs, labels = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    try:
        classes = net(inputs[:1]).shape[-1]
    except RuntimeError as exc:
        raise XCompileError(f"train: inputs of shape {list(x.shape)} do not fit the model: {str(exc).splitlines()[0]}") from None
    if len(labels) == 0 or len(labels) != len(inputs) or labels.min() < 0 or labels.max() >= classes:
        raise XCompileError(f"train: need as many labels as inputs (> 0), each in 0..{classes - 1}; got {len(labels)} labels for {len(inputs)} inputs")
    for _ in range(epochs):
        order = generator.permutation(len(labels))
        for start in range(0, len(order), batch_size):
            batch = torch.from_numpy(order[start : start + batch_size])
            logits = net(inputs[batch])
            loss = torch.nn.functional.cross_entropy(logits, labels[batch])
            for name in steps.weights:
                if tops[name] > 0:
                    loss = loss + strength * net.parameters[name].abs().mean() / tops[name]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                for name in steps.weights:
                    weight = net.parameters[name]
                    weight.clamp_(-tops[name], tops[name])
                    weight.mul_(masks[name])
    trained = onnx.ModelProto()
    trained.CopyFrom(source)
    for initializer in trained.graph.initializer:
        if initializer.name in net.parameters:
            values = net.parameters[initializer.name].detach().numpy().astype(numpy_helper.to_array(initializer).dtype)
            initializer.CopyFrom(numpy_helper.from_array(values, initializer.name))
    return trained


def _load(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise XCompileError(f"train: model '{path}' does not exist")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's decode errors have no common base
        raise XCompileError(f"train: '{path}' is not a readable ONNX model: {exc}") from None


def _attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Interpreter:
    """The ONNX graph run node by node with torch ops; MVM weights and biases are parameters."""

    def __init__(self, model: onnx.ModelProto, steps: Plan, torch):
        self.torch, self.graph = torch, model.graph
        trainable = set(steps.weights) | set(steps.biases)
        self.parameters, self.constants = {}, {}
        for initializer in self.graph.initializer:
            value = torch.from_numpy(numpy_helper.to_array(initializer).copy())
            if initializer.name in trainable:
                self.parameters[initializer.name] = value.float().requires_grad_(True)
            else:
                self.constants[initializer.name] = value
        initializers = {i.name for i in self.graph.initializer}
        self.input = next(i.name for i in self.graph.input if i.name not in initializers)

    def __call__(self, x):
        F = self.torch.nn.functional
        values = {**self.constants, **self.parameters, self.input: x}
        for node in self.graph.node:
            a = _attributes(node)
            args = [values[name] if name else None for name in node.input]
            op = node.op_type
            if op == "Conv":
                pads = a.get("pads", [0, 0, 0, 0])
                if pads[: len(pads) // 2] != pads[len(pads) // 2 :] or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                    raise XCompileError(f"train: Conv '{node.name}' has asymmetric or automatic padding, which the interpreter does not run")
                out = F.conv2d(args[0], args[1], args[2] if len(args) > 2 else None, stride=a.get("strides", 1),
                               padding=pads[: len(pads) // 2], dilation=a.get("dilations", 1), groups=a.get("group", 1))
            elif op == "Gemm":
                left = args[0].t() if a.get("transA", 0) else args[0]
                right = args[1].t() if a.get("transB", 0) else args[1]
                out = a.get("alpha", 1.0) * left @ right
                if len(args) > 2 and args[2] is not None:
                    out = out + a.get("beta", 1.0) * args[2]
            elif op == "MatMul":
                out = args[0] @ args[1]
            elif op == "Add":
                out = args[0] + args[1]
            elif op == "Relu":
                out = F.relu(args[0])
            elif op in ("MaxPool", "AveragePool"):
                pads = a.get("pads", [0, 0, 0, 0])
                if a.get("ceil_mode", 0) or pads[: len(pads) // 2] != pads[len(pads) // 2 :]:
                    raise XCompileError(f"train: {op} '{node.name}' uses ceil mode or asymmetric padding, which the interpreter does not run")
                pool = F.max_pool2d if op == "MaxPool" else F.avg_pool2d
                out = pool(args[0], a["kernel_shape"], stride=a.get("strides", a["kernel_shape"]), padding=pads[: len(pads) // 2])
            elif op == "Flatten":
                if a.get("axis", 1) != 1:
                    raise XCompileError(f"train: Flatten '{node.name}' with axis {a['axis']} is not run by the interpreter (axis 1 only)")
                out = args[0].flatten(1)
            elif op == "Reshape":
                out = args[0].reshape([int(d) if d != 0 else args[0].shape[i] for i, d in enumerate(args[1].tolist())])
            else:  # Identity, Dropout (inference: identity)
                out = args[0]
            values[node.output[0]] = out
        return values[self.graph.output[0].name]
