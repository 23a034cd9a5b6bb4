"""Numba kernels of the crossbar runtime: the per-element work around the array GEMMs.

The array read itself (input voltages @ G_eff) is a BLAS GEMM; these kernels are the DAC before it
and the ADC + digital recombination after it, fused so each current is touched once.
"""

from __future__ import annotations

import numba
import numpy as np

from xcompile.runtime.converters import adc, dac_code


@numba.njit(parallel=True, cache=True)
def dac_split(x, scale, levels, positive, negative):
    """Normalised row voltages (code / levels, or |x| / scale for an ideal DAC) of both signs.

    x [P, K]; scale [P] (the range of each vector); returns whether any input was negative.
    """
    rows, k = x.shape
    any_negative = np.zeros(rows, dtype=np.bool_)
    for p in numba.prange(rows):
        s = scale[p]
        for i in range(k):
            value = x[p, i]
            magnitude = abs(value)
            u = 0.0
            if s > 0.0:
                u = dac_code(magnitude, s, levels) / levels if levels > 0 else min(magnitude / s, 1.0)
            if value >= 0.0:
                positive[p, i] = u
                negative[p, i] = 0.0
            else:
                positive[p, i] = 0.0
                negative[p, i] = u
                any_negative[p] = True
    return any_negative.any()


@numba.njit(parallel=True, cache=True)
def bit_plane(x, scale, levels, sign, bit, out):
    """Row voltages (0 or 1) of one input bit: bit `bit` of the DAC code of sign * x."""
    rows, k = x.shape
    for p in numba.prange(rows):
        s = scale[p]
        for i in range(k):
            value = sign * x[p, i]
            code = 0
            if value > 0.0 and s > 0.0:
                code = int(dac_code(value, s, levels))
            out[p, i] = (code >> bit) & 1


@numba.njit(parallel=True, cache=True)
def adc_accumulate(currents, full_scale, levels, alpha, col_ptr, dst, coeff, weight, out, clipped):
    """out[p, dst] += weight * coeff * ADC(currents[p, c]) for every column c and its entries.

    levels = 2^a - 1 (0: ideal ADC). clipped[p] counts conversions above full scale.
    """
    rows, cols = currents.shape
    for p in numba.prange(rows):
        count = 0
        for c in range(cols):
            current = currents[p, c]
            if levels > 0:
                if current > full_scale[c]:
                    count += 1
                current = adc(current, full_scale[c], levels, alpha)
            for e in range(col_ptr[c], col_ptr[c + 1]):
                out[p, dst[e]] += weight * coeff[e] * current
        clipped[p] += count
