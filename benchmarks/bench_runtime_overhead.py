"""What running inside the partitioned executor costs, on the shipped digits models at batch 256.

Side by side in one run: ONNX Runtime on the original model; xcompile's Session in ideal mode
(every MVM collapsed to one GEMM: the executor's own overhead); the default quantised mapping.
Overhead per MVM node = (Session - ORT) / MVM nodes. The MLP (dense layers only) shows the
executor's own cost; the CNN adds the im2col that forms crossbar input vectors from images.

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
    ideal = xcompile.Session(xcompile.compile_model(path, ideal=True, progress=False))
    quantised = xcompile.Session(xcompile.compile_model(path, progress=False))
    steps = ideal._steps
    mvm = sum(type(s).__name__ == "_Mvm" for s in steps)
    segments = len(steps) - mvm

    t_ort = median_time(lambda: reference.run(None, {"input": x}), repeats=200, warmup=10)
    t_ideal = median_time(lambda: ideal.run(None, {"input": x}), repeats=200, warmup=10)
    t_quant = median_time(lambda: quantised.run(None, {"input": x}), repeats=200, warmup=10)

    print(f"{name}, batch {BATCH}: {mvm} MVM nodes (crossbar runtime), {segments} ONNX Runtime segments")
    print(f"{'':<42} {'ms/batch':>9} {'ratio':>6}")
    print(f"{'ONNX Runtime, original model':<42} {t_ort * 1e3:>9.3f} {1:>6.2f}")
    print(f"{'xcompile Session, ideal (collapsed GEMMs)':<42} {t_ideal * 1e3:>9.3f} {t_ideal / t_ort:>6.2f}")
    print(f"{'xcompile Session, 8-bit quantised':<42} {t_quant * 1e3:>9.3f} {t_quant / t_ort:>6.2f}")
    print(f"overhead per MVM node: {(t_ideal - t_ort) / mvm * 1e6:.0f} us "
          f"({(t_ideal - t_ort) / mvm / BATCH * 1e9:.0f} ns per sample and node)\n")


if __name__ == "__main__":
    main()
