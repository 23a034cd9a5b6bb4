"""Train the shipped digits models on CPU in seconds and export them to ONNX (dev-only: torch).

    pip install torch==2.13.0 scikit-learn
    python models/train_digits.py

Data: scikit-learn's bundled `load_digits()` — 1,797 real 8x8 handwritten digits — scaled to
[0, 1] as images [N, 1, 8, 8], split 75/25 (stratified, random_state=0). Writes
models/digits_mlp.onnx, models/digits_cnn.onnx and the held-out split and a 256-sample
calibration set from the training split to xcompile/data/ (shipped with the package, so
`xcompile eval --dataset digits` works anywhere). Same seed, same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SEED = 0


def data():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(SEED)
    for p in model.parameters():  # re-initialise under the seed, whatever was drawn before
        if p.dim() > 1:
            nn.init.kaiming_uniform_(p, nonlinearity="relu")
        else:
            nn.init.zeros_(p)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        for batch in torch.randperm(len(xt), generator=generator).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimiser.step()
    return model.eval()


def export(model: nn.Module, path: Path) -> None:
    torch.onnx.export(
        model, torch.zeros(1, 1, 8, 8), str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(1) == y).mean())


def main() -> None:
    torch.set_num_threads(1)
    np.random.seed(SEED)
    x_train, x_test, y_train, y_test = data()
    rng = np.random.default_rng(SEED)
    calib = rng.choice(len(x_train), 256, replace=False)
    np.savez(ROOT / "xcompile/data/digits_test.npz", x=x_test, y=y_test)
    np.savez(ROOT / "xcompile/data/digits_calib.npz", x=x_train[calib], y=y_train[calib])
    for name, build, epochs in (("digits_mlp", mlp, 60), ("digits_cnn", cnn, 30)):
        path = ROOT / "models" / f"{name}.onnx"
        export(train(build(), x_train, y_train, epochs), path)
        print(f"{name}: test accuracy {accuracy(path, x_test, y_test):.2%} ({len(y_test)} held-out digits) -> {path.name}")


if __name__ == "__main__":
    main()
