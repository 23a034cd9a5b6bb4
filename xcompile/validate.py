"""Load = validate: the checks mapping.bin passes before anything in it is used (docs/format.md).

A mapping is untrusted input. Its digests show the file is whole, not who made it: anyone can
edit a member and recompute them. So the loader checks the container (every member stored, sizes
within the file), the manifest (size, nesting, types), every array's header before its data is
read, and then every array against the manifest and the others: dtypes, shapes, index ranges,
permutations, level maxima, scales, the tile layout, the schedule, and the runtime graph's
CrossbarMVM nodes. Nothing of the file reaches the runtime's kernels unchecked. Every failure is
one XCompileError naming the member and the rule it breaks.

This module is the loader's entry (xcompile/artifact.py): the container, the manifest and the
Program. The rest sits in sibling modules that import only downward: validate_values.py (the
error, member names, readers of one value or .npy array), validate_layers.py (layers, tile
layout, schedule) and validate_onnx.py (model.onnx, graph.onnx).
"""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from typing import Any

import networkx as nx

from xcompile.config import CompileOptions, Hardware
from xcompile.errors import XCompileError
from xcompile.ir import PassRecord, Program
from xcompile.reprogramming import CROSSBAR_ARRAYS, LOAD_ARRAYS
from xcompile.validate_layers import build_layer, build_schedule
from xcompile.validate_onnx import check_runtime_graph, parse_onnx
from xcompile.validate_values import (
    ENCODING_ARRAYS, MANIFEST, SCHEDULE_PREFIX, TILING_ARRAYS, Invalid, as_dict, as_list, as_str, fail, short_repr,
)

__all__ = [  # what the loader (xcompile/artifact.py) uses
    "ENCODING_ARRAYS", "MANIFEST", "MANIFEST_DIGEST", "SCHEDULE_PREFIX", "TILING_ARRAYS", "Invalid",
    "build_program", "check_container", "check_manifest_keys", "expected_members", "parse_manifest",
]

MANIFEST_DIGEST = "manifest.sha256"
MANIFEST_BYTES_MAX = 256 << 20  # the manifest is parsed whole; a big model's is a few MB
JSON_DEPTH_MAX = 32  # the manifest nests 6 deep; free-form notes get some room
OPTIONAL_ARRAYS = ("bias", "output_order", "input_order", "stale_cells", "stale_levels", "channel_scale")
MANIFEST_KEYS = {"format", "format_version", "xcompile_version", "options", "hardware", "passes", "digital_ops", "layers", "placement", "schedule", "members"}


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
    layers = as_list(manifest["layers"], "layers")
    required = {"model.onnx", "graph.onnx"}
    allowed = set(required)
    for position, meta in enumerate(layers):
        as_dict(meta, f"layers[{position}]")
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


# --- the manifest's top-level fields -----------------------------------------------------------


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
    for i, record in enumerate(as_list(value, "passes")):
        where = f"passes[{i}]"
        if not isinstance(record, dict) or set(record) != {"name", "options", "changed", "seconds"}:
            fail(MANIFEST, f"'{where}' must hold exactly name, options, changed, seconds")
        seconds = record["seconds"]
        if not isinstance(record["changed"], bool) or isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
            fail(MANIFEST, f"'{where}': 'changed' must be true/false and 'seconds' a finite number >= 0")
        records.append(PassRecord(name=as_str(record["name"], f"{where}.name"), options=as_dict(record["options"], f"{where}.options"),
                                  changed=record["changed"], seconds=float(seconds)))
    return tuple(records)


def _check_placement(value) -> None:
    if value is None:
        return
    as_dict(value, "placement")
    scalar = (str, int, float, bool)
    if value.get("directed") is not True or value.get("multigraph") is not False or not isinstance(value.get("graph"), dict):
        fail(MANIFEST, "'placement' must be a directed, non-multi node-link graph")
    ids = set()
    for node in as_list(value.get("nodes"), "placement.nodes"):
        if not isinstance(node, dict) or not isinstance(node.get("id"), str) or not all(isinstance(v, scalar) for v in node.values()):
            fail(MANIFEST, f"'placement.nodes' entries must have a string 'id' and plain values, got {short_repr(node)}")
        ids.add(node["id"])
    for edge in as_list(value.get("edges"), "placement.edges"):
        if not isinstance(edge, dict) or not all(isinstance(v, scalar) for v in edge.values()) or edge.get("source") not in ids or edge.get("target") not in ids:
            fail(MANIFEST, f"'placement.edges' entries must join two placement nodes and hold plain values, got {short_repr(edge)}")
    if not all(isinstance(v, scalar) for v in value["graph"].values()):
        fail(MANIFEST, "'placement.graph' attributes must be plain values")
    try:
        nx.node_link_graph(value, edges="edges")
    except (nx.NetworkXError, KeyError, TypeError, ValueError) as exc:
        fail(MANIFEST, f"'placement' is not a node-link graph ({exc})")


# --- the whole program -------------------------------------------------------------------------


def build_program(manifest: dict, blobs: dict[str, bytes]) -> Program:
    """The one place a loaded mapping becomes a Program: every field checked first."""
    options = _config(CompileOptions, manifest["options"], "options")
    if not isinstance(options.ideal, bool):
        fail(MANIFEST, f"'options.ideal' must be true or false, got {short_repr(options.ideal)}")
    hardware = _config(Hardware, manifest["hardware"], "hardware")
    history = _history(manifest["passes"])
    digital = as_list(manifest["digital_ops"], "digital_ops")
    for i, op in enumerate(digital):
        as_str(op, f"digital_ops[{i}]")
    _check_placement(manifest["placement"])  # written for tools reading the zip; the program derives its own
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
        digital_ops=tuple(digital), schedule=schedule,
    )
