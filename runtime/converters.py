"""Converter equations: the DAC that turns input codes into row voltages, the ADC after a column.

DAC (unipolar, d bits over [0, V_read]): an input x of a vector with range s gets the code
    c = round(|x| / s * (2^d - 1)),  v = c / (2^d - 1) * V_read
signed inputs run as two passes (positive and negative part), or bit-serially over the d bits
of c (one array read and one ADC conversion per bit). d = 0: an ideal, analog DAC.

ADC (a bits over [0, I_fs]): a column current I becomes
    u = clip(I / I_fs, 0, 1),  u' = tanh(alpha u) / tanh(alpha) (alpha = nonlinearity; 0: u' = u)
    code = round(u' * (2^a - 1)),  I_hat = code / (2^a - 1) * I_fs
a = 0: an ideal ADC. Currents above I_fs are clipped and counted.
These scalar functions are compiled into the kernels (runtime/kernels.py); numba's cache does
not see edits here, so touch kernels.py after changing them.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(inline="always", cache=True)
def adc(current, inverse_full_scale, step, levels, alpha, tanh_alpha):
    """One conversion as a current estimate (A): inverse_full_scale = 1 / I_fs, step = I_fs / levels.

    Written for SIMD: float32, no branches but the nonlinearity's (uniform per call), np.rint.
    """
    u = min(max(current * inverse_full_scale, numba.float32(0.0)), numba.float32(1.0))
    if alpha > 0.0:
        u = numba.float32(math.tanh(alpha * u) / tanh_alpha)
    return np.rint(u * levels) * step


@numba.njit(inline="always", cache=True)
def dac_code(magnitude, scale, levels):
    """Input code (0 .. levels) of |x| for a vector of range `scale` (levels = 2^d - 1 > 0)."""
    return np.rint(min(magnitude / scale, 1.0) * levels)
