"""Train the shipped digits models on CPU in seconds and export them to ONNX (dev-only: torch).

    pip install torch==2.13.0 scikit-learn
    python models/train_digits.py

Also writes models/digits_cnn_pruned.onnx: the CNN with 75% of its channels removed by
structured magnitude pruning (the filters of smallest L1 norm in every conv layer and the hidden
Linear layer, zeroed together with the next layer's weights that read them), then fine-tuned
with the pruned channels held at zero. The zeros stay in the model, so a compiler sees the
sparse crossbar columns and rows.

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


PRUNED_FRACTION = 0.75


def prune_channels(model: nn.Sequential, fraction: float) -> list[tuple[nn.Module, torch.Tensor, nn.Module | None]]:
    """Zero the `fraction` of output channels with the smallest L1 norm in every layer but the
    last, and the next layer's inputs from them; returns (layer, kept mask, next layer)."""
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    masks = []
    for layer, following in zip(layers[:-1], layers[1:]):
        norms = layer.weight.detach().abs().flatten(1).sum(1)
        kept = torch.zeros_like(norms, dtype=torch.bool)
        kept[norms.argsort(descending=True)[: round(len(norms) * (1 - fraction))]] = True
        masks.append((layer, kept, following))
    _apply_masks(masks)
    return masks


@torch.no_grad()
def _apply_masks(masks) -> None:
    for layer, kept, following in masks:
        layer.weight[~kept] = 0.0
        layer.bias[~kept] = 0.0
        if isinstance(following, nn.Conv2d):
            following.weight[:, ~kept] = 0.0
        else:  # the Linear after Flatten reads every channel's spatial positions
            per_channel = following.weight.shape[1] // kept.numel()
            following.weight[:, (~kept).repeat_interleave(per_channel)] = 0.0


def fine_tune(model: nn.Module, masks, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(xt), generator=generator).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimiser.step()
            _apply_masks(masks)
    return model.eval()


def from_onnx(model: nn.Module, path: Path) -> nn.Module:
    """Load the weights of an exported model back (initializer names are the state_dict keys)."""
    import onnx
    from onnx import numpy_helper

    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(str(path)).graph.initializer}
    model.load_state_dict({k: weights[k] for k in model.state_dict()})
    return model


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
    pruned = from_onnx(cnn(), ROOT / "models" / "digits_cnn.onnx")  # prune the shipped CNN itself
    masks = prune_channels(pruned, PRUNED_FRACTION)
    path = ROOT / "models" / "digits_cnn_pruned.onnx"
    export(fine_tune(pruned, masks, x_train, y_train, 80), path)
    kept = sum(int(k.sum()) for _, k, _ in masks)
    total = sum(k.numel() for _, k, _ in masks)
    print(f"digits_cnn_pruned: {total - kept} of {total} channels pruned, test accuracy {accuracy(path, x_test, y_test):.2%} -> {path.name}")


if __name__ == "__main__":
    main()
