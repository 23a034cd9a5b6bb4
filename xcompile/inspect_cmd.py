"""`xcompile inspect`: what went where in a mapping, as a table or JSON, and the files that show it
(the placement graph, its picture, the writes of a schedule). docs/inspect.md documents it all.

Files are announced on stderr ("wrote FILE (...)"), so `--json` output on stdout stays JSON.
Only argparse at import: `xcompile --help` builds this parser without loading the compiler.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> None:
    """The `inspect` subcommand."""
    p = sub.add_parser("inspect", help="show what went where in a mapping")
    p.add_argument("mapping", help="mapping file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (keys: docs/inspect.md)")
    p.add_argument("--graph", metavar="FILE", help="write the placement graph (.graphml, .dot, .gv or .json)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the physical crossbars, cells coloured by layer; rounds with a schedule (.png, .pdf or .svg; needs matplotlib)")
    p.add_argument("--calibration", metavar="DATA", help="'digits' (its calibration split) or an .npz with x: adds the read-energy proxy per layer")
    p.add_argument("--writes-plot", metavar="FILE.png", help="plot the cell writes per physical crossbar and per round (needs a schedule)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from xcompile.artifact import load
    from xcompile.placement import placement_graph
    from xcompile.report import check_plot_path, format_summary, write_graph, write_placement_plot

    if args.plot:
        check_plot_path(args.plot)  # a wrong suffix is refused before any work
    mapping = load(args.mapping)
    info = mapping.summary()
    if args.calibration:
        from xcompile.data import load_calibration
        from xcompile.runtime.session import Session

        x = load_calibration(args.calibration)[0]
        session = Session(mapping)
        name = session.get_inputs()[0].name
        energy = session.read_energy({name: x[:256]})
        for layer in info["layers"]:
            layer["read_energy"] = energy[layer["name"]]
        info["totals"]["read_energy"] = sum(energy.values())
    if args.graph:
        graph = placement_graph(mapping.program)
        write_graph(graph, args.graph)
        _wrote(args.graph, f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges")
    if args.plot:
        _wrote(args.plot, write_placement_plot(mapping.program, args.plot))
    if args.writes_plot:
        from xcompile.reprogramming import write_writes_plot

        write_writes_plot(mapping.program.schedule, args.writes_plot)
        _wrote(args.writes_plot, "cell writes per crossbar and per round")
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def _wrote(path: str, what: str) -> None:
    print(f"wrote {path} ({what})", file=sys.stderr)
