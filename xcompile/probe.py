"""Output-gain probes: how much the loss moves when MVM output channels lose part of their signal.

Line resistance attenuates each crossbar output position by its own factor, so remapping asks,
per layer output, what a gain g < 1 on it costs. The probe is the float model (ONNX Runtime)
with a Mul after every MVM layer's output, by a gain per sample and output channel fed as a
graph input: one run evaluates many gain patterns by stacking copies of the calibration batch.
The loss is the mean cross-entropy against the calibration labels, or against the float model's
own predictions when there are none (then it measures agreement with the float model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from xcompile.data import check_classes, check_feeds, check_labels, check_samples, load_calibration, node_arg
from xcompile.errors import XCompileError
from xcompile.ir import Program
from xcompile.runtime.ort_session import inference_session

GAIN_PREFIX = "xcompile_gain_"
ROWS_PER_RUN = 8192  # samples (stacked patterns x calibration batch) per ONNX Runtime run


@dataclass(frozen=True)
class Calibration:
    """Inputs (and labels, if known) that data-driven passes measure the model on."""

    x: np.ndarray
    y: np.ndarray | None = None

    @classmethod
    def load(cls, source) -> "Calibration":
        """From 'digits' (the shipped calibration split), an .npz path with `x` (and optionally
        `y` labels), an (x, y) pair, a dict with x / y, or an array of inputs."""
        if isinstance(source, Calibration):
            return source
        if isinstance(source, (str, os.PathLike)):
            return cls(*load_calibration(source))
        if isinstance(source, dict):
            if "x" not in source:
                raise XCompileError(f"calibration data must hold inputs 'x' (and optionally labels 'y'); it has {sorted(source)}")
            return cls(np.asarray(source["x"]), None if source.get("y") is None else check_labels(source["y"], "calibration data"))
        if isinstance(source, tuple) and len(source) == 2:
            return cls(np.asarray(source[0]), None if source[1] is None else check_labels(source[1], "calibration data"))
        return cls(np.asarray(source))

    def __post_init__(self) -> None:
        check_samples(self.x, self.y, "calibration data")

    def describe(self) -> dict:
        """What a pass record keeps of the data: its size and a digest, not the data."""
        import hashlib

        digest = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        if self.y is not None:
            digest.update(np.ascontiguousarray(self.y).tobytes())
        return {"samples": int(self.x.shape[0]), "labels": self.y is not None, "sha256": digest.hexdigest()}


class GainProbe:
    """`losses(gains)`: the calibration loss for each pattern of per-channel output gains."""

    def __init__(self, program: Program, calibration: Calibration):
        model = onnx.load_from_string(program.model)
        inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        if len(inputs) != 1:
            raise XCompileError(f"data-driven remapping needs a model with one input; this one has {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        self.x = check_feeds({self.input_name: calibration.x}, [node_arg(inputs[0])], data_set="calibration data")[self.input_name]
        self.layers = list(program.layers)
        self._channel_axis = {}
        probed = self._insert_gains(model)
        self.session = inference_session(probed.SerializeToString())
        self.output_name = probed.graph.output[0].name
        batch = inputs[0].type.tensor_type.shape.dim[0] if inputs[0].type.tensor_type.shape.dim else None
        self.fixed_batch = batch.dim_value if batch is not None and batch.HasField("dim_value") else None
        if self.fixed_batch and self.x.shape[0] < self.fixed_batch:
            raise XCompileError(
                f"calibration data has {self.x.shape[0]} samples; the model's input '{self.input_name}' takes batches of {self.fixed_batch}"
            )
        if self.fixed_batch:
            self.x = self.x[: self.x.shape[0] // self.fixed_batch * self.fixed_batch]
        logits = self._run(self.x, {})
        self.spread = float(logits.reshape(logits.shape[0], -1).std(axis=1).mean()) or 1.0
        if calibration.y is not None:
            y = np.asarray(calibration.y)[: self.x.shape[0]]
            check_classes(y, logits.shape[-1], "calibration data")
            self.labels = y.astype(np.int64)
        else:
            self.labels = logits.reshape(logits.shape[0], -1).argmax(-1)

    def losses(self, layer_index: int, patterns: np.ndarray, base: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """Per-sample losses [P, samples]: row p of `patterns` [P, N] as the gains of layer
        `layer_index`, `base` gains [N] on the other layers (1 where not given)."""
        samples = self.x.shape[0]
        per_run = max(1, ROWS_PER_RUN // samples)
        out = np.empty((len(patterns), samples))
        for start in range(0, len(patterns), per_run):
            chunk = np.asarray(patterns[start : start + per_run])
            rows = len(chunk) * samples
            gains = {index: np.broadcast_to(g, (rows, g.shape[-1])) for index, g in (base or {}).items()}
            gains[layer_index] = np.repeat(chunk, samples, axis=0)
            logits = self._run(np.concatenate([self.x] * len(chunk)), gains)
            out[start : start + len(chunk)] = self.sample_losses(logits, np.tile(self.labels, len(chunk))).reshape(len(chunk), samples)
        return out

    def sample_losses(self, logits: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Cross-entropy per sample of scale-free logits: each sample's logits divided by their
        spread and multiplied by the float model's mean spread. A ReLU network's outputs scale
        with a common attenuation without changing a single decision, so only what changes
        decisions (relative gains, bias against signal, crosstalk) may count as loss."""
        z = logits.reshape(logits.shape[0], -1).astype(np.float64)
        spread = z.std(axis=1, keepdims=True)
        z = z / np.where(spread > 0, spread, 1.0) * self.spread
        return _cross_entropy(z, self.labels if labels is None else labels)

    def _run(self, x: np.ndarray, gains: dict[int, np.ndarray]) -> np.ndarray:
        rows = x.shape[0]
        feeds_gain = {}
        for layer in self.layers:
            g = gains.get(layer.index)
            g = np.ones((rows, layer.outputs), np.float32) if g is None else np.asarray(g, np.float32)
            feeds_gain[GAIN_PREFIX + str(layer.index)] = self._shaped(layer.index, g)
        step = self.fixed_batch or rows
        parts = []
        for start in range(0, rows, step):
            feeds = {self.input_name: x[start : start + step]}
            feeds.update({k: v[start : start + step] for k, v in feeds_gain.items()})
            parts.append(self.session.run([self.output_name], feeds)[0])
        return np.concatenate(parts)

    def _shaped(self, index: int, gains: np.ndarray) -> np.ndarray:
        """[rows, N] gains broadcastable against the layer's output tensor."""
        axis, rank = self._channel_axis[index]
        shape = [gains.shape[0]] + [1] * (rank - 1)
        shape[axis] = gains.shape[1]
        return np.ascontiguousarray(gains).reshape(shape)

    def _insert_gains(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The model with y_l <- y_l * gain_l after every MVM layer's output tensor."""
        inferred = onnx.shape_inference.infer_shapes(model)
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        produced = {o for node in model.graph.node for o in node.output}
        graph = model.graph
        for layer in self.layers:
            name = layer.output_name
            if name not in produced or name not in ranks:
                raise XCompileError(f"layer '{layer.name}': its output '{name}' is not a tensor of the original model, so it cannot be probed")
            rank = ranks[name]
            axis = 1 if layer.kind != "dense" else rank - 1
            self._channel_axis[layer.index] = (axis, rank)
            raw = name + "__xcompile_raw"
            for node in graph.node:
                node.output[:] = [raw if o == name else o for o in node.output]
            gain = GAIN_PREFIX + str(layer.index)
            shape = [None] + [1] * (rank - 1)
            shape[axis] = layer.outputs
            graph.input.append(helper.make_tensor_value_info(gain, onnx.TensorProto.FLOAT, shape))
            graph.node.append(helper.make_node("Mul", [raw, gain], [name], name=f"xcompile_probe_{layer.index}"))
        sorted_model = onnx.ModelProto()
        sorted_model.CopyFrom(model)
        _topological_sort(sorted_model.graph)
        return sorted_model


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every node follows the producers of its inputs (the probes were appended)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise XCompileError("the model's graph has a cycle or reads a value nothing produces")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if not any(n is r for r in ready)]
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]
