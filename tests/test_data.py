"""xcompile.data: the shipped data sets, the .npz / .npy readers and the check of feeds against a
model's inputs. Every bad file or feed is refused with one message naming it and what is wrong."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import xcompile
from xcompile import data
from xcompile.cli import main
from xcompile.data import NodeArg, check_feeds
from xcompile.errors import XCompileError

X = np.zeros((4, 3), np.float32)
Y = np.arange(4)


def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def test_a_good_npz_gives_x_and_y(tmp_path):
    x, y = data.read_npz(_npz(tmp_path, x=X, y=Y), "dataset")
    assert x.shape == (4, 3) and y.tolist() == [0, 1, 2, 3]
    assert data.read_npz(_npz(tmp_path, x=X), "calibration file", labels="optional")[1] is None
    assert data.read_npz(_npz(tmp_path, x=X, y=np.zeros(4, np.float32)), "calibration file", labels="unused")[1] is None


@pytest.mark.parametrize(
    "arrays, labels, message",
    [
        ({"x": X}, "required", r"dataset '.*d\.npz' must hold inputs 'x' and labels 'y'; it has \['x'\]"),
        ({"y": Y}, "optional", r"must hold inputs 'x' \(and optionally labels 'y'\); it has \['y'\]"),
        ({"x": np.array(["a", "b"]), "y": Y[:2]}, "required", r"d\.npz': inputs 'x' must be numbers, got dtype <U1"),
        ({"x": X, "y": Y.astype(np.float32)}, "required", r"labels 'y' must be a 1-D array of integer classes, got float32 \[4\]"),
        ({"x": X, "y": Y.reshape(2, 2)}, "optional", r"labels 'y' must be a 1-D array of integer classes, got int64 \[2, 2\]"),
        ({"x": np.full((4, 3), np.inf, np.float32), "y": Y}, "required", r"d\.npz': inputs hold NaN or infinite values"),
        ({"x": X, "y": Y[:3]}, "required", r"d\.npz': 'x' has 4 samples and 'y' 3; expected the same number"),
        ({"x": X[:0], "y": Y[:0]}, "required", r"d\.npz' is empty: it needs at least one sample"),
        ({"x": np.float32(1.0)}, "optional", r"d\.npz' is empty"),
        ({"x": np.array([object()] * 4), "y": Y}, "required", r"d\.npz': 'x' holds Python objects \(a pickled array\)"),
    ],
    ids=["no-y", "no-x", "strings", "float-labels", "2d-labels", "inf", "lengths", "empty", "scalar", "pickled"],
)
def test_bad_npz_contents_are_named(tmp_path, arrays, labels, message):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(XCompileError, match=message):
        data.read_npz(path, "dataset", labels=labels)


def test_bad_npz_files_are_named(tmp_path):
    with pytest.raises(XCompileError, match=r"dataset '.*none\.npz' does not exist"):
        data.read_npz(tmp_path / "none.npz", "dataset")
    with pytest.raises(XCompileError, match="is not a regular file"):
        data.read_npz(tmp_path, "dataset")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(XCompileError, match=r"text\.npz' is not a readable \.npz file: it is not a zip archive"):
        data.read_npz(tmp_path / "text.npz", "dataset")
    np.save(tmp_path / "one.npy", X)
    with pytest.raises(XCompileError, match=r"one\.npy' is not a readable \.npz file: it is a single \.npy array"):
        data.read_npz(tmp_path / "one.npy", "calibration file")
    with zipfile.ZipFile(tmp_path / "junk.npz", "w") as archive:
        archive.writestr("x.npy", b"not an array")
        archive.writestr("y.npy", b"nor this")
    with pytest.raises(XCompileError, match=r"junk\.npz' is not a readable \.npz file: "):
        data.read_npz(tmp_path / "junk.npz", "dataset")


def test_npy_reader(tmp_path):
    np.save(tmp_path / "x.npy", X)
    assert data.read_npy(tmp_path / "x.npy").shape == (4, 3)
    with pytest.raises(XCompileError, match=r"input file '.*none\.npy' does not exist"):
        data.read_npy(tmp_path / "none.npy")
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(XCompileError, match=r"text\.npy' is not a readable \.npy array: it does not start with the \.npy header"):
        data.read_npy(tmp_path / "text.npy")
    with pytest.raises(XCompileError, match=r"d\.npz' is not a readable \.npy array: it is an \.npz archive of arrays"):
        data.read_npy(_npz(tmp_path, x=X))
    np.save(tmp_path / "objects.npy", np.array([object()]), allow_pickle=True)
    with pytest.raises(XCompileError, match=r"objects\.npy' holds Python objects \(a pickled array\)"):
        data.read_npy(tmp_path / "objects.npy")
    (tmp_path / "short.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:-8])
    with pytest.raises(XCompileError, match=r"short\.npy' is not a readable \.npy array: "):
        data.read_npy(tmp_path / "short.npy")


def test_builtin_data_sets_and_their_splits(tmp_path):
    x, y, calib = data.load_dataset("digits")
    assert x.shape[0] == y.shape[0] > 0 and calib.shape[1:] == x.shape[1:]
    assert data.load_calibration("digits")[0].shape == calib.shape
    assert data.load_dataset(_npz(tmp_path, x=X, y=Y))[2] is None
    with pytest.raises(XCompileError, match=r"dataset 'imagenet' does not exist and is not a built-in data set \(digits, mnist\)"):
        data.load_dataset("imagenet")
    with pytest.raises(XCompileError, match=r"calibration file 'missing\.npz' does not exist"):
        data.load_calibration("missing.npz")
    with pytest.raises(XCompileError, match="no built-in data set 'digits' split 'train'"):
        data.builtin_split("digits", "train")


def test_labels_must_name_the_models_classes():
    data.check_classes(np.array([0, 4]), 5, "dataset 'd'")
    with pytest.raises(XCompileError, match=r"^dataset 'd': labels run 0\.\.5; the model has 5 classes$"):
        data.check_classes(np.array([0, 5]), 5, "dataset 'd'")


# --- feeds ----------------------------------------------------------------------------------------

ARG = NodeArg("x", "tensor(float)", [-1, 3, "h", None])


@pytest.mark.parametrize(
    "feeds, message",
    [
        ([X], "feeds must be a dict of input name -> array, got list"),
        ({"x": X, "z": X}, "unknown input name(s) ['z']; the model takes ['x']"),
        ({}, "missing input(s) ['x']; the model takes ['x']"),
        ({"x": np.zeros((2, 3, 4, 4))}, "input 'x': unexpected data type tensor(double) (numpy dtype float64), the model expects tensor(float)"),
        ({"x": np.full((2, 3, 4, 4), np.nan, np.float32)}, "input 'x' holds NaN or infinite values"),
        ({"x": np.zeros((3, 4, 4), np.float32)}, "input 'x': invalid rank 3 (shape [3, 4, 4]), the model expects rank 4 ([-1, 3, 'h', None])"),
        ({"x": np.zeros((2, 4, 4, 4), np.float32)},
         "input 'x' has shape [2, 4, 4, 4]: invalid dimensions (index 1 got 4 expected 3); the model expects [-1, 3, 'h', None]"),
    ],
    ids=["not-a-dict", "unknown", "missing", "dtype", "nan", "rank", "dims"],
)
def test_feeds_get_the_sessions_messages(feeds, message):
    with pytest.raises(XCompileError, match=f"^{re.escape(message)}$"):
        check_feeds(feeds, [ARG])


def test_free_dimensions_take_any_size_as_in_onnxruntime():
    for shape in [(0, 3, 1, 1), (5, 3, 7, 2)]:
        x = np.zeros(shape, np.float32)
        assert check_feeds({"x": x}, [ARG])["x"] is x
    unshaped = NodeArg("x", "tensor(float)", None)
    assert check_feeds({"x": np.zeros(2, np.float32)}, [unshaped])["x"].shape == (2,)
    sequence = NodeArg("s", "seq", [])
    assert check_feeds({"s": [1, 2]}, [sequence])["s"] == [1, 2]  # non-tensors pass as they are


def test_node_arg_describes_inputs_like_onnxruntime():
    value = helper.make_tensor_value_info("x", TensorProto.INT64, [4, "batch", None])
    assert data.node_arg(value) == NodeArg("x", "tensor(int64)", [4, "batch", None])
    unshaped = helper.make_tensor_value_info("u", TensorProto.FLOAT, None)
    assert data.node_arg(unshaped).shape is None


def test_a_data_set_runs_in_batches_of_the_models_type():
    fixed = NodeArg("x", "tensor(float)", [2, 3])
    x = check_feeds({"x": np.ones((5, 3), np.float64)}, [fixed], data_set="dataset 'd'")["x"]
    assert x.dtype == np.float32 and x.shape == (5, 3)  # any number of samples, cast to float
    assert check_feeds({"x": np.ones((1, 3), bool)}, [fixed], data_set="dataset 'd'")["x"].dtype == np.float32


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((5, 4), np.float32), "dataset 'd': inputs have shape [5, 4], the model's input 'x' is [2, 3]"),
        (np.zeros((5,), np.float32), "dataset 'd': inputs have shape [5], the model's input 'x' is [2, 3]"),
        (np.zeros((0, 3), np.float32), "dataset 'd' is empty: it needs at least one sample"),
        (np.array([["a"] * 3]), "dataset 'd': inputs 'x' must be numbers, got dtype <U1"),
        (np.full((2, 3), -np.inf), "dataset 'd': inputs hold NaN or infinite values"),
    ],
    ids=["dims", "rank", "empty", "strings", "inf"],
)
def test_bad_data_sets_are_named(x, message):
    with pytest.raises(XCompileError, match=f"^{re.escape(message)}$"):
        check_feeds({"x": x}, [NodeArg("x", "tensor(float)", [2, 3])], data_set="dataset 'd'")


def test_importing_the_data_module_loads_no_runtime():
    code = "import sys, xcompile.data; print(sorted(m for m in ('onnxruntime', 'numba', 'scipy', 'pandas', 'dask') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- the tools read through it ----------------------------------------------------------------------

MLP = Path(__file__).resolve().parent.parent / "models" / "digits_mlp.onnx"


@pytest.fixture(scope="module")
def mlp_mapping(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "mapping.bin"
    xcompile.compile_model(MLP, ideal=True, progress=False).save(path)
    return path


def test_the_command_line_reads_every_file_here(mlp_mapping, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 64), np.float32))
    for argv, message in [
        (["run", str(mlp_mapping), "-i", str(tmp_path / "x.npz")], "it is an .npz archive of arrays"),
        (["inspect", str(mlp_mapping), "--calibration", str(tmp_path / "x.npy")], "it is a single .npy array"),
        (["eval", str(mlp_mapping), "--dataset", str(tmp_path / "x.npz")], "must hold inputs 'x' and labels 'y'"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("xcompile: error:") and message in err and "Traceback" not in err
    # calibration is read one way everywhere: eval takes a built-in's calibration split as compile does
    assert main(["eval", str(mlp_mapping), "--dataset", "digits", "--calibration", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["crossbar_accuracy_mean"] > 0.9


def test_a_sweep_refuses_bad_calibration_data_before_any_work(tmp_path):
    np.savez(tmp_path / "cal.npz", x=np.full((4, 64), np.nan, np.float32))
    out = tmp_path / "results"
    with pytest.raises(XCompileError, match=r"calibration file '.*cal\.npz': inputs hold NaN or infinite values"):
        xcompile.sweep(MLP, {"grid": {"r_wire": [0.0]}}, dataset="digits", output=out, workers=1, calibration=tmp_path / "cal.npz", progress=False)
    assert not out.exists()
