"""mapping.bin: one self-contained, versioned, integrity-checked file (docs/format.md).

An uncompressed zip of: `manifest.json` (options, hardware, passes, layers, tiles, placement
graph, the SHA-256 of every other member), `model.onnx` (the original model), `graph.onnx` (the
runtime graph), `arrays/*.npy` (cell levels, tiles, orders; never pickled) and `manifest.sha256`
(the digest of the manifest). Written to a temporary file and renamed into place, so the target
is complete or absent; loading validates every member (xcompile/validate.py).
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

from xcompile.config import CompileOptions, Hardware
from xcompile.errors import XCompileError
from xcompile.fileio import atomic_output
from xcompile import validate
from xcompile.ir import Layer, Program
from xcompile.placement import placement_graph
from xcompile.validate import ENCODING_ARRAYS as _ENCODING_ARRAYS, MANIFEST, MANIFEST_DIGEST, SCHEDULE_PREFIX
from xcompile.validate import TILING_ARRAYS as _TILING_ARRAYS

FORMAT = "xcompile-mapping"
FORMAT_VERSION = 3  # 2: weights derived from the levels, not stored; validated on load. 3: digital_ops (was digital_nodes)
_LAYER_ARRAYS = ("bias", "levels", "output_order", "input_order", "stale_cells", "stale_levels", "channel_scale")


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
        "digital_ops": list(program.digital_ops),
        "layers": layers_meta,
        "placement": nx.node_link_data(placement_graph(program), edges="edges"),  # for tools reading the zip
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
    """Read and validate a mapping (xcompile/validate.py): refused with one line unless every
    member passes, before anything in it runs."""
    source = Path(path)
    where = f"mapping '{source}'"
    if not source.is_file():
        raise XCompileError(f"{where} does not exist" if not source.exists() else f"{where} is not a file")
    try:
        with zipfile.ZipFile(source) as archive:
            validate.check_container(archive, source.stat().st_size)
            names = set(archive.namelist())
            if MANIFEST not in names or MANIFEST_DIGEST not in names:
                raise XCompileError(f"{where} is not an xcompile mapping (no manifest)")
            manifest_bytes = archive.read(MANIFEST)
            if hashlib.sha256(manifest_bytes).hexdigest() != archive.read(MANIFEST_DIGEST).decode(errors="replace").strip():
                raise XCompileError(f"{where} is corrupt: the manifest does not match its digest")
            manifest = validate.parse_manifest(manifest_bytes)
            _check_format(manifest, where)
            validate.check_manifest_keys(manifest)
            blobs = {}
            for name, digest in validate.expected_members(manifest, names).items():
                data = archive.read(name)
                if hashlib.sha256(data).hexdigest() != digest:
                    raise XCompileError(f"{where} is corrupt: member '{name}' does not match its digest")
                blobs[name] = data
        return Mapping(validate.build_program(manifest, blobs))
    except validate.Invalid as exc:
        raise XCompileError(f"{where} is invalid: {exc}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        raise XCompileError(f"{where} is not a readable xcompile mapping (truncated or damaged): {exc}") from None


def _check_format(manifest: Any, where: str) -> None:
    if manifest.get("format") != FORMAT:
        raise XCompileError(f"{where} is not an xcompile mapping")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise XCompileError(
            f"{where} has format version {version!r}; this xcompile ({_version()}) reads version {FORMAT_VERSION}: recompile the model"
        )


def _layer_to_manifest(layer: Layer) -> tuple[dict, dict[str, np.ndarray]]:
    """A layer's manifest entry and arrays. Its weights are not stored: the loader derives them
    from the cell levels, so what a loaded mapping shows is what its cells compute."""
    meta = {
        "index": layer.index,
        "name": layer.name,
        "node_name": layer.node_name,
        "op_type": layer.op_type,
        "kind": layer.kind,
        "geometry": layer.geometry,
        "weight_shape": list(layer.weight.shape),
        "input_name": layer.input_name,
        "output_name": layer.output_name,
        "scale": layer.scale,
        "notes": layer.notes,
        "encoding": None,
        "tiling": None,
    }
    arrays = {name: getattr(layer, name) for name in _LAYER_ARRAYS if getattr(layer, name) is not None}
    if layer.encoding is not None:
        enc = layer.encoding
        meta["encoding"] = {"name": enc.name, "columns_per_output": enc.columns_per_output, "shared_columns": enc.shared_columns}
        arrays.update({f"encoding.{name}": getattr(enc, name) for name in _ENCODING_ARRAYS})
    if layer.tiling is not None:
        meta["tiling"] = {"rows": layer.tiling.rows, "cols": layer.tiling.cols}
        arrays.update({f"tiling.{name}": getattr(layer.tiling, name) for name in _TILING_ARRAYS})
    return meta, arrays


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xcompile")
    except PackageNotFoundError:
        return "unknown"
