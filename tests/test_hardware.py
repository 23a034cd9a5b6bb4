"""Hardware users can trust: structural keys from the mapping, presets with sources,
per-channel weight scales, line-resistance compensation and the per-non-ideality breakdown."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import xcompile
from xcompile.cli import main
from xcompile.errors import XCompileError

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"


def _readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has a Python example"
    return blocks[0]


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    """The README's example compiles for 64 x 64 and runs on the 128 x 128 `rram` preset's devices."""
    shutil.copy(DIGITS, tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    scope = {"x": x}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the example calibrates on its first batch and says so
        exec(compile(_readme_python_example(), "README.md", "exec"), scope)
    assert scope["logits"].shape == (4, 10) and np.isfinite(scope["logits"]).all()
    assert scope["session"].hardware.rows == 64 and scope["session"].hardware.sigma > 0


def test_structural_keys_come_from_the_mapping(tmp_path):
    mapping = xcompile.compile_model(DIGITS, rows=64, cols=32, progress=False)
    toml = tmp_path / "hw.toml"
    toml.write_text('preset = "rram"\nrows = 256\ncols = 256\nr_wire = 1.5\n')
    session = xcompile.Session(mapping, hardware=str(toml))
    assert (session.hardware.rows, session.hardware.cols, session.hardware.r_wire) == (64, 32, 1.5)
    assert xcompile.Session(mapping, hardware="rram", rows=64).hardware.rows == 64  # agreeing is fine
    with pytest.raises(XCompileError, match="'rows' is 128 but the mapping was compiled for 64"):
        xcompile.Session(mapping, hardware="rram", rows=128)


def test_cli_run_with_a_preset_on_a_small_mapping(tmp_path, capsys):
    mapping = tmp_path / "m.bin"
    assert main([str(DIGITS), "-o", str(mapping), "--rows", "32", "--cols", "32", "-q"]) == 0
    np.save(tmp_path / "x.npy", np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32))
    assert main(["run", str(mapping), "--input", str(tmp_path / "x.npy"), "--preset", "rram",
                 "--calibration", f"input={tmp_path / 'x.npy'}"]) == 0
    assert "shape [3, 10]" in capsys.readouterr().out


def test_presets_command_prints_every_value_with_its_source(capsys):
    import json

    from xcompile.config import PRESETS

    assert main(["presets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["presets"]
    assert [p["name"] for p in listed] == list(PRESETS)
    for preset in listed:
        assert set(preset["sources"]) == set(PRESETS[preset["name"]])
        assert all(source.strip() for source in preset["sources"].values())
        for key, value in PRESETS[preset["name"]].items():
            assert preset["values"][key] == value
    assert {"rram", "rram-harsh", "pcm", "x-changr"} <= set(PRESETS)
    assert main(["presets"]) == 0
    assert "x-changr" in capsys.readouterr().out


def test_an_unknown_preset_lists_the_known_ones(tmp_path, capsys):
    mapping = tmp_path / "m.bin"
    assert main([str(DIGITS), "-o", str(mapping), "-q"]) == 0
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    assert main(["run", str(mapping), "--input", str(tmp_path / "x.npy"), "--preset", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown hardware preset 'nosuch'" in err and "rram-harsh" in err and "pcm" in err
    with pytest.raises(XCompileError, match="does not exist"):
        xcompile.Session(str(mapping), hardware=str(tmp_path / "missing.toml"))


def _unequal_channels(k: int = 40, n: int = 12, seed: int = 3, decades: float = 3):
    """One Gemm whose output channels span `decades` decades of weight magnitude."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(k, n)) * np.logspace(0, -decades, n)).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32) * 1e-3
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")
    graph = helper.make_graph(
        [node], "unequal", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _relative_error_per_channel(y, reference):
    return np.abs(y - reference).max(axis=0) / np.abs(reference).max(axis=0)


@pytest.mark.parametrize("encoding", ["dual", "acm", "offset"])
def test_channel_scales_keep_small_channels_and_ideal_mode_stays_exact(encoding, tmp_path):
    import onnxruntime as ort

    model = _unequal_channels()
    x = np.random.default_rng(0).normal(size=(64, 40)).astype(np.float32)
    reference = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    errors = {}
    for scale in ("layer", "channel"):
        ideal = xcompile.compile_model(model, ideal=True, weight_scale=scale, encoding=encoding, progress=False)
        y = xcompile.Session(ideal).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantised = xcompile.compile_model(model, weight_scale=scale, encoding=encoding, progress=False)
        quantised.save(tmp_path / f"{scale}.bin")
        y = xcompile.Session(str(tmp_path / f"{scale}.bin")).run(None, {"x": x})[0]
        errors[scale] = _relative_error_per_channel(y, reference)
    assert errors["layer"].max() > 0.5  # the smallest channels are rounded away on one scale
    assert errors["channel"].max() < 0.02  # each channel on its own 8-bit step
    assert xcompile.load(tmp_path / "channel.bin").layers[0].channel_scale.shape == (12,)


def test_channel_scales_on_crossbars_with_converters():
    """The per-channel step is applied after the ADC and recombination, before the bias."""
    import onnxruntime as ort

    model = _unequal_channels()
    x = np.random.default_rng(1).normal(size=(64, 40)).astype(np.float32)
    reference = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    mapping = xcompile.compile_model(model, weight_scale="channel", progress=False)
    y = xcompile.Session(mapping, calibration={"x": x}, dac_bits=8, adc_bits=10).run(None, {"x": x})[0]
    assert _relative_error_per_channel(y, reference).max() < 0.05


def test_compile_warns_when_one_layer_scale_rounds_most_weights_to_zero():
    model = _unequal_channels(n=24, decades=5)
    with pytest.warns(UserWarning, match=r"layer 'fc': one 8-bit scale per layer rounds \d+% of its nonzero weights to zero"):
        xcompile.compile_model(model, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xcompile.compile_model(model, weight_scale="channel", progress=False)


def test_channel_scales_follow_remapped_outputs():
    import onnxruntime as ort

    model = _unequal_channels(n=12)
    x = np.random.default_rng(2).normal(size=(32, 40)).astype(np.float32)
    reference = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    mapping = xcompile.compile_model(model, weight_scale="channel", remap="static", r_wire=2.0, cols=8, progress=False)
    assert mapping.layers[0].output_order is not None and not np.array_equal(mapping.layers[0].output_order, np.arange(12))
    with pytest.warns(UserWarning, match="placed the outputs for the compiled wires"):  # run on other wires: said once
        y = xcompile.Session(mapping, r_wire=0.0).run(None, {"x": x})[0]
    assert _relative_error_per_channel(y, reference).max() < 0.02


def _array_error(session, x_voltages: np.ndarray) -> float:
    """||currents after the digital gains (and row scales) - currents of the target cells|| /
    ||target currents||, measured on the tile's used columns for these normalised voltages."""
    from xcompile.runtime.devices import level_conductance

    crossbar = session._layers[0].crossbar
    (block,) = crossbar.blocks
    layer, hw = crossbar.layer, session.hardware
    used = block.conductance.shape[1]
    target = level_conductance(layer.levels[0][:, :used], session.program.options.level_max, hw) * hw.v_read
    v = x_voltages if block.row_scale is None else x_voltages * block.row_scale
    measured = (v @ block.conductance.astype(np.float64)) * block.gain
    wanted = x_voltages @ target
    return float(np.linalg.norm(measured - wanted) / np.linalg.norm(wanted))


@pytest.fixture(scope="module")
def full_tile():
    """A 128-input, 64-output layer: one full 128 x 128 dual-array tile."""
    from builders import dense

    return xcompile.compile_model(dense(128, 64, seed=0, bias=False), progress=False)


def test_column_compensation_cuts_the_array_error_of_a_full_tile(full_tile):
    v = np.random.default_rng(5).random((256, 128))  # uniform inputs
    errors = {}
    for mode in ("none", "column", "row-column"):
        session = xcompile.Session(full_tile, g_on=1e-3, r_wire=1.0, compensation=mode)
        errors[mode] = _array_error(session, v)
    assert errors["none"] > 0.10  # a 128-long line at 1 kOhm cells loses a lot
    assert errors["column"] < 0.10 and errors["column"] < errors["none"] / 5
    assert errors["row-column"] <= errors["column"] * 1.01


def test_compensation_is_seeded_and_fits_the_programmed_cells(full_tile):
    options = dict(r_wire=1.0, variation="lognormal", sigma=0.05, compensation="column")
    gains = [xcompile.Session(full_tile, seed=s, **options)._layers[0].crossbar.blocks[0].gain for s in (3, 3, 4)]
    np.testing.assert_array_equal(gains[0], gains[1])
    assert not np.array_equal(gains[0], gains[2])


def test_predistortion_solves_through_the_network_and_reports_its_cost():
    from builders import dense

    mapping = xcompile.compile_model(dense(24, 12, seed=1, bias=False), rows=24, cols=24, progress=False)
    v = np.random.default_rng(6).random((256, 24))
    wires = dict(g_on=1e-3, r_wire=5.0, r_source=50.0, r_sink=50.0)
    column = xcompile.Session(mapping, compensation="column", **wires)
    solved = xcompile.Session(mapping, compensation="predistort", **wires)
    assert solved._layers[0].crossbar.compensation["predistort_seconds"] > 0
    assert _array_error(solved, v) < 0.8 * _array_error(column, v)
    from xcompile.runtime import compensation
    from xcompile.runtime.devices import level_conductance

    target = level_conductance(mapping.layers[0].levels[0], 255.0, solved.hardware)
    written, info = compensation.predistort(target, (24, 24), solved.hardware, compensation.probe_moment(24))
    assert solved.hardware.g_off <= written.min() and written.max() <= solved.hardware.g_on  # within the window
    assert info["misfit_after"] < info["misfit_before"]


@pytest.mark.parametrize("options", [dict(encoding="dual"), dict(encoding="acm"), dict(encoding="offset"),
                                     dict(weight_bits=8, cell_bits=4), dict(weight_scale="channel")])
def test_compensation_composes_with_encodings_slicing_and_converters(options):
    from builders import dense

    model = dense(96, 40, seed=2)
    mapping = xcompile.compile_model(model, progress=False, **options)
    x = np.random.default_rng(7).random((128, 96)).astype(np.float32)
    reference = xcompile.Session(mapping).run(None, {"x": x})[0]  # the quantised model, ideal hardware
    errors = {}
    for mode in ("none", "column", "row-column"):
        session = xcompile.Session(mapping, calibration={"x": x}, r_wire=1.0, dac_bits=8, adc_bits=8, compensation=mode)
        y = session.run(None, {"x": x})[0]
        errors[mode] = np.linalg.norm(y - reference) / np.linalg.norm(reference)
    assert errors["column"] < errors["none"] / 2
    assert errors["row-column"] < errors["none"] / 2


def test_compensation_fits_on_calibration_data_when_given():
    """Inputs far from the probe distribution (only the first rows driven): a fit on them does better."""
    from builders import dense

    mapping = xcompile.compile_model(dense(128, 32, seed=4, bias=False), progress=False)
    x = np.zeros((256, 128), np.float32)
    x[:, :24] = np.random.default_rng(8).random((256, 24))
    reference = xcompile.Session(mapping).run(None, {"x": x})[0]
    errors = {}
    for name, calibration in (("probe", None), ("data", {"x": x})):
        session = xcompile.Session(mapping, r_wire=2.0, compensation="row-column", calibration=calibration)
        y = session.run(None, {"x": x})[0]
        errors[name] = np.linalg.norm(y - reference) / np.linalg.norm(reference)
        assert session.compensation["fc"]["fitted_on"] == ("calibration data" if calibration else "probe")
    assert errors["data"] < 0.5 * errors["probe"]
