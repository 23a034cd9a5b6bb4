"""Remapping against line resistance on the shipped digits CNNs: accuracy won back, compile time.

Hardware: 128 x 128 crossbars, r_wire 2 ohm per segment (ideal source and sink), lognormal
programming variation sigma 0.05 so that seeds differ, everything else ideal; 8-bit weights and
cells, dual encoding. There the line resistance costs the digits CNN several points as mapped.
Every remap mode (and sensitivity) is compiled once (timed) and evaluated over SEEDS trials on
the 450 held-out digits; recovery = the share of the as-mapped drop it wins back. The sparse
part runs the 75%-channel-pruned CNN as mapped and rearranged, next to the unpruned CNN.

    python benchmarks/bench_remap.py                 # prints the table
    python benchmarks/bench_remap.py --write-docs    # also writes docs/studies/remap.{md,png}
    python benchmarks/bench_remap.py --elsewhere     # static, chain, dynamic vs none on other models and hardware
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import xcompile
from xcompile.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "digits_cnn.onnx"
PRUNED = ROOT / "models" / "digits_cnn_pruned.onnx"
MLP = ROOT / "models" / "digits_mlp.onnx"
HARDWARE = {"rows": 128, "cols": 128, "r_wire": 2.0, "variation": "lognormal", "sigma": 0.05}
SEEDS = 10
MODES = [
    ("CNN", CNN, "none", "magnitude"),
    ("CNN", CNN, "static", "magnitude"),
    ("CNN", CNN, "static", "taylor"),
    ("CNN", CNN, "static", "perturbation"),
    ("CNN", CNN, "chain", "magnitude"),
    ("CNN", CNN, "dynamic", "magnitude"),
    ("CNN", CNN, "sparse", "magnitude"),
    ("pruned CNN", PRUNED, "none", "magnitude"),
    ("pruned CNN", PRUNED, "sparse", "magnitude"),
    ("pruned CNN", PRUNED, "dynamic", "magnitude"),
]
ELSEWHERE = [  # (label, model, hardware changes)
    ("digits MLP", MLP, {}),
    ("pruned CNN", PRUNED, {}),
    ("CNN, r_wire 1 ohm", CNN, {"r_wire": 1.0}),
    ("CNN, r_wire 3 ohm", CNN, {"r_wire": 3.0}),
    ("CNN, 64 x 64 crossbars", CNN, {"rows": 64, "cols": 64}),
]


def measure(seeds: int = SEEDS) -> list[dict]:
    rows = []
    for label, model, remap, sensitivity in MODES:
        rows.append({"model": label, "remap": remap, "sensitivity": sensitivity, **_run(model, remap, sensitivity, HARDWARE, seeds)})
        baseline = next(r for r in rows if r["model"] == label and r["remap"] == "none")
        rows[-1]["recovery"] = _recovery(baseline, rows[-1])
        print(_line(rows[-1]), flush=True)
    return rows


def elsewhere(seeds: int = SEEDS) -> None:
    """X-CHANGR static and dynamic, and chain, against the layer's own order on other models and hardware."""
    print(f"recovery elsewhere ({seeds} seeds; 128 x 128, r_wire 2 ohm, sigma 0.05 unless named):")
    for label, model, changes in ELSEWHERE:
        none = _run(model, "none", "magnitude", {**HARDWARE, **changes}, seeds)
        line = f"  {label:<22} drop as mapped {100 * none['drop_mean']:6.2f} pts"
        for remap in ("static", "chain", "dynamic"):
            row = _run(model, remap, "magnitude", {**HARDWARE, **changes}, seeds)
            line += f"  {remap} {100 * row['drop_mean']:6.2f} ({100 * _recovery(none, row):5.1f}%)"
        print(line, flush=True)


def _run(model: Path, remap: str, sensitivity: str, hardware: dict, seeds: int) -> dict:
    started = time.perf_counter()
    mapping = xcompile.compile_model(model, progress=False, remap=remap, sensitivity=sensitivity, calibration="digits", **hardware)
    compile_seconds = time.perf_counter() - started
    result = evaluate(mapping, "digits", trials=seeds, seed=1, progress=False)
    drops = [result["float_accuracy"] - t["accuracy"] for t in result["per_trial"]]
    return {
        "compile_seconds": round(compile_seconds, 2), "float_accuracy": result["float_accuracy"],
        "accuracy_mean": result["crossbar_accuracy_mean"], "accuracy_std": result["crossbar_accuracy_std"],
        "drop_mean": float(np.mean(drops)), "drop_std": float(np.std(drops, ddof=1)),
    }


def _recovery(baseline: dict, row: dict) -> float:
    return (baseline["drop_mean"] - row["drop_mean"]) / baseline["drop_mean"] if baseline["drop_mean"] > 0 else 0.0


def _line(r: dict) -> str:
    return (
        f"{r['model']:<11} {r['remap']:<8} {r['sensitivity']:<13} drop {100 * r['drop_mean']:5.2f} ± {100 * r['drop_std']:4.2f} pts  "
        f"recovery {100 * r['recovery']:6.1f}%  compile {r['compile_seconds']:6.1f} s"
    )


def write_docs(rows: list[dict], seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ROOT / "docs" / "studies"
    labels = [f"{r['model']}\n{r['remap']}" + (f"\n{r['sensitivity']}" if r["remap"] in ("static", "chain") else "") for r in rows]
    fig, ax = plt.subplots(figsize=(11, 4))
    colours = ["tab:gray" if r["remap"] == "none" else "tab:blue" if r["model"] == "CNN" else "tab:orange" for r in rows]
    ax.bar(range(len(rows)), [100 * r["drop_mean"] for r in rows], yerr=[100 * r["drop_std"] for r in rows], color=colours, capsize=3)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("accuracy drop vs float (points)")
    ax.set_title(f"digits CNN on 128x128 crossbars, r_wire {HARDWARE['r_wire']} ohm, sigma {HARDWARE['sigma']}: mean ± std over {SEEDS} seeds")
    fig.tight_layout()
    fig.savefig(out / "remap.png", dpi=120)
    table = [
        "| model | remap | sensitivity | float | crossbar accuracy | drop (points) | recovery | compile (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['remap']} | {r['sensitivity'] if r['remap'] in ('static', 'dynamic', 'chain') else '—'} | {r['float_accuracy']:.2%} | "
            f"{r['accuracy_mean']:.2%} ± {r['accuracy_std']:.2%} | {100 * r['drop_mean']:.2f} ± {100 * r['drop_std']:.2f} | "
            f"{100 * r['recovery']:.0f}% | {r['compile_seconds']:.1f} |"
        )
    (out / "remap_results.md").write_text(
        f"<!-- written by `python benchmarks/bench_remap.py --write-docs` in {seconds:.0f} s -->\n" + "\n".join(table) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    parser.add_argument("--write-docs", action="store_true", help="write docs/studies/remap.png and remap_results.md")
    parser.add_argument("--elsewhere", action="store_true", help="only static, chain, dynamic vs none on other models and hardware")
    args = parser.parse_args()
    if args.elsewhere:
        elsewhere(args.seeds)
        return
    started = time.perf_counter()
    rows = measure(args.seeds)
    if args.write_docs:
        write_docs(rows, time.perf_counter() - started)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
