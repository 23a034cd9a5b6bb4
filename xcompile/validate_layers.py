"""Load = validate, the layers (docs/format.md): each layer's manifest entry and arrays, checked
against each other and the options (encoding terms, the canonical tile layout, level ranges,
permutations), and the schedule that places their tiles on the physical crossbars."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from xcompile.config import CompileOptions, Hardware
from xcompile.ir import Encoding, Layer, Tiling
from xcompile.reprogramming import LOAD_ARRAYS, Schedule
from xcompile.validate_values import (
    ENCODING_ARRAYS, GEOMETRY_INT_MAX, MANIFEST, SCHEDULE_PREFIX, TILING_ARRAYS, as_dict, as_int, as_list, as_str,
    check_permutation, check_range, fail, read_npy, short_repr,
)

KINDS = ("dense", "conv", "conv_transpose")  # op_type names the source op (Gemm, QLinearConv, LSTM, ...) for people
AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
LAYER_KEYS = {"index", "name", "node_name", "op_type", "kind", "geometry", "weight_shape", "input_name", "output_name", "scale", "notes", "encoding", "tiling"}


# --- layers ------------------------------------------------------------------------------------


def _geometry(meta: dict, key: str, shape: tuple[int, int, int]) -> None:
    """The attributes the runtime reads to form a layer's input vectors and outputs."""
    kind, geometry = meta["kind"], as_dict(meta["geometry"], f"{key}.geometry")
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
    rank = as_int(geometry["rank"], f"{key}.geometry.rank", 1, 8)
    lengths = {"kernel": rank, "strides": rank, "dilations": rank, "pads": 2 * rank}
    lows = {"kernel": 1, "strides": 1, "dilations": 1, "pads": 0}
    if kind == "conv_transpose":
        lengths["output_padding"] = rank
        lows.update(output_padding=0, output_shape=1)
    for name, low in lows.items():
        values = as_list(geometry[name], f"{key}.geometry.{name}")
        if name in lengths and len(values) != lengths[name] or name == "output_shape" and values and len(values) < rank:
            fail(MANIFEST, f"'{key}.geometry.{name}' must have {lengths.get(name, rank)} entries, got {len(values)}")
        for value in values:
            as_int(value, f"{key}.geometry.{name}", low, GEOMETRY_INT_MAX)
    if geometry["auto_pad"] not in AUTO_PADS:
        fail(MANIFEST, f"'{key}.geometry.auto_pad' must be one of {', '.join(AUTO_PADS)}, got {short_repr(geometry['auto_pad'])}")
    if as_int(geometry["group"], f"{key}.geometry.group", 1, GEOMETRY_INT_MAX) != groups:
        fail(MANIFEST, f"'{key}.geometry.group' is {geometry['group']}, the weight shape has {groups} groups")
    kernel = math.prod(geometry["kernel"])
    if kind == "conv" and kg % kernel:
        fail(MANIFEST, f"'{key}.weight_shape': {kg} rows per group is not a whole number of {kernel}-cell kernels")
    if kind == "conv_transpose":
        if ng % kernel or as_int(geometry["channels_out"], f"{key}.geometry.channels_out", 1, 1 << 31) != groups * ng // kernel:
            fail(MANIFEST, f"'{key}.geometry.channels_out' must be groups x outputs per group / kernel cells = {groups * ng // max(kernel, 1)}")
        if any(p >= max(s, d) for p, s, d in zip(geometry["output_padding"], geometry["strides"], geometry["dilations"])):
            fail(MANIFEST, f"'{key}.geometry.output_padding' must be below the stride or dilation of its axis")


def _layer_meta(meta: dict, position: int) -> tuple[int, int, int]:
    key = f"layers[{position}]"
    if set(meta) != LAYER_KEYS:
        fail(MANIFEST, f"'{key}' must hold exactly {sorted(LAYER_KEYS)}")
    if meta["index"] != position or isinstance(meta["index"], bool):
        fail(MANIFEST, f"'{key}.index' must be {position} (layers in index order), got {short_repr(meta['index'])}")
    for name in ("name", "node_name", "op_type", "kind", "input_name", "output_name"):
        as_str(meta[name], f"{key}.{name}")
    if meta["kind"] not in KINDS:
        fail(MANIFEST, f"'{key}.kind' must be one of {', '.join(KINDS)}, got {short_repr(meta['kind'])}")
    shape = as_list(meta["weight_shape"], f"{key}.weight_shape")
    if len(shape) != 3:
        fail(MANIFEST, f"'{key}.weight_shape' must be [groups, rows per group, outputs per group]")
    groups, kg, ng = (as_int(v, f"{key}.weight_shape", 1, 1 << 31) for v in shape)
    scale = meta["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        fail(MANIFEST, f"'{key}.scale' (weight value of one level) must be a finite number > 0, got {short_repr(scale)}")
    notes = as_dict(meta["notes"], f"{key}.notes")
    vectors = notes.get("vectors_per_sample")
    if vectors is not None:
        as_int(vectors, f"{key}.notes.vectors_per_sample", 0, 1 << 62)
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
    check_range(prefix + "levels.npy", levels, 0, level_max, f"a cell level ({'ideal mode' if options.ideal else f'cell_bits {options.cell_bits}'})")
    for i in range(count):
        (r0, r1), (c0, c1) = tiling.row_range[i], tiling.out_range[i]
        used = encoding.columns_used(int(c1 - c0))
        if levels[i, r1 - r0 :].any() or levels[i, :, used:].any():
            fail(prefix + "levels.npy", f"tile {i} has levels outside the {r1 - r0} x {used} cells it uses (unused cells are 0)")
    optional = {"bias": None}
    if f"{prefix}bias.npy" in blobs:
        channels = meta["geometry"]["channels_out"] if meta["kind"] == "conv_transpose" else n
        optional["bias"] = array("bias", (np.float32,), (channels,))
        check_range(prefix + "bias.npy", optional["bias"], -np.inf, np.inf, "a bias")
    if f"{prefix}channel_scale.npy" in blobs:
        if options.weight_scale != "channel":
            fail(prefix + "channel_scale.npy", "per-output scales come only with options weight_scale 'channel'")
        optional["channel_scale"] = array("channel_scale", (np.float64,), (n,))
        check_range(prefix + "channel_scale.npy", optional["channel_scale"], np.finfo(np.float64).tiny, np.finfo(np.float32).max, "a per-output step (finite, > 0)")
    for name, size in (("output_order", n), ("input_order", k)):
        if f"{prefix}{name}.npy" in blobs:
            optional[name] = array(name, (np.int64,), (size,))
            check_permutation(prefix + name + ".npy", optional[name], size)
    stale = [f"{prefix}stale_{n}.npy" in blobs for n in ("cells", "levels")]
    if any(stale):
        if not all(stale) or options.stuck_slices == 0:
            fail(prefix + "stale_cells.npy", "stale_cells and stale_levels come together, and only with bit stucking (options stuck_slices)")
        cells = optional["stale_cells"] = array("stale_cells", (np.int64,), (None,))
        optional["stale_levels"] = array("stale_levels", (level_dtype,), (cells.size,))
        check_range(prefix + "stale_cells.npy", cells, 0, levels.size - 1, "a flat cell index into levels")
        if (np.diff(cells) <= 0).any():
            fail(prefix + "stale_cells.npy", "cell indices must be increasing (each cell once)")
        check_range(prefix + "stale_levels.npy", optional["stale_levels"], 0, level_max, "a stale cell level")
    layer = Layer(
        index=position, name=meta["name"], node_name=meta["node_name"], op_type=meta["op_type"], kind=meta["kind"],
        geometry=meta["geometry"], weight=np.broadcast_to(np.float32(0), shape), input_name=meta["input_name"],
        output_name=meta["output_name"], scale=float(meta["scale"]), encoding=encoding, tiling=tiling, levels=levels,
        notes=meta["notes"], **optional,
    )
    signed = layer.level_weights()
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
    check_range(member("layer"), arrays["layer"], 0, len(layers) - 1, "a layer index")
    check_range(member("crossbar"), arrays["crossbar"], 0, options.crossbars - 1, "a physical crossbar")
    check_range(member("round"), arrays["round"], 0, max(loads - 1, 0), "a round")
    for name in ("writes", "changed", "stale"):
        check_range(member(name), arrays[name], 0, cells, "a count of cells")
    check_range(member("cell_writes_max"), arrays["cell_writes_max"], 0, loads, "writes of one cell per pass")
    counts = np.array([layer.tiling.count for layer in layers], dtype=np.int64)
    check_range(member("tile"), arrays["tile"], 0, max(int(counts.max(initial=0)) - 1, 0), "a tile index")
    if loads and (arrays["tile"] >= counts[arrays["layer"]]).any():
        fail(member("tile"), "a tile index beyond its layer's tiles")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    flat = offsets[arrays["layer"]] + arrays["tile"]
    check_permutation(member("tile"), flat, loads)
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

