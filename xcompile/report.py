"""What went where: the inspection summary of a compiled program (text and JSON), the placement
graph's export and its picture."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from xcompile.errors import XCompileError
from xcompile.fileio import atomic_output
from xcompile import reprogramming
from xcompile.coverage import coverage, describe
from xcompile.ir import Program
from xcompile.placement import placement_graph

GRAPH_FORMATS = (".graphml", ".dot", ".gv", ".json")
PLOT_FORMATS = (".png", ".pdf", ".svg")
PLOT_CROSSBARS = 64  # crossbars the placement plot draws at most
PLOT_ROUNDS = 16  # with a schedule: the rounds it draws at most,
PLOT_ROUND_CROSSBARS = 16  # and the crossbars per round
PLOT_LEGEND = 24  # layers its legend lists at most


def summary(program: Program) -> dict[str, Any]:
    """Per-layer and total figures; the keys are documented in docs/inspect.md and stay stable."""
    hw = program.hardware
    cells_per_crossbar = hw.rows * hw.cols
    layers = []
    for layer in program.layers:
        tiling, enc = layer.tiling, layer.encoding
        rows_used = tiling.row_range[:, 1] - tiling.row_range[:, 0]
        outs = tiling.out_range[:, 1] - tiling.out_range[:, 0]
        columns = outs * enc.columns_per_output + enc.shared_columns
        cells_used = int((rows_used * columns).sum())
        cells_total = int(tiling.count * cells_per_crossbar)
        per_vector = int(columns.sum()) * _reads_per_vector(hw)
        vectors = layer.notes.get("vectors_per_sample")
        layers.append(
            {
                "name": layer.name,
                "op_type": layer.op_type,
                "kind": layer.kind,
                "rows": layer.rows_in,
                "outputs": layer.outputs,
                "groups": layer.groups,
                "weights": int(layer.weight.size),
                "tiles": tiling.count,
                "crossbars": int(len(set(tiling.crossbar.tolist()))),
                "columns": int(columns.sum()),
                "cells_used": cells_used,
                "cells_total": cells_total,
                "utilisation": round(cells_used / cells_total, 6) if cells_total else 0.0,
                "encoding": enc.name,
                "scale": layer.scale,
                "adc_conversions_per_vector": per_vector,
                "vectors_per_sample": vectors,
                "adc_conversions_per_inference": None if vectors is None else per_vector * vectors,
                "notes": {k: v for k, v in layer.notes.items() if k != "vectors_per_sample"},
                "output_order": None if layer.output_order is None else layer.output_order.tolist(),
                "input_order": None if layer.input_order is None else layer.input_order.tolist(),
            }
        )
    crossbars = set()
    for layer in program.layers:
        crossbars.update(layer.tiling.crossbar.tolist())
    used = sum(l["cells_used"] for l in layers)
    total = sum(l["cells_total"] for l in layers)
    return {
        "hardware": program.hardware.to_dict(),
        "options": program.options.to_dict(),
        "passes": [{"name": r.name, "options": r.options, "changed": r.changed, "seconds": r.seconds} for r in program.history],
        "layers": layers,
        "totals": {
            "layers": len(layers),
            "weights": sum(l["weights"] for l in layers),
            "tiles": sum(l["tiles"] for l in layers),
            "crossbars": len(crossbars),
            "cells_used": used,
            "cells_total": total,
            "utilisation": round(used / total, 6) if total else 0.0,
            "columns": sum(l["columns"] for l in layers),
            "adc_conversions_per_inference": None
            if any(l["adc_conversions_per_inference"] is None for l in layers)
            else sum(l["adc_conversions_per_inference"] for l in layers),
        },
        "digital_ops": list(program.digital_ops),
        "coverage": coverage(program),
        "schedule": reprogramming.summary(program.schedule),
    }


def _reads_per_vector(hw) -> int:
    """Array reads (so ADC conversions per column) one non-negative input vector takes."""
    return hw.dac_bits if hw.input_mode == "bit_serial" else 1


def format_summary(info: dict[str, Any]) -> str:
    hw, opts = info["hardware"], info["options"]
    mode = "ideal (float weights)" if opts["ideal"] else f"{opts['weight_bits']}-bit weights, {opts['cell_bits']}-bit cells"
    lines = [
        f"hardware: {hw['rows']}x{hw['cols']} crossbars, G {hw['g_off']:.3g}..{hw['g_on']:.3g} S, V_read {hw['v_read']} V",
        f"          {_describe_nonidealities(hw)}",
        f"mapping:  {mode}, {opts['encoding']} encoding",
        "",
    ]
    header = (
        f"{'layer':<28} {'op':<13} {'rows x outputs':>15} {'grp':>4} {'tiles':>6} {'xbars':>6} {'columns':>8} "
        f"{'cells used':>12} {'util':>7} {'ADC conv/inference':>19}"
    )
    lines += [header, "-" * len(header)]
    for l in info["layers"]:
        shape = f"{l['rows']} x {l['outputs']}"
        conversions = "?" if l["adc_conversions_per_inference"] is None else f"{l['adc_conversions_per_inference']:,}"
        lines.append(
            f"{l['name'][:28]:<28} {l['op_type']:<13} {shape:>15} {l['groups']:>4} {l['tiles']:>6} {l['crossbars']:>6} "
            f"{l['columns']:>8,} {l['cells_used']:>12,} {l['utilisation']:>7.1%} {conversions:>19}"
        )
    t = info["totals"]
    lines += [
        "-" * len(header),
        f"{'total':<28} {t['layers']:<13} {t['weights']:>15,} {'':>4} {t['tiles']:>6} {t['crossbars']:>6} {t['columns']:>8,} "
        f"{t['cells_used']:>12,} {t['utilisation']:>7.1%} "
        f"{'?' if t['adc_conversions_per_inference'] is None else format(t['adc_conversions_per_inference'], ','):>19}",
        *(
            [f"read-energy proxy (sum of G V^2 per inference, W x read time): {t['read_energy']:.4g}"]
            if "read_energy" in t
            else []
        ),
        *_remap_lines(info),
        *reprogramming.format_schedule(info.get("schedule")),
        "",
        *_coverage_lines(info.get("coverage")),
        f"digital (ONNX Runtime): {', '.join(info['digital_ops']) or 'nothing'}",
        "passes: " + " -> ".join(p["name"] for p in info["passes"]),
    ]
    return "\n".join(lines)


def _coverage_lines(info: dict[str, Any] | None) -> list[str]:
    """The share of weights on crossbars, and every weight-bearing op left digital with its reason."""
    if info is None:
        return []
    lines = [f"coverage: {describe(info)} ({info['weights_on_crossbars']:,} of "
             f"{info['weights_on_crossbars'] + info['weights_digital']:,} weight elements)"]
    if info["fraction_on_crossbars"] is None:
        lines[0] = "coverage: NOTE nothing is mapped: the model has no weight-bearing op xcompile found"
    for entry in info["left_digital"]:
        lines.append(f"  LEFT DIGITAL {entry['node']} ({entry['op_type']}, {entry['weights']:,} weights): {entry['reason']}")
    return lines


def _remap_lines(info: dict[str, Any], shown: int = 16) -> list[str]:
    """Which layer output sits at each crossbar output position, for remapped layers."""
    remapped = [l for l in info["layers"] if l["output_order"] is not None]
    if not remapped:
        return []
    opts = info["options"]
    lines = ["", f"remap {opts['remap']} ({opts['sensitivity']}): crossbar output position -> layer output"]
    for l in remapped:
        order = l["output_order"]
        more = f" ... ({len(order)} in all; --json lists every one)" if len(order) > shown else ""
        lines.append(f"  {l['name'][:28]:<28} {' '.join(map(str, order[:shown]))}{more}")
    return lines


def _describe_nonidealities(hw: dict[str, Any]) -> str:
    wires = "ideal wires" if not (hw["r_wire"] or hw["r_source"] or hw["r_sink"]) else (
        f"wires {hw['r_wire']} ohm/segment, source {hw['r_source']} ohm, sink {hw['r_sink']} ohm"
    )
    dac = f"DAC {hw['dac_bits']} bit ({hw['dac_range']}, {hw['input_mode']})" if hw["dac_bits"] else "ideal DAC"
    adc = f"ADC {hw['adc_bits']} bit ({hw['adc_range']})" if hw["adc_bits"] else "ideal ADC"
    devices = f"{hw['variation']} variation {hw['sigma']}" if hw["sigma"] else "no variation"
    if hw["stuck_off_rate"] or hw["stuck_on_rate"]:
        devices += f", stuck off/on {hw['stuck_off_rate']}/{hw['stuck_on_rate']}"
    if hw["read_noise"]:
        devices += f", read noise {hw['read_noise']}"
    return f"{wires}; {dac}, {adc}; {devices}"


def write_graph(graph: nx.DiGraph, path: str | os.PathLike) -> Path:
    """Write the placement graph (xcompile/placement.py) as GraphML, DOT or node-link JSON, chosen by the file suffix."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in GRAPH_FORMATS:
        raise XCompileError(f"graph file '{target}' must end in one of {', '.join(GRAPH_FORMATS)}")
    with atomic_output(target) as temp:
        if suffix == ".graphml":
            nx.write_graphml(graph, temp)
        elif suffix == ".json":
            temp.write_text(json.dumps(nx.node_link_data(graph, edges="edges"), indent=1))
        else:
            nx.drawing.nx_pydot.write_dot(_quoted(graph), temp)
    return target


def check_plot_path(path: str | os.PathLike) -> Path:
    """The placement picture's file, refused before any work unless its suffix names a format."""
    target = Path(path)
    if target.suffix.lower() not in PLOT_FORMATS:
        raise XCompileError(f"placement plot '{target}' must end in one of {', '.join(PLOT_FORMATS)}")
    return target


def write_placement_plot(program: Program, path: str | os.PathLike) -> str:
    """Draw the physical crossbars, each a rows x cols image whose used cells take their tile's
    layer colour (unused cells stay grey, so utilisation shows): a grid of crossbars, or with a
    reprogramming schedule one row of crossbars per round. Large chips are cut to the first
    PLOT_CROSSBARS crossbars (PLOT_ROUNDS rounds of PLOT_ROUND_CROSSBARS); the title says so.
    Returns what it drew, in words."""
    target = check_plot_path(path)
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise XCompileError("the placement plot needs matplotlib: pip install matplotlib") from None
    graph = placement_graph(program)
    layers = [data["layer"] for _, data in graph.nodes(data=True) if data["kind"] == "input"]
    tiles = [data for _, data in graph.nodes(data=True) if data["kind"] == "tile"]
    if not tiles:
        raise XCompileError(f"placement plot '{target}': the mapping has no crossbar tiles to draw (it runs on ONNX Runtime alone)")
    grid = _PlotGrid(graph.graph["rows"], graph.graph["cols"], program.schedule, len(tiles))
    colour = {name: i for i, name in enumerate(layers)}
    image = grid.image()
    used = np.zeros((grid.down, grid.across), dtype=np.int64)  # cells used per drawn crossbar
    loaded = np.zeros((grid.down, grid.across), dtype=bool)
    for tile in tiles:
        place = grid.place(tile)
        if place is not None:
            top, left = grid.corner(*place)
            image[top : top + tile["rows_used"], left : left + tile["cols_used"]] = colour[tile["layer"]]
            used[place] += tile["rows_used"] * tile["cols_used"]
            loaded[place] = True
    palette = _layer_colours(colormaps, len(layers))
    figure = Figure(figsize=grid.figsize(legend=bool(layers)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.imshow(image + 2, cmap=ListedColormap(["white", "0.88", *palette]), vmin=0, vmax=len(palette) + 1, interpolation="nearest")
    axes.set_frame_on(False)
    axes.set_xticks([])
    axes.set_yticks([])
    grid.label(axes, used, loaded)
    cells = sum(tile["rows_used"] * tile["cols_used"] for tile in tiles)
    title = (
        f"{_count(len(tiles), 'tile')} of {_count(len(layers), 'layer')} {grid.where()} of {grid.rows}x{grid.cols} cells\n"
        f"{_share(cells, len(tiles) * grid.rows * grid.cols)} of the tiles' cells used (grey: unused)"
    )
    figure.suptitle(title + (f"; {grid.cut()}" if grid.cut() else ""), fontsize=10)
    if layers:
        count = {name: 0 for name in layers}
        for tile in tiles:
            count[tile["layer"]] += 1
        listed = layers[:PLOT_LEGEND]
        heading = "layers" + (f" (first {len(listed)} of {len(layers)})" if len(layers) > len(listed) else "")
        labels = [f"{name} ({_count(count[name], 'tile')})" for name in listed]
        figure.legend([Patch(color=palette[colour[n]]) for n in listed], labels, loc="outside right upper", title=heading, fontsize=8, frameon=False)
    with atomic_output(target) as temp:
        figure.savefig(temp, format=target.suffix.lower().lstrip("."), dpi=120, bbox_inches="tight")
    return f"{grid.drawn()} of {grid.rows}x{grid.cols} cells, {_count(len(tiles), 'tile')} of {_count(len(layers), 'layer')}" + (
        f"; {grid.cut()}" if grid.cut() else ""
    )


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"


def _share(part: int, whole: int) -> str:
    """A percentage that never rounds a used cell away to 0%."""
    return "<1%" if 0 < part < 0.005 * whole else f"{part / max(1, whole):.0%}"


class _PlotGrid:
    """Where the placement plot draws each crossbar: one row per round with a schedule, else a
    near-square grid in crossbar order; a gap above each crossbar holds its label."""

    def __init__(self, rows: int, cols: int, schedule, tiles: int):
        self.rows, self.cols, self.schedule = rows, cols, schedule
        self.crossbars = schedule.crossbars if schedule is not None else tiles
        self.rounds = schedule.rounds if schedule is not None else 1
        if schedule is not None:
            self.across, self.down = min(self.crossbars, PLOT_ROUND_CROSSBARS), min(self.rounds, PLOT_ROUNDS)
            self.shown = self.across * self.down
        else:
            self.shown = min(self.crossbars, PLOT_CROSSBARS)
            self.across = min(self.shown, max(1, math.ceil(math.sqrt(1.6 * self.shown * rows / cols))))
            self.down = max(1, math.ceil(self.shown / self.across))
        self.gap = max(1, round(0.25 * max(rows, cols)))  # room for the labels, a quarter of a crossbar

    def corner(self, down: int, across: int) -> tuple[int, int]:
        return self.gap + down * (self.rows + self.gap), across * (self.cols + self.gap)

    def image(self) -> np.ndarray:
        """-2 between crossbars, -1 on their cells (unused until a tile is drawn)."""
        image = np.full((self.down * (self.rows + self.gap), self.across * (self.cols + self.gap) - self.gap), -2)
        for index in range(self.shown):
            top, left = self.corner(*self._panel(index))
            image[top : top + self.rows, left : left + self.cols] = -1
        return image

    def _panel(self, index: int) -> tuple[int, int]:
        return divmod(index, self.across)

    def place(self, tile: dict) -> tuple[int, int] | None:
        """(row, column) of the crossbar panel a tile node is drawn on, None if not drawn."""
        if self.schedule is not None:
            place = tile["round"], tile["crossbar"]
        elif tile["crossbar"] < self.shown:
            place = self._panel(tile["crossbar"])
        else:
            return None
        return place if place[0] < self.down and place[1] < self.across else None

    def label(self, axes, used: np.ndarray, loaded: np.ndarray) -> None:
        """Each crossbar's number and share of cells used (or idle, in a round that loads no tile on
        it), above it; with a schedule, the rounds at the left."""
        size = 8 if self.across <= 12 else 6
        for index in range(self.shown):
            down, across = self._panel(index)
            top, left = self.corner(down, across)
            number = across if self.schedule is not None else index
            share = _share(used[down, across], self.rows * self.cols) if loaded[down, across] else "idle"
            axes.text(left + (self.cols - 1) / 2, top - 0.5, f"xbar {number}: {share}", ha="center", va="bottom", fontsize=size)
        if self.schedule is not None:
            centres = [self.corner(r, 0)[0] + (self.rows - 1) / 2 for r in range(self.down)]
            axes.set_yticks(centres, [f"round {r}" for r in range(self.down)], fontsize=size + 1)
            axes.tick_params(length=0)

    def figsize(self, legend: bool) -> tuple[float, float]:
        panel = max(0.6, min(1.8, 13.0 / self.across, 12.0 / self.down))  # inches per crossbar
        scale = panel / max(self.rows, self.cols)
        width = max(6.0, (self.across * (self.cols + self.gap)) * scale) + (2.8 if legend else 0.4)
        height = (self.down * (self.rows + self.gap)) * scale + 0.9
        return width, height

    def where(self) -> str:
        crossbars = _count(self.crossbars, "crossbar")
        return f"in {_count(self.rounds, 'round')} on {crossbars}" if self.schedule is not None else f"on {crossbars}"

    def drawn(self) -> str:
        shown = _count(self.across if self.schedule is not None else self.shown, "crossbar")
        return f"{shown} x {_count(self.down, 'round')}" if self.schedule is not None else shown

    def cut(self) -> str:
        """What a capped picture leaves out, or '' when it shows everything."""
        parts = []
        if self.schedule is not None and self.rounds > self.down:
            parts.append(f"first {self.down} of {self.rounds} rounds")
        if self.crossbars > (self.across if self.schedule is not None else self.shown):
            parts.append(f"first {self.across if self.schedule is not None else self.shown} of {self.crossbars} crossbars")
        return " and ".join(parts) + (" drawn" if parts else "")


def _layer_colours(colormaps, count: int) -> list:
    """One distinct colour per layer: the qualitative tables while they last, then a sampled rainbow."""
    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, count)]


def _quoted(graph: nx.DiGraph) -> nx.DiGraph:
    """pydot needs node names with '/' or '.' quoted."""
    return nx.relabel_nodes(graph, {n: f'"{n}"' for n in graph.nodes})
