"""The `xcompile` command: compile (default), inspect, run.

Bad input is one line on stderr and exit code 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from xcompile.errors import XCompileError

COMMANDS = ("compile", "inspect", "run")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "compile")  # `xcompile model.onnx -o mapping.bin`
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except XCompileError as exc:
        print(f"xcompile: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xcompile: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xcompile",
        description="Compile ONNX models onto resistive crossbars, inspect the mapping, run it.",
        epilog="`xcompile MODEL.onnx -o mapping.bin` is short for `xcompile compile MODEL.onnx -o mapping.bin`.",
    )
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("compile", help="compile an ONNX model into mapping.bin")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("-o", "--output", required=True, help="mapping file to write")
    p.add_argument("--ideal", action="store_true", help="float weights, no quantisation, no non-idealities")
    p.add_argument("--hardware", metavar="FILE", help="hardware description (TOML)")
    p.add_argument("--rows", type=int, help="crossbar rows (default 128)")
    p.add_argument("--cols", type=int, help="crossbar columns (default 128)")
    p.add_argument("--weight-bits", type=int, help="weight magnitude bits (default 8)")
    p.add_argument("--cell-bits", type=int, help="bits per cell (default 8)")
    p.add_argument("--encoding", help="signed-weight encoding: dual (default)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary line")
    p.set_defaults(handler=_compile)

    p = sub.add_parser("inspect", help="show what went where in a mapping")
    p.add_argument("mapping", help="mapping file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (keys: docs/inspect.md)")
    p.add_argument("--graph", metavar="FILE", help="write the placement graph (.graphml, .dot, .gv or .json)")
    p.set_defaults(handler=_inspect)

    p = sub.add_parser("run", help="run a mapping on inputs from .npy files")
    p.add_argument("mapping", help="mapping file")
    p.add_argument("-i", "--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input (repeat per input; NAME= may be left out for a one-input model)")
    p.add_argument("-o", "--output", metavar="OUT.npz", help="write the outputs here (default: print a summary)")
    p.set_defaults(handler=_run)
    return parser


def _compile(args) -> int:
    from xcompile.pipeline import compile_model

    options = {
        key: value
        for key, value in {
            "ideal": args.ideal or None,
            "hardware": args.hardware,
            "rows": args.rows,
            "cols": args.cols,
            "weight_bits": args.weight_bits,
            "cell_bits": args.cell_bits,
            "encoding": args.encoding,
        }.items()
        if value is not None
    }
    started = time.perf_counter()
    mapping = compile_model(args.model, progress=False if args.quiet else None, **options)
    mapping.save(args.output)
    if not args.quiet:
        totals = mapping.summary()["totals"]
        print(
            f"wrote {args.output}: {totals['layers']} MVM layers, {totals['tiles']} tiles on "
            f"{mapping.hardware.rows}x{mapping.hardware.cols} crossbars, "
            f"{totals['utilisation']:.1%} of cells used ({time.perf_counter() - started:.2f} s)"
        )
    return 0


def _inspect(args) -> int:
    from xcompile.artifact import load
    from xcompile.report import format_summary, write_graph

    mapping = load(args.mapping)
    info = mapping.summary()
    if args.graph:
        write_graph(mapping.program, args.graph)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def _run(args) -> int:
    from xcompile.fileio import atomic_output
    from xcompile.runtime.session import Session

    session = Session(args.mapping)
    names = [i.name for i in session.get_inputs()]
    feeds = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep:
            if len(names) != 1:
                raise XCompileError(f"--input '{item}': the model has inputs {names}; say which one as NAME=FILE.npy")
            name, path = names[0], item
        feeds[name] = _load_npy(path)
    outputs = session.run(None, feeds)
    out_names = [o.name for o in session.get_outputs()]
    if args.output:
        with atomic_output(args.output) as temp:
            with open(temp, "wb") as handle:
                np.savez(handle, **{n: np.asarray(v) for n, v in zip(out_names, outputs)})
        print(f"wrote {args.output}: {', '.join(out_names)}")
    else:
        for name, value in zip(out_names, outputs):
            value = np.asarray(value)
            print(f"{name}: shape {list(value.shape)} {value.dtype}")
            print(np.array2string(value, threshold=20, precision=5))
    return 0


def _load_npy(path: str) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise XCompileError(f"input file '{file}' does not exist")
    try:
        return np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise XCompileError(f"input file '{file}' is not a readable .npy array: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
