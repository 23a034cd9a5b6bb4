"""Converter equations: the DAC that turns input codes into row voltages, the ADC after a column.

DAC (unipolar, d bits over [0, V_read]): an input x of a vector with range s gets the code
    c = round(|x| / s * (2^d - 1)),  v = c / (2^d - 1) * V_read
signed inputs run as two passes (positive and negative part), or bit-serially over the d bits
of c (one array read and one ADC conversion per bit). d = 0: an ideal, analog DAC.

ADC (a bits over [0, I_fs]): a column current I becomes
    u = clip(I / I_fs, 0, 1),  u' = tanh(alpha u) / tanh(alpha) (alpha = nonlinearity; 0: u' = u)
    code = round(u' * (2^a - 1)),  I_hat = code / (2^a - 1) * I_fs
a = 0: an ideal ADC. Currents above I_fs are clipped and counted.
These scalar functions are compiled into the kernels (runtime/kernels.py).
"""

from __future__ import annotations

import math

import numba


@numba.njit(inline="always", cache=True)
def adc(current: float, full_scale: float, levels: float, alpha: float) -> float:
    """One conversion, as a current estimate in amperes (levels = 2^a - 1 > 0)."""
    u = current / full_scale
    if u > 1.0:
        u = 1.0
    elif u < 0.0:
        u = 0.0
    if alpha > 0.0:
        u = math.tanh(alpha * u) / math.tanh(alpha)
    return round(u * levels) / levels * full_scale


@numba.njit(inline="always", cache=True)
def dac_code(magnitude: float, scale: float, levels: float) -> float:
    """Input code (0 .. levels) of |x| for a vector of range `scale` (levels = 2^d - 1 > 0)."""
    u = magnitude / scale
    if u > 1.0:
        u = 1.0
    return round(u * levels)
