"""Accuracy studies: the float model on ONNX Runtime against the crossbars, over seeded trials."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from xcompile.data import check_classes, check_feeds, load_dataset
from xcompile.errors import XCompileError
from xcompile.runtime.ort_session import inference_session

CALIBRATION_SAMPLES = 256


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

    Trial t runs with seed `seed + t`; the float model runs once (FloatReference.measure says
    where calibrated converter ranges come from).
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise XCompileError(f"trials must be a whole number >= 1, got {trials!r}")
    reference = FloatReference.measure(mapping, dataset, batch_size=batch_size, calibration=calibration)
    done = [
        crossbar_trial(mapping, reference, seed + t, **hardware)
        for t in tqdm(range(trials), desc="trials", unit="trial", disable=None if progress is None else not progress, leave=False)
    ]
    rows = [{k: v for k, v in trial.items() if k != "hardware"} for trial in done]
    accuracy = np.array([r["accuracy"] for r in rows])
    float_accuracy = reference.float_accuracy
    return {
        "dataset": str(dataset),
        "samples": int(reference.x.shape[0]),
        "trials": trials,
        "float_accuracy": float_accuracy,
        "crossbar_accuracy_mean": float(accuracy.mean()),
        "crossbar_accuracy_std": float(accuracy.std(ddof=1)) if trials > 1 else 0.0,
        "drop_mean": float(float_accuracy - accuracy.mean()),
        "adc_clipped_mean": float(np.mean([r["adc_clipped"] for r in rows])),
        "per_trial": rows,
        "hardware": done[-1]["hardware"],
    }


@dataclass(frozen=True)
class FloatReference:
    """A data set ready to run and the float model's accuracy on it: measured once, then any
    number of crossbar trials compare against it (a sweep point runs many)."""

    x: np.ndarray
    y: np.ndarray
    input_name: str
    calibration: np.ndarray
    batch_size: int
    float_accuracy: float

    @classmethod
    def measure(cls, mapping, dataset, *, batch_size: int = 256, calibration: np.ndarray | None = None) -> "FloatReference":
        """Check the data against the model and run the original model on ONNX Runtime.
        Calibrated converter ranges come from `calibration`, else the dataset's own calibration
        split, else its first 256 samples."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise XCompileError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        x, y, calib = load_dataset(dataset)
        calib = calibration if calibration is not None else calib if calib is not None else x[:CALIBRATION_SAMPLES]
        reference = inference_session(mapping.program.model)
        inputs = reference.get_inputs()
        if len(inputs) != 1:
            raise XCompileError(f"eval needs a model with one input; this one has {[i.name for i in inputs]}")
        name = inputs[0].name
        x = check_feeds({name: x}, inputs, data_set=f"dataset '{dataset}'")[name]
        float_logits = _batched(lambda b: reference.run(None, {name: b})[0], x, batch_size)
        check_classes(y, float_logits.shape[-1], f"dataset '{dataset}'")
        float_accuracy = float((float_logits.argmax(-1) == y).mean())
        return cls(x, y, name, calib.astype(x.dtype), batch_size, float_accuracy)


def crossbar_trial(mapping, reference: FloatReference, seed: int, **hardware: Any) -> dict[str, Any]:
    """One seeded trial on the crossbars: the tiles programmed with `seed`, then the data set run;
    its accuracy, converter counts and the hardware it ran on."""
    from xcompile.runtime.session import Session

    session = Session(mapping, seed=seed, calibration={reference.input_name: reference.calibration}, **hardware)
    logits = _batched(lambda b: session.run(None, {reference.input_name: b})[0], reference.x, reference.batch_size)
    return {
        "seed": seed,
        "accuracy": float((logits.argmax(-1) == reference.y).mean()),
        "adc_clipped": session.adc_clipped,
        "adc_conversions": session.adc_conversions,
        "hardware": session.hardware.to_dict(),
    }


def _batched(run, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


# Which non-idealities `breakdown` separates: name -> the hardware keys that make it.
NON_IDEALITIES = (
    ("r_wire", ("r_wire",)),
    ("r_source, r_sink", ("r_source", "r_sink")),
    ("converters", ("dac_bits", "dac_range", "input_mode", "adc_bits", "adc_range", "adc_nonlinearity")),
    ("variation", ("variation", "sigma")),
    ("stuck cells", ("stuck_off_rate", "stuck_on_rate")),
    ("read noise", ("read_noise",)),
)
WIRES = ("r_wire", "r_source", "r_sink")


def breakdown(
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
    """What each non-ideality of the hardware costs: trials with each one alone (everything
    else ideal, the device window kept), then all together, each without compensation and with
    it (the hardware's own mode, row-column when it has none). Same seeds for every row."""
    import dataclasses

    from xcompile.config import Hardware, runtime_hardware

    hw = runtime_hardware(mapping.program.hardware, hardware.pop("hardware", None), hardware)
    compensated = hw.compensation if hw.compensation != "none" else "row-column"
    ideal = Hardware(rows=hw.rows, cols=hw.cols, g_on=hw.g_on, g_off=hw.g_off, v_read=hw.v_read)
    present = [(name, keys) for name, keys in NON_IDEALITIES if any(getattr(hw, k) != getattr(ideal, k) for k in keys)]
    every_key = tuple(k for _, keys in present for k in keys)
    settings = [("ideal", ())] + present + ([("all", every_key)] if len(present) > 1 else [])
    rows, float_accuracy, samples = [], None, 0
    for name, keys in settings:
        row: dict[str, Any] = {"non_ideality": name, "hardware": {k: getattr(hw, k) for k in keys}}
        for mode, column in (("none", "uncompensated"), (compensated, "compensated")):
            if mode != "none" and name == "ideal":
                row[column] = row["uncompensated"]  # nothing to compensate: the same trials
                continue
            setting = dataclasses.replace(ideal, **row["hardware"], compensation=mode)
            result = evaluate(mapping, dataset, trials=trials, seed=seed, batch_size=batch_size, calibration=calibration,
                              progress=progress, hardware=setting)
            float_accuracy, samples = result["float_accuracy"], result["samples"]
            accuracy = np.array([t["accuracy"] for t in result["per_trial"]])
            row[column] = {
                "accuracy_mean": float(accuracy.mean()),
                "accuracy_std": float(accuracy.std(ddof=1)) if trials > 1 else 0.0,
                "ci95": _interval95(accuracy),
                "drop_mean": float(float_accuracy - accuracy.mean()),
            }
        rows.append(row)
    return {
        "dataset": str(dataset), "samples": samples, "trials": trials, "seed": seed, "float_accuracy": float_accuracy,
        "compensation": compensated, "hardware": hw.to_dict(), "rows": rows,
    }


def _interval95(values: np.ndarray) -> float:
    """Half-width of a 95% confidence interval of the mean over trials (Student t; 0 for one trial)."""
    if values.size < 2:
        return 0.0
    from scipy.stats import t

    return float(t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))


def format_breakdown(result: dict[str, Any]) -> str:
    """The breakdown as a text table: accuracy and drop per non-ideality, without and with compensation."""
    lines = [
        f"dataset {result['dataset']}: {result['samples']} samples, {result['trials']} trial(s) from seed {result['seed']}; "
        f"float model {result['float_accuracy']:.2%}; compensation {result['compensation']}",
        f"{'non-ideality':<18} {'accuracy':>22} {'drop':>8}   {'compensated':>22} {'drop':>8}",
    ]
    for row in result["rows"]:
        cells = []
        for column in ("uncompensated", "compensated"):
            r = row[column]
            cells.append(f"{r['accuracy_mean']:>13.2%} +- {r['ci95']:>5.2%} {r['drop_mean'] * 100:>8.2f}")
        lines.append(f"{row['non_ideality']:<18} {cells[0]}   {cells[1]}")
    lines.append("(+- : 95% interval of the mean over trials; drop in points against the float model)")
    return "\n".join(lines)


def plot_breakdown(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Bars of the accuracy drop per non-ideality, without and with compensation (95% intervals)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise XCompileError("--plot needs matplotlib (pip install matplotlib)") from None
    from xcompile.fileio import atomic_output

    kind = Path(path).suffix.lstrip(".").lower()
    if kind not in ("png", "pdf", "svg"):
        raise XCompileError(f"plot file '{path}': expected a .png, .pdf or .svg name")
    names = [row["non_ideality"] for row in result["rows"]]
    y = np.arange(len(names))
    figure, axes = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    for offset, column, label in ((-0.2, "uncompensated", "no compensation"), (0.2, "compensated", f"compensation {result['compensation']}")):
        drops = [row[column]["drop_mean"] * 100 for row in result["rows"]]
        errors = [row[column]["ci95"] * 100 for row in result["rows"]]
        axes.barh(y + offset, drops, height=0.4, xerr=errors, label=label)
    axes.set_yticks(y, names)
    axes.invert_yaxis()
    axes.set_xlabel(f"accuracy drop (points) against the float model ({result['float_accuracy']:.2%})")
    axes.set_title(f"What each non-ideality costs: {result['dataset']}, {result['trials']} trial(s)")
    axes.legend()
    figure.tight_layout()
    with atomic_output(path) as temp:
        figure.savefig(temp, format=kind)
    plt.close(figure)
