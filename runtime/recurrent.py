"""The digital recurrence of an ONNX LSTM / GRU / RNN around its crossbar layers.

W x for every time step is one batch through the W layer; R h goes through the R layer once per
step; gates, peepholes, clip, activations and the state update are numpy, as the ONNX operator
specifications define them (layout 0 and 1, sequence_lens, initial states, linear_before_reset,
input_forget). Steps past a sequence's length keep its state and output zeros, as ONNX Runtime.
With `dynamic_quantize` (ONNX Runtime's DynamicQuantizeLSTM) every input of a crossbar product
is first quantised as that kernel does, once per product: the whole X of a direction, then h at
each step, to uint8 on the range [min(v, 0), max(v, 0)] (round half to even), and dequantised.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _activation(name: str, alpha: float, beta: float) -> Callable[[np.ndarray], np.ndarray]:
    def sigmoid(v):
        return np.exp(-np.logaddexp(0, -v)).astype(v.dtype)

    return {
        "Sigmoid": sigmoid,
        "Tanh": np.tanh,
        "Relu": lambda v: np.maximum(v, 0),
        "Affine": lambda v: alpha * v + beta,
        "LeakyRelu": lambda v: np.where(v >= 0, v, alpha * v),
        "ThresholdedRelu": lambda v: np.where(v > alpha, v, 0),
        "ScaledTanh": lambda v: alpha * np.tanh(beta * v),
        "HardSigmoid": lambda v: np.clip(alpha * v + beta, 0, 1),
        "Elu": lambda v: np.where(v >= 0, v, alpha * (np.exp(v) - 1)),
        "Softsign": lambda v: v / (1 + np.abs(v)),
        "Softplus": lambda v: np.logaddexp(0, v),
    }[name]


def run(attrs: dict, x, seq_lens, initial_h, initial_c, peepholes, mvm: Callable[[int, np.ndarray], np.ndarray]) -> list:
    """(Y, Y_h, Y_c) of one recurrent node; mvm(layer index, rows [..., K]) runs a crossbar layer."""
    op, hidden, directions = attrs["op"], attrs["hidden_size"], attrs["directions"]
    x = np.asarray(x)
    dtype = x.dtype
    if attrs["layout"]:
        x = x.transpose(1, 0, 2)  # [batch, T, I] -> [T, batch, I]
        initial_h = None if initial_h is None else np.asarray(initial_h).transpose(1, 0, 2)
        initial_c = None if initial_c is None else np.asarray(initial_c).transpose(1, 0, 2)
    steps, batch = x.shape[:2]
    lengths = np.full(batch, steps, np.int64) if seq_lens is None else np.asarray(seq_lens).astype(np.int64)
    per = len(attrs["activations"]) // directions
    y = np.zeros((steps, directions, batch, hidden), dtype)
    y_h = np.zeros((directions, batch, hidden), dtype)
    y_c = np.zeros((directions, batch, hidden), dtype)
    r_per = len(attrs["r_layers"]) // directions
    if attrs.get("dynamic_quantize"):
        mvm = _dynamically_quantised(mvm)
    for d in range(directions):
        reverse = attrs["direction"] == "reverse" or d == 1
        funcs = [
            _activation(n, a, b)
            for n, a, b in zip(*(attrs[k][d * per : (d + 1) * per] for k in ("activations", "activation_alpha", "activation_beta")))
        ]
        order = _time_order(steps, lengths, reverse)  # [T, batch]: the input step each step reads
        xw = mvm(attrs["w_layers"][d], x)  # [T, batch, gates * hidden], all steps at once
        xw = np.take_along_axis(xw, order[:, :, None], axis=0)
        h = np.zeros((batch, hidden), dtype) if initial_h is None else np.asarray(initial_h)[d].astype(dtype)
        c = np.zeros((batch, hidden), dtype) if initial_c is None else np.asarray(initial_c)[d].astype(dtype)
        p = None if peepholes is None else np.asarray(peepholes)[d].astype(dtype)
        layers = attrs["r_layers"][d * r_per : (d + 1) * r_per]
        outputs = np.zeros((steps, batch, hidden), dtype)
        for t in range(steps):
            live = (t < lengths)[:, None]
            if op == "LSTM":
                h_new, c_new = _lstm_step(attrs, funcs, xw[t], mvm(layers[0], h), c, p)
                c = np.where(live, c_new, c)
            elif op == "GRU":
                h_new = _gru_step(attrs, funcs, xw[t], h, layers, mvm)
            else:
                h_new = funcs[0](_clip(attrs, xw[t] + mvm(layers[0], h)))
            h = np.where(live, h_new, h)
            outputs[t] = np.where(live, h_new, 0)
        np.put_along_axis(y[:, d], order[:, :, None], outputs, axis=0)
        y[:, d] = np.where((np.arange(steps)[:, None] < lengths)[:, :, None], y[:, d], 0)
        y_h[d], y_c[d] = h, c
    if attrs["layout"]:
        return [y.transpose(2, 0, 1, 3), y_h.transpose(1, 0, 2), y_c.transpose(1, 0, 2)]
    return [y, y_h, y_c]


def _dynamically_quantised(mvm: Callable[[int, np.ndarray], np.ndarray]) -> Callable[[int, np.ndarray], np.ndarray]:
    """mvm with its input quantised to uint8 over the whole input, and dequantised, first."""

    def quantised(index: int, v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float32)
        low, high = np.float32(min(float(v.min(initial=0.0)), 0.0)), np.float32(max(float(v.max(initial=0.0)), 0.0))
        scale = np.float32(1.0) if high == low else np.float32((high - low) / np.float32(255))
        zero = np.float32(np.rint(np.clip(np.float32(0) - low / scale, 0, 255)))
        levels = np.clip(np.rint(v / scale) + zero, 0, 255)
        return mvm(index, ((levels - zero) * scale).astype(np.float32))

    return quantised


def _time_order(steps: int, lengths: np.ndarray, reverse: bool) -> np.ndarray:
    """[T, batch] input step read at each recurrence step: t, or a sequence's own steps backwards."""
    t = np.arange(steps)[:, None].repeat(len(lengths), axis=1)
    if not reverse:
        return t
    backwards = lengths[None, :] - 1 - t
    return np.where(backwards >= 0, backwards, t)  # padded steps map onto themselves (masked)


def _clip(attrs: dict, v: np.ndarray) -> np.ndarray:
    return np.clip(v, -attrs["clip"], attrs["clip"]) if "clip" in attrs else v


def _lstm_step(attrs, funcs, xw, rh, c, p):
    f, g, h_act = funcs
    gates = xw + rh
    hidden = c.shape[-1]
    i_in, o_in, f_in, c_in = (gates[:, k * hidden : (k + 1) * hidden] for k in range(4))
    if p is not None:
        i_in = i_in + p[:hidden] * c
        f_in = f_in + p[2 * hidden :] * c
    i = f(_clip(attrs, i_in))
    forget = 1 - i if attrs["input_forget"] else f(_clip(attrs, f_in))
    c_new = forget * c + i * g(_clip(attrs, c_in))
    if p is not None:
        o_in = o_in + p[hidden : 2 * hidden] * c_new
    o = f(_clip(attrs, o_in))
    return o * h_act(c_new), c_new


def _gru_step(attrs, funcs, xw, h, layers, mvm):
    f, g = funcs
    hidden = h.shape[-1]
    if attrs["linear_before_reset"]:
        rh = mvm(layers[0], h)
        z = f(_clip(attrs, xw[:, :hidden] + rh[:, :hidden]))
        r = f(_clip(attrs, xw[:, hidden : 2 * hidden] + rh[:, hidden : 2 * hidden]))
        candidate = g(_clip(attrs, xw[:, 2 * hidden :] + r * rh[:, 2 * hidden :]))
    else:
        rh = mvm(layers[0], h)
        z = f(_clip(attrs, xw[:, :hidden] + rh[:, :hidden]))
        r = f(_clip(attrs, xw[:, hidden : 2 * hidden] + rh[:, hidden:]))
        candidate = g(_clip(attrs, xw[:, 2 * hidden :] + mvm(layers[1], r * h)))
    return (1 - z) * candidate + z * h
