"""Bit stucking on the shipped digits models: cell writes saved against accuracy, over 10 seeds.

Both models with 8-bit weights on 2-bit cells (4 slices), dual encoding, 32 x 32 crossbars and
fewer physical crossbars than tiles (CNN: 378 tiles on 8; MLP: 51 on 4), `sorted` schedule.
For k = 1, 2 and 3 stuck slice columns (the lowest 2, 4 or 6 bits of a weight) and a range of p (the
share of changed cells that is rewritten; p = 1 is no stucking), each seed draws other stucking
decisions; the runtime computes with the stale cells on otherwise ideal hardware, so every
accuracy point lost is the cost of stucking.

    pip install -e ".[test]"                    # matplotlib
    python docs/studies/schedules.py            # writes schedules.md, schedules.png, schedules_writes.png here
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import xcompile  # noqa: E402
from xcompile.evaluate import evaluate  # noqa: E402
from xcompile.reprogramming import write_writes_plot  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent.parent / "models"
SETUPS = {"digits_cnn": 8, "digits_mlp": 4}  # model -> physical crossbars
BASE = {"weight_bits": 8, "cell_bits": 2, "rows": 32, "cols": 32, "progress": False}
STUCK_SLICES = (1, 2, 3)
FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.1, 0.0)
SEEDS = 10
WITHIN = 0.01  # one accuracy point


def main() -> None:
    started = time.perf_counter()
    results = {}  # (model, k, p) -> (accuracies over seeds, writes over seeds)
    baseline = {}  # model -> (layer writes, sorted writes, float accuracy, quantised accuracy, tiles, rounds)
    for name, crossbars in SETUPS.items():
        path = MODELS / f"{name}.onnx"
        layer = xcompile.compile_model(path, crossbars=crossbars, schedule="layer", **BASE)
        sorted_ = xcompile.compile_model(path, crossbars=crossbars, schedule="sorted", **BASE)
        reference = evaluate(sorted_, "digits", progress=False)
        schedule = sorted_.program.schedule
        baseline[name] = (
            int(layer.program.schedule.writes.sum()), int(schedule.writes.sum()), reference["float_accuracy"],
            reference["crossbar_accuracy_mean"], int(schedule.layer.size), schedule.rounds,
        )
        for k in STUCK_SLICES:
            for p in FRACTIONS:
                accuracy, writes = [], []
                for seed in range(SEEDS if p < 1 else 1):
                    mapping = xcompile.compile_model(
                        path, crossbars=crossbars, schedule="sorted", stuck_slices=k, stuck_fraction=p, seed=seed, **BASE
                    )
                    accuracy.append(evaluate(mapping, "digits", seed=seed, progress=False)["crossbar_accuracy_mean"])
                    writes.append(int(mapping.program.schedule.writes.sum()))
                    if name == "digits_cnn" and k == 2 and p == 0.25 and seed == 0:
                        write_writes_plot(mapping.program.schedule, HERE / "schedules_writes.png")
                results[name, k, p] = (np.array(accuracy), np.array(writes))
    _write_markdown(results, baseline, time.perf_counter() - started)
    _plot(results, baseline)


def _smallest_fraction(results, name, k, reference):
    """The smallest p whose mean accuracy over the seeds stays within one point of no stucking."""
    kept = [p for p in FRACTIONS if results[name, k, p][0].mean() >= reference - WITHIN]
    return min(kept)


def _write_markdown(results, baseline, seconds) -> None:
    lines = [
        "# Reprogramming schedules on the digits models: bit stucking's writes and accuracy",
        "",
        f"Made by `python docs/studies/schedules.py` ({seconds:.0f} s on the 2-core machine). 8-bit weights on 2-bit "
        "cells (4 slices), dual encoding, 32 x 32 crossbars, `sorted` schedule; otherwise ideal hardware, so the "
        f"accuracy lost is stucking's alone. 450 held-out digits; mean ± std over {SEEDS} seeds (each seed draws other "
        "stucking decisions). p is the share of changed cells in the k lowest slice columns that is rewritten "
        "(`--stuck-fraction p --stuck-slices k`): p = 1 is no stucking.",
        "",
        "| model | tiles on physical crossbars | rounds | writes, `layer` | writes, `sorted` | float accuracy | crossbars, no stucking |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, crossbars in SETUPS.items():
        layer_writes, sorted_writes, float_accuracy, quantised, tiles, rounds = baseline[name]
        lines.append(
            f"| {name} | {tiles} on {crossbars} | {rounds} | {layer_writes:,} | {sorted_writes:,} ({layer_writes / sorted_writes:.2f}x fewer) | "
            f"{float_accuracy:.2%} | {quantised:.2%} |"
        )
    for name in SETUPS:
        layer_writes, _, _, quantised, _, _ = baseline[name]
        lines += [
            "",
            f"## {name}",
            "",
            "| k (stuck slices) | p (rewritten) | accuracy | drop vs no stucking (points) | writes per pass | fewer writes than `layer` |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for k in STUCK_SLICES:
            for p in FRACTIONS:
                accuracy, writes = results[name, k, p]
                lines.append(
                    f"| {k} | {p:g} | {accuracy.mean():.2%} ± {accuracy.std(ddof=1) if accuracy.size > 1 else 0:.2%} | "
                    f"{(quantised - accuracy.mean()) * 100:.2f} | {writes.mean():,.0f} | {layer_writes / writes.mean():.2f}x |"
                )
        for k in STUCK_SLICES:
            p = _smallest_fraction(results, name, k, quantised)
            accuracy, writes = results[name, k, p]
            lines.append(
                f"\nk = {k}: the smallest p that keeps the mean accuracy within 1 point is **p = {p:g}** "
                f"({accuracy.mean():.2%}, {layer_writes / writes.mean():.2f}x fewer writes than `layer`)."
            )
    lines += [
        "",
        "![accuracy and writes against p](schedules.png)",
        "",
        "Writes per physical crossbar and per round for the CNN with k = 2, p = 0.25, seed 0 — the same plot as",
        "",
        "    xcompile models/digits_cnn.onnx -o cnn.bin --weight-bits 8 --cell-bits 2 --rows 32 --cols 32 \\",
        "        --crossbars 8 --schedule sorted --stuck-slices 2 --stuck-fraction 0.25 --seed 0",
        "    xcompile inspect cnn.bin --writes-plot schedules_writes.png",
        "",
        "![writes per crossbar](schedules_writes.png)",
        "",
    ]
    (HERE / "schedules.md").write_text("\n".join(lines))


def _plot(results, baseline) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in SETUPS:
        layer_writes, _, _, quantised, _, _ = baseline[name]
        for k, style in zip(STUCK_SLICES, ("-o", "--s", ":^")):
            accuracy = [results[name, k, p][0] for p in FRACTIONS]
            writes = [results[name, k, p][1].mean() for p in FRACTIONS]
            label = f"{name}, k={k}"
            axes[0].errorbar(FRACTIONS, [a.mean() * 100 for a in accuracy], yerr=[a.std() * 100 for a in accuracy], fmt=style, capsize=3, label=label)
            axes[1].plot(FRACTIONS, [layer_writes / w for w in writes], style, label=label)
        axes[0].axhline((quantised - WITHIN) * 100, linestyle=":", color="grey")
    axes[0].set_xlabel("p: share of changed stuck-slice cells rewritten")
    axes[0].set_ylabel(f"accuracy (%), mean ± std of {SEEDS} seeds")
    axes[0].set_title("accuracy (dotted: 1 point below no stucking)", fontsize=10)
    axes[1].set_xlabel("p: share of changed stuck-slice cells rewritten")
    axes[1].set_ylabel("cell writes: layer schedule / this")
    axes[1].set_title("write reduction against the layer schedule", fontsize=10)
    for axis in axes:
        axis.invert_xaxis()
        axis.legend(fontsize=8)
    figure.suptitle("digits models, 8-bit weights on 2-bit cells, sorted schedule + bit stucking")
    figure.tight_layout()
    figure.savefig(HERE / "schedules.png", dpi=120)


if __name__ == "__main__":
    main()
