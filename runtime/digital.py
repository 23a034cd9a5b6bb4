"""The digital side of an MVM layer: forming input vectors (im2col) and outputs (col2im, layout).

Pure numpy on views wherever possible; N-D for every convolution rank. Conventions follow the ONNX
operator specifications (Conv, ConvTranspose, Gemm, MatMul).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv_pads(in_shape, geometry) -> tuple[list[int], list[int]]:
    """Begin / end padding of a Conv for the given spatial input shape (auto_pad resolved)."""
    rank, auto_pad = geometry["rank"], geometry["auto_pad"]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(in_shape, geometry["kernel"], geometry["strides"], geometry["dilations"]):
            out = math.ceil(size / s)
            total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin, end
    if auto_pad == "VALID":
        return [0] * rank, [0] * rank
    pads = geometry["pads"]
    return list(pads[:rank]), list(pads[rank:])


def im2col(x: np.ndarray, geometry) -> tuple[np.ndarray, tuple[int, ...]]:
    """[B, C, *S] -> ([B * prod(O), C * prod(k)] patch rows, O).

    Row order within a patch: group, kernel offset, channel of the group — the layer matrix's
    row order (xcompile/frontend_mvm.py). The input goes channels-last first, so every gather copies
    a run of channels.
    """
    rank, group = geometry["rank"], geometry["group"]
    kernel, strides, dilations = geometry["kernel"], geometry["strides"], geometry["dilations"]
    begin, end = conv_pads(x.shape[2:], geometry)
    x = np.moveaxis(x, 1, -1)  # [B, *S, C]
    if any(begin) or any(end):
        x = np.pad(x, [(0, 0)] + list(zip(begin, end)) + [(0, 0)])
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    if any(size < span for size, span in zip(x.shape[1:-1], spans)):
        raise ValueError(f"padded input {list(x.shape[1:-1])} is smaller than the kernel's span {spans}")
    windows = sliding_window_view(x, spans, axis=tuple(range(1, 1 + rank)))  # [B, *O', C, *span]
    index = (slice(None),) + tuple(slice(None, None, s) for s in strides) + (slice(None),) + tuple(
        slice(None, None, d) for d in dilations
    )
    windows = windows[index]  # [B, *O, C, *k]
    out_shape = windows.shape[1 : 1 + rank]
    channels = windows.shape[1 + rank]
    order = tuple(range(1 + rank)) + tuple(range(2 + rank, 2 + 2 * rank)) + (1 + rank,)
    patches = windows.transpose(order)  # [B, *O, *k, C]
    positions = x.shape[0] * math.prod(out_shape)
    row = math.prod(kernel) * channels  # explicit, not -1: an empty batch has no size to infer from
    if group == 1:
        return patches.reshape(positions, row), tuple(out_shape)
    patches = patches.reshape(positions, math.prod(kernel), group, channels // group)
    return patches.transpose(0, 2, 1, 3).reshape(positions, row), tuple(out_shape)


def conv_output(y: np.ndarray, batch: int, out_shape) -> np.ndarray:
    """MVM rows [B * prod(O), N] -> [B, N, *O]."""
    y = y.reshape((batch,) + tuple(out_shape) + (y.shape[-1],))
    return np.moveaxis(y, -1, 1)


def conv_transpose_geometry(in_shape, geometry) -> tuple[list[int], list[int]]:
    """(begin pads, output spatial shape) of a ConvTranspose, as the ONNX specification gives them."""
    rank = geometry["rank"]
    strides, dilations, kernel = geometry["strides"], geometry["dilations"], geometry["kernel"]
    out_pad = geometry["output_padding"]
    full = [s * (i - 1) + op + d * (k - 1) + 1 for i, s, op, d, k in zip(in_shape, strides, out_pad, dilations, kernel)]
    output_shape = geometry["output_shape"][-rank:] if geometry["output_shape"] else None
    auto_pad = geometry["auto_pad"]
    if output_shape is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # as ONNX Runtime: the padding is never negative, the output never larger than full
        output_shape = [f - max(0, f - i * s) for f, i, s in zip(full, in_shape, strides)]
    if output_shape is not None:
        begin = []
        for f, o in zip(full, output_shape):
            total = max(0, f - o)  # ONNX Runtime pads by >= 0; a larger output_shape is zeros at the end
            begin.append(total - total // 2 if auto_pad != "SAME_UPPER" else total // 2)
        return begin, list(output_shape)
    pads = [0] * (2 * rank) if auto_pad == "VALID" else geometry["pads"]
    begin = list(pads[:rank])
    return begin, [f - b - e for f, b, e in zip(full, begin, pads[rank:])]


def col2im(cols: np.ndarray, batch: int, in_shape, geometry, channels_out: int) -> np.ndarray:
    """ConvTranspose scatter-add: MVM rows [B * prod(I), Cout * prod(k)] -> [B, Cout, *out]."""
    rank = geometry["rank"]
    kernel, strides, dilations = geometry["kernel"], geometry["strides"], geometry["dilations"]
    begin, out_shape = conv_transpose_geometry(in_shape, geometry)
    cols = cols.reshape((batch,) + tuple(in_shape) + (channels_out,) + tuple(kernel))
    cols = np.moveaxis(cols, 1 + rank, 1)  # [B, Cout, *I, *k]
    canvas_shape = [
        max(s * (i - 1) + d * (k - 1) + 1, b + o)
        for i, s, d, k, b, o in zip(in_shape, strides, dilations, kernel, begin, out_shape)
    ]
    lead = [max(0, -b) for b in begin]  # negative begin padding extends the canvas at the front
    canvas = np.zeros((batch, channels_out) + tuple(c + l for c, l in zip(canvas_shape, lead)), dtype=cols.dtype)
    for offset in np.ndindex(*kernel):
        target = (slice(None), slice(None)) + tuple(
            slice(l + o * d, l + o * d + s * (i - 1) + 1, s)
            for l, o, d, s, i in zip(lead, offset, dilations, strides, in_shape)
        )
        canvas[target] += cols[(Ellipsis,) + offset]
    crop = (slice(None), slice(None)) + tuple(slice(l + b, l + b + o) for l, b, o in zip(lead, begin, out_shape))
    return canvas[crop]


def dense_input(x: np.ndarray, geometry) -> tuple[np.ndarray, dict]:
    """Input vectors of a Gemm / MatMul layer as rows [P, K], and what `dense_output` needs."""
    if geometry["transpose_input"]:
        x = x.T
    axis = -2 if geometry["weight_left"] and x.ndim > 1 else -1
    moved = np.moveaxis(x, axis, -1)
    return moved.reshape(-1, moved.shape[-1]), {"lead": moved.shape[:-1], "axis": axis}


def dense_output(y: np.ndarray, info: dict, geometry) -> np.ndarray:
    y = y.reshape(tuple(info["lead"]) + (y.shape[-1],))
    if geometry["squeeze"]:
        return y[..., 0]
    return np.moveaxis(y, -1, info["axis"])
