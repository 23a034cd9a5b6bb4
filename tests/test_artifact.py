"""mapping.bin: round trip, versioning, integrity, atomic writes."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import xcompile
from xcompile import artifact
from builders import small_cnn


@pytest.fixture(scope="module")
def mapping():
    return xcompile.compile_model(small_cnn(), progress=False)


@pytest.fixture
def saved(mapping, tmp_path):
    return mapping.save(tmp_path / "mapping.bin")


def test_round_trip_keeps_every_layer_array_and_the_outputs(mapping, saved):
    loaded = xcompile.load(saved)
    assert loaded.options == mapping.options and loaded.hardware == mapping.hardware
    assert [r.name for r in loaded.program.history] == ["quantize", "remap", "encode", "tile", "assign", "schedule"]
    for before, after in zip(mapping.layers, loaded.layers):
        assert before.name == after.name and before.geometry == after.geometry
        np.testing.assert_array_equal(before.weight, after.weight)
        np.testing.assert_array_equal(before.weight_q, after.weight_q)
        np.testing.assert_array_equal(before.levels, after.levels)
        np.testing.assert_array_equal(before.tiling.row_range, after.tiling.row_range)
    assert loaded.program.model == mapping.program.model
    x = np.random.default_rng(1).normal(size=(3, 3, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(
        xcompile.Session(mapping).run(None, {"x": x})[0], xcompile.Session(saved).run(None, {"x": x})[0]
    )
    assert set(loaded.program.placement.nodes) == set(mapping.program.placement.nodes)


def test_no_pickle_inside(saved):
    with zipfile.ZipFile(saved) as archive:
        assert archive.testzip() is None
        for name in archive.namelist():
            if name.endswith(".npy"):
                header = archive.read(name)[:128]
                assert b"'descr': '|O'" not in header and b"'descr': 'O'" not in header


def test_truncated_file_is_refused(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(xcompile.XCompileError, match="truncated or damaged|not an xcompile"):
        xcompile.load(saved)


@pytest.mark.parametrize("where", [0.25, 0.5, 0.9])
def test_a_flipped_bit_anywhere_in_the_data_is_refused(saved, where):
    data = bytearray(saved.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    saved.write_bytes(bytes(data))
    with pytest.raises(xcompile.XCompileError):
        xcompile.load(saved)


def _rewrite_manifest(path, change):
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members["manifest.json"])
    change(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    import hashlib

    members["manifest.sha256"] = hashlib.sha256(members["manifest.json"]).hexdigest().encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_another_format_version_is_refused_with_its_number(saved):
    _rewrite_manifest(saved, lambda m: m.update(format_version=artifact.FORMAT_VERSION + 1))
    with pytest.raises(xcompile.XCompileError, match=f"format version {artifact.FORMAT_VERSION + 1}"):
        xcompile.load(saved)


def test_a_member_that_does_not_match_its_digest_is_refused(saved):
    with zipfile.ZipFile(saved) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["model.onnx"] = members["model.onnx"][:-1] + bytes([members["model.onnx"][-1] ^ 1])
    with zipfile.ZipFile(saved, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(xcompile.XCompileError, match="model.onnx"):
        xcompile.load(saved)


@pytest.mark.parametrize("content", [b"", b"hello world", b"PK\x03\x04garbage"])
def test_files_that_are_not_mappings_are_refused(tmp_path, content):
    path = tmp_path / "x.bin"
    path.write_bytes(content)
    with pytest.raises(xcompile.XCompileError):
        xcompile.load(path)


def test_a_zip_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "x.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(xcompile.XCompileError, match="not an xcompile mapping"):
        xcompile.load(path)


def test_interrupted_write_leaves_nothing_behind(mapping, tmp_path, monkeypatch):
    target = tmp_path / "mapping.bin"
    real = zipfile.ZipFile.writestr
    calls = []

    def interrupt(self, name, data, *args, **kwargs):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, name, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", interrupt)
    with pytest.raises(KeyboardInterrupt):
        mapping.save(target)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_file(mapping, saved, monkeypatch):
    before = saved.read_bytes()

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", fail)
    with pytest.raises(xcompile.XCompileError, match="disk full"):
        mapping.save(saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_saved_file_has_an_ordinary_files_permissions(mapping, tmp_path):
    """Written through a private temporary file, but readable by others as any new file is."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        mapping.save(tmp_path / "shared.bin")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.bin").stat().st_mode) == 0o644
