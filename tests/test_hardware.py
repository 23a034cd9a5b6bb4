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
