"""Data in, checked once: the shipped data sets, a user's .npz / .npy, and feeds against a model's inputs.

Every tool that reads data (compile's calibration, inspect, run, eval, train, sweep) and every
tool that feeds a model (the Session, the remapping probe, eval's float reference) comes here, so
a bad file or a feed ONNX Runtime would refuse gets the same one-line XCompileError everywhere.
numpy and onnx only: importing this loads no runtime.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import onnx
from onnx import helper

from xcompile.errors import XCompileError

BUILTIN_DATASETS = ("digits", "mnist")  # shipped as xcompile/data/<name>_<split>.npz
SPLITS = ("test", "calib")
NPY_MAGIC = b"\x93NUMPY"
Labels = Literal["required", "optional", "unused"]


# --- data sets and files ------------------------------------------------------------------------


def builtin_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a shipped data set's 'test' or 'calib' split."""
    if name not in BUILTIN_DATASETS or split not in SPLITS:
        raise XCompileError(f"no built-in data set '{name}' split '{split}': there are {BUILTIN_DATASETS} x {SPLITS}")
    with resources.as_file(resources.files("xcompile") / "data" / f"{name}_{split}.npz") as path:
        return read_npz(path, "dataset", labels="required")


def load_data(source: str | os.PathLike, split: str, *, what: str = "dataset", labels: Labels = "required") -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y) from a built-in name (its `split`) or an .npz file (`what` names it in errors)."""
    if str(source) in BUILTIN_DATASETS:
        return builtin_split(str(source), split)
    path = Path(source)
    if not path.exists():
        raise XCompileError(f"{what} '{path}' does not exist and is not a built-in data set ({', '.join(BUILTIN_DATASETS)})")
    return read_npz(path, what, labels=labels)


def load_dataset(source: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(inputs, labels, calibration inputs or None) to evaluate on: a built-in's test split and
    its calibration split, or an .npz with x and y."""
    x, y = load_data(source, "test")
    return x, y, builtin_split(str(source), "calib")[0] if str(source) in BUILTIN_DATASETS else None


def load_calibration(source: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y or None) to calibrate or measure on: a built-in's calibration split, or an .npz
    with x and optionally labels y."""
    return load_data(source, "calib", what="calibration file", labels="optional")


def read_npz(path: str | os.PathLike, what: str, *, labels: Labels = "required") -> tuple[np.ndarray, np.ndarray | None]:
    """x (numbers, finite) and y (integer labels, one per sample) from an .npz, as np.savez writes it.
    labels: 'required', 'optional' (read when present) or 'unused' (never read)."""
    path = Path(path)
    where = f"{what} '{path}'"
    _check_file(path, where)
    if not zipfile.is_zipfile(path):
        hint = "it is a single .npy array" if _starts_with_npy_magic(path, where) else "it is not a zip archive"
        raise XCompileError(f"{where} is not a readable .npz file: {hint} (np.savez(path, x=..., y=...) writes one)")
    try:
        with np.load(path, allow_pickle=False) as data:
            wanted = ["x"] + (["y"] if labels == "required" or (labels == "optional" and "y" in data.files) else [])
            if not set(wanted) <= set(data.files):
                expected = {"required": "inputs 'x' and labels 'y'", "optional": "inputs 'x' (and optionally labels 'y')", "unused": "inputs 'x'"}
                raise XCompileError(f"{where} must hold {expected[labels]}; it has {sorted(data.files)}")
            arrays = {key: _member(data, key, where) for key in wanted}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise XCompileError(f"{where} is not a readable .npz file: {exc}") from None
    x = _check_inputs(arrays["x"], where)
    y = check_labels(arrays["y"], where) if "y" in arrays else None
    check_samples(x, y, where)
    return x, y


def read_npy(path: str | os.PathLike, what: str = "input file") -> np.ndarray:
    """One array from an .npy file, as np.save writes it (never unpickled)."""
    path = Path(path)
    where = f"{what} '{path}'"
    _check_file(path, where)
    if not _starts_with_npy_magic(path, where):
        hint = "it is an .npz archive of arrays" if zipfile.is_zipfile(path) else "it does not start with the .npy header"
        raise XCompileError(f"{where} is not a readable .npy array: {hint} (np.save(path, array) writes one)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise XCompileError(f"{where} holds Python objects (a pickled array), which are never loaded; save numbers") from None
        raise XCompileError(f"{where} is not a readable .npy array: {exc}") from None
    except (OSError, EOFError) as exc:
        raise XCompileError(f"{where} is not a readable .npy array: {exc}") from None


def _check_file(path: Path, where: str) -> None:
    if not path.exists():
        raise XCompileError(f"{where} does not exist")
    if not path.is_file():
        raise XCompileError(f"{where} is not a regular file")


def _starts_with_npy_magic(path: Path, where: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(NPY_MAGIC)) == NPY_MAGIC
    except OSError as exc:
        raise XCompileError(f"{where} cannot be read: {exc.strerror or exc}") from None


def _member(data, key: str, where: str) -> np.ndarray:
    try:
        value = data[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise XCompileError(f"{where}: '{key}' holds Python objects (a pickled array), which are never loaded; save numbers") from None
        raise
    if not isinstance(value, np.ndarray):  # numpy hands back the raw bytes of a member that is no .npy
        raise XCompileError(f"{where} is not a readable .npz file: its member '{key}' is not an .npy array")
    return value


# --- checks of arrays ---------------------------------------------------------------------------


def _check_inputs(x, where: str) -> np.ndarray:
    """x as an array of finite numbers (bool, integer or float)."""
    x = np.asarray(x)
    if not _numbers(x.dtype):
        raise XCompileError(f"{where}: inputs 'x' must be numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise XCompileError(f"{where}: inputs hold NaN or infinite values")
    return x


def check_labels(y, where: str) -> np.ndarray:
    """y as a 1-D array of integer classes."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise XCompileError(f"{where}: labels 'y' must be a 1-D array of integer classes, got {y.dtype} {list(y.shape)}")
    return y


def check_samples(x: np.ndarray, y: np.ndarray | None, where: str) -> None:
    """At least one sample, and one label per sample."""
    if x.ndim == 0 or x.shape[0] == 0:
        raise XCompileError(f"{where} is empty: it needs at least one sample")
    if y is not None and y.shape[0] != x.shape[0]:
        raise XCompileError(f"{where}: 'x' has {x.shape[0]} samples and 'y' {y.shape[0]}; expected the same number")


def check_classes(y: np.ndarray, classes: int, where: str) -> None:
    """Every label names one of the model's `classes` outputs."""
    if y.min() < 0 or y.max() >= classes:
        raise XCompileError(f"{where}: labels run {y.min()}..{y.max()}; the model has {classes} classes")


def _numbers(dtype: np.dtype) -> bool:
    return dtype == np.bool_ or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


# --- feeds against the model's declared inputs --------------------------------------------------


@dataclass(frozen=True)
class NodeArg:
    """What `onnxruntime.NodeArg` tells: name, type string, shape (ints, names or None)."""

    name: str
    type: str
    shape: list | None


def node_arg(value: onnx.ValueInfoProto) -> NodeArg:
    """A graph input or output as ONNX Runtime describes it."""
    t = value.type
    if t.HasField("tensor_type"):
        elem_name = onnx.TensorProto.DataType.Name(t.tensor_type.elem_type).lower()
        shape = None  # no shape declared: any shape, as in ONNX Runtime
        if t.tensor_type.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]
        return NodeArg(value.name, f"tensor({elem_name})", shape)
    return NodeArg(value.name, t.WhichOneof("value") or "unknown", [])


def check_feeds(feeds: dict[str, Any], inputs: Sequence, *, data_set: str | None = None) -> dict[str, Any]:
    """The feeds checked against the model's declared `inputs` (NodeArgs, ours or ONNX Runtime's):
    every input fed and no other name; for tensors what ONNX Runtime refuses (data type, rank,
    fixed dimensions; symbolic, unnamed and negative dimensions take any size) and NaN / inf.

    data_set: what a whole data set is called in errors ("dataset 'd.npz'"). A data set runs in
    batches and is converted to the model's type, so it may have any number of samples (but at
    least one) and any numeric dtype.
    """
    if not isinstance(feeds, dict):
        raise XCompileError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
    expected = {i.name: i for i in inputs}
    extra = sorted(set(feeds) - set(expected))
    if extra:
        raise XCompileError(f"unknown input name(s) {extra}; the model takes {sorted(expected)}")
    missing = sorted(set(expected) - set(feeds))
    if missing:
        raise XCompileError(f"missing input(s) {missing}; the model takes {sorted(expected)}")
    env = {}
    for name, value in feeds.items():
        arg = expected[name]
        if arg.type.startswith("tensor("):
            value = _checked_data_set(value, arg, data_set) if data_set else _checked_feed(value, arg)
        env[name] = value
    return env


def _checked_feed(value, arg) -> np.ndarray:
    value = np.asarray(value)
    want = _numpy_dtype(arg.type)
    if want is not None and value.dtype != want:
        raise XCompileError(
            f"input '{arg.name}': unexpected data type tensor({_type_name(value.dtype)}) (numpy dtype {value.dtype}), "
            f"the model expects {arg.type}"
        )
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
        raise XCompileError(f"input '{arg.name}' holds NaN or infinite values")
    declared = arg.shape
    if declared is None:
        return value
    if len(declared) != value.ndim:
        raise XCompileError(
            f"input '{arg.name}': invalid rank {value.ndim} (shape {list(value.shape)}), the model expects rank {len(declared)} ({declared})"
        )
    wrong = [(i, s, d) for i, (s, d) in enumerate(zip(value.shape, declared)) if _fixed(d) and d != s]
    if wrong:
        listed = ", ".join(f"index {i} got {s} expected {d}" for i, s, d in wrong)
        raise XCompileError(f"input '{arg.name}' has shape {list(value.shape)}: invalid dimensions ({listed}); the model expects {declared}")
    return value


def _checked_data_set(value, arg, data_set: str) -> np.ndarray:
    x = _check_inputs(value, data_set)
    check_samples(x, None, data_set)
    declared = arg.shape
    if declared is not None and (
        len(declared) != x.ndim or any(_fixed(d) and d != s for d, s in zip(declared[1:], x.shape[1:]))
    ):
        raise XCompileError(f"{data_set}: inputs have shape {list(x.shape)}, the model's input '{arg.name}' is {declared}")
    want = _numpy_dtype(arg.type)
    return x if want is None else x.astype(want, copy=False)


def _fixed(dim) -> bool:
    """A dimension the model fixes to a size (ints >= 0; names, None and -1 take any size)."""
    return isinstance(dim, int) and dim >= 0


def _type_name(dtype: np.dtype) -> str:
    """ONNX's name of a numpy dtype ('float', 'double', ...), else numpy's."""
    try:
        return onnx.TensorProto.DataType.Name(helper.np_dtype_to_tensor_dtype(dtype)).lower()
    except (KeyError, TypeError, ValueError):
        return str(dtype)


def _numpy_dtype(type_string: str):
    """The numpy dtype of an ONNX Runtime type string ('tensor(float)'), None if it has none."""
    elem = type_string[len("tensor(") : -1].upper()
    try:
        return helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, elem))
    except (AttributeError, KeyError, TypeError):
        return None
