"""Whole-layer simulation speed against ONNX Runtime's own MatMul over the same cell columns.

512 x 512 weights, batch 1024, 8-bit DAC and ADC, lognormal variation, no bit slicing: the dual
array puts it on 512 x 1024 cell columns, so the baseline is ORT's MatMul [1024, 512] @ [512, 1024].
Inputs are non-negative (activations after a ReLU), so the DAC needs one pass; the signed-input
figure (two passes) is printed too. Target: crossbar layer <= 1.5x the baseline.

    python benchmarks/bench_layer.py
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import xcompile
from timing import median_time

K = N = 512
BATCH = 1024


def matmul_model(k: int, n: int, weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    x = np.maximum(rng.normal(size=(BATCH, K)), 0).astype(np.float32)
    x_signed = rng.normal(size=(BATCH, K)).astype(np.float32)

    cells = rng.normal(size=(K, 2 * N)).astype(np.float32)
    baseline = ort.InferenceSession(matmul_model(K, 2 * N, cells).SerializeToString(), providers=["CPUExecutionProvider"])
    t_ort = median_time(lambda: baseline.run(None, {"x": x}))

    mapping = xcompile.compile_model(matmul_model(K, N, weight), progress=False)
    session = xcompile.Session(
        mapping, dac_bits=8, adc_bits=8, variation="lognormal", sigma=0.05, calibration={"x": x}, seed=0
    )
    t_xbar = median_time(lambda: session.run(None, {"x": x}))
    t_signed = median_time(lambda: session.run(None, {"x": x_signed}))
    ideal = xcompile.Session(xcompile.compile_model(matmul_model(K, N, weight), ideal=True, progress=False))
    t_ideal = median_time(lambda: ideal.run(None, {"x": x}))

    print(f"layer {K}x{N}, batch {BATCH}; baseline: ORT MatMul [{BATCH},{K}] @ [{K},{2 * N}] (the dual array's cell columns)")
    print(f"{'what':<44} {'ms':>9} {'ratio':>7}")
    print(f"{'ORT MatMul over the cell columns':<44} {t_ort * 1e3:>9.2f} {1.0:>7.2f}")
    print(f"{'crossbar: DAC8/ADC8, variation, x >= 0':<44} {t_xbar * 1e3:>9.2f} {t_xbar / t_ort:>7.2f}")
    print(f"{'crossbar: same, signed x (two DAC passes)':<44} {t_signed * 1e3:>9.2f} {t_signed / t_ort:>7.2f}")
    print(f"{'ideal hardware (collapsed to one GEMM)':<44} {t_ideal * 1e3:>9.2f} {t_ideal / t_ort:>7.2f}")
    verdict = "PASS" if t_xbar / t_ort <= 1.5 else "MISS"
    print(f"target: crossbar / ORT <= 1.5 -> {t_xbar / t_ort:.2f} {verdict}")


if __name__ == "__main__":
    main()
