"""Line-resistance compensation on the digits CNN under the `rram` preset's wires and devices.

g_on 1 mS, g_off 10 uS, r_wire 2.5 ohm, r_source = r_sink = 100 ohm, 8-bit DAC / ADC, 5% lognormal
variation (`xcompile presets`). Accuracy per compensation mode over seeded trials, then the
breakdown (each non-ideality alone, all together, without and with row-column compensation).
Compensation is fitted on the digits calibration split (as `xcompile eval` does).

    pip install -e ".[test]"                   # matplotlib
    python docs/studies/compensation.py        # writes compensation.md's tables to stdout, compensation.png here
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import xcompile
from xcompile.evaluate import _interval95, breakdown, evaluate, plot_breakdown

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent.parent / "models" / "digits_cnn.onnx"
TRIALS = 5
MODES = ("none", "column", "row-column", "predistort")


def main() -> None:
    mapping = xcompile.compile_model(MODEL, progress=False)
    print(f"| compensation | accuracy (mean, 95% interval over {TRIALS} seeds) | drop (points) | seconds |")
    print("| --- | --- | --- | --- |")
    for mode in MODES:
        started = time.perf_counter()
        result = evaluate(mapping, "digits", trials=TRIALS, progress=False, hardware="rram", compensation=mode)
        accuracy = np.array([t["accuracy"] for t in result["per_trial"]])
        print(f"| {mode} | {accuracy.mean():.2%} ± {_interval95(accuracy):.2%} | {result['drop_mean'] * 100:.2f} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)
    print(f"\nfloat model: {result['float_accuracy']:.2%} on {result['samples']} samples\n")
    table = breakdown(mapping, "digits", trials=TRIALS, progress=False, hardware="rram")
    print("| non-ideality | accuracy | drop | with row-column | drop |")
    print("| --- | --- | --- | --- | --- |")
    for row in table["rows"]:
        plain, fixed = row["uncompensated"], row["compensated"]
        print(f"| {row['non_ideality']} | {plain['accuracy_mean']:.2%} ± {plain['ci95']:.2%} | {plain['drop_mean'] * 100:.2f} | "
              f"{fixed['accuracy_mean']:.2%} ± {fixed['ci95']:.2%} | {fixed['drop_mean'] * 100:.2f} |")
    plot_breakdown(table, HERE / "compensation.png")


if __name__ == "__main__":
    main()
