"""Whole-layer simulation speed against ONNX Runtime's own MatMul over the same cell columns.

512 x 512 weights, batch 1024, 8-bit DAC and ADC, lognormal variation, no bit slicing: the dual
array puts it on 512 x 1024 cell columns, so the baseline is ORT's MatMul [1024, 512] @ [512, 1024].
Inputs are non-negative (activations after a ReLU), so the DAC needs one pass; the signed-input
figure (two passes) is printed too. Target: crossbar layer <= 1.5x the baseline, on the default
128 x 128 crossbars (4 row blocks, so the arrays deliver 4x the currents of the cell columns, each
through an ADC) and on 512 x 512 ones (one row block: the cell columns read once). The machine is
shared and its speed drifts, so all are timed in alternating rounds (a median of runs each, after
a pause so that thread pools still spinning from the run before, OpenBLAS's or ORT's, do not take
the cores) and each ratio is the median of the rounds' ratios, printed with their range.

    python benchmarks/bench_layer.py
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import xcompile
from timing import median_time

K = N = 512
BATCH = 1024
ROUNDS = 9


def matmul_model(k: int, n: int, weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def settled(run) -> float:
    """median_time after a pause: BLAS and ORT thread pools spin for a while after their work,
    and must not take the cores from whatever is timed next."""
    time.sleep(0.3)
    return median_time(run, repeats=10)


def main() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    x = np.maximum(rng.normal(size=(BATCH, K)), 0).astype(np.float32)
    x_signed = rng.normal(size=(BATCH, K)).astype(np.float32)

    cells = rng.normal(size=(K, 2 * N)).astype(np.float32)
    baseline = ort.InferenceSession(matmul_model(K, 2 * N, cells).SerializeToString(), providers=["CPUExecutionProvider"])
    mapping = xcompile.compile_model(matmul_model(K, N, weight), progress=False)
    session = xcompile.Session(
        mapping, dac_bits=8, adc_bits=8, variation="lognormal", sigma=0.05, calibration={"x": x}, seed=0
    )
    whole_rows = xcompile.Session(
        xcompile.compile_model(matmul_model(K, N, weight), progress=False, rows=K, cols=K),
        dac_bits=8, adc_bits=8, variation="lognormal", sigma=0.05, calibration={"x": x}, seed=0,
    )
    ideal = xcompile.Session(xcompile.compile_model(matmul_model(K, N, weight), ideal=True, progress=False))
    runs = {
        "ORT MatMul over the cell columns": lambda: baseline.run(None, {"x": x}),
        "crossbar: DAC8/ADC8, variation, x >= 0": lambda: session.run(None, {"x": x}),
        f"same on {K} x {K} crossbars (one row block)": lambda: whole_rows.run(None, {"x": x}),
        "crossbar: same, signed x (two DAC passes)": lambda: session.run(None, {"x": x_signed}),
        "ideal hardware (collapsed to one GEMM)": lambda: ideal.run(None, {"x": x}),
    }
    rounds = np.array([[settled(run) for run in runs.values()] for _ in range(ROUNDS)])
    ratios = rounds / rounds[:, :1]

    print(f"layer {K}x{N}, batch {BATCH}; baseline: ORT MatMul [{BATCH},{K}] @ [{K},{2 * N}] (the dual array's cell columns)")
    print(f"{ROUNDS} alternating rounds; median ms, and the median (range) of the rounds' ratios")
    print(f"{'what':<44} {'ms':>9} {'ratio':>7}  range")
    for name, times, ratio in zip(runs, rounds.T, ratios.T):
        print(f"{name:<44} {np.median(times) * 1e3:>9.2f} {np.median(ratio):>7.2f}  {ratio.min():.2f}-{ratio.max():.2f}")
    for column, what in ((1, "128 x 128 crossbars"), (2, f"{K} x {K} crossbars")):
        ratio = np.median(ratios[:, column])
        print(f"target: crossbar / ORT <= 1.5 on {what} -> {ratio:.2f} {'PASS' if ratio <= 1.5 else 'MISS'}")


if __name__ == "__main__":
    main()
