"""Load = validate: the checks mapping.bin passes before anything in it is used (docs/format.md).

A mapping is untrusted input. Its digests show the file is whole, not who made it: anyone can
edit a member and recompute them. So the loader checks the container (every member stored, sizes
within the file), the manifest (size, nesting, types), every array's header before its data is
read, and then every array against the manifest and the others: dtypes, shapes, index ranges,
permutations, level maxima, scales, the tile layout, the schedule, and the runtime graph's
CrossbarMVM nodes. Nothing of the file reaches the runtime's kernels unchecked. Every failure is
one XCompileError naming the member and the rule it breaks.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import zipfile
from tokenize import TokenError
from typing import Any, NoReturn

import networkx as nx
import numpy as np
import onnx
from onnx import helper
from google.protobuf.message import DecodeError

from xcompile.config import CompileOptions, Hardware
from xcompile.errors import XCompileError
from xcompile.ir import CUSTOM_DOMAIN, MVM_OP, RECURRENT_OP, Encoding, Layer, PassRecord, Program, Tiling
from xcompile.reprogramming import CROSSBAR_ARRAYS, LOAD_ARRAYS, Schedule

MANIFEST, MANIFEST_DIGEST = "manifest.json", "manifest.sha256"
MANIFEST_BYTES_MAX = 256 << 20  # the manifest is parsed whole; a big model's is a few MB
JSON_DEPTH_MAX = 32  # the manifest nests 6 deep; free-form notes get some room
NPY_HEADER_MAX = 4096  # an .npy header of ours is < 200 bytes
GEOMETRY_INT_MAX = 1 << 16  # kernel sizes, strides, dilations, pads, output shapes of one layer
SCHEDULE_PREFIX = "arrays/schedule/"
TILING_ARRAYS = ("grid", "row_range", "out_range", "crossbar")
ENCODING_ARRAYS = ("term_offset", "term_step", "term_coeff")
OPTIONAL_ARRAYS = ("bias", "output_order", "input_order", "stale_cells", "stale_levels", "channel_scale")
KINDS = ("dense", "conv", "conv_transpose")  # op_type names the source op (Gemm, QLinearConv, LSTM, ...) for people
AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
LAYER_KEYS = {"index", "name", "node_name", "op_type", "kind", "geometry", "weight_shape", "input_name", "output_name", "scale", "notes", "encoding", "tiling"}
MANIFEST_KEYS = {"format", "format_version", "xcompile_version", "options", "hardware", "passes", "digital_nodes", "layers", "placement", "schedule", "members"}


class Invalid(XCompileError):
    """A mapping that breaks a rule: `member: rule`, prefixed with the file by the loader."""


def fail(member: str, rule: str) -> NoReturn:
    raise Invalid(f"{member}: {rule}")


# --- the container -----------------------------------------------------------------------------


def check_container(archive: zipfile.ZipFile, file_size: int) -> None:
    """Every member STORED, unencrypted, named once, and no bigger than the file it is in."""
    seen, total = set(), 0
    for info in archive.infolist():
        name = info.filename
        if name in seen:
            fail(name, "the zip holds two members of this name")
        seen.add(name)
        if info.flag_bits & 0x1:
            fail(name, "the member is encrypted; mapping.bin members are plain")
        if info.compress_type != zipfile.ZIP_STORED:
            fail(name, f"the member is compressed (zip method {info.compress_type}); mapping.bin members are STORED")
        if info.file_size != info.compress_size:
            fail(name, f"a STORED member declares {info.file_size} bytes but holds {info.compress_size}")
        total += info.file_size
        if total > file_size:
            fail(name, f"the members declare more bytes ({total}) than the file has ({file_size})")
    if MANIFEST in seen and archive.getinfo(MANIFEST).file_size > MANIFEST_BYTES_MAX:
        fail(MANIFEST, f"{archive.getinfo(MANIFEST).file_size} bytes, above the cap of {MANIFEST_BYTES_MAX}")


def parse_manifest(data: bytes) -> dict:
    """The manifest's JSON object; nesting past JSON_DEPTH_MAX is refused, never a RecursionError."""
    try:
        manifest = json.loads(data)
    except RecursionError:
        fail(MANIFEST, f"JSON nested deeper than {JSON_DEPTH_MAX} levels")
    except (UnicodeDecodeError, ValueError) as exc:
        fail(MANIFEST, f"not valid JSON ({exc})")
    if _depth(manifest) > JSON_DEPTH_MAX:
        fail(MANIFEST, f"JSON nested deeper than {JSON_DEPTH_MAX} levels")
    if not isinstance(manifest, dict):
        fail(MANIFEST, f"expected a JSON object, got {type(manifest).__name__}")
    return manifest


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > JSON_DEPTH_MAX:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def check_manifest_keys(manifest: dict) -> None:
    missing, extra = sorted(MANIFEST_KEYS - set(manifest)), sorted(set(manifest) - MANIFEST_KEYS)
    if missing or extra:
        fail(MANIFEST, f"top-level keys missing: {missing}, unknown: {extra}")


def expected_members(manifest: dict, zip_names: set[str]) -> dict[str, str]:
    """The members and digests the manifest lists, checked against what the layers need and the zip holds."""
    members = manifest["members"]
    if not isinstance(members, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for k, v in members.items()
    ):
        fail(MANIFEST, "'members' must map member names to SHA-256 hex digests")
    layers = _list(manifest["layers"], "layers")
    required = {"model.onnx", "graph.onnx"}
    allowed = set(required)
    for position, meta in enumerate(layers):
        _dict(meta, f"layers[{position}]")
        prefix = f"arrays/{position}/"
        required |= {prefix + "levels.npy"}
        required |= {f"{prefix}tiling.{n}.npy" for n in TILING_ARRAYS} | {f"{prefix}encoding.{n}.npy" for n in ENCODING_ARRAYS}
        allowed |= {f"{prefix}{n}.npy" for n in OPTIONAL_ARRAYS}
    if manifest["schedule"] is not None:
        required |= {f"{SCHEDULE_PREFIX}{n}.npy" for n in LOAD_ARRAYS + CROSSBAR_ARRAYS}
    allowed |= required
    missing = sorted(required - set(members))
    if missing:
        fail(missing[0], "a required member is not listed in the manifest")
    unknown = sorted(set(members) - allowed)
    if unknown:
        fail(unknown[0], "unknown member (not part of this format version)")
    stray = sorted(zip_names - set(members) - {MANIFEST, MANIFEST_DIGEST})
    if stray:
        fail(stray[0], "a member the manifest does not list")
    absent = sorted(set(members) - zip_names)
    if absent:
        fail(absent[0], "listed in the manifest but missing from the file")
    return members


# --- arrays ------------------------------------------------------------------------------------


def read_npy(name: str, data: bytes, dtypes: tuple, shape: tuple) -> np.ndarray:
    """A read-only array from .npy bytes: dtype one of `dtypes`, shape `shape` (None = any size),
    its size checked against the member's bytes before any data is touched."""
    stream = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        found, fortran, dtype = reader(stream, max_header_size=NPY_HEADER_MAX)
    except (ValueError, SyntaxError, TypeError, EOFError, TokenError, RecursionError, MemoryError, OverflowError) as exc:
        fail(name, f"not a readable .npy array ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if any(d < 0 for d in found):
        fail(name, f"negative dimension in shape {list(found)}")
    if dtype.hasobject or dtype not in [np.dtype(d) for d in dtypes]:
        fail(name, f"dtype {dtype}, expected {' or '.join(str(np.dtype(d)) for d in dtypes)}")
    if len(found) != len(shape) or any(want is not None and got != want for got, want in zip(found, shape)):
        fail(name, f"shape {list(found)}, expected {[('any' if s is None else s) for s in shape]}")
    count = math.prod(found)
    if stream.tell() + count * dtype.itemsize != len(data):
        fail(name, f"the header declares {count} values of {dtype.itemsize} bytes, the member holds {len(data) - stream.tell()} bytes of data")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell()).reshape(found, order="F" if fortran else "C")
    return np.ascontiguousarray(array) if fortran else array


def _check_range(name: str, array: np.ndarray, low, high, what: str) -> None:
    """Every value finite and within [low, high]."""
    if array.size == 0:
        return
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        fail(name, f"{what} holds NaN or infinite values")
    smallest, largest = array.min(), array.max()
    if smallest < low or largest > high:
        fail(name, f"{what} must lie in [{low}, {high}], found values from {smallest} to {largest}")


def _check_permutation(name: str, array: np.ndarray, size: int) -> None:
    seen = np.zeros(size, dtype=bool)
    _check_range(name, array, 0, size - 1, "a permutation index")
    seen[array] = True
    if not seen.all():
        fail(name, f"not a permutation of 0..{size - 1}: {int(size - seen.sum())} indices repeat")


# --- manifest parts ----------------------------------------------------------------------------


def _list(value, key: str) -> list:
    if not isinstance(value, list):
        fail(MANIFEST, f"'{key}' must be a list, got {type(value).__name__}")
    return value


def _dict(value, key: str) -> dict:
    if not isinstance(value, dict):
        fail(MANIFEST, f"'{key}' must be an object, got {type(value).__name__}")
    return value


def _int(value, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        fail(MANIFEST, f"'{key}' must be a whole number from {low} to {high}, got {_short(value)}")
    return value


def _str(value, key: str) -> str:
    if not isinstance(value, str):
        fail(MANIFEST, f"'{key}' must be a string, got {_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _config(cls, value, key: str):
    """CompileOptions / Hardware through their own validation, every field given."""
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(value, dict) or set(value) != names:
        fail(MANIFEST, f"'{key}' must give exactly the fields {sorted(names)}")
    try:
        return cls(**value)
    except XCompileError as exc:
        fail(MANIFEST, f"'{key}': {exc}")


def _history(value) -> tuple[PassRecord, ...]:
    records = []
    for i, record in enumerate(_list(value, "passes")):
        where = f"passes[{i}]"
        if not isinstance(record, dict) or set(record) != {"name", "options", "changed", "seconds"}:
            fail(MANIFEST, f"'{where}' must hold exactly name, options, changed, seconds")
        seconds = record["seconds"]
        if not isinstance(record["changed"], bool) or isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
            fail(MANIFEST, f"'{where}': 'changed' must be true/false and 'seconds' a finite number >= 0")
        records.append(PassRecord(name=_str(record["name"], f"{where}.name"), options=_dict(record["options"], f"{where}.options"),
                                  changed=record["changed"], seconds=float(seconds)))
    return tuple(records)


def _placement(value) -> nx.DiGraph | None:
    if value is None:
        return None
    _dict(value, "placement")
    scalar = (str, int, float, bool)
    if value.get("directed") is not True or value.get("multigraph") is not False or not isinstance(value.get("graph"), dict):
        fail(MANIFEST, "'placement' must be a directed, non-multi node-link graph")
    ids = set()
    for node in _list(value.get("nodes"), "placement.nodes"):
        if not isinstance(node, dict) or not isinstance(node.get("id"), str) or not all(isinstance(v, scalar) for v in node.values()):
            fail(MANIFEST, f"'placement.nodes' entries must have a string 'id' and plain values, got {_short(node)}")
        ids.add(node["id"])
    for edge in _list(value.get("edges"), "placement.edges"):
        if not isinstance(edge, dict) or not all(isinstance(v, scalar) for v in edge.values()) or edge.get("source") not in ids or edge.get("target") not in ids:
            fail(MANIFEST, f"'placement.edges' entries must join two placement nodes and hold plain values, got {_short(edge)}")
    if not all(isinstance(v, scalar) for v in value["graph"].values()):
        fail(MANIFEST, "'placement.graph' attributes must be plain values")
    try:
        return nx.node_link_graph(value, edges="edges")
    except (nx.NetworkXError, KeyError, TypeError, ValueError) as exc:
        fail(MANIFEST, f"'placement' is not a node-link graph ({exc})")


# --- layers ------------------------------------------------------------------------------------


def _geometry(meta: dict, key: str, shape: tuple[int, int, int]) -> None:
    """The attributes the runtime reads to form a layer's input vectors and outputs."""
    kind, geometry = meta["kind"], _dict(meta["geometry"], f"{key}.geometry")
    groups, kg, ng = shape
    if kind == "dense":
        if set(geometry) != {"weight_left", "transpose_input", "squeeze"} or not all(isinstance(v, bool) for v in geometry.values()):
            fail(MANIFEST, f"'{key}.geometry' of a dense layer holds exactly weight_left, transpose_input, squeeze (true/false)")
        if groups != 1:
            fail(MANIFEST, f"'{key}.weight_shape': a dense layer has one group, got {groups}")
        if geometry["squeeze"] and ng != 1:
            fail(MANIFEST, f"'{key}.geometry': squeeze drops the output axis, which needs one output, not {ng}")
        return
    names = {"rank", "kernel", "strides", "dilations", "pads", "auto_pad", "group"}
    if kind == "conv_transpose":
        names |= {"output_padding", "output_shape", "channels_out"}
    if set(geometry) != names:
        fail(MANIFEST, f"'{key}.geometry' of a {kind} layer holds exactly {sorted(names)}")
    rank = _int(geometry["rank"], f"{key}.geometry.rank", 1, 8)
    lengths = {"kernel": rank, "strides": rank, "dilations": rank, "pads": 2 * rank}
    lows = {"kernel": 1, "strides": 1, "dilations": 1, "pads": 0}
    if kind == "conv_transpose":
        lengths["output_padding"] = rank
        lows.update(output_padding=0, output_shape=1)
    for name, low in lows.items():
        values = _list(geometry[name], f"{key}.geometry.{name}")
        if name in lengths and len(values) != lengths[name] or name == "output_shape" and values and len(values) < rank:
            fail(MANIFEST, f"'{key}.geometry.{name}' must have {lengths.get(name, rank)} entries, got {len(values)}")
        for value in values:
            _int(value, f"{key}.geometry.{name}", low, GEOMETRY_INT_MAX)
    if geometry["auto_pad"] not in AUTO_PADS:
        fail(MANIFEST, f"'{key}.geometry.auto_pad' must be one of {', '.join(AUTO_PADS)}, got {_short(geometry['auto_pad'])}")
    if _int(geometry["group"], f"{key}.geometry.group", 1, GEOMETRY_INT_MAX) != groups:
        fail(MANIFEST, f"'{key}.geometry.group' is {geometry['group']}, the weight shape has {groups} groups")
    kernel = math.prod(geometry["kernel"])
    if kind == "conv" and kg % kernel:
        fail(MANIFEST, f"'{key}.weight_shape': {kg} rows per group is not a whole number of {kernel}-cell kernels")
    if kind == "conv_transpose":
        if ng % kernel or _int(geometry["channels_out"], f"{key}.geometry.channels_out", 1, 1 << 31) != groups * ng // kernel:
            fail(MANIFEST, f"'{key}.geometry.channels_out' must be groups x outputs per group / kernel cells = {groups * ng // max(kernel, 1)}")
        if any(p >= max(s, d) for p, s, d in zip(geometry["output_padding"], geometry["strides"], geometry["dilations"])):
            fail(MANIFEST, f"'{key}.geometry.output_padding' must be below the stride or dilation of its axis")


def _layer_meta(meta: dict, position: int) -> tuple[int, int, int]:
    key = f"layers[{position}]"
    if set(meta) != LAYER_KEYS:
        fail(MANIFEST, f"'{key}' must hold exactly {sorted(LAYER_KEYS)}")
    if meta["index"] != position or isinstance(meta["index"], bool):
        fail(MANIFEST, f"'{key}.index' must be {position} (layers in index order), got {_short(meta['index'])}")
    for name in ("name", "node_name", "op_type", "kind", "input_name", "output_name"):
        _str(meta[name], f"{key}.{name}")
    if meta["kind"] not in KINDS:
        fail(MANIFEST, f"'{key}.kind' must be one of {', '.join(KINDS)}, got {_short(meta['kind'])}")
    shape = _list(meta["weight_shape"], f"{key}.weight_shape")
    if len(shape) != 3:
        fail(MANIFEST, f"'{key}.weight_shape' must be [groups, rows per group, outputs per group]")
    groups, kg, ng = (_int(v, f"{key}.weight_shape", 1, 1 << 31) for v in shape)
    scale = meta["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        fail(MANIFEST, f"'{key}.scale' (weight value of one level) must be a finite number > 0, got {_short(scale)}")
    notes = _dict(meta["notes"], f"{key}.notes")
    vectors = notes.get("vectors_per_sample")
    if vectors is not None:
        _int(vectors, f"{key}.notes.vectors_per_sample", 0, 1 << 62)
    _geometry(meta, key, (groups, kg, ng))
    return groups, kg, ng


def _encoding(meta, key: str, prefix: str, arrays: dict, options: CompileOptions) -> Encoding:
    """The recombination terms: fully given by the options (passes/encode.py), so checked equal."""
    from xcompile.passes.encode import encoding_for

    expected = encoding_for(options)
    want = {"name": expected.name, "columns_per_output": expected.columns_per_output, "shared_columns": expected.shared_columns}
    if meta != want:
        fail(MANIFEST, f"'{key}.encoding' must be {want} for options encoding {options.encoding!r}, cell_bits {options.cell_bits}")
    for name in ENCODING_ARRAYS:
        if not np.array_equal(arrays[name], getattr(expected, name)):
            fail(f"{prefix}encoding.{name}.npy", f"terms differ from the {expected.name} encoding the options define")
    return Encoding(**want, **{n: arrays[n] for n in ENCODING_ARRAYS})


def canonical_tiles(k: int, n: int, kg: int, ng: int, rows: int, per_tile: int, limit: int):
    """grid, row_range, out_range of the tiles a layer takes (passes/tile.py's layout: row blocks
    in order, in each the column blocks that meet its groups), or None past `limit` tiles, so a
    crafted layer shape costs no more memory than the levels that must back it."""
    blocks = -(-k // rows)
    if blocks > limit:
        return None
    rb = np.arange(blocks, dtype=np.int64)
    r0 = rb * rows
    r1 = np.minimum(r0 + rows, k)
    first = (r0 // kg) * ng // per_tile  # column blocks holding the outputs of the row block's groups
    last = (((r1 - 1) // kg + 1) * ng - 1) // per_tile
    per_block = last - first + 1
    count = int(per_block.sum())
    if count > limit:
        return None
    row_block = np.repeat(rb, per_block)
    col_block = np.arange(count, dtype=np.int64) - np.repeat(np.cumsum(per_block) - per_block, per_block) + np.repeat(first, per_block)
    c0 = col_block * per_tile
    pair = lambda a, b: np.stack([a, b], axis=1).astype(np.int64)  # noqa: E731
    return pair(row_block, col_block), pair(r0[row_block], r1[row_block]), pair(c0, np.minimum(c0 + per_tile, n))


def _tiles(shape, hardware: Hardware, encoding: Encoding, levels_bytes: int, member: str):
    """The layer's canonical tile layout; refused when its levels member cannot hold that many tiles."""
    groups, kg, ng = shape
    per_tile = encoding.outputs_per_tile(hardware.cols)
    if per_tile < 1:
        fail(MANIFEST, f"a {hardware.cols}-column crossbar holds no output of the {encoding.name} encoding")
    limit = levels_bytes // (hardware.rows * hardware.cols)  # a level takes at least one byte
    tiles = canonical_tiles(groups * kg, groups * ng, kg, ng, hardware.rows, per_tile, limit)
    if tiles is None:
        fail(member, f"{levels_bytes} bytes cannot hold the levels of the tiles a {groups} x {kg} x {ng} layer takes on {hardware.rows}x{hardware.cols} crossbars")
    return tiles


def _tiling(meta, key: str, prefix: str, arrays: dict, expected, hardware: Hardware) -> Tiling:
    if meta != {"rows": hardware.rows, "cols": hardware.cols}:
        fail(MANIFEST, f"'{key}.tiling' must be {{'rows': {hardware.rows}, 'cols': {hardware.cols}}} (the hardware's array)")
    for name, want in zip(("grid", "row_range", "out_range"), expected):
        if not np.array_equal(arrays[name], want):
            fail(f"{prefix}tiling.{name}.npy", f"the tile layout differs from the one the layer's shape and the {hardware.rows}x{hardware.cols} array give")
    return Tiling(rows=hardware.rows, cols=hardware.cols, **{n: arrays[n] for n in TILING_ARRAYS})


def _signed_weights(layer: Layer) -> np.ndarray:
    """The signed weights [groups, Kg, Ng] in level steps that the layer's target levels encode."""
    enc, tiling = layer.encoding, layer.tiling
    target = np.zeros(layer.weight.shape, dtype=np.float64)
    for i in range(tiling.count):
        (r0, r1), (c0, c1) = tiling.row_range[i], tiling.out_range[i]
        layer.add_block(target, (r0, r1), (c0, c1), enc.combine(layer.levels[i, : r1 - r0].astype(np.float64), int(c1 - c0)))
    return target


def build_layer(meta: dict, position: int, blobs: dict[str, bytes], options: CompileOptions, hardware: Hardware) -> Layer:
    """One layer from its manifest entry and arrays, every array checked against both."""
    key, prefix = f"layers[{position}]", f"arrays/{position}/"
    shape = _layer_meta(meta, position)
    groups, kg, ng = shape
    k, n = groups * kg, groups * ng

    def array(name, dtypes, dims):
        return read_npy(prefix + name + ".npy", blobs[prefix + name + ".npy"], dtypes, dims)

    terms = array("encoding.term_offset", (np.int64,), (None,)).shape[0]
    encoding = _encoding(meta["encoding"], key, prefix, {
        "term_offset": array("encoding.term_offset", (np.int64,), (terms,)),
        "term_step": array("encoding.term_step", (np.int64,), (terms,)),
        "term_coeff": array("encoding.term_coeff", (np.float64,), (terms,)),
    }, options)
    expected = _tiles(shape, hardware, encoding, len(blobs[prefix + "levels.npy"]), prefix + "levels.npy")
    count = expected[0].shape[0]
    tiling = _tiling(meta["tiling"], key, prefix, {
        "grid": array("tiling.grid", (np.int64,), (count, 2)),
        "row_range": array("tiling.row_range", (np.int64,), (count, 2)),
        "out_range": array("tiling.out_range", (np.int64,), (count, 2)),
        "crossbar": array("tiling.crossbar", (np.int64,), (count,)),
    }, expected, hardware)
    level_dtype = np.float32 if options.ideal else np.uint8 if options.cell_bits <= 8 else np.uint16
    levels = array("levels", (level_dtype,), (count, hardware.rows, hardware.cols))
    level_max = options.level_max * (1 + 1e-6 if options.ideal else 1)  # float levels round by an ulp
    _check_range(prefix + "levels.npy", levels, 0, level_max, f"a cell level ({'ideal mode' if options.ideal else f'cell_bits {options.cell_bits}'})")
    for i in range(count):
        (r0, r1), (c0, c1) = tiling.row_range[i], tiling.out_range[i]
        used = encoding.columns_used(int(c1 - c0))
        if levels[i, r1 - r0 :].any() or levels[i, :, used:].any():
            fail(prefix + "levels.npy", f"tile {i} has levels outside the {r1 - r0} x {used} cells it uses (unused cells are 0)")
    optional = {"bias": None}
    if f"{prefix}bias.npy" in blobs:
        channels = meta["geometry"]["channels_out"] if meta["kind"] == "conv_transpose" else n
        optional["bias"] = array("bias", (np.float32,), (channels,))
        _check_range(prefix + "bias.npy", optional["bias"], -np.inf, np.inf, "a bias")
    if f"{prefix}channel_scale.npy" in blobs:
        if options.weight_scale != "channel":
            fail(prefix + "channel_scale.npy", "per-output scales come only with options weight_scale 'channel'")
        optional["channel_scale"] = array("channel_scale", (np.float64,), (n,))
        _check_range(prefix + "channel_scale.npy", optional["channel_scale"], np.finfo(np.float64).tiny, np.finfo(np.float32).max, "a per-output step (finite, > 0)")
    for name, size in (("output_order", n), ("input_order", k)):
        if f"{prefix}{name}.npy" in blobs:
            optional[name] = array(name, (np.int64,), (size,))
            _check_permutation(prefix + name + ".npy", optional[name], size)
    stale = [f"{prefix}stale_{n}.npy" in blobs for n in ("cells", "levels")]
    if any(stale):
        if not all(stale) or options.stuck_slices == 0:
            fail(prefix + "stale_cells.npy", "stale_cells and stale_levels come together, and only with bit stucking (options stuck_slices)")
        cells = optional["stale_cells"] = array("stale_cells", (np.int64,), (None,))
        optional["stale_levels"] = array("stale_levels", (level_dtype,), (cells.size,))
        _check_range(prefix + "stale_cells.npy", cells, 0, levels.size - 1, "a flat cell index into levels")
        if (np.diff(cells) <= 0).any():
            fail(prefix + "stale_cells.npy", "cell indices must be increasing (each cell once)")
        _check_range(prefix + "stale_levels.npy", optional["stale_levels"], 0, level_max, "a stale cell level")
    layer = Layer(
        index=position, name=meta["name"], node_name=meta["node_name"], op_type=meta["op_type"], kind=meta["kind"],
        geometry=meta["geometry"], weight=np.broadcast_to(np.float32(0), shape), input_name=meta["input_name"],
        output_name=meta["output_name"], scale=float(meta["scale"]), encoding=encoding, tiling=tiling, levels=levels,
        notes=meta["notes"], **optional,
    )
    signed = _signed_weights(layer)
    with np.errstate(over="ignore"):
        weight = (signed * layer.output_step()).astype(np.float32)
    if not np.isfinite(weight).all():
        fail(MANIFEST, f"'{key}.scale' ({layer.scale}) times the levels overflows float32 weights")
    weight.flags.writeable = False
    weight_q = None
    if not options.ideal:
        weight_q = np.rint(signed).astype(np.int32)
        weight_q.flags.writeable = False
    return dataclasses.replace(layer, weight=weight, weight_q=weight_q)


# --- the schedule and the physical crossbars ---------------------------------------------------


def build_schedule(meta, blobs: dict[str, bytes], layers: tuple[Layer, ...], options: CompileOptions, hardware: Hardware) -> Schedule | None:
    if (meta is None) != (options.crossbars is None):
        fail(MANIFEST, "'schedule' is given exactly when options 'crossbars' is")
    if meta is None:
        for layer in layers:  # one physical crossbar per tile, numbered in network order
            first = sum(other.tiling.count for other in layers[: layer.index])
            if not np.array_equal(layer.tiling.crossbar, np.arange(first, first + layer.tiling.count)):
                fail(f"arrays/{layer.index}/tiling.crossbar.npy", "without a schedule, tiles are on crossbars numbered in network order")
        return None
    want = {"crossbars": options.crossbars, "order": options.schedule, "stuck_fraction": float(options.stuck_fraction),
            "stuck_slices": options.stuck_slices, "seed": options.seed}
    if meta != want:
        fail(MANIFEST, f"'schedule' must be {want} (from the options)")
    loads = sum(layer.tiling.count for layer in layers)
    arrays = {name: read_npy(f"{SCHEDULE_PREFIX}{name}.npy", blobs[f"{SCHEDULE_PREFIX}{name}.npy"], (np.int64,), (loads,)) for name in LOAD_ARRAYS}
    arrays["cell_writes_max"] = read_npy(f"{SCHEDULE_PREFIX}cell_writes_max.npy", blobs[f"{SCHEDULE_PREFIX}cell_writes_max.npy"], (np.int64,), (options.crossbars,))
    member = lambda name: f"{SCHEDULE_PREFIX}{name}.npy"  # noqa: E731
    cells = hardware.rows * hardware.cols
    _check_range(member("layer"), arrays["layer"], 0, len(layers) - 1, "a layer index")
    _check_range(member("crossbar"), arrays["crossbar"], 0, options.crossbars - 1, "a physical crossbar")
    _check_range(member("round"), arrays["round"], 0, max(loads - 1, 0), "a round")
    for name in ("writes", "changed", "stale"):
        _check_range(member(name), arrays[name], 0, cells, "a count of cells")
    _check_range(member("cell_writes_max"), arrays["cell_writes_max"], 0, loads, "writes of one cell per pass")
    counts = np.array([layer.tiling.count for layer in layers], dtype=np.int64)
    _check_range(member("tile"), arrays["tile"], 0, max(int(counts.max(initial=0)) - 1, 0), "a tile index")
    if loads and (arrays["tile"] >= counts[arrays["layer"]]).any():
        fail(member("tile"), "a tile index beyond its layer's tiles")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    flat = offsets[arrays["layer"]] + arrays["tile"]
    _check_permutation(member("tile"), flat, loads)
    if (np.diff(arrays["round"]) < 0).any():
        fail(member("round"), "loads are listed round by round")
    slots = arrays["round"] * options.crossbars + arrays["crossbar"]
    if np.unique(slots).size != loads:
        fail(member("crossbar"), "a physical crossbar is loaded twice in one round")
    for layer in layers:
        mine = arrays["layer"] == layer.index
        placed = np.empty(layer.tiling.count, dtype=np.int64)
        placed[arrays["tile"][mine]] = arrays["crossbar"][mine]
        if not np.array_equal(placed, layer.tiling.crossbar):
            fail(f"arrays/{layer.index}/tiling.crossbar.npy", "the tiles' crossbars differ from the schedule's loads")
    return Schedule.from_manifest(meta, arrays)


# --- ONNX members ------------------------------------------------------------------------------


def parse_onnx(name: str, data: bytes) -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        fail(name, f"not a readable ONNX model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    bad_text = _undecodable_text(model)
    if bad_text:
        fail(name, f"{bad_text} is not valid UTF-8 text")
    for tensor, where in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            fail(name, f"tensor '{tensor.name}' ({where}) refers to external data; a mapping is self-contained and external data is never read")
    return model


def _undecodable_text(message) -> str | None:
    """The first text field (names, op types, doc strings, ...) whose bytes are not UTF-8, or None.

    ONNX's protobuf is proto2, which does not check text when parsing: such a field reads as bytes,
    and a UnicodeDecodeError surfaces wherever it is used later (graph building, ONNX Runtime)."""
    stack = [(message, type(message).__name__)]
    while stack:
        current, where = stack.pop()
        for field in current.DESCRIPTOR.fields:
            if field.type == field.TYPE_STRING:
                values = getattr(current, field.name)
                if any(isinstance(v, bytes) for v in (values if field.is_repeated else [values])):
                    return f"{where}.{field.name}"
            elif field.type == field.TYPE_MESSAGE:
                value = getattr(current, field.name)
                if field.is_repeated:
                    stack.extend((item, f"{where}.{field.name}[{i}]") for i, item in enumerate(value))
                elif current.HasField(field.name):
                    stack.append((value, f"{where}.{field.name}"))
    return None


def _tensors(model: onnx.ModelProto):
    """Every TensorProto of a model: initializers, sparse ones, node attributes, in every subgraph and function."""
    graphs = [(model.graph, "graph")]
    nodes = [(node, f"function {f.name}") for f in model.functions for node in f.node]
    while graphs or nodes:
        if graphs:
            graph, where = graphs.pop()
            yield from ((t, f"initializer of {where}") for t in graph.initializer)
            for sparse in graph.sparse_initializer:
                yield from ((t, f"sparse initializer of {where}") for t in (sparse.values, sparse.indices))
            nodes.extend((node, where) for node in graph.node)
            continue
        node, where = nodes.pop()
        for attr in node.attribute:
            inside = f"attribute {attr.name} of node '{node.name or node.op_type}' in {where}"
            if attr.HasField("t"):
                yield attr.t, inside
            yield from ((t, inside) for t in attr.tensors)
            if attr.HasField("sparse_tensor"):
                yield from ((t, inside) for t in (attr.sparse_tensor.values, attr.sparse_tensor.indices))
            for sparse in attr.sparse_tensors:
                yield from ((t, inside) for t in (sparse.values, sparse.indices))
            if attr.HasField("g"):
                graphs.append((attr.g, inside))
            graphs.extend((g, inside) for g in attr.graphs)


def check_runtime_graph(graph: onnx.ModelProto, layers: tuple[Layer, ...]) -> None:
    """The graph's inputs and outputs have known tensor types (the session reports them); every
    crossbar node (CrossbarMVM, CrossbarRecurrent; at the top level or inside If / Loop / Scan
    bodies, never in a function) is well-formed and names layers that fit it, each layer once."""
    known = set(onnx.TensorProto.DataType.values())
    for value in list(graph.graph.input) + list(graph.graph.output):
        kind = value.type.WhichOneof("value")
        if kind == "tensor_type" and value.type.tensor_type.elem_type not in known:
            fail("graph.onnx", f"graph input/output '{value.name}' has element type {value.type.tensor_type.elem_type}, not an ONNX tensor type")
    referenced: list[int] = []
    stack = [graph.graph]
    while stack:
        inner = stack.pop()
        for node in inner.node:
            for attr in node.attribute:
                stack.extend(([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
            if node.domain != CUSTOM_DOMAIN:
                continue
            what = f"node '{node.name}'"
            if node.op_type == MVM_OP:
                referenced.append(_mvm_node(node, what, len(layers)))
            elif node.op_type == RECURRENT_OP:
                referenced.extend(_recurrent_node(node, what, layers))
            else:
                fail("graph.onnx", f"{what} is {CUSTOM_DOMAIN}::{node.op_type}; that domain has only {MVM_OP} and {RECURRENT_OP}")
    counts = np.bincount(np.array(referenced, dtype=np.int64), minlength=len(layers))
    if layers and (counts != 1).any():
        index = int(np.flatnonzero(counts != 1)[0])
        fail("graph.onnx", f"layer {index} is run by {int(counts[index])} crossbar nodes; each layer runs exactly once")
    functions = [f for f in graph.functions]
    while functions:
        inner = functions.pop()
        for node in inner.node:
            if node.domain == CUSTOM_DOMAIN:
                fail("graph.onnx", f"crossbar node '{node.name}' inside a function; the runtime runs them in graphs only")
            for attr in node.attribute:
                functions.extend(([attr.g] if attr.HasField("g") else []) + list(attr.graphs))


def _mvm_node(node: onnx.NodeProto, what: str, layers: int) -> int:
    attrs = {a.name: a for a in node.attribute}
    layer = attrs.get("layer")
    if set(attrs) != {"layer"} or layer.type != onnx.AttributeProto.INT:
        fail("graph.onnx", f"{what} ({MVM_OP}) must have exactly one attribute, the integer 'layer'")
    if not 0 <= layer.i < layers:
        fail("graph.onnx", f"{what} ({MVM_OP}) has layer={layer.i}; the mapping has layers 0..{layers - 1}")
    if len(node.input) != 1 or len(node.output) != 1 or not node.input[0] or not node.output[0]:
        fail("graph.onnx", f"{what} ({MVM_OP}) must have one input and one output")
    return layer.i


RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
RECURRENT_ACTIVATIONS = {"LSTM": 3, "GRU": 2, "RNN": 1}
ACTIVATIONS = ("Sigmoid", "Tanh", "Relu", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "HardSigmoid", "Elu", "Softsign", "Softplus")
_RECURRENT_TYPES = {
    "op": onnx.AttributeProto.STRING, "hidden_size": onnx.AttributeProto.INT, "directions": onnx.AttributeProto.INT,
    "direction": onnx.AttributeProto.STRING, "layout": onnx.AttributeProto.INT, "linear_before_reset": onnx.AttributeProto.INT,
    "input_forget": onnx.AttributeProto.INT, "activations": onnx.AttributeProto.STRINGS, "w_layers": onnx.AttributeProto.INTS,
    "r_layers": onnx.AttributeProto.INTS, "activation_alpha": onnx.AttributeProto.FLOATS, "activation_beta": onnx.AttributeProto.FLOATS,
}


def _recurrent_node(node: onnx.NodeProto, what: str, layers: tuple[Layer, ...]) -> list[int]:
    """A CrossbarRecurrent node: attributes of the types and ranges runtime/recurrent.py reads, and
    W / R layers of the shapes its gates need. Returns the layers it runs."""
    attrs = {a.name: a for a in node.attribute}
    if not set(_RECURRENT_TYPES) <= set(attrs) <= set(_RECURRENT_TYPES) | {"clip"}:
        fail("graph.onnx", f"{what} ({RECURRENT_OP}) must have exactly the attributes {sorted(_RECURRENT_TYPES)} (and clip)")
    for name, kind in {**_RECURRENT_TYPES, "clip": onnx.AttributeProto.FLOAT}.items():
        if name in attrs and attrs[name].type != kind:
            fail("graph.onnx", f"{what} ({RECURRENT_OP}): attribute '{name}' has the wrong type")
    value = {name: helper.get_attribute_value(a) for name, a in attrs.items()}
    op = value["op"].decode(errors="replace")
    hidden, directions = value["hidden_size"], value["directions"]
    direction = value["direction"].decode(errors="replace")
    rule = None
    if op not in RECURRENT_GATES:
        rule = f"op must be one of {sorted(RECURRENT_GATES)}"
    elif not 1 <= hidden <= GEOMETRY_INT_MAX or directions not in (1, 2):
        rule = "hidden_size must be in 1..65536 and directions 1 or 2"
    elif direction not in ("forward", "reverse", "bidirectional") or (direction == "bidirectional") != (directions == 2):
        rule = "direction must be forward, reverse or bidirectional, and bidirectional exactly when directions is 2"
    elif any(value[k] not in (0, 1) for k in ("layout", "linear_before_reset", "input_forget")):
        rule = "layout, linear_before_reset and input_forget must be 0 or 1"
    elif not len(value["activations"]) == len(value["activation_alpha"]) == len(value["activation_beta"]) == RECURRENT_ACTIVATIONS[op] * directions:
        rule = f"{op} needs {RECURRENT_ACTIVATIONS[op]} activations per direction, each with an alpha and a beta"
    elif any(a.decode(errors="replace") not in ACTIVATIONS for a in value["activations"]):
        rule = f"activations must be among {', '.join(ACTIVATIONS)}"
    elif not all(math.isfinite(v) for v in [*value["activation_alpha"], *value["activation_beta"]]):
        rule = "activation_alpha and activation_beta must be finite"
    elif "clip" in value and not 0 < value["clip"] < math.inf:
        rule = "clip must be a finite number > 0"
    elif not 1 <= len(node.input) <= 5 or not node.input[0] or not 1 <= len(node.output) <= 3:
        rule = "inputs must be X (given), then optionally sequence_lens, initial_h, initial_c, P; and 1 to 3 outputs"
    if rule:
        fail("graph.onnx", f"{what} ({RECURRENT_OP}): {rule}")
    gates = RECURRENT_GATES[op]
    split = op == "GRU" and not value["linear_before_reset"]  # R_zr and R_h: R_h multiplies r * h
    r_outputs = [2 * hidden, hidden] if split else [gates * hidden]
    w_layers, r_layers = list(value["w_layers"]), list(value["r_layers"])
    if len(w_layers) != directions or len(r_layers) != directions * len(r_outputs):
        fail("graph.onnx", f"{what} ({RECURRENT_OP}): needs {directions} W layer(s) and {directions * len(r_outputs)} R layer(s)")
    expected = [(w, None, gates * hidden) for w in w_layers]
    expected += [(r, hidden, r_outputs[i % len(r_outputs)]) for i, r in enumerate(r_layers)]
    for index, rows, outputs in expected:
        if not 0 <= index < len(layers):
            fail("graph.onnx", f"{what} ({RECURRENT_OP}) names layer {index}; the mapping has layers 0..{len(layers) - 1}")
        layer = layers[index]
        groups, k, n = layer.weight.shape
        if layer.kind != "dense" or groups != 1 or n != outputs or (rows is not None and k != rows):
            fail("graph.onnx", f"{what} ({RECURRENT_OP}): layer {index} has shape {[groups, k, n]}; its gates need "
                 f"[1, {rows if rows is not None else 'inputs'}, {outputs}] (dense)")
    return w_layers + r_layers


# --- the whole program -------------------------------------------------------------------------


def build_program(manifest: dict, blobs: dict[str, bytes]) -> Program:
    options = _config(CompileOptions, manifest["options"], "options")
    if not isinstance(options.ideal, bool):
        fail(MANIFEST, f"'options.ideal' must be true or false, got {_short(options.ideal)}")
    hardware = _config(Hardware, manifest["hardware"], "hardware")
    history = _history(manifest["passes"])
    digital = _list(manifest["digital_nodes"], "digital_nodes")
    for i, op in enumerate(digital):
        _str(op, f"digital_nodes[{i}]")
    placement = _placement(manifest["placement"])
    layers = tuple(build_layer(meta, i, blobs, options, hardware) for i, meta in enumerate(manifest["layers"]))
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        fail(MANIFEST, "layer names must be unique")
    schedule = build_schedule(manifest["schedule"], blobs, layers, options, hardware)
    parse_onnx("model.onnx", blobs["model.onnx"])
    graph = parse_onnx("graph.onnx", blobs["graph.onnx"])
    check_runtime_graph(graph, layers)
    return Program(
        model=blobs["model.onnx"], graph=graph, layers=layers, options=options, hardware=hardware, history=history,
        digital_nodes=tuple(digital), schedule=schedule,
    )
