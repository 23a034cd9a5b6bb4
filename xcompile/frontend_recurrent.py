"""ONNX LSTM / GRU / RNN: W and R on crossbars as MVM layers, the recurrence digital.

Each direction's input weights W become one dense layer, run on all time steps at once; its
recurrent weights R one layer (GRU without `linear_before_reset`: two, since R_h multiplies
r * h, not h), run once per step. The node becomes one `ai.xcompile::CrossbarRecurrent` node that
the runtime executes (runtime/recurrent.py): it keeps the ONNX attributes and the digital inputs
(X, sequence_lens, initial_h, initial_c, peepholes P) and names its layers.
ONNX Runtime's `DynamicQuantizeLSTM` (what `quantize_dynamic` makes of an LSTM) maps the same way
with its int8 / uint8 W and R dequantised (per direction, or per gate column) and the runtime
quantising each product's input as that kernel does (`dynamic_quantize`, runtime/recurrent.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from xcompile.coverage import Unsupported
from xcompile.ir import CUSTOM_DOMAIN, RECURRENT_OP, Layer, frozen_array

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
DYNAMIC_LSTM = "DynamicQuantizeLSTM"  # com.microsoft
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
ACTIVATIONS = {  # name -> (alpha, beta) it takes, with ONNX's defaults
    "Relu": (), "Tanh": (), "Sigmoid": (), "Softsign": (), "Softplus": (),
    "Affine": (1.0, 0.0), "LeakyRelu": (0.01,), "ThresholdedRelu": (1.0,), "ScaledTanh": (1.0, 1.0),
    "HardSigmoid": (0.2, 0.5), "Elu": (1.0,),
}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
DENSE = {"weight_left": False, "transpose_input": False, "squeeze": False}


def build_recurrent(node: ir.Node, first_index: int, name: str) -> tuple[list[Layer], ir.Node]:
    """The layers of one recurrent node and the runtime node that replaces it (raises Unsupported)."""
    op = node.op_type
    inputs = (list(node.inputs) + [None] * 12)[:12]
    x, w_value, r_value, b_value, seq_lens, initial_h = inputs[:6]
    quantised = op == DYNAMIC_LSTM
    if quantised:  # W [dirs, input, 4H] and R [dirs, H, 4H], transposed against the ONNX LSTM's
        op = "LSTM"
        w = _dequantised(w_value, inputs[8], inputs[9], "W").transpose(0, 2, 1)
        r = _dequantised(r_value, inputs[10], inputs[11], "R").transpose(0, 2, 1)
    else:
        w, r = _const(w_value, "W"), _const(r_value, "R")
    initial_c, peepholes = (inputs[6], inputs[7]) if op == "LSTM" else (None, None)
    attrs = {k: v.value for k, v in node.attributes.items()}
    hidden = int(attrs.get("hidden_size", r.shape[-1]))
    gates = GATES[op]
    directions = {"forward": 1, "reverse": 1, "bidirectional": 2}.get(attrs.get("direction", "forward"))
    if directions is None:
        raise Unsupported(f"direction '{attrs['direction']}' is not forward, reverse or bidirectional")
    if w.ndim != 3 or w.shape[:2] != (directions, gates * hidden) or r.shape != (directions, gates * hidden, hidden):
        raise Unsupported(f"W {list(w.shape)} / R {list(r.shape)} do not fit {directions} direction(s) of {gates} x {hidden} gates")
    bias = np.zeros((directions, 2 * gates * hidden), np.float32) if b_value is None else _const(b_value, "B")
    if bias.shape != (directions, 2 * gates * hidden):
        raise Unsupported(f"B has shape {list(bias.shape)}, expected {[directions, 2 * gates * hidden]}")
    activations = _activations(op, attrs, directions)
    if peepholes is not None and _const(peepholes, "P").shape != (directions, 3 * hidden):
        raise Unsupported(f"P has shape {list(peepholes.const_value.shape)}, expected {[directions, 3 * hidden]}")
    lbr = int(attrs.get("linear_before_reset", 0))
    layout = int(attrs.get("layout", 0))
    steps = _steps(x, layout)

    layers: list[Layer] = []

    def add(suffix, matrix, vector, input_name):
        layers.append(Layer(
            index=first_index + len(layers), name=f"{name}/{suffix}", node_name=node.name or "", op_type=node.op_type, kind="dense",
            geometry=dict(DENSE), weight=frozen_array(matrix.T[None], np.float32), bias=frozen_array(vector, np.float32),
            input_name=input_name, output_name=f"{name}/{suffix}", notes={"vectors_per_sample": steps},
        ))
        return layers[-1].index

    w_layers, r_layers = [], []
    for d in range(directions):
        side = ("forward", "reverse")[d] if directions == 2 else attrs.get("direction", "forward")
        wb, rb = bias[d, : gates * hidden], bias[d, gates * hidden :]
        w_layers.append(add(f"W_{side}", w[d], wb, x.name or ""))
        if op == "GRU" and not lbr:  # R_h multiplies r * h: a layer of its own
            r_layers.append(add(f"R_zr_{side}", r[d, : 2 * hidden], rb[: 2 * hidden], f"{name}/h_{side}"))
            r_layers.append(add(f"R_h_{side}", r[d, 2 * hidden :], rb[2 * hidden :], f"{name}/rh_{side}"))
        else:
            r_layers.append(add(f"R_{side}", r[d], rb, f"{name}/h_{side}"))

    runtime_attrs = {
        "op": op, "hidden_size": hidden, "directions": directions, "direction": attrs.get("direction", "forward"),
        "layout": layout, "linear_before_reset": lbr, "input_forget": int(attrs.get("input_forget", 0)),
        "activations": activations, "w_layers": w_layers, "r_layers": r_layers,
        "activation_alpha": [float(a) for a in _alpha_beta(activations, attrs, 0)],
        "activation_beta": [float(b) for b in _alpha_beta(activations, attrs, 1)],
    }
    if "clip" in attrs:
        runtime_attrs["clip"] = float(attrs["clip"])
    if quantised:
        runtime_attrs["dynamic_quantize"] = 1
    runtime = ir.node(
        RECURRENT_OP, [x, seq_lens, initial_h, initial_c, peepholes], runtime_attrs,
        domain=CUSTOM_DOMAIN, name=f"xcompile/{name}", num_outputs=len(node.outputs),
    )
    return layers, runtime


def _const(value, what: str) -> np.ndarray:
    if value is None or value.const_value is None or value.is_graph_input():
        raise Unsupported(f"{what} ('{value.name if value is not None else ''}') is not a constant; a crossbar needs constant weights")
    return np.asarray(value.const_value.numpy(), dtype=np.float32)


def _dequantised(value, scale_value, zero_value, what: str) -> np.ndarray:
    """(integers - zero point) * scale, per direction or per gate column, as float32."""
    if value is None or value.const_value is None or value.is_graph_input():
        raise Unsupported(f"{what} is not a constant; a crossbar needs constant weights")
    integers = np.asarray(value.const_value.numpy())
    scale = _const(scale_value, f"{what}_scale")
    zero = np.zeros_like(scale) if zero_value is None else _const(zero_value, f"{what}_zero_point")
    if integers.ndim != 3 or scale.shape not in ((integers.shape[0],), (integers.shape[0], integers.shape[2])) or zero.shape != scale.shape:
        raise Unsupported(f"{what} {list(integers.shape)} with scale {list(scale.shape)} and zero point {list(zero.shape)}: "
                          "xcompile lowers one scale per direction or per gate column")
    column = (slice(None), None, None) if scale.ndim == 1 else (slice(None), None, slice(None))
    return ((integers.astype(np.float32) - zero[column]) * scale[column]).astype(np.float32)


def _activations(op: str, attrs: dict, directions: int) -> list[str]:
    names = list(attrs.get("activations", [])) or DEFAULT_ACTIVATIONS[op] * directions
    per = len(DEFAULT_ACTIVATIONS[op])
    if len(names) == per and directions == 2:
        names = names * 2
    if len(names) != per * directions:
        raise Unsupported(f"{len(names)} activations given, {op} takes {per} per direction")
    canonical = {n.lower(): n for n in ACTIVATIONS}
    unknown = [n for n in names if n.lower() not in canonical]
    if unknown:
        raise Unsupported(f"activation(s) {unknown} are not ones xcompile runs")
    return [canonical[n.lower()] for n in names]


def _alpha_beta(activations: list[str], attrs: dict, which: int) -> list[float]:
    """Per activation, its alpha (which=0) or beta (1): the given lists are consumed in the order
    of the activations that take one, ONNX's defaults for the rest."""
    given = list(attrs.get("activation_alpha" if which == 0 else "activation_beta", []))
    values = []
    for name in activations:
        defaults = ACTIVATIONS[name]
        if len(defaults) > which:
            values.append(given.pop(0) if given else defaults[which])
        else:
            values.append(0.0)
    return values


def _steps(x, layout: int):
    shape = None if x is None or x.shape is None else list(x.shape)
    if shape is None or len(shape) != 3:
        return None
    steps = shape[1 if layout else 0]
    return steps if isinstance(steps, int) else None
