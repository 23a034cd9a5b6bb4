"""Signed-weight encodings side by side on the digits CNN: cost, and accuracy on non-ideal arrays.

Cost (area: cells; read energy: sum of G V^2 per inference over the calibration split) from
`xcompile inspect --json --calibration digits`; accuracy over 10 seeds per point under
(a) programming variation (lognormal sigma sweep) and (b) line resistance (r_wire sweep, with
a 2% variation so that seeds differ). 8-bit weights and cells, 128 x 128 crossbars.

    pip install -e ".[test]"                    # matplotlib
    python docs/studies/encodings.py            # writes encodings.md and encodings.png here
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import xcompile  # noqa: E402
from xcompile.evaluate import evaluate, load_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent.parent / "models" / "digits_cnn.onnx"
ENCODINGS = ("dual", "acm", "offset")
SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.3)
WIRES = (0.0, 0.5, 1.0, 2.0)
SEEDS = 10


def main() -> None:
    started = time.perf_counter()
    calib = load_dataset("digits")[2]  # the calibration split, as `inspect --calibration digits`
    mappings = {e: xcompile.compile_model(MODEL, encoding=e, progress=False) for e in ENCODINGS}
    cost = {}
    for e, mapping in mappings.items():
        totals = mapping.summary()["totals"]
        energy = xcompile.Session(mapping).read_energy({"input": calib})
        cost[e] = (totals["cells_used"], totals["columns"], sum(energy.values()))
    by_sigma = {e: [evaluate(m, "digits", trials=SEEDS if s else 1, progress=False, variation="lognormal" if s else "none", sigma=s)
                    for s in SIGMAS] for e, m in mappings.items()}
    by_wire = {e: [evaluate(m, "digits", trials=SEEDS, progress=False, r_wire=w, variation="lognormal", sigma=0.02)
                   for w in WIRES] for e, m in mappings.items()}
    float_accuracy = by_sigma["dual"][0]["float_accuracy"]

    def cell(r):
        return f"{r['crossbar_accuracy_mean']:.2%} ± {r['crossbar_accuracy_std']:.2%}"

    lines = [
        "# Signed-weight encodings on the digits CNN",
        "",
        f"Made by `python docs/studies/encodings.py` ({time.perf_counter() - started:.0f} s on the 2-core machine). "
        f"Float model {float_accuracy:.2%} on 450 held-out digits; 8-bit weights and cells, 128 x 128 crossbars, "
        "g_on 1 mS, g_off 10 uS, V_read 0.2 V. Mean ± std over 10 seeds (one run where nothing is random).",
        "",
        "## Cost",
        "",
        "| encoding | cells (area proxy) | columns | read-energy proxy, sum G V^2 per inference | area vs dual | energy vs dual |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in ENCODINGS:
        cells, columns, energy = cost[e]
        lines.append(f"| {e} | {cells:,} | {columns:,} | {energy:.4g} | {cost['dual'][0] / cells:.2f}x less | {cost['dual'][2] / energy:.2f}x less |")
    lines += [
        "",
        "## Accuracy under programming variation (lognormal sigma)",
        "",
        "| encoding | " + " | ".join(f"sigma {s}" for s in SIGMAS) + " |",
        "| --- | " + " | ".join("---" for _ in SIGMAS) + " |",
    ]
    lines += [f"| {e} | " + " | ".join(cell(r) for r in by_sigma[e]) + " |" for e in ENCODINGS]
    lines += [
        "",
        "## Accuracy under line resistance (r_wire per segment, 2% variation)",
        "",
        "| encoding | " + " | ".join(f"r_wire {w} ohm" for w in WIRES) + " |",
        "| --- | " + " | ".join("---" for _ in WIRES) + " |",
    ]
    lines += [f"| {e} | " + " | ".join(cell(r) for r in by_wire[e]) + " |" for e in ENCODINGS]
    lines += ["", "![encodings](encodings.png)", ""]
    (HERE / "encodings.md").write_text("\n".join(lines))

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for e in ENCODINGS:
        for axis, xs, results in ((axes[0], SIGMAS, by_sigma[e]), (axes[1], WIRES, by_wire[e])):
            mean = np.array([r["crossbar_accuracy_mean"] for r in results]) * 100
            std = np.array([r["crossbar_accuracy_std"] for r in results]) * 100
            axis.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=e)
    axes[0].set_xlabel("programming variation sigma (lognormal)")
    axes[1].set_xlabel("wire resistance per segment (ohm), sigma 0.02")
    for axis in axes:
        axis.axhline(float_accuracy * 100, color="grey", linestyle="--")
        axis.set_ylabel("accuracy (%)")
        axis.legend()
    figure.suptitle("digits CNN: dual vs ACM vs offset (10 seeds)")
    figure.tight_layout()
    figure.savefig(HERE / "encodings.png", dpi=120)


if __name__ == "__main__":
    main()
