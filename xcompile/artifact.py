"""mapping.bin: one self-contained, versioned, integrity-checked file (docs/format.md).

An uncompressed zip of: `manifest.json` (options, hardware, passes, layers, tiles, placement
graph, the SHA-256 of every other member), `model.onnx` (the original model), `graph.onnx` (the
runtime graph), `arrays/*.npy` (weights, levels, tiles; loaded with allow_pickle=False) and
`manifest.sha256` (the digest of the manifest). Written to a temporary file and renamed into
place, so the target is complete or absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx

from xcompile.config import CompileOptions, Hardware
from xcompile.errors import XCompileError
from xcompile.fileio import atomic_output
from xcompile.ir import Encoding, Layer, PassRecord, Program, Tiling, frozen_array
from xcompile.reprogramming import Schedule

FORMAT = "xcompile-mapping"
FORMAT_VERSION = 1
MANIFEST, MANIFEST_DIGEST = "manifest.json", "manifest.sha256"
_LAYER_ARRAYS = ("weight", "bias", "weight_q", "levels", "output_order", "input_order", "stale_cells", "stale_levels", "channel_scale")
SCHEDULE_PREFIX = "arrays/schedule/"
_TILING_ARRAYS = ("grid", "row_range", "out_range", "crossbar")
_ENCODING_ARRAYS = ("term_offset", "term_step", "term_coeff")


class Mapping:
    """A compiled model: the crossbar program plus what it takes to save, inspect and run it."""

    def __init__(self, program: Program):
        self.program = program

    @property
    def layers(self) -> tuple[Layer, ...]:
        return self.program.layers

    @property
    def hardware(self) -> Hardware:
        return self.program.hardware

    @property
    def options(self) -> CompileOptions:
        return self.program.options

    def save(self, path: str | os.PathLike) -> Path:
        return save(self.program, path)

    def summary(self) -> dict[str, Any]:
        from xcompile.report import summary

        return summary(self.program)

    def __repr__(self) -> str:
        tiles = sum(layer.tiling.count for layer in self.layers if layer.tiling is not None)
        return f"<Mapping: {len(self.layers)} MVM layers, {tiles} tiles on {self.hardware.rows}x{self.hardware.cols} crossbars>"


def save(program: Program, path: str | os.PathLike) -> Path:
    members: list[tuple[str, bytes]] = [
        ("model.onnx", program.model),
        ("graph.onnx", program.graph.SerializeToString()),
    ]
    layers_meta = []
    for layer in program.layers:
        meta, arrays = _layer_to_manifest(layer)
        layers_meta.append(meta)
        members.extend((f"arrays/{layer.index}/{name}.npy", _npy(array)) for name, array in arrays.items())
    schedule_meta, schedule_arrays = program.schedule.to_manifest() if program.schedule is not None else (None, {})
    members.extend((f"{SCHEDULE_PREFIX}{name}.npy", _npy(array)) for name, array in schedule_arrays.items())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "xcompile_version": _version(),
        "options": program.options.to_dict(),
        "hardware": program.hardware.to_dict(),
        "passes": [dataclasses.asdict(record) for record in program.history],
        "digital_nodes": list(program.digital_nodes),
        "layers": layers_meta,
        "placement": None if program.placement is None else nx.node_link_data(program.placement, edges="edges"),
        "schedule": schedule_meta,
        "members": {name: hashlib.sha256(data).hexdigest() for name, data in members},
    }
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with atomic_output(path) as temp:
        with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.writestr(MANIFEST, manifest_bytes)
            for name, data in members:
                archive.writestr(name, data)
            archive.writestr(MANIFEST_DIGEST, hashlib.sha256(manifest_bytes).hexdigest())
    return Path(path)


def load(path: str | os.PathLike) -> Mapping:
    source = Path(path)
    where = f"mapping '{source}'"
    if not source.is_file():
        raise XCompileError(f"{where} does not exist" if not source.exists() else f"{where} is not a file")
    try:
        with zipfile.ZipFile(source) as archive:
            names = set(archive.namelist())
            if MANIFEST not in names or MANIFEST_DIGEST not in names:
                raise XCompileError(f"{where} is not an xcompile mapping (no manifest)")
            manifest_bytes = archive.read(MANIFEST)
            if hashlib.sha256(manifest_bytes).hexdigest() != archive.read(MANIFEST_DIGEST).decode(errors="replace").strip():
                raise XCompileError(f"{where} is corrupt: the manifest does not match its digest")
            manifest = json.loads(manifest_bytes)
            _check_format(manifest, where)
            blobs = {}
            for name, digest in manifest["members"].items():
                if name not in names:
                    raise XCompileError(f"{where} is corrupt: member '{name}' is missing")
                data = archive.read(name)
                if hashlib.sha256(data).hexdigest() != digest:
                    raise XCompileError(f"{where} is corrupt: member '{name}' does not match its digest")
                blobs[name] = data
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XCompileError(f"{where} is not a readable xcompile mapping (truncated or damaged): {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise XCompileError(f"{where} is not a readable xcompile mapping: {exc}") from None
    try:
        return Mapping(_program_from(manifest, blobs))
    except (KeyError, TypeError, ValueError) as exc:
        raise XCompileError(f"{where} has an unreadable manifest: {exc}") from None


def _check_format(manifest: Any, where: str) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise XCompileError(f"{where} is not an xcompile mapping")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise XCompileError(
            f"{where} has format version {version}; this xcompile ({_version()}) reads version {FORMAT_VERSION}: recompile the model"
        )


def _layer_to_manifest(layer: Layer) -> tuple[dict, dict[str, np.ndarray]]:
    meta = {
        "index": layer.index,
        "name": layer.name,
        "node_name": layer.node_name,
        "op_type": layer.op_type,
        "kind": layer.kind,
        "geometry": layer.geometry,
        "input_name": layer.input_name,
        "output_name": layer.output_name,
        "scale": layer.scale,
        "notes": layer.notes,
        "encoding": None,
        "tiling": None,
    }
    arrays = {name: getattr(layer, name) for name in _LAYER_ARRAYS if getattr(layer, name) is not None}
    if "weight_q" in arrays:
        arrays["weight_q"] = _compact_ints(arrays["weight_q"])
    if layer.encoding is not None:
        enc = layer.encoding
        meta["encoding"] = {"name": enc.name, "columns_per_output": enc.columns_per_output, "shared_columns": enc.shared_columns}
        arrays.update({f"encoding.{name}": getattr(enc, name) for name in _ENCODING_ARRAYS})
    if layer.tiling is not None:
        meta["tiling"] = {"rows": layer.tiling.rows, "cols": layer.tiling.cols}
        arrays.update({f"tiling.{name}": getattr(layer.tiling, name) for name in _TILING_ARRAYS})
    return meta, arrays


def _program_from(manifest: dict, blobs: dict[str, bytes]) -> Program:
    layers = []
    for meta in manifest["layers"]:
        prefix = f"arrays/{meta['index']}/"
        arrays = {
            name[len(prefix) : -len(".npy")]: _array(blobs[name]) for name in blobs if name.startswith(prefix)
        }
        encoding = tiling = None
        if meta["encoding"] is not None:
            encoding = Encoding(**meta["encoding"], **{n: arrays[f"encoding.{n}"] for n in _ENCODING_ARRAYS})
        if meta["tiling"] is not None:
            tiling = Tiling(**meta["tiling"], **{n: arrays[f"tiling.{n}"] for n in _TILING_ARRAYS})
        weight_q = arrays.get("weight_q")
        layers.append(
            Layer(
                index=meta["index"],
                name=meta["name"],
                node_name=meta["node_name"],
                op_type=meta["op_type"],
                kind=meta["kind"],
                geometry=meta["geometry"],
                weight=arrays["weight"],
                bias=arrays.get("bias"),
                input_name=meta["input_name"],
                output_name=meta["output_name"],
                scale=meta["scale"],
                weight_q=None if weight_q is None else frozen_array(weight_q, np.int32),
                encoding=encoding,
                tiling=tiling,
                levels=arrays.get("levels"),
                notes=meta["notes"],
                output_order=arrays.get("output_order"),
                input_order=arrays.get("input_order"),
                stale_cells=arrays.get("stale_cells"),
                stale_levels=arrays.get("stale_levels"),
                channel_scale=_channel_scale(arrays.get("channel_scale"), arrays["weight"], meta["name"]),
            )
        )
    placement = manifest["placement"]
    return Program(
        model=blobs["model.onnx"],
        graph=onnx.load_model_from_string(blobs["graph.onnx"]),
        layers=tuple(layers),
        options=CompileOptions(**manifest["options"]),
        hardware=Hardware(**manifest["hardware"]),
        history=tuple(PassRecord(**record) for record in manifest["passes"]),
        placement=None if placement is None else nx.node_link_graph(placement, edges="edges"),
        digital_nodes=tuple(manifest["digital_nodes"]),
        schedule=_schedule_from(manifest.get("schedule"), blobs),
    )


def _channel_scale(array: np.ndarray | None, weight: np.ndarray, layer: str) -> np.ndarray | None:
    """Per-output weight steps: [groups * Ng] finite and positive, or absent."""
    if array is None:
        return None
    outputs = int(weight.shape[0] * weight.shape[2]) if weight.ndim == 3 else -1
    if array.shape != (outputs,) or not np.issubdtype(array.dtype, np.floating) or not (np.isfinite(array).all() and (array > 0).all()):
        raise ValueError(f"layer '{layer}': channel_scale must be {outputs} finite positive floats, got {array.dtype} {list(array.shape)}")
    return array


def _schedule_from(meta: dict | None, blobs: dict[str, bytes]) -> Schedule | None:
    if meta is None:
        return None
    arrays = {name[len(SCHEDULE_PREFIX) : -len(".npy")]: _array(data) for name, data in blobs.items() if name.startswith(SCHEDULE_PREFIX)}
    return Schedule.from_manifest(meta, arrays)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _array(data: bytes) -> np.ndarray:
    array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    array.flags.writeable = False
    return array


def _compact_ints(array: np.ndarray) -> np.ndarray:
    largest = int(np.abs(array).max(initial=0))
    return array.astype(np.int8 if largest < 128 else np.int16 if largest < 32768 else np.int32)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xcompile")
    except PackageNotFoundError:
        return "unknown"
