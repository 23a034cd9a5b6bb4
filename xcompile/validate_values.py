"""The rules every mapping.bin check shares: the error, the format's member names, and readers
of one manifest value or one .npy array that refuse anything else (docs/format.md)."""

from __future__ import annotations

import io
import math
from tokenize import TokenError
from typing import NoReturn

import numpy as np

from xcompile.errors import XCompileError

MANIFEST = "manifest.json"
NPY_HEADER_MAX = 4096  # an .npy header of ours is < 200 bytes
GEOMETRY_INT_MAX = 1 << 16  # kernel sizes, strides, dilations, pads, output shapes of one layer
SCHEDULE_PREFIX = "arrays/schedule/"
TILING_ARRAYS = ("grid", "row_range", "out_range", "crossbar")
ENCODING_ARRAYS = ("term_offset", "term_step", "term_coeff")


class Invalid(XCompileError):
    """A mapping that breaks a rule: `member: rule`, prefixed with the file by the loader."""


def fail(member: str, rule: str) -> NoReturn:
    raise Invalid(f"{member}: {rule}")


# --- arrays ------------------------------------------------------------------------------------


def read_npy(name: str, data: bytes, dtypes: tuple, shape: tuple) -> np.ndarray:
    """A read-only array from .npy bytes: dtype one of `dtypes`, shape `shape` (None = any size),
    its size checked against the member's bytes before any data is touched."""
    stream = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        found, fortran, dtype = reader(stream, max_header_size=NPY_HEADER_MAX)
    except (ValueError, SyntaxError, TypeError, EOFError, TokenError, RecursionError, MemoryError, OverflowError) as exc:
        fail(name, f"not a readable .npy array ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if any(d < 0 for d in found):
        fail(name, f"negative dimension in shape {list(found)}")
    if dtype.hasobject or dtype not in [np.dtype(d) for d in dtypes]:
        fail(name, f"dtype {dtype}, expected {' or '.join(str(np.dtype(d)) for d in dtypes)}")
    if len(found) != len(shape) or any(want is not None and got != want for got, want in zip(found, shape)):
        fail(name, f"shape {list(found)}, expected {[('any' if s is None else s) for s in shape]}")
    count = math.prod(found)
    if stream.tell() + count * dtype.itemsize != len(data):
        fail(name, f"the header declares {count} values of {dtype.itemsize} bytes, the member holds {len(data) - stream.tell()} bytes of data")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell()).reshape(found, order="F" if fortran else "C")
    return np.ascontiguousarray(array) if fortran else array


def check_range(name: str, array: np.ndarray, low, high, what: str) -> None:
    """Every value finite and within [low, high]."""
    if array.size == 0:
        return
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        fail(name, f"{what} holds NaN or infinite values")
    smallest, largest = array.min(), array.max()
    if smallest < low or largest > high:
        fail(name, f"{what} must lie in [{low}, {high}], found values from {smallest} to {largest}")


def check_permutation(name: str, array: np.ndarray, size: int) -> None:
    seen = np.zeros(size, dtype=bool)
    check_range(name, array, 0, size - 1, "a permutation index")
    seen[array] = True
    if not seen.all():
        fail(name, f"not a permutation of 0..{size - 1}: {int(size - seen.sum())} indices repeat")



# --- manifest values ---------------------------------------------------------------------------


def as_list(value, key: str) -> list:
    if not isinstance(value, list):
        fail(MANIFEST, f"'{key}' must be a list, got {type(value).__name__}")
    return value


def as_dict(value, key: str) -> dict:
    if not isinstance(value, dict):
        fail(MANIFEST, f"'{key}' must be an object, got {type(value).__name__}")
    return value


def as_int(value, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        fail(MANIFEST, f"'{key}' must be a whole number from {low} to {high}, got {short_repr(value)}")
    return value


def as_str(value, key: str) -> str:
    if not isinstance(value, str):
        fail(MANIFEST, f"'{key}' must be a string, got {short_repr(value)}")
    return value


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."
