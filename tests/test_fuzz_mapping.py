"""Fuzzing mapping.bin: crafted files (every digest recomputed) load and run, or are refused.

Small compiled mappings are mutated member by member: bytes flipped, arrays given other dtypes,
shapes, headers or out-of-range values, manifest fields replaced or deleted, members dropped or
added, zip entries compressed or flagged encrypted, CrossbarMVM nodes and external data edited
in the ONNX members. Each file either loads and runs (ideal and non-ideal hardware) to outputs of
the right shape, equal to the unmutated run when the computation is unchanged, or is refused
with XCompileError, never anything else. XCOMPILE_FUZZ_EXAMPLES sets the examples (tests/fuzz_tally.py).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import xcompile
from builders import dense, small_cnn
from fuzz_tally import fuzz, record
from xcompile.errors import XCompileError

NON_IDEAL = {"dac_bits": 6, "adc_bits": 6, "adc_range": "fixed", "variation": "lognormal", "sigma": 0.05}
DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint64", "float16", "float32", "float64", "bool", ">i8", "complex64"]


@dataclass(repr=False)
class Base:
    name: str
    mapping: xcompile.Mapping
    members: dict[str, bytes]
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]  # per hardware: the unmutated run

    def __repr__(self) -> str:
        return f"<base mapping {self.name}>"


def _run(mapping, feeds, hardware: str) -> np.ndarray:
    options = NON_IDEAL if hardware == "non_ideal" else {}
    return xcompile.Session(mapping, seed=3, **options).run(None, feeds)[0]


def _base(name, model, feeds, tmp, **options) -> Base:
    mapping = xcompile.compile_model(model, progress=False, **options)
    path = mapping.save(tmp / f"{name}.bin")
    loaded = xcompile.load(path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    return Base(name, loaded, members, feeds, {hw: _run(loaded, feeds, hw) for hw in ("ideal", "non_ideal")})


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[Base]:
    tmp = tmp_path_factory.mktemp("bases")
    rng = np.random.default_rng(0)
    image = {"x": rng.normal(size=(2, 3, 10, 10)).astype(np.float32)}
    vector = {"x": rng.normal(size=(3, 20)).astype(np.float32)}
    return [
        _base("cnn", small_cnn(), image, tmp, rows=16, cols=16, cell_bits=4),
        _base("cnn_ideal", small_cnn(), image, tmp, ideal=True, rows=16, cols=16, encoding="acm"),
        _base("dense_schedule", dense(20, 12), vector, tmp, rows=8, cols=8, cell_bits=4, crossbars=3, schedule="sorted",
              stuck_slices=1, stuck_fraction=0.5, remap="static", remap_rows=True, encoding="offset"),
    ]


def test_the_bases_cover_what_the_fuzzing_mutates(bases):
    """Every optional array and the schedule are present somewhere; the ideal base equals ONNX Runtime."""
    names = {name.rsplit("/", 1)[-1] for base in bases for name in base.members}
    assert {"stale_cells.npy", "stale_levels.npy", "output_order.npy", "input_order.npy", "bias.npy", "cell_writes_max.npy"} <= names
    import onnxruntime as ort

    base = bases[1]
    reference = ort.InferenceSession(base.mapping.program.model, providers=["CPUExecutionProvider"]).run(None, base.feeds)[0]
    np.testing.assert_allclose(base.outputs["ideal"], reference, rtol=1e-5, atol=1e-5)


# --- mutations --------------------------------------------------------------------------------


def _npy_members(members):
    return sorted(name for name in members if name.endswith(".npy"))


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _pick(data, items):
    """One of `items`, drawn by index (their reprs can be large)."""
    return items[data.draw(st.integers(0, len(items) - 1), label="index")]


def _flip(data, members):
    name = data.draw(st.sampled_from(sorted(set(members) - {"manifest.sha256"})), label="member")
    blob = bytearray(members[name])
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        position = data.draw(st.integers(0, len(blob) - 1))
        blob[position] ^= data.draw(st.integers(1, 255))
    members[name] = bytes(blob)


def _values(data, members):
    """Array elements replaced by values from anywhere in (and beyond) the dtype's range."""
    name = data.draw(st.sampled_from(_npy_members(members)), label="member")
    array = _load_npy(members[name]).copy()
    if array.size == 0:
        return
    flat = array.reshape(-1)
    if np.issubdtype(array.dtype, np.floating):
        values = st.one_of(st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e30, -1e-30]), st.floats(allow_nan=True, width=32))
    else:
        info = np.iinfo(array.dtype)
        edges = [v for v in (-1, 0, 1, 15, 16, 255, 256, int(info.max), int(info.min)) if info.min <= v <= info.max]
        values = st.one_of(st.sampled_from(edges), st.integers(int(info.min), int(info.max)), st.integers(max(-4, int(info.min)), min(300, int(info.max))))
    for _ in range(data.draw(st.integers(1, 4), label="values")):
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(values)
    members[name] = _npy(array)


def _permute(data, members):
    """Array elements shuffled: a valid permutation stays one (orders), a layout breaks (tiles)."""
    name = data.draw(st.sampled_from(_npy_members(members)), label="member")
    array = _load_npy(members[name])
    order = data.draw(st.permutations(range(array.shape[0]))) if array.ndim and array.shape[0] else []
    members[name] = _npy(array[list(order)] if len(order) else array)


def _in_range(data, members):
    """Valid-looking data: cell levels anywhere from 0 to one above the cell maximum, a bias
    value, a swap in an order. Often loads, and then must still run."""
    names = [n for n in _npy_members(members) if n.rsplit("/", 1)[-1] in ("levels.npy", "stale_levels.npy", "bias.npy", "output_order.npy", "input_order.npy")]
    name = _pick(data, names)
    array = _load_npy(members[name]).copy()
    flat = array.reshape(-1)
    if name.endswith("order.npy"):
        i, j = data.draw(st.integers(0, flat.size - 1)), data.draw(st.integers(0, flat.size - 1))
        flat[[i, j]] = flat[[j, i]]
    else:
        top = 255.0 if array.dtype == np.float32 and "levels" in name else float(np.iinfo(array.dtype).max) if array.dtype.kind == "u" else 1e3
        for _ in range(data.draw(st.integers(1, 6), label="values")):
            value = data.draw(st.one_of(st.integers(0, 16), st.floats(-top, top + 1)))
            flat[data.draw(st.integers(0, flat.size - 1))] = np.clip(value, 0 if array.dtype.kind == "u" else -top, top)
    members[name] = _npy(array)


def _dtype(data, members):
    name = data.draw(st.sampled_from(_npy_members(members)), label="member")
    array = _load_npy(members[name])
    with np.errstate(all="ignore"):
        members[name] = _npy(array.astype(data.draw(st.sampled_from(DTYPES), label="dtype")))


def _shape(data, members):
    name = data.draw(st.sampled_from(_npy_members(members)), label="member")
    array = _load_npy(members[name])
    how = data.draw(st.sampled_from(["drop", "add", "axis", "flatten", "empty", "transpose"]), label="reshape")
    flat = array.reshape(-1)
    changed = {
        "drop": flat[:-1],
        "add": np.concatenate([flat, flat[:1]]) if flat.size else np.zeros(1, array.dtype),
        "axis": array[None],
        "flatten": flat,
        "empty": flat[:0],
        "transpose": array.T,
    }[how]
    members[name] = _npy(np.ascontiguousarray(changed))


def _header(data, members):
    """The .npy header rewritten: a huge or negative shape, Fortran order, an object dtype."""
    name = data.draw(st.sampled_from(_npy_members(members)), label="member")
    blob = members[name]
    length = 10 + int.from_bytes(blob[8:10], "little")
    header = blob[10:length].decode("latin1")
    descr = data.draw(st.sampled_from([None, "'|O'", "'<f8'", "'<i8'", "'|u1'"]), label="descr")
    shape = data.draw(st.sampled_from([None, "(10000000000000,)", "(-1,)", "(3, -3)", "()", "(0,)", "(1, 1, 1, 1)"]), label="shape")
    fortran = data.draw(st.booleans(), label="fortran")
    head = {"descr": descr, "fortran_order": str(fortran), "shape": shape}
    parsed = ast.literal_eval(header)
    text = "{'descr': %s, 'fortran_order': %s, 'shape': %s, }" % (
        head["descr"] or repr(parsed["descr"]), head["fortran_order"], head["shape"] or repr(parsed["shape"]))
    text = text.ljust(len(header) - 1) + "\n" if len(text) < len(header) else text + "\n"
    members[name] = blob[:8] + len(text).to_bytes(2, "little") + text.encode("latin1") + blob[length:]


def _json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                        st.sampled_from([0, -1, 1, 99, 2**31, 65536, "dual", "conv", "NaN"]))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=6)


def _manifest_edit(data, members):
    """One field of the manifest (at any depth) replaced, deleted, or given a sibling."""
    manifest = json.loads(members["manifest.json"])
    node = manifest
    for _ in range(data.draw(st.integers(0, 6), label="depth")):
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []
        children = [(k, v) for k, v in children if isinstance(v, (dict, list)) and v]
        if not children:
            break
        node = children[data.draw(st.integers(0, len(children) - 1), label="child")][1]
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    if action == "add" or not keys:
        if isinstance(node, dict):
            node[data.draw(st.text(max_size=6))] = data.draw(_json_values())
        else:
            node.append(data.draw(_json_values()))
    else:
        key = data.draw(st.sampled_from(keys), label="key")
        if action == "delete":
            del node[key]
        else:
            node[key] = data.draw(_json_values(), label="value")
    members["manifest.json"] = json.dumps(manifest).encode()


def _deep_manifest(data, members):
    depth = data.draw(st.sampled_from([40, 1000, 200_000]), label="depth")
    members["manifest.json"] = b'{"format": "xcompile-mapping", "x": ' + b"[" * depth + b"]" * depth + b"}"


def _members_edit(data, members):
    action = data.draw(st.sampled_from(["drop", "add", "unlist", "empty"]), label="members")
    manifest = json.loads(members["manifest.json"])
    if action == "drop":
        name = data.draw(st.sampled_from(sorted(set(members) - {"manifest.json", "manifest.sha256"})))
        del members[name]
        if data.draw(st.booleans()):
            manifest["members"].pop(name, None)
    elif action == "add":
        name = data.draw(st.sampled_from(["arrays/0/weight.npy", "arrays/0/weight_q.npy", "extra.txt", "arrays/9/levels.npy", "../evil"]))
        members[name] = _npy(np.zeros(3, np.float32))
        if data.draw(st.booleans()):
            manifest["members"][name] = hashlib.sha256(members[name]).hexdigest()
    elif action == "unlist":
        manifest["members"].pop(data.draw(st.sampled_from(sorted(manifest["members"]))))
    else:
        manifest["members"] = {} if data.draw(st.booleans()) else []
    members["manifest.json"] = json.dumps(manifest).encode()


def _graph_edit(data, members):
    """CrossbarMVM nodes re-pointed, stripped, doubled; tensors moved to external data."""
    name = data.draw(st.sampled_from(["graph.onnx", "model.onnx"]), label="member")
    model = onnx.load_model_from_string(members[name])
    mvms = [node for node in model.graph.node if node.domain == "ai.xcompile"]
    action = data.draw(st.sampled_from(["layer", "strip", "double", "attribute", "external", "external_constant"]), label="graph")
    if action == "layer" and mvms:
        node = _pick(data, mvms)
        node.attribute[0].i = data.draw(st.sampled_from([-1, 0, 1, 2, 99, 2**40]))
    elif action == "strip" and mvms:
        del _pick(data, mvms).attribute[:]
    elif action == "double" and mvms:
        copy = model.graph.node.add()
        copy.CopyFrom(_pick(data, mvms))
        copy.output[0] = copy.output[0] + "_again"
    elif action == "attribute" and mvms:
        node = _pick(data, mvms)
        node.attribute.append(onnx.helper.make_attribute(data.draw(st.sampled_from(["group", "layer", "strides"])), [0, 0]))
    elif action == "external" and model.graph.initializer:
        tensor = _pick(data, list(model.graph.initializer))
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", data.draw(st.sampled_from(["/etc/hostname", "secret.bin", "../x"]))
    else:
        constant = onnx.helper.make_node("Constant", [], ["fuzz_constant"], value=onnx.helper.make_tensor("c", onnx.TensorProto.FLOAT, [1], [1.0]))
        constant.attribute[0].t.data_location = onnx.TensorProto.EXTERNAL
        entry = constant.attribute[0].t.external_data.add()
        entry.key, entry.value = "location", "/etc/hostname"
        model.graph.node.insert(0, constant)
    members[name] = model.SerializeToString()


MUTATIONS = [_flip, _values, _in_range, _in_range, _permute, _dtype, _shape, _header, _manifest_edit, _deep_manifest, _members_edit, _graph_edit]
ZIP_TWEAKS = ["none", "none", "none", "deflate", "encrypted", "method"]


def _write(path: Path, members: dict[str, bytes], tweak: str, target: str) -> None:
    """The members as a zip, digests recomputed; `tweak` applied to member `target`."""
    members = dict(members)
    if "manifest.json" in members:
        try:
            manifest = json.loads(members["manifest.json"])
        except (ValueError, RecursionError):
            manifest = None
        if isinstance(manifest, dict) and isinstance(manifest.get("members"), dict):
            for name in manifest["members"]:
                if name in members:
                    manifest["members"][name] = hashlib.sha256(members[name]).hexdigest()
            members["manifest.json"] = json.dumps(manifest).encode()
        members["manifest.sha256"] = hashlib.sha256(members["manifest.json"]).hexdigest().encode()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED if tweak == "deflate" and name == target else zipfile.ZIP_STORED
            archive.writestr(info, data)
    if tweak in ("encrypted", "method"):
        _patch_central_directory(path, target, tweak)


def _patch_central_directory(path: Path, target: str, tweak: str) -> None:
    """Set the encryption flag, or an unknown compression method (99), on one entry of the zip."""
    blob = bytearray(path.read_bytes())
    name = target.encode()
    for signature, flag_at, method_at, name_at in ((b"PK\x01\x02", 8, 10, 46), (b"PK\x03\x04", 6, 8, 30)):
        start = 0
        while (start := blob.find(signature, start)) >= 0:
            if blob[start + name_at : start + name_at + len(name)] == name:
                if tweak == "encrypted":
                    blob[start + flag_at] |= 0x1
                else:
                    blob[start + method_at : start + method_at + 2] = (99).to_bytes(2, "little")
            start += 4
    path.write_bytes(bytes(blob))


def _same_computation(a, b) -> bool:
    """Whether two programs compute the same (same arrays, numbers and graph): then the same outputs."""
    pa, pb = a.program, b.program
    if pa.options != pb.options or pa.hardware != pb.hardware or pa.graph.SerializeToString() != pb.graph.SerializeToString():
        return False
    for la, lb in zip(pa.layers, pb.layers, strict=True):
        if la.scale != lb.scale or la.geometry != lb.geometry or la.kind != lb.kind:
            return False
        for name in ("levels", "bias", "output_order", "input_order", "stale_cells", "stale_levels"):
            x, y = getattr(la, name), getattr(lb, name)
            if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
                return False
    return True


def _outcome(base: Base, path: Path) -> str:
    """'refused' (XCompileError at load or run) or 'ran' (checked); anything else propagates."""
    try:
        mapping = xcompile.load(path)
    except XCompileError:
        return "refused"
    same = _same_computation(mapping, base.mapping)
    for hardware in ("ideal", "non_ideal"):
        try:
            with np.errstate(all="ignore"):
                out = _run(mapping, base.feeds, hardware)
        except XCompileError:
            return "refused at run"
        expected = base.outputs[hardware]
        assert out.shape == expected.shape and out.dtype == expected.dtype
        if same:
            np.testing.assert_array_equal(out, expected)
        elif all(np.abs(layer.weight).max() < 1e20 and (layer.bias is None or np.abs(layer.bias).max() < 1e20) for layer in mapping.layers):
            assert np.isfinite(out).all(), "finite weights and inputs gave non-finite outputs"
    from xcompile.report import format_summary

    format_summary(mapping.summary())
    return "ran"


@fuzz
@given(data=st.data())
def test_a_mutated_mapping_loads_and_runs_or_is_refused(bases, tmp_path_factory, data):
    base = bases[data.draw(st.integers(0, len(bases) - 1), label="base")]
    members = dict(base.members)
    mutation = MUTATIONS[data.draw(st.integers(0, len(MUTATIONS) - 1), label="mutation")]
    data.draw(st.just(mutation.__name__), label="mutation name")
    mutation(data, members)
    tweak = data.draw(st.sampled_from(ZIP_TWEAKS), label="zip")
    target = data.draw(st.sampled_from(sorted(members)), label="zip target")
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "mutated.bin"
    _write(path, members, tweak, target)
    record(_outcome(base, path))


def _crafted(base: Base, case: str, path: Path) -> None:
    members = dict(base.members)
    tweak, target = "none", "model.onnx"
    if case == "levels":
        levels = _load_npy(members["arrays/0/levels.npy"]).copy()
        levels[0, 0, 0] = 255  # above the 4-bit cell maximum
        members["arrays/0/levels.npy"] = _npy(levels)
    elif case == "layer_attribute":
        graph = onnx.load_model_from_string(members["graph.onnx"])
        next(n for n in graph.graph.node if n.domain == "ai.xcompile").attribute[0].i = 99
        members["graph.onnx"] = graph.SerializeToString()
    elif case == "external":
        model = onnx.load_model_from_string(members["model.onnx"])
        tensor = model.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", "/etc/hostname"
        members["model.onnx"] = model.SerializeToString()
    elif case == "deflate":
        tweak = "deflate"
    else:
        members["manifest.json"] = b"[" * 200_000 + b"]" * 200_000
    _write(path, members, tweak, target)


@pytest.mark.parametrize("case", ["levels", "layer_attribute", "external", "deflate", "deep"])
def test_the_cli_refuses_a_crafted_mapping_with_one_line_and_exit_2(bases, tmp_path, capsys, case):
    from xcompile.cli import main

    path = tmp_path / "crafted.bin"
    _crafted(bases[0], case, path)
    np.save(tmp_path / "x.npy", bases[0].feeds["x"])
    for command in (["inspect", str(path)], ["run", str(path), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npz")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "crafted.bin" in err, err
    assert not (tmp_path / "y.npz").exists()


def test_the_installed_command_refuses_a_crafted_mapping(bases, tmp_path):
    """The same through a real process: exit 2, one line, no traceback."""
    path = tmp_path / "crafted.bin"
    _crafted(bases[0], "external", path)
    done = subprocess.run([sys.executable, "-m", "xcompile.cli", "inspect", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "external data" in done.stderr, done.stderr
