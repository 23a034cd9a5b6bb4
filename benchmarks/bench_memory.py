"""Memory of a programmed ResNet-50-shaped model (25.5 M weights): levels plus G_eff per cell.

The session holds, per MVM layer and row block, the float32 effective conductances of every used
cell column (what an MVM multiplies by) and the mapping's uint8 levels. Target: <= 4 GB.
Devices with variation; ideal wires so that the run takes seconds (G_eff with wires has the
same size: one float32 per used cell).

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import onnx

import xcompile
from shapes import resnet50


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "resnet50.onnx"
        onnx.save(resnet50(), path)
        mapping = xcompile.compile_model(path, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    started = time.perf_counter()
    session = xcompile.Session(mapping, variation="lognormal", sigma=0.05, adc_bits=8, adc_range="fixed")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    conductance = sum(b.conductance.nbytes for r in session._layers.values() for b in r.crossbar.blocks)
    levels = sum(layer.levels.nbytes for layer in mapping.layers)
    print(f"programmed {sum(l.tiling.count for l in mapping.layers)} tiles in {seconds:.1f} s")
    print(f"G_eff (float32, used cells): {conductance / 2**30:.2f} GiB; levels (uint8): {levels / 2**30:.2f} GiB")
    print(f"process peak RSS: {peak:.2f} GiB (before programming {before:.2f} GiB); target <= 4 GiB: "
          f"{'PASS' if peak <= 4 else 'MISS'}")


if __name__ == "__main__":
    sys.exit(main())
