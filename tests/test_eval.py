"""`xcompile eval`: float vs crossbar accuracy over seeded trials, and its bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import xcompile
from xcompile.cli import main
from xcompile.evaluate import evaluate
from builders import small_cnn


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    model = small_cnn(seed=1)
    onnx.save(model, folder / "cnn.onnx")
    x = np.random.default_rng(0).normal(size=(120, 3, 10, 10)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].argmax(1)
    np.savez(folder / "data.npz", x=x, y=y)
    mapping = folder / "cnn.bin"
    assert main([str(folder / "cnn.onnx"), "-o", str(mapping), "-q"]) == 0
    return folder, mapping


def test_eval_reports_float_and_crossbar_accuracy_over_trials(setup, capsys):
    folder, mapping = setup
    assert main(["eval", str(mapping), "--dataset", str(folder / "data.npz"), "--trials", "3", "--seed", "7",
                 "--preset", "rram-harsh", "--r-wire", "0", "--r-source", "0", "--r-sink", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["float_accuracy"] == 1.0  # labels are the float model's own answers
    assert [t["seed"] for t in result["per_trial"]] == [7, 8, 9]
    accuracies = [t["accuracy"] for t in result["per_trial"]]
    assert result["crossbar_accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert result["crossbar_accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert result["drop_mean"] == pytest.approx(1.0 - np.mean(accuracies))
    assert 0 < result["drop_mean"] < 1  # 15% spread, stuck cells and 6-bit converters cost something
    assert result["hardware"]["sigma"] == 0.15


def test_eval_is_reproducible_and_ideal_hardware_loses_nothing(setup):
    folder, mapping = setup
    loaded = xcompile.load(mapping)
    first = evaluate(loaded, folder / "data.npz", trials=2, seed=3, progress=False, variation="lognormal", sigma=0.1)
    again = evaluate(loaded, folder / "data.npz", trials=2, seed=3, progress=False, variation="lognormal", sigma=0.1)
    assert first["per_trial"] == again["per_trial"]
    ideal = xcompile.compile_model(folder / "cnn.onnx", ideal=True, progress=False)
    assert evaluate(ideal, folder / "data.npz", progress=False)["drop_mean"] == 0.0


def test_eval_text_output(setup, capsys):
    folder, mapping = setup
    assert main(["eval", str(mapping), "--dataset", str(folder / "data.npz")]) == 0
    out = capsys.readouterr().out
    assert "float model (ONNX Runtime): 100.00%" in out and "drop:" in out


@pytest.mark.parametrize(
    "arrays, extra, message",
    [
        ({"x": "X", "y": "Y"}, ["--trials", "0"], "trials"),
        ({"x": "X"}, [], "'y'"),
        ({"x": "X", "y": "Y_SHORT"}, [], "same number"),
        ({"x": "X", "y": "Y_BIG"}, [], "classes"),
        ({"x": "X", "y": "Y_FLOAT"}, [], "integer"),
        ({"x": "X_SHAPE", "y": "Y"}, [], "shape"),
        ({"x": "X_NAN", "y": "Y"}, [], "NaN"),
    ],
)
def test_bad_datasets_are_refused(setup, tmp_path, arrays, extra, message, capsys):
    folder, mapping = setup
    x = np.zeros((10, 3, 10, 10), np.float32)
    x_nan = x.copy()
    x_nan[0, 0, 0, 0] = np.inf
    pool = {
        "X": x, "Y": np.zeros(10, np.int64), "Y_SHORT": np.zeros(9, np.int64), "Y_BIG": np.full(10, 99),
        "Y_FLOAT": np.zeros(10, np.float32), "X_SHAPE": np.zeros((10, 3, 8, 8), np.float32), "X_NAN": x_nan,
    }
    np.savez(tmp_path / "bad.npz", **{k: pool[v] for k, v in arrays.items()})
    assert main(["eval", str(mapping), "--dataset", str(tmp_path / "bad.npz"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xcompile: error:") and message in err


def test_unknown_dataset_name(setup, capsys):
    _, mapping = setup
    assert main(["eval", str(mapping), "--dataset", "imagenet"]) == 2
    assert "built-in" in capsys.readouterr().err


def test_breakdown_separates_each_non_ideality_with_and_without_compensation(setup, tmp_path, capsys):
    folder, mapping = setup
    plot = tmp_path / "breakdown.png"
    assert main(["eval", str(mapping), "--dataset", str(folder / "data.npz"), "--trials", "2", "--breakdown", "--json",
                 "--r-wire", "3", "--adc-bits", "6", "--variation", "lognormal", "--sigma", "0.05", "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["non_ideality"]: row for row in result["rows"]}
    assert list(rows) == ["ideal", "r_wire", "converters", "variation", "all"]  # only what the hardware has
    assert rows["r_wire"]["hardware"] == {"r_wire": 3.0}
    assert rows["variation"]["hardware"] == {"variation": "lognormal", "sigma": 0.05}
    assert result["compensation"] == "row-column"
    ideal = rows["ideal"]["uncompensated"]
    assert ideal == rows["ideal"]["compensated"] and ideal["ci95"] == 0.0
    wires = rows["r_wire"]
    assert wires["compensated"]["accuracy_mean"] > wires["uncompensated"]["accuracy_mean"]
    assert rows["all"]["uncompensated"]["drop_mean"] >= wires["uncompensated"]["drop_mean"] - 0.05
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_breakdown_text_table_and_plot_needs_breakdown(setup, capsys):
    folder, mapping = setup
    assert main(["eval", str(mapping), "--dataset", str(folder / "data.npz"), "--breakdown", "--r-wire", "2",
                 "--compensation", "column"]) == 0
    out = capsys.readouterr().out
    assert "compensation column" in out and "r_wire" in out and "95% interval" in out
    assert main(["eval", str(mapping), "--dataset", str(folder / "data.npz"), "--plot", "x.png"]) == 2
    assert "--breakdown" in capsys.readouterr().err
