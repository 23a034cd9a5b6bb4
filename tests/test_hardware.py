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
    y = xcompile.Session(mapping, r_wire=0.0).run(None, {"x": x})[0]
    assert _relative_error_per_channel(y, reference).max() < 0.02
