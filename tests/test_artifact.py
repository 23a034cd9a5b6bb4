"""mapping.bin: round trip, versioning, integrity, atomic writes."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import xcompile
from xcompile import artifact
from xcompile.placement import placement_graph
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
    assert [r.name for r in loaded.program.history] == ["quantize", "remap", "encode", "sort_sections", "tile", "assign", "schedule"]
    for before, after in zip(mapping.layers, loaded.layers):
        assert before.name == after.name and before.geometry == after.geometry
        np.testing.assert_array_equal(before.weight_q, after.weight_q)  # what the levels encode
        np.testing.assert_allclose(after.weight, before.weight_q * before.scale, rtol=1e-6)  # quantised, as the cells hold it
        np.testing.assert_array_equal(before.levels, after.levels)
        np.testing.assert_array_equal(before.tiling.row_range, after.tiling.row_range)
    assert loaded.program.model == mapping.program.model
    x = np.random.default_rng(1).normal(size=(3, 3, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(
        xcompile.Session(mapping).run(None, {"x": x})[0], xcompile.Session(saved).run(None, {"x": x})[0]
    )
    assert set(placement_graph(loaded.program).nodes) == set(placement_graph(mapping.program).nodes)


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


def test_the_kernels_stay_in_bounds_with_numba_boundscheck(tmp_path):
    """Saved, loaded (so validated) mappings of every encoding run through the Numba kernels
    compiled with bounds checks: an index out of range would raise IndexError in the child."""
    script = """
import numpy as np, xcompile
from builders import small_cnn
x = np.random.default_rng(0).normal(size=(3, 3, 10, 10)).astype(np.float32)
for options in ({"encoding": "dual"}, {"encoding": "acm", "acm_fit": "clip"}, {"encoding": "offset", "cell_bits": 2},
                {"crossbars": 3, "schedule": "sorted", "stuck_slices": 1, "stuck_fraction": 0.5, "cell_bits": 4}):
    path = xcompile.compile_model(small_cnn(), progress=False, rows=16, cols=12, **options).save("m.bin")
    for hardware in ({"adc_bits": 5, "dac_bits": 4, "adc_range": "per_column"}, {"input_mode": "bit_serial", "dac_bits": 3, "adc_bits": 6}):
        y = xcompile.Session(xcompile.load(path), calibration={"x": x}, **hardware).run(None, {"x": x})[0]
        assert y.shape == (3, 5) and np.isfinite(y).all()
from xcompile.runtime import kernels
one = np.ones(1, np.int64)
try:  # the checks are on: an index past the accumulator raises
    kernels.combine(np.zeros((1, 2), np.float32), 0 * one, 0 * one, one, 5 * one, one, np.ones(1), np.ones(1), np.zeros(1), np.zeros((1, 1), np.float32))
except IndexError:
    print("in bounds")
"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "in bounds" in done.stdout, done.stderr[-2000:]


def _craft(path, edit, compress=zipfile.ZIP_STORED, flag_bits=0):
    """Rewrite a saved mapping after edit(members, manifest), every digest recomputed."""
    import hashlib

    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    members.pop("manifest.sha256")
    edit(members, manifest)
    if isinstance(manifest.get("members"), dict):
        manifest["members"] = {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}
    members["manifest.json"] = json.dumps(manifest).encode() if not isinstance(manifest, bytes) else manifest
    members["manifest.sha256"] = hashlib.sha256(members["manifest.json"]).hexdigest().encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compress if name == "graph.onnx" else zipfile.ZIP_STORED
            archive.writestr(info, data)
    if flag_bits:  # zipfile clears the flags it writes: set them in the local and central headers
        blob = bytearray(path.read_bytes())
        for signature, flags_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
            start = blob.find(signature)
            while start >= 0:
                if blob[start + name_at : start + name_at + 10] == b"graph.onnx":
                    blob[start + flags_at] |= flag_bits
                start = blob.find(signature, start + 4)
        path.write_bytes(bytes(blob))


def _array_edit(name, change):
    import io

    def edit(members, manifest):
        array = np.load(io.BytesIO(members[name])).copy()
        buffer = io.BytesIO()
        np.save(buffer, change(array))
        members[name] = buffer.getvalue()

    return edit


def _graph_edit(member, change):
    import onnx

    def edit(members, manifest):
        model = onnx.load_model_from_string(members[member])
        change(model)
        members[member] = model.SerializeToString()

    return edit


def _external(model):
    import onnx

    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/hostname"


def _external_constant(model):
    import onnx
    from onnx import helper

    node = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", onnx.TensorProto.FLOAT, [1], [1.0]))
    node.attribute[0].t.data_location = onnx.TensorProto.EXTERNAL
    node.attribute[0].t.external_data.add(key="location", value="secret.bin")
    model.graph.node.insert(0, node)


def _mvm(model):
    return next(n for n in model.graph.node if n.domain == "ai.xcompile")


def _huge_header(members, manifest):
    data = members["arrays/0/levels.npy"]
    end = 10 + int.from_bytes(data[8:10], "little")
    header = data[10:end].decode("latin1")
    claimed = header[: header.index("'shape'")] + "'shape': (10000000000000,), }"
    members["arrays/0/levels.npy"] = data[:8] + (end - 10).to_bytes(2, "little") + claimed.ljust(end - 11).encode("latin1") + b"\n" + data[end:]


def _undecodable_graph_name(members, manifest):
    import onnx

    model = onnx.load_model_from_string(members["graph.onnx"])
    model.graph.name = "GRAPHNAME"
    data = bytearray(model.SerializeToString())
    data[data.find(b"GRAPHNAME")] = 0xF4  # not a UTF-8 start byte
    members["graph.onnx"] = bytes(data)


# case: (edit, regex the message must match); cases marked * edit the scheduled mapping (one
# layer, 4-bit cells, orders, stale cells and a schedule), the others the small CNN's
CRAFTED = {
    "*levels above the cell maximum": (_array_edit("arrays/0/levels.npy", lambda a: np.where(a == a.max(), 16, a).astype(a.dtype)), "arrays/0/levels.npy.*cell level"),
    "*output order all zeros": (_array_edit("arrays/0/output_order.npy", lambda a: a * 0), "output_order.npy.*permutation"),
    "*negative input order": (_array_edit("arrays/0/input_order.npy", lambda a: a - 1), "input_order.npy.*permutation"),
    "*negative stale cell": (_array_edit("arrays/0/stale_cells.npy", lambda a: a - 10**6), "stale_cells.npy.*flat cell index"),
    "*schedule round out of range": (_array_edit("arrays/schedule/round.npy", lambda a: a + 10**12), "round.npy.*round"),
    "term offset past the tile": (_array_edit("arrays/0/encoding.term_offset.npy", lambda a: a + 10**6), "term_offset.npy.*encoding"),
    "tile outputs out of range": (_array_edit("arrays/1/tiling.out_range.npy", lambda a: a * 7), "out_range.npy.*tile layout"),
    "NaN bias": (_array_edit("arrays/0/bias.npy", lambda a: a * np.nan), "bias.npy.*NaN"),
    "levels as float64": (_array_edit("arrays/0/levels.npy", lambda a: a.astype(np.float64)), "levels.npy.*dtype"),
    "npy header claiming 10^13 values": (_huge_header, "levels.npy.*shape"),
    "NaN scale": (lambda m, j: j["layers"][0].update(scale=float("nan")), r"layers\[0\].scale"),
    "negative scale": (lambda m, j: j["layers"][1].update(scale=-1.0), r"layers\[1\].scale"),
    "scale overflowing float32": (lambda m, j: j["layers"][0].update(scale=1e300), r"layers\[0\].scale.*overflows"),
    "group 0": (lambda m, j: j["layers"][0]["geometry"].update(group=0), "geometry.group"),
    "strides 0": (lambda m, j: j["layers"][0]["geometry"].update(strides=[0, 0]), "geometry.strides"),
    "empty member list": (lambda m, j: j.update(members=[]), "'members'"),
    "unlisted member": (lambda m, j: m.update({"arrays/0/weight.npy": b"x"}), "weight.npy.*unknown member"),
    "missing member": (lambda m, j: m.pop("arrays/0/levels.npy"), "levels.npy"),
    "absurd array size": (lambda m, j: j["hardware"].update(rows=65536, cols=65536), "'hardware'.*65536 x 65536.*GiB limit"),
    "layer shape beyond its levels": (lambda m, j: j["layers"][1].update(weight_shape=[1, 2**31, 2**31]), "arrays/1/levels.npy.*cannot hold"),
    "graph name not UTF-8": (_undecodable_graph_name, "graph.onnx.*graph.name is not valid UTF-8"),
    "crossbar layer 99": (_graph_edit("graph.onnx", lambda g: setattr(_mvm(g).attribute[0], "i", 99)), "graph.onnx.*layer=99"),
    "graph input of no ONNX type": (_graph_edit("graph.onnx", lambda g: setattr(g.graph.input[0].type.tensor_type, "elem_type", 99)), "graph.onnx.*element type 99"),
    "crossbar without layer": (_graph_edit("graph.onnx", lambda g: _mvm(g).ClearField("attribute")), "graph.onnx.*'layer'"),
    "external data in model.onnx": (_graph_edit("model.onnx", _external), "model.onnx.*external data"),
    "external Constant in graph.onnx": (_graph_edit("graph.onnx", _external_constant), "graph.onnx.*external data"),
}


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    """A mapping with every optional array: orders, stale cells, a schedule."""
    from builders import dense

    path = tmp_path_factory.mktemp("scheduled") / "base.bin"
    xcompile.compile_model(
        dense(20, 12), progress=False, rows=8, cols=8, cell_bits=4, crossbars=3, schedule="sorted", stuck_slices=1,
        stuck_fraction=0.5, remap="static", remap_rows=True,
    ).save(path)
    return path.read_bytes()


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_mapping_is_refused_naming_the_member_and_rule(saved, scheduled, tmp_path, case):
    edit, message = CRAFTED[case]
    path = tmp_path / "crafted.bin"
    path.write_bytes(scheduled if case.startswith("*") else saved.read_bytes())
    _craft(path, edit)
    with pytest.raises(xcompile.XCompileError, match=message):
        xcompile.load(path)


@pytest.mark.parametrize("compress, flags, message", [(zipfile.ZIP_DEFLATED, 0, "compressed"), (zipfile.ZIP_STORED, 0x1, "encrypted")])
def test_compressed_or_encrypted_members_are_refused(saved, compress, flags, message):
    _craft(saved, lambda m, j: None, compress=compress, flag_bits=flags)
    with pytest.raises(xcompile.XCompileError, match=f"graph.onnx.*{message}"):
        xcompile.load(saved)


def test_a_deeply_nested_manifest_is_refused_in_one_line(saved):
    _craft(saved, lambda m, j: j.update(notes=json.loads("[" * 100 + "]" * 100)))
    with pytest.raises(xcompile.XCompileError, match="nested deeper"):
        xcompile.load(saved)
    with zipfile.ZipFile(saved) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["manifest.json"] = b"[" * 200_000 + b"]" * 200_000
    import hashlib

    members["manifest.sha256"] = hashlib.sha256(members["manifest.json"]).hexdigest().encode()
    with zipfile.ZipFile(saved, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(xcompile.XCompileError, match="nested deeper"):
        xcompile.load(saved)


def test_a_mapping_stores_no_weights_and_shows_what_its_levels_compute(saved):
    """Weights are derived from the cells on load: inspect's numbers and the run agree by construction."""
    with zipfile.ZipFile(saved) as archive:
        names = archive.namelist()
    assert not any(name.endswith(("/weight.npy", "/weight_q.npy")) for name in names)
    from xcompile.runtime.crossbar import effective_weights

    for layer in xcompile.load(saved).layers:
        np.testing.assert_allclose(layer.weight, effective_weights(layer), rtol=1e-6)


def _recurrent_edit(name, value):
    """Set attribute `name` of the CrossbarRecurrent node in graph.onnx to `value`."""
    from onnx import helper

    def change(model):
        node = next(n for n in model.graph.node if n.op_type == "CrossbarRecurrent")
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute(name, value)])

    return _graph_edit("graph.onnx", change)


RECURRENT_CRAFTED = {
    "W layer out of range": (_recurrent_edit("w_layers", [99]), "layer 99"),
    "R layer of the wrong shape": (_recurrent_edit("r_layers", [0]), "layer 0 has shape"),
    "hidden size of the wrong layers": (_recurrent_edit("hidden_size", 3), "layer .* has shape"),
    "unknown activation": (_recurrent_edit("activations", ["Sigmoid", "Exp", "Tanh"]), "activations must be among"),
    "two directions, one layer each": (_recurrent_edit("directions", 2), "bidirectional exactly when"),
    "NaN clip": (_recurrent_edit("clip", float("nan")), "clip must be"),
    "a layer run twice": (_graph_edit("graph.onnx", lambda m: m.graph.node.extend(
        [n for n in m.graph.node if n.op_type == "CrossbarRecurrent"][:1])), "run by 2 crossbar nodes"),
}


@pytest.mark.parametrize("case", RECURRENT_CRAFTED)
def test_a_crafted_recurrent_node_is_refused(tmp_path, case):
    from pathlib import Path

    path = tmp_path / "lstm.bin"
    xcompile.compile_model(Path(__file__).parent / "data" / "torch_lstm_forward.onnx", progress=False).save(path)
    xcompile.load(path)  # the untouched file loads
    edit, message = RECURRENT_CRAFTED[case]
    _craft(path, edit)
    with pytest.raises(xcompile.XCompileError, match=f"graph.onnx.*{message}"):
        xcompile.load(path)


def test_channel_scales_are_stored_checked_and_run(tmp_path):
    path = tmp_path / "channel.bin"
    mapping = xcompile.compile_model(small_cnn(seed=4), weight_scale="channel", progress=False)
    mapping.save(path)
    x = np.random.default_rng(1).normal(size=(3, 3, 10, 10)).astype(np.float32)
    expected = xcompile.Session(mapping).run(None, {"x": x})[0]
    np.testing.assert_array_equal(xcompile.Session(str(path)).run(None, {"x": x})[0], expected)
    _craft(path, _array_edit("arrays/0/channel_scale.npy", lambda a: np.where(np.arange(a.size) == 2, np.nan, a)))
    with pytest.raises(xcompile.XCompileError, match="channel_scale.npy.*NaN"):
        xcompile.load(path)
