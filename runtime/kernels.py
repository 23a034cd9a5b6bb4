"""Numba kernels of the crossbar runtime: the per-element work around the array GEMMs.

The array read itself (input voltages @ G_eff) is a BLAS GEMM; these kernels are the DAC before it
and the ADC + digital recombination after it, fused so each current is touched once. They are
serial and release the GIL: the runtime runs batch chunks on its own threads (BLAS held to one
thread meanwhile), which keeps both cores busy without BLAS and OpenMP threads fighting.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from xcompile.runtime.converters import adc, dac_code


@numba.njit(nogil=True, cache=True)
def dac(x, scale, levels, sign, out):
    """Normalised row voltages of the part of x with this sign (code / levels, or |x| / scale
    for an ideal DAC; 0 elsewhere): one pass of a signed input.

    x [P, K]; scale [P] (the range of each vector); returns whether any input had the other sign.
    """
    rows, k = x.shape
    other_sign = False
    for p in range(rows):
        s = scale[p]
        inverse = 1.0 / s if s > 0.0 else 0.0
        for i in range(k):
            value = sign * x[p, i]
            if levels > 0:
                u = dac_code(abs(value), s, levels) / levels if s > 0.0 else 0.0
            else:
                u = min(abs(value) * inverse, 1.0)
            out[p, i] = u if value > 0.0 else 0.0
            other_sign |= value < 0.0
    return other_sign


@numba.njit(nogil=True, cache=True)
def bit_plane(x, scale, levels, sign, bit, out):
    """Row voltages (0 or 1) of one input bit: bit `bit` of the DAC code of sign * x."""
    rows, k = x.shape
    for p in range(rows):
        s = scale[p]
        for i in range(k):
            value = sign * x[p, i]
            code = 0
            if value > 0.0 and s > 0.0:
                code = int(dac_code(value, s, levels))
            out[p, i] = (code >> bit) & 1


@numba.njit(nogil=True, cache=True)
def convert_accumulate(currents, convert, inverse_full_scale, step, levels, alpha, gain, tile_base, tile_acc, tile_columns, weight, acc):
    """acc[p, tile_acc[t] + c] += weight * gain[...] * ADC(currents[p, tile_base[t] + c]) for each
    tile t (gain: the digital per-column gain of compensation, 1 without); returns how many
    conversions were above full scale (clipped).

    currents [P, C]: one row block's tiles side by side. acc holds one column per physical column
    of a column block, so row blocks that share outputs add up before the (linear) recombination.
    convert = False: an ideal ADC. Row and tile slices keep the inner loops contiguous, so they
    vectorise.
    """
    tanh_alpha = math.tanh(alpha) if alpha > 0.0 else 1.0
    clipped = 0
    for p in range(currents.shape[0]):
        count = 0
        row, target = currents[p], acc[p]
        for t in range(tile_base.size):
            first, width = tile_base[t], tile_columns[t]
            source = row[first : first + width]
            into = target[tile_acc[t] : tile_acc[t] + width]
            factor = gain[first : first + width]
            if convert:
                inverse, quantum = inverse_full_scale[first : first + width], step[first : first + width]
                for c in range(width):
                    count += source[c] * inverse[c] > 1.0
                    into[c] += weight * factor[c] * adc(source[c], inverse[c], quantum[c], levels, alpha, tanh_alpha)
            else:
                for c in range(width):
                    into[c] += weight * factor[c] * source[c]
        clipped += count
    return clipped


@numba.njit(nogil=True, cache=True)
def combine(acc, block_acc, block_out, block_outputs, term_offset, term_step, term_coeff, row_factor, bias, out):
    """out[p, block_out[b] + j] = row_factor[p] * sum_k coeff_k * acc[p, block_acc[b] + offset_k + step_k * j] + bias.

    Each output row is summed in float64 and rounded once into out (float32 or float64). Column
    blocks own disjoint outputs, so the first term of each block writes and the others add.
    """
    line = np.empty(out.shape[1])
    for p in range(acc.shape[0]):
        row, factor = acc[p], row_factor[p]
        for b in range(block_acc.size):
            into = line[block_out[b] : block_out[b] + block_outputs[b]]
            for k in range(term_offset.size):
                start, stride, coeff = block_acc[b] + term_offset[k], term_step[k], factor * term_coeff[k]
                if k == 0:
                    for j in range(block_outputs[b]):
                        into[j] = coeff * row[start + stride * j]
                else:
                    for j in range(block_outputs[b]):
                        into[j] += coeff * row[start + stride * j]
        target = out[p]
        for j in range(line.size):
            target[j] = line[j] + bias[j]
