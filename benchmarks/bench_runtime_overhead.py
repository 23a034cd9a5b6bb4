"""What running inside the partitioned executor costs, on the shipped digits models at batch 256.

Side by side in one run: ONNX Runtime on the original model; xcompile's Session in ideal mode as
it runs (the whole model as one ONNX Runtime graph with the effective weights, runtime/fused.py);
the same session forced step by step (every MVM node on the crossbar runner, collapsed to one
GEMM: the partitioned executor's own cost, what non-ideal hardware pays); the default quantised
mapping. Overhead per MVM node = (step by step - ORT) / MVM nodes. The MLP (dense layers only)
shows the executor's own cost; the CNN adds the im2col that forms crossbar input vectors.

    python benchmarks/bench_runtime_overhead.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

import xcompile
from timing import median_time

ROOT = Path(__file__).resolve().parent.parent
BATCH = 256


def main() -> None:
    x = np.load(ROOT / "xcompile" / "data" / "digits_test.npz")["x"][:BATCH]
    for name in ("digits_cnn", "digits_mlp"):
        measure(name, x)


def measure(name: str, x: np.ndarray) -> None:
    path = ROOT / "models" / f"{name}.onnx"
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    mapping = xcompile.compile_model(path, ideal=True, progress=False)
    ideal, stepwise = xcompile.Session(mapping), xcompile.Session(mapping)
    stepwise._fused = False  # the partitioned executor, as non-ideal hardware runs
    quantised = xcompile.Session(xcompile.compile_model(path, progress=False))
    mvm = len(mapping.layers)

    t_ort = median_time(lambda: reference.run(None, {"input": x}), repeats=200, warmup=10)
    t_ideal = median_time(lambda: ideal.run(None, {"input": x}), repeats=200, warmup=10)
    t_step = median_time(lambda: stepwise.run(None, {"input": x}), repeats=200, warmup=10)
    t_quant = median_time(lambda: quantised.run(None, {"input": x}), repeats=200, warmup=10)

    print(f"{name}, batch {BATCH}: {mvm} MVM nodes")
    print(f"{'':<50} {'ms/batch':>9} {'ratio':>6}")
    print(f"{'ONNX Runtime, original model':<50} {t_ort * 1e3:>9.3f} {1:>6.2f}")
    print(f"{'xcompile Session, ideal (one ONNX Runtime graph)':<50} {t_ideal * 1e3:>9.3f} {t_ideal / t_ort:>6.2f}")
    print(f"{'xcompile Session, ideal, step by step':<50} {t_step * 1e3:>9.3f} {t_step / t_ort:>6.2f}")
    print(f"{'xcompile Session, 8-bit quantised (one graph)':<50} {t_quant * 1e3:>9.3f} {t_quant / t_ort:>6.2f}")
    print(f"step-by-step overhead per MVM node: {(t_step - t_ort) / mvm * 1e6:.0f} us "
          f"({(t_step - t_ort) / mvm / BATCH * 1e9:.0f} ns per sample and node)\n")


if __name__ == "__main__":
    main()
