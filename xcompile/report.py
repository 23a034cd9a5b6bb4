"""What went where: the inspection summary of a compiled program (text and JSON), graph export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import networkx as nx

from xcompile.errors import XCompileError
from xcompile.fileio import atomic_output
from xcompile import reprogramming
from xcompile.coverage import coverage, describe
from xcompile.ir import Program

GRAPH_FORMATS = (".graphml", ".dot", ".gv", ".json")


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
        "digital_ops": list(program.digital_nodes),
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


def write_graph(program: Program, path: str | os.PathLike) -> Path:
    """Write the placement graph as GraphML, DOT or node-link JSON, chosen by the file suffix."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in GRAPH_FORMATS:
        raise XCompileError(f"graph file '{target}' must end in one of {', '.join(GRAPH_FORMATS)}")
    graph = program.placement if program.placement is not None else nx.DiGraph()
    with atomic_output(target) as temp:
        if suffix == ".graphml":
            nx.write_graphml(graph, temp)
        elif suffix == ".json":
            temp.write_text(json.dumps(nx.node_link_data(graph, edges="edges"), indent=1))
        else:
            nx.drawing.nx_pydot.write_dot(_quoted(graph), temp)
    return target


def _quoted(graph: nx.DiGraph) -> nx.DiGraph:
    """pydot needs node names with '/' or '.' quoted."""
    return nx.relabel_nodes(graph, {n: f'"{n}"' for n in graph.nodes})
