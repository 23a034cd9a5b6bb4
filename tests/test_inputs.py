"""ONNX input and hardware that cannot be right are refused with one clear line, never computed:
non-finite weights, external data outside the model's folder, crossbars too narrow or too big,
and writes that fail half-way."""

from __future__ import annotations

import errno
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

import xcompile
from xcompile import checks
from xcompile.config import MAX_TILE_BYTES, Hardware, tile_bytes
from xcompile.fileio import atomic_output
from builders import dense, model, small_cnn, tensor


def _with_weight(value: float) -> onnx.ModelProto:
    m = dense(16, 8)
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[3, 4] = value
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    return m


@pytest.mark.parametrize("value, what", [(np.nan, "1 NaN"), (np.inf, "1 infinite"), (-np.inf, "1 infinite")])
def test_non_finite_weights_are_refused_naming_tensor_and_node(value, what):
    for ideal in (True, False):
        with pytest.raises(xcompile.XCompileError, match=rf"node 'fc' \(Gemm\): weight tensor 'w' .*{what}"):
            xcompile.compile_model(_with_weight(value), ideal=ideal, progress=False)


def test_a_non_finite_weight_made_by_a_folded_subgraph_is_refused_too():
    """The weight is Transpose(w): the check sees what the crossbar would hold, after folding."""
    w = np.ones((8, 16), np.float32)
    w[2, 2] = np.nan
    nodes = [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")]
    m = model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 8])], [numpy_helper.from_array(w, "w")])
    with pytest.raises(xcompile.XCompileError, match="node 'mm' \\(MatMul\\).*NaN"):
        xcompile.compile_model(m, progress=False)


def _external(folder, name="model.onnx", location="weights.bin") -> onnx.ModelProto:
    m = dense(16, 8)
    convert_model_to_external_data(m, all_tensors_to_one_file=True, location=location, size_threshold=0)
    folder.mkdir(exist_ok=True)
    onnx.save(m, folder / name)
    return onnx.load(folder / name, load_external_data=False)


def test_external_data_beside_the_model_is_read(tmp_path):
    _external(tmp_path / "m")
    x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(tmp_path / "m" / "model.onnx")).run(None, {"x": x})[0]
    mapping = xcompile.compile_model(tmp_path / "m" / "model.onnx", ideal=True, progress=False)
    got = xcompile.Session(mapping).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_model_in_memory_with_external_references_is_refused_not_resolved_against_the_cwd(tmp_path, monkeypatch):
    proto = _external(tmp_path)
    monkeypatch.chdir(tmp_path)  # the data file is right there in the working directory: still refused
    with pytest.raises(xcompile.XCompileError, match="tensor 'w' .*external file 'weights.bin'"):
        xcompile.compile_model(proto, progress=False)


def _pointing_at(folder, location: str):
    proto = _external(folder)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, folder / "crafted.onnx")
    return folder / "crafted.onnx"


@pytest.mark.parametrize(
    "location, message",
    [
        ("../secret.bin", "relative path inside"),
        ("sub/../../secret.bin", "relative path inside"),
        ("ABSOLUTE", "relative path inside"),
        ("link.bin", "outside the model's folder"),
        ("missing.bin", "does not exist"),
        ("", "names no file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "missing", "empty"],
)
def test_external_data_outside_the_models_folder_is_refused(tmp_path, location, message):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x01" * 4096)
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(secret, folder / "link.bin")
    path = _pointing_at(folder, str(secret) if location == "ABSOLUTE" else location)
    with pytest.raises(xcompile.XCompileError, match=message):
        xcompile.compile_model(path, progress=False)


@pytest.mark.parametrize("key, value, message", [("length", str(10**13), "does not match its shape"), ("offset", "100000", "holds"), ("offset", "-1", "whole number")])
def test_external_data_is_never_read_past_what_the_tensor_declares(tmp_path, key, value, message):
    proto = _external(tmp_path)
    for t in proto.graph.initializer:
        entries = {e.key: e for e in t.external_data}
        if key in entries:
            entries[key].value = value
        else:
            t.external_data.add(key=key, value=value)
    onnx.save(proto, tmp_path / "crafted.onnx")
    with pytest.raises(xcompile.XCompileError, match=message):
        xcompile.compile_model(tmp_path / "crafted.onnx", progress=False)


def test_a_model_only_missing_its_output_type_compiles_and_runs_like_onnxruntime():
    m = small_cnn()
    m.graph.output[0].ClearField("type")
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m)
    x = np.random.default_rng(1).normal(size=(2, 3, 10, 10)).astype(np.float32)
    expected = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    before = m.SerializeToString()
    got = xcompile.Session(xcompile.compile_model(m, ideal=True, progress=False)).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert m.SerializeToString() == before  # the caller's model is left as it was


def test_model_files_over_the_cap_are_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.onnx"
    onnx.save(small_cnn(), path)
    monkeypatch.setattr(checks, "MAX_MODEL_BYTES", path.stat().st_size - 1)
    monkeypatch.setattr(onnx, "load", lambda *a, **k: pytest.fail("read a file over the cap"))
    with pytest.raises(xcompile.XCompileError, match="over the .* bytes an ONNX protobuf can hold"):
        xcompile.compile_model(path, progress=False)


def test_a_model_path_that_is_not_a_regular_file_is_refused():
    with pytest.raises(xcompile.XCompileError, match="not a regular file"):
        xcompile.compile_model("/dev/zero", progress=False)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"cols": 2, "cell_bits": 4}, "dual encoding with 2 slice\\(s\\) of 4 bit\\(s\\) needs 4 columns"),
        ({"cols": 3, "encoding": "offset", "cell_bits": 1}, "needs 16 columns"),
        ({"cols": 3, "encoding": "acm", "weight_bits": 4, "cell_bits": 2}, "needs 4 columns"),
        ({"cols": 7, "cell_bits": 2}, "needs 8 columns"),
    ],
)
def test_crossbars_too_narrow_for_the_encoding_are_refused(options, message):
    with pytest.raises(xcompile.XCompileError, match=message):
        xcompile.compile_model(dense(8, 4), progress=False, **options)


@pytest.mark.parametrize("options", [{"cols": 4, "cell_bits": 4}, {"cols": 8, "cell_bits": 2}, {"cols": 16, "encoding": "offset", "cell_bits": 1}])
def test_the_narrowest_crossbar_that_fits_compiles_every_output(options):
    mapping = xcompile.compile_model(dense(8, 5), progress=False, **options)
    layer = mapping.layers[0]
    assert layer.tiling.count == 5  # one output per tile
    assert sorted(int(c0) for c0, _ in layer.tiling.out_range) == list(range(5))


def test_absurd_crossbar_sizes_are_refused_by_the_tile_memory_limit():
    with pytest.raises(xcompile.XCompileError, match="65536 x 65536 crossbar needs about .* GiB"):
        Hardware(rows=65536, cols=65536)
    with pytest.raises(xcompile.XCompileError, match="GiB limit"):
        Hardware(rows=1, cols=65536)  # thin but long: the wire solve's boundary is what costs
    Hardware(rows=2048, cols=2048)  # the documented largest square that fits
    assert tile_bytes(2048, 2048) <= MAX_TILE_BYTES < tile_bytes(4096, 4096)


def test_tile_memory_bound_holds_for_the_wire_solver():
    """tile_bytes bounds the wire solver's scratch (its frontal matrices) on shapes of every aspect."""
    from xcompile.runtime import physics

    for rows, cols in ((128, 128), (64, 1024), (1024, 64), (300, 200), (1, 500)):
        sizes = np.zeros(2 * (rows + cols).bit_length() + 2, np.int64)
        physics._frontal_sizes(0, rows, 0, cols, rows, cols, 0, sizes)
        assert 8 * int(sizes.sum()) <= tile_bytes(rows, cols)


def test_a_model_with_nothing_to_map_needs_allow_empty():
    relu = model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 4])], [tensor("y", ["N", 4])])
    with pytest.raises(xcompile.XCompileError, match="nothing to map"):
        xcompile.compile_model(relu, progress=False)
    mapping = xcompile.compile_model(relu, progress=False, allow_empty=True)
    x = np.array([[-1, 2, -3, 4]], np.float32)
    assert np.array_equal(xcompile.Session(mapping).run(None, {"x": x})[0], np.maximum(x, 0))


def test_a_write_that_fails_half_way_is_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(xcompile.XCompileError, match=f"cannot write '{target}': No space left on device"):
        with atomic_output(target) as temp:
            temp.write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_removes_its_temporary_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as temp:
            temp.write_bytes(b"new, half")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"] and target.read_bytes() == b"old"


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", refused)  # as in a read-only folder (root writes anywhere)
    with pytest.raises(xcompile.XCompileError, match="cannot write '.*out.bin': Permission denied"):
        with atomic_output(tmp_path / "out.bin"):
            pytest.fail("the block ran without a temporary file")


@pytest.mark.parametrize(
    "content, message",
    [(b"rows = [1,", "not valid TOML"), (b"\xff\xfe", "not valid TOML"), (b"preset = [1]", "unknown hardware preset"), (b"hardware = 5", "got int")],
)
def test_bad_hardware_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "hw.toml"
    path.write_bytes(content)
    with pytest.raises(xcompile.XCompileError, match=message):
        xcompile.compile_model(dense(4, 2), progress=False, hardware=str(path))
