"""Compile time of a ResNet-50-shaped graph (25.5 M weights) with the default options.

    python benchmarks/bench_compile.py            # target: <= 30 s on 2 cores
    python benchmarks/bench_compile.py --profile  # and where the time goes
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import onnx

import xcompile
from shapes import resnet50, weight_count

TARGET_SECONDS = 30.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "resnet50.onnx"
        model = resnet50()
        onnx.save(model, path)
        profiler = cProfile.Profile() if args.profile else None
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        mapping = xcompile.compile_model(path, progress=True)
        compiled = time.perf_counter()
        mapping.save(Path(folder) / "resnet50.bin")
        saved = time.perf_counter()
        if profiler:
            profiler.disable()
        totals = mapping.summary()["totals"]
        size = (Path(folder) / "resnet50.bin").stat().st_size / 2**20
        print(f"weights {weight_count(model) / 1e6:.1f} M, {totals['layers']} MVM layers, {totals['tiles']} tiles of 128x128")
        print(f"compile (load, fold, passes): {compiled - started:6.2f} s")
        print(f"save mapping.bin:             {saved - compiled:6.2f} s ({size:.0f} MiB)")
        total = saved - started
        print(f"total:                        {total:6.2f} s   target <= {TARGET_SECONDS:.0f} s: {'PASS' if total <= TARGET_SECONDS else 'MISS'}")
        for record in mapping.program.history:
            print(f"  pass {record.name:<9} {record.seconds:6.2f} s")
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
