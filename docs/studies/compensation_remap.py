"""Does remapping still win anything once columns are compensated? Digits CNN, 128 x 128,
r_wire 2 ohm, 5% lognormal variation (the remapping study's setting, docs/remap.md), 5 seeds.

    python docs/studies/compensation_remap.py      # a few minutes; prints the table in compensation.md
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import xcompile
from xcompile.evaluate import _interval95, evaluate

MODEL = Path(__file__).resolve().parent.parent.parent / "models" / "digits_cnn.onnx"
HARDWARE = dict(r_wire=2.0, variation="lognormal", sigma=0.05)
TRIALS = 5


def main() -> None:
    print("| remap | compensation | accuracy (95% interval, 5 seeds) | drop (points) |")
    print("| --- | --- | --- | --- |")
    for remap in ("none", "static"):
        mapping = xcompile.compile_model(MODEL, remap=remap, progress=False, **HARDWARE)
        for mode in ("none", "column", "row-column"):
            result = evaluate(mapping, "digits", trials=TRIALS, progress=False, compensation=mode)
            accuracy = np.array([t["accuracy"] for t in result["per_trial"]])
            print(f"| {remap} | {mode} | {accuracy.mean():.2%} ± {_interval95(accuracy):.2%} | {result['drop_mean'] * 100:.2f} |", flush=True)


if __name__ == "__main__":
    main()
