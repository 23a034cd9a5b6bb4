"""The command line as a user meets it: the main job, and one clear line for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import networkx as nx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import xcompile
from xcompile.cli import main
from builders import model, small_cnn, tensor

SUMMARY_KEYS = {"hardware", "options", "passes", "layers", "totals", "digital_ops", "coverage", "schedule"}
LAYER_KEYS = {
    "name", "op_type", "kind", "rows", "outputs", "groups", "weights", "tiles", "crossbars",
    "cells_used", "cells_total", "utilisation", "encoding", "scale", "columns",
    "adc_conversions_per_vector", "vectors_per_sample", "adc_conversions_per_inference", "notes",
    "output_order", "input_order",
}


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


@pytest.fixture(scope="module")
def compiled(cnn_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "mapping.bin"
    assert main([str(cnn_path), "-o", str(out), "-q"]) == 0
    return out


def test_compile_inspect_run_as_a_user_would(cnn_path, tmp_path):
    out = tmp_path / "mapping.bin"
    result = subprocess.run(
        [sys.executable, "-m", "xcompile.cli", str(cnn_path), "-o", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "2 MVM layers" in result.stdout and out.exists()
    result = subprocess.run([sys.executable, "-m", "xcompile.cli", "inspect", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "conv" in result.stdout and "fc" in result.stdout and "total" in result.stdout


def test_inspect_json_has_the_documented_keys_and_consistent_totals(compiled, capsys):
    assert main(["inspect", str(compiled), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == SUMMARY_KEYS
    assert all(set(layer) == LAYER_KEYS for layer in info["layers"])
    assert info["totals"]["tiles"] == sum(layer["tiles"] for layer in info["layers"])
    assert info["totals"]["cells_used"] == sum(layer["cells_used"] for layer in info["layers"])
    conv = info["layers"][0]
    # conv: 3*3*3 = 27 rows, 6 outputs on a dual array: 12 of 128 columns in one tile
    assert (conv["rows"], conv["outputs"], conv["tiles"], conv["cells_used"]) == (27, 6, 1, 27 * 12)
    assert conv["utilisation"] == pytest.approx(27 * 12 / 128**2, abs=1e-6)
    fc = info["layers"][1]
    assert fc["rows"] == 150 and fc["tiles"] == 2  # 150 rows -> two row blocks of 128
    assert "Relu" in info["digital_ops"] and "MaxPool" in info["digital_ops"]
    assert "read_energy" not in info["totals"]


def test_inspect_with_calibration_adds_read_energy(compiled, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(8, 3, 10, 10)).astype(np.float32))
    assert main(["inspect", str(compiled), "--json", "--calibration", str(tmp_path / "calib.npz")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["totals"]["read_energy"] == pytest.approx(sum(layer["read_energy"] for layer in info["layers"]))
    assert all(layer["read_energy"] > 0 for layer in info["layers"])


@pytest.mark.parametrize("suffix", [".graphml", ".dot", ".json"])
def test_placement_graph_export(compiled, tmp_path, suffix, capsys):
    target = tmp_path / f"placement{suffix}"
    assert main(["inspect", str(compiled), "--graph", str(target)]) == 0
    text = target.read_text()
    if suffix == ".graphml":
        graph = nx.read_graphml(target)
        tiles = [n for n, d in graph.nodes(data=True) if d["kind"] == "tile"]
        assert len(tiles) == 3 and all("crossbar" in graph.nodes[t] for t in tiles)
        assert graph.has_edge("conv/out", "fc/in")  # data flows conv -> relu -> pool -> fc
    elif suffix == ".json":
        data = json.loads(text)
        assert {n["kind"] for n in data["nodes"]} == {"input", "tile", "adder", "output"}
    else:
        assert text.startswith("strict digraph") and '"fc/tile1.0"' in text


def test_run_writes_what_the_session_returns(compiled, tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(2, 3, 10, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(compiled), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(tmp_path / "out.npz")]) == 0
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(out["y"], xcompile.Session(compiled).run(["y"], {"x": x})[0])
    assert main(["run", str(compiled), "-i", str(tmp_path / "x.npy")]) == 0  # NAME= optional with one input
    assert "y: shape [2, 5]" in capsys.readouterr().out


def test_ideal_flag_matches_onnxruntime(cnn_path, tmp_path):
    out = tmp_path / "ideal.bin"
    assert main([str(cnn_path), "-o", str(out), "--ideal", "-q"]) == 0
    x = np.random.default_rng(2).normal(size=(4, 3, 10, 10)).astype(np.float32)
    expected = ort.InferenceSession(str(cnn_path)).run(None, {"x": x})[0]
    got = xcompile.Session(out).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def _dynamic_weight_conv(path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv_dyn")]
    onnx.save(model(nodes, [tensor("x", [1, 1, 4, 4]), tensor("w", [1, 1, 3, 3])], [tensor("y", [1, 1, 2, 2])]), path)


def _channel_mismatch(path):
    w = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv_bad")]
    m = model(nodes, [tensor("x", [1, 5, 6, 6])], [tensor("y", [1, 2, 4, 4])], [w])
    onnx.save(m, path)


def _truncated(path):
    data = small_cnn().SerializeToString()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize(
    "make, args, message",
    [
        (None, [], "does not exist"),
        (lambda p: p.write_text("not a model at all\n"), [], "not"),
        (_truncated, [], "not"),
        (_dynamic_weight_conv, [], "conv_dyn"),
        (_channel_mismatch, [], "channel"),
        ("cnn", ["--rows", "0"], "rows"),
        ("cnn", ["--weight-bits", "0"], "weight_bits"),
        ("cnn", ["--weight-bits", "4", "--cell-bits", "6"], "cell_bits"),
        ("cnn", ["--encoding", "quaternary"], "encoding"),
        ("cnn", ["--hardware", "HW"], "colums"),
        ("cnn", ["--hardware", "missing.toml"], "does not exist"),
        ("cnn", ["--hardware", "."], "not a file"),
        ("cnn", ["--hardware", "BADTOML"], "not valid TOML"),
        ("cnn", ["--cols", "2", "--cell-bits", "4"], "needs 4 columns"),
        ("cnn", ["--cols", "3", "--encoding", "offset", "--cell-bits", "1"], "needs 16 columns"),
        ("cnn", ["--cols", "2", "--encoding", "acm", "--cell-bits", "4"], "needs 4 columns"),
        ("cnn", ["--rows", "65536", "--cols", "65536"], "GiB limit"),
        ("cnn", ["--no-such-flag"], "--no-such-flag"),
        (lambda p: onnx.save(model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [1, 4])], [tensor("y", [1, 4])]), p), [], "nothing to map"),
    ],
    ids=["missing", "text-file", "truncated", "dynamic-weight", "channel-mismatch", "rows-0", "bits-0", "cell-over-weight", "encoding", "hardware-key", "hardware-missing",
         "hardware-dir", "hardware-bad-toml", "narrow-dual", "narrow-offset", "narrow-acm", "absurd-size", "unknown-flag", "no-weights"],
)
def test_bad_compile_input_is_one_clear_line_exit_2_and_no_output(tmp_path, cnn_path, make, args, message):
    source = tmp_path / "model.onnx"
    if make == "cnn":
        source = cnn_path
    elif make is not None:
        make(source)
    hw = tmp_path / "hw.toml"
    hw.write_text("[hardware]\nrows = 64\ncolums = 64\n")
    (tmp_path / "bad.toml").write_bytes(b"rows = [1,\xff")
    subst = {"HW": str(hw), "BADTOML": str(tmp_path / "bad.toml"), ".": str(tmp_path)}
    args = [subst[a] if a in subst else str(tmp_path / a) if a.endswith(".toml") else a for a in args]
    out = tmp_path / "out.bin"
    result = subprocess.run(
        [sys.executable, "-m", "xcompile.cli", str(source), "-o", str(out), *args], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("xcompile: error:") and message in lines[0], result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.bin")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "MAP", "-i", "x=MISSING.npy"], "does not exist"),
        (["run", "MAP", "-i", "x=TEXT"], "not a readable .npy"),
        (["run", "MAP", "-i", "z=X"], "unknown input"),
        (["run", "MAP", "-i", "x=X64"], "dtype float64"),
        (["run", "MAP", "-i", "x=XSHAPE"], "shape"),
        (["run", "MAP"], "missing input"),
        (["inspect", "MAP", "--graph", "g.png"], ".graphml"),
        (["inspect", "TEXT"], "not a readable xcompile mapping"),
    ],
)
def test_bad_run_and_inspect_input(tmp_path, compiled, args, message, capsys):
    (tmp_path / "text.npy").write_text("hello")
    x = np.zeros((1, 3, 10, 10), np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x64.npy", x.astype(np.float64))
    np.save(tmp_path / "xshape.npy", np.zeros((1, 3, 9, 10), np.float32))
    subst = {"MAP": str(compiled), "TEXT": str(tmp_path / "text.npy"), "X": str(tmp_path / "x.npy"),
             "X64": str(tmp_path / "x64.npy"), "XSHAPE": str(tmp_path / "xshape.npy"), "MISSING.npy": str(tmp_path / "none.npy")}
    argv = []
    for a in args:
        name, sep, value = a.partition("=")
        argv.append(f"{name}={subst.get(value, value)}" if sep else subst.get(a, a))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("xcompile: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


def test_python_api_rejects_unknown_options():
    with pytest.raises(xcompile.XCompileError, match="crossbar_size"):
        xcompile.compile_model(small_cnn(), crossbar_size=64)


def test_a_bug_is_one_line_asking_for_a_report_exit_1(compiled, monkeypatch, capsys):
    import xcompile.inspect_cmd as inspect_cmd

    def broken(args):
        raise KeyError("layer")

    monkeypatch.setattr(inspect_cmd, "run", broken)
    assert main(["inspect", str(compiled)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "internal error: KeyError" in lines[0] and "please report" in lines[0] and "--debug" in lines[0]
    assert main(["--debug", "inspect", str(compiled)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err and err.splitlines()[-1].startswith("xcompile: internal error")


def test_debug_flag_after_the_command_and_with_the_compile_shorthand(cnn_path, tmp_path, capsys):
    assert main([str(cnn_path), "-o", str(tmp_path / "m.bin"), "--cols", "2", "--cell-bits", "4", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("xcompile: error: a crossbar of 2 columns")


# A save interrupted by a signal: the process signals itself from inside the zip writer, so the
# signal lands mid-save every time; then the folder must hold nothing but the model.
_SIGNAL_MID_SAVE = """
import os, signal, sys, zipfile
from xcompile.cli import main
write = zipfile.ZipFile.writestr
def interrupted(self, *args, **kwargs):
    write(self, *args, **kwargs)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
zipfile.ZipFile.writestr = interrupted
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("signal_name, code, message", [("SIGTERM", 130, "interrupted"), ("SIGINT", 130, "interrupted")])
def test_a_signal_mid_save_exits_cleanly_and_leaves_no_partial_file(cnn_path, tmp_path, signal_name, code, message):
    folder = tmp_path / "out"
    folder.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _SIGNAL_MID_SAVE, signal_name, str(cnn_path), "-o", str(folder / "m.bin"), "-q"],
        capture_output=True, text=True,
    )
    assert result.returncode == code, result.stderr
    assert result.stderr.strip() == f"xcompile: {message}"
    assert list(folder.iterdir()) == []


def test_sigterm_during_a_real_compile_leaves_no_partial_file(tmp_path):
    """SIGTERM from outside, once the output's temporary file exists (a model big enough to take
    a moment to write): exit 130 as for Ctrl-C and nothing left in the folder."""
    import signal
    import time

    from builders import dense

    onnx.save(dense(2000, 2000), tmp_path / "big.onnx")
    folder = tmp_path / "out"
    folder.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "xcompile.cli", str(tmp_path / "big.onnx"), "-o", str(folder / "m.bin"), "-q", "--rows", "64", "--cols", "64"],
        stderr=subprocess.PIPE, text=True,
    )
    while process.poll() is None and not list(folder.iterdir()):
        time.sleep(0.002)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=120)[1]
    seen_partial = process.returncode == 130
    assert process.returncode in (0, 130), err  # 0 only if the save finished before the signal
    assert [p.name for p in folder.iterdir()] == ([] if seen_partial else ["m.bin"])
    if seen_partial:
        assert err.strip() == "xcompile: interrupted"


def test_disk_full_during_save_is_one_line_naming_the_file(cnn_path, tmp_path):
    """A file-size limit makes the kernel refuse writes past 8 kB, as a full disk would."""
    import resource
    import signal

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 13, 1 << 13))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing

    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "m.bin"
    result = subprocess.run(
        [sys.executable, "-m", "xcompile.cli", str(cnn_path), "-o", str(out), "-q", "--rows", "16", "--cols", "16"],
        capture_output=True, text=True, preexec_fn=limit_file_size,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xcompile: error: cannot write '{out}'"), result.stderr
    assert list(folder.iterdir()) == []


def _dense_graph(nodes, inputs, outputs, k=8, n=4, extra=(), opset=17):
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(k, n)).astype(np.float32), "w")
    return model(nodes, inputs, outputs, [w, *extra], opset=opset)


def _opset_99():
    return _dense_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")], [tensor("x", ["N", 8])], [tensor("y", ["N", 4])], opset=99)


def _custom_op():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"), helper.make_node("Bar", ["h"], ["y"], domain="com.foo", name="bar")]
    m = _dense_graph(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 4])])
    m.opset_import.append(helper.make_opsetid("com.foo", 1))
    return m


def _gemm_bias_7_for_4_outputs():
    b = numpy_helper.from_array(np.ones(7, np.float32), "b")
    return _dense_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")], [tensor("x", ["N", 8])], [tensor("y", ["N", 4])], extra=[b])


def _flatten_axis_0():
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=0), helper.make_node("Gemm", ["f", "w"], ["y"], name="fc")]
    return _dense_graph(nodes, [tensor("x", ["N", 8])], [tensor("y", [1, 4])])


def _kernel_over_input():
    w = numpy_helper.from_array(np.ones((2, 1, 5, 5), np.float32), "w")
    return model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [tensor("x", ["N", 1, 3, 3])], [tensor("y", ["N", 2, None, None])], [w])


def _k_zero():
    w = numpy_helper.from_array(np.zeros((0, 4), np.float32), "w")
    return model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [tensor("x", ["N", 0])], [tensor("y", ["N", 4])], [w])


def _reshape_at_run_time():
    s = numpy_helper.from_array(np.array([3, -1], np.int64), "s")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Reshape", ["h", "s"], ["y"], name="reshape")]
    return _dense_graph(nodes, [tensor("x", ["N", 8])], [tensor("y", [3, None])], extra=[s])


@pytest.mark.parametrize(
    "make, batch, stage, message",
    [
        (_opset_99, (2, 8), "compile", "opset 99"),
        (_custom_op, (2, 8), "compile", "node 'bar' uses operator 'Bar' of domain 'com.foo'"),
        (_gemm_bias_7_for_4_outputs, (2, 8), "compile", "node 'fc' (Gemm): the bias C has shape [7]"),
        (_flatten_axis_0, (2, 8), "run", "node 'fc' (Gemm): its input of shape [1, 16] gives vectors of 16 values, the weights take 8"),
        (_kernel_over_input, (2, 1, 3, 3), "compile", "node 'conv' (Conv): the kernel spans [5, 5], more than the padded input [3, 3]"),
        (_k_zero, (2, 0), "compile", "node 'mm' (MatMul): the weight is empty"),
        (_reshape_at_run_time, (2, 8), "run", "ONNX Runtime failed running node 'reshape' (Reshape)"),
    ],
    ids=["opset-99", "custom-op", "gemm-bias", "flatten-axis-0", "kernel-over-input", "k-0", "reshape"],
)
def test_models_onnxruntime_refuses_are_one_line_exit_2_at_compile_or_run(tmp_path, make, batch, stage, message):
    m = make()
    onnx.save(m, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones(batch, np.float32))
    if make is not _k_zero:  # ONNX Runtime refuses these too, at load or at run (K = 0 it runs to zeros)
        with pytest.raises(Exception):
            ort.InferenceSession(m.SerializeToString()).run(None, {"x": np.ones(batch, np.float32)})
    commands = {"compile": [str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.bin"), "-q"], "run": ["run", str(tmp_path / "m.bin"), "-i", str(tmp_path / "x.npy")]}
    if stage == "run":
        xcompile.compile_model(m, progress=False).save(tmp_path / "m.bin")
    result = subprocess.run([sys.executable, "-m", "xcompile.cli", *commands[stage]], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("xcompile: error:")
    assert message in result.stderr, result.stderr
