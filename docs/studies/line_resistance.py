"""RxNN's finding on our own numbers: accuracy of the digits CNN against crossbar size and r_wire.

Only line resistance is switched on (ideal devices and converters, ideal drivers and sinks), so
every point is deterministic; the G_eff of each tile is exact (runtime/physics.py).

    pip install -e ".[test]"                       # matplotlib
    python docs/studies/line_resistance.py         # writes line_resistance.md and .png here
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import xcompile  # noqa: E402
from xcompile.evaluate import evaluate  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent.parent / "models" / "digits_cnn.onnx"
SIZES = (32, 64, 128, 256)
WIRES = (0.0, 1.0, 2.5, 5.0, 10.0)


def main() -> None:
    results = {}
    started = time.perf_counter()
    for size in SIZES:
        mapping = xcompile.compile_model(MODEL, rows=size, cols=size, progress=False)
        for r_wire in WIRES:
            result = evaluate(mapping, "digits", trials=1, progress=False, r_wire=r_wire)
            results[size, r_wire] = result
            print(f"{size:>4}x{size:<4} r_wire {r_wire:>4} ohm: {result['crossbar_accuracy_mean']:.2%} "
                  f"(drop {result['drop_mean'] * 100:.2f} points)", flush=True)
    float_accuracy = results[SIZES[0], 0.0]["float_accuracy"]

    lines = [
        "# Accuracy drop against crossbar size and wire resistance (digits CNN)",
        "",
        "Made by `python docs/studies/line_resistance.py` "
        f"({time.perf_counter() - started:.0f} s on the 2-core machine). Float model: {float_accuracy:.2%} "
        "on the 450 held-out digits. 8-bit weights and cells, dual array, g_on 1 mS, g_off 10 uS, "
        "V_read 0.2 V, ideal devices, converters, drivers and sinks: only the wire segments change.",
        "",
        "Accuracy drop in points (float accuracy minus crossbar accuracy):",
        "",
        "| crossbar | " + " | ".join(f"r_wire {w} ohm" for w in WIRES) + " |",
        "| --- | " + " | ".join("---" for _ in WIRES) + " |",
    ]
    for size in SIZES:
        cells = [f"{results[size, w]['drop_mean'] * 100:.2f}" for w in WIRES]
        lines.append(f"| {size} x {size} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy against wire resistance](line_resistance.png)", ""]
    (HERE / "line_resistance.md").write_text("\n".join(lines))

    figure, axis = plt.subplots(figsize=(6, 4))
    for size in SIZES:
        axis.plot(WIRES, [results[size, w]["crossbar_accuracy_mean"] * 100 for w in WIRES], marker="o", label=f"{size} x {size}")
    axis.axhline(float_accuracy * 100, color="grey", linestyle="--", label="float model")
    axis.set_xlabel("wire resistance per segment (ohm)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title("digits CNN on crossbars with line resistance")
    axis.legend()
    figure.tight_layout()
    figure.savefig(HERE / "line_resistance.png", dpi=120)


if __name__ == "__main__":
    main()
