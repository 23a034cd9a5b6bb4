"""Export the tiny models tests/test_recurrent.py and tests/test_quantized.py run (torch 2.13, run once by hand:
`python tests/data/make_torch_recurrent.py`). Random weights, seed 0; a few kB each."""

from pathlib import Path

import torch

HERE = Path(__file__).parent


class Tagger(torch.nn.Module):
    """Recurrent stack + linear head: the shape of an OCR / voice-activity model's sequence part."""

    def __init__(self, cell, batch_first, **options):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(input_size=6, hidden_size=5, batch_first=batch_first, **options)
        self.head = torch.nn.Linear(5 * (2 if options.get("bidirectional") else 1), 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y)


MODELS = {
    "torch_lstm_bidirectional_2layers_batch_first": (torch.nn.LSTM, True, {"num_layers": 2, "bidirectional": True}),
    "torch_lstm_forward": (torch.nn.LSTM, False, {}),
    "torch_gru_bidirectional": (torch.nn.GRU, False, {"bidirectional": True}),
    "torch_gru_2layers_batch_first": (torch.nn.GRU, True, {"num_layers": 2}),
    "torch_rnn_relu_bidirectional": (torch.nn.RNN, False, {"nonlinearity": "relu", "bidirectional": True}),
    "torch_rnn_tanh_batch_first": (torch.nn.RNN, True, {}),
}

class Encoder(torch.nn.Module):
    """A two-layer transformer encoder (sentence-encoder shape): attention, feed-forward, norms."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def export_encoder():
    torch.manual_seed(0)
    module = Encoder().eval()
    x = torch.randn(2, 5, 16)
    torch.onnx.export(module, (x,), HERE / "torch_transformer_encoder.onnx", input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch", 1: "tokens"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)


if __name__ == "__main__":
    for name, (cell, batch_first, options) in MODELS.items():
        torch.manual_seed(0)
        module = Tagger(cell, batch_first, **options).eval()
        x = torch.randn(2, 7, 6) if batch_first else torch.randn(7, 2, 6)
        axes = {0: "batch", 1: "time"} if batch_first else {0: "time", 1: "batch"}
        torch.onnx.export(module, (x,), HERE / f"{name}.onnx", input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": axes, "y": axes}, opset_version=17, dynamo=False)
        print(name)
    export_encoder()
    print("torch_transformer_encoder")
