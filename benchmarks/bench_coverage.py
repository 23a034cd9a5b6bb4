"""Coverage and exactness on quantised, recurrent and transformer models: for each, the share of
weight elements on crossbars, the layers, and ideal mode's largest relative error against ONNX
Runtime on the same model (integer outputs compared after their float scale). ONNX Runtime runs with
`session.x64quantprecision` (exact integer GEMMs) where it loads the model so; where it does not,
the last column says "saturating": its uint8 x int8 kernels then add 16-bit pair sums with
saturation on x86 CPUs without VNNI, off the ONNX specification (docs/coverage.md).

    python benchmarks/bench_coverage.py        # about a minute on 2 cores

Models: the shipped digits CNN / MLP and the torch-exported transformer encoder, each as float and
quantised by onnxruntime.quantization (quantize_dynamic; quantize_static QDQ, per-channel QDQ and
QOperator; MatMulNBits 4- and 8-bit, blocks of 16, where there are MatMuls), each also as ONNX
Runtime's extended optimiser writes it; and tests/data's tiny torch
LSTM / GRU / RNN models.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

import xcompile

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "digits_cnn": (ROOT / "models" / "digits_cnn.onnx", (1, 8, 8)),
    "digits_mlp": (ROOT / "models" / "digits_mlp.onnx", (1, 8, 8)),
    "transformer_encoder": (ROOT / "tests" / "data" / "torch_transformer_encoder.onnx", (5, 16)),
}


class _Reader:
    def __init__(self, name, shape):
        self.batches = iter([{name: np.random.default_rng(i).uniform(0, 4, (4, *shape)).astype(np.float32)} for i in range(8)])

    def get_next(self):
        return next(self.batches, None)


def _variants(folder: Path):
    for name, (path, shape) in SOURCES.items():
        input_name = onnx.load(path).graph.input[0].name
        yield f"{name} float", path, shape
        quantize_dynamic(path, folder / f"{name}_dyn.onnx", weight_type=QuantType.QInt8)
        yield f"{name} quantize_dynamic", folder / f"{name}_dyn.onnx", shape
        for label, fmt, per_channel in (("QDQ", QuantFormat.QDQ, False), ("QDQ per-channel", QuantFormat.QDQ, True),
                                        ("QOperator", QuantFormat.QOperator, False)):
            target = folder / f"{name}_{label.replace(' ', '_')}.onnx"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # it prints tensors
                quantize_static(path, target, _Reader(input_name, shape), quant_format=fmt, per_channel=per_channel)
            yield f"{name} static {label}", target, shape
        for bits in (4, 8):  # weight-only, blockwise: what ONNX Runtime's quantiser writes for language models
            quantiser = MatMulNBitsQuantizer(onnx.load(path), bits=bits, block_size=16)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                quantiser.process()
            if any(node.op_type == "MatMulNBits" for node in quantiser.model.model.graph.node):
                onnx.save(quantiser.model.model, folder / f"{name}_nbits{bits}.onnx")
                yield f"{name} MatMulNBits {bits}-bit", folder / f"{name}_nbits{bits}.onnx", shape
    for path in sorted((ROOT / "tests" / "data").glob("torch_*.onnx")):
        if "transformer" not in path.name:
            yield path.stem, path, None


def _optimized(path: Path, folder: Path) -> Path:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / f"{path.stem}_ortopt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Path(options.optimized_model_filepath)


def _feeds(model: onnx.ModelProto, shape) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value or 3 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.uniform(0, 4, (16, *shape) if shape else dims).astype(np.float32)
    return feeds


def main() -> None:
    logging.disable(logging.WARNING)  # ONNX Runtime's quantisers log to the root logger, its weight-only one from INFO up
    print(f"{'model':<54} {'layers':>6} {'on crossbars':>13} {'left digital':>13} {'max rel. error vs ORT':>22}  ORT integer GEMMs")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for label, path, shape in _variants(folder):
            for suffix, model_path in (("", path), (" +ORT opt", _optimized(path, folder))):
                model = onnx.load(model_path)
                feeds = _feeds(model, shape)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mapping = xcompile.compile_model(model, ideal=True, progress=False)
                got = xcompile.Session(mapping).run(None, feeds)
                want, mode = _onnxruntime(model_path, feeds)
                error = max(float(np.abs(g.astype(np.float64) - w).max() / max(np.abs(w).max(), 1e-30)) for g, w in zip(got, want))
                coverage = mapping.summary()["coverage"]
                left = ", ".join(sorted({e["op_type"] for e in coverage["left_digital"]})) or "-"
                print(f"{label + suffix:<54} {len(mapping.layers):>6} {coverage['fraction_on_crossbars']:>13.1%} {left:>13} {error:>22.2g}  {mode}")


def _onnxruntime(path: Path, feeds: dict) -> tuple[list, str]:
    """ONNX Runtime's outputs, with exact integer GEMMs where it loads the model so."""
    exact = ort.SessionOptions()
    exact.log_severity_level = 4
    exact.add_session_config_entry("session.x64quantprecision", "1")
    for options, mode in ((exact, "exact"), (ort.SessionOptions(), "saturating")):
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds), mode
        except (ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.Fail):
            continue
    raise RuntimeError(f"ONNX Runtime cannot load {path}")


if __name__ == "__main__":
    main()
