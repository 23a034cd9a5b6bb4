"""Accuracy studies: the float model on ONNX Runtime against the crossbars, over seeded trials."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from xcompile.errors import XCompileError

BUILTIN_DATASETS = ("digits", "mnist")
CALIBRATION_SAMPLES = 256


def load_dataset(name_or_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(inputs, labels, calibration inputs or None) from a built-in name or an .npz with x and y."""
    if str(name_or_path) in BUILTIN_DATASETS:
        x, y = builtin_split(str(name_or_path), "test")
        return x, y, builtin_split(str(name_or_path), "calib")[0]
    path = Path(name_or_path)
    if not path.is_file():
        raise XCompileError(f"dataset '{path}' is neither a built-in ({', '.join(BUILTIN_DATASETS)}) nor an existing .npz file")
    x, y = _read_npz(path)
    return x, y, None


def builtin_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a shipped dataset's 'test' or 'calib' split."""
    with resources.as_file(resources.files("xcompile") / "data" / f"{name}_{split}.npz") as path:
        return _read_npz(path)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise XCompileError(f"dataset '{path}' must hold arrays 'x' (inputs) and 'y' (labels), it has {sorted(data.files)}")
            x, y = data["x"], data["y"]
    except (ValueError, OSError, EOFError) as exc:
        raise XCompileError(f"dataset '{path}' is not a readable .npz file: {exc}") from None
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise XCompileError(f"dataset '{path}': 'y' must be a 1-D array of integer class labels, got {y.dtype} {list(y.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise XCompileError(f"dataset '{path}': 'x' has {x.shape[0]} samples and 'y' {y.shape[0]}; expected the same number, > 0")
    return x, y


def evaluate(
    mapping,
    dataset: str | os.PathLike,
    *,
    trials: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    calibration: np.ndarray | None = None,
    progress: bool | None = None,
    **hardware: Any,
) -> dict[str, Any]:
    """Float accuracy (ORT on the original model) vs crossbar accuracy over `trials` seeds.

    Trial t runs with seed `seed + t`. Calibrated converter ranges come from `calibration`, else
    the dataset's own calibration split, else its first 256 samples.
    """
    from xcompile.runtime.session import Session

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise XCompileError(f"trials must be a whole number >= 1, got {trials!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise XCompileError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    x, y, calib = load_dataset(dataset)
    calib = calibration if calibration is not None else calib if calib is not None else x[:CALIBRATION_SAMPLES]
    reference = ort.InferenceSession(mapping.program.model, providers=["CPUExecutionProvider"])
    inputs = reference.get_inputs()
    if len(inputs) != 1:
        raise XCompileError(f"eval needs a model with one input; this one has {[i.name for i in inputs]}")
    name = inputs[0].name
    _check_inputs(x, inputs[0], dataset)
    x = x.astype(_input_dtype(inputs[0].type), copy=False)
    float_logits = _batched(lambda b: reference.run(None, {name: b})[0], x, batch_size)
    classes = float_logits.shape[-1]
    if y.min() < 0 or y.max() >= classes:
        raise XCompileError(f"dataset '{dataset}': labels run {y.min()}..{y.max()}, the model has {classes} classes")
    float_accuracy = float((float_logits.argmax(-1) == y).mean())
    rows = []
    for t in tqdm(range(trials), desc="trials", unit="trial", disable=None if progress is None else not progress, leave=False):
        session = Session(mapping, seed=seed + t, calibration={name: calib.astype(x.dtype)}, **hardware)
        logits = _batched(lambda b: session.run(None, {name: b})[0], x, batch_size)
        rows.append(
            {
                "seed": seed + t,
                "accuracy": float((logits.argmax(-1) == y).mean()),
                "adc_clipped": session.adc_clipped,
                "adc_conversions": session.adc_conversions,
            }
        )
    accuracy = np.array([r["accuracy"] for r in rows])
    return {
        "dataset": str(dataset),
        "samples": int(x.shape[0]),
        "trials": trials,
        "float_accuracy": float_accuracy,
        "crossbar_accuracy_mean": float(accuracy.mean()),
        "crossbar_accuracy_std": float(accuracy.std(ddof=1)) if trials > 1 else 0.0,
        "drop_mean": float(float_accuracy - accuracy.mean()),
        "adc_clipped_mean": float(np.mean([r["adc_clipped"] for r in rows])),
        "per_trial": rows,
        "hardware": session.hardware.to_dict(),
    }


def _check_inputs(x: np.ndarray, arg, dataset) -> None:
    shape = arg.shape
    if len(shape) != x.ndim or any(isinstance(d, int) and d != s for d, s in zip(shape[1:], x.shape[1:])):
        raise XCompileError(f"dataset '{dataset}': inputs have shape {list(x.shape)}, the model's input '{arg.name}' is {shape}")
    if not np.isfinite(x).all():
        raise XCompileError(f"dataset '{dataset}': inputs hold NaN or infinite values")


def _input_dtype(type_name: str):
    return {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}.get(type_name, np.float32)


def _batched(run, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
