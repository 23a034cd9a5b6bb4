"""The `xcompile` command: compile (default), inspect, run.

One boundary for every failure (docs/errors.md): bad input is one line on stderr
and exit code 2; anything else is a bug, one line asking for a report and exit code 1 (the
traceback with `--debug`); Ctrl-C and SIGTERM exit 130, after the temporary files of an
unfinished output are removed. Nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from xcompile import inspect_cmd
from xcompile.config import CompileOptions, Hardware, option_flags
from xcompile.errors import XCompileError

COMMANDS = ("compile", "inspect", "run", "eval", "sweep", "presets", "train")

STRUCTURAL = ("rows", "cols")  # hardware keys fixed by the mapping: compile flags only


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut]  # a global flag, before or after the command
    argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "compile")  # `xcompile model.onnx -o mapping.bin`
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    warnings.showwarning = _show_warning
    restore = _handle_sigterm()
    try:
        return args.handler(args)
    except XCompileError as exc:
        return _fail(f"error: {exc}", 2, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, debug)
    except BrokenPipeError:  # `xcompile inspect m.bin | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except MemoryError:
        return _fail("error: out of memory (a smaller batch, model or crossbar may fit)", 2, debug)
    except Exception as exc:  # a bug: say so in one line, the traceback only when asked
        where = "" if debug else "; rerun with --debug for the traceback"
        return _fail(f"internal error: {type(exc).__name__}: {_one_line(exc)} (please report{where})", 1, debug)
    finally:
        restore()


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"xcompile: {_one_line(message)}", file=sys.stderr)
    return code


def _one_line(message) -> str:
    return " ".join(str(message).split())


_MAIN_PID = os.getpid()


def _raise_terminated(signum, frame) -> None:
    if os.getpid() != _MAIN_PID:  # a forked child inherited the handler: die as SIGTERM asks
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise KeyboardInterrupt  # like Ctrl-C, so that cleanup (`atomic_output`) runs on the way out


def _handle_sigterm():
    """Turn SIGTERM into KeyboardInterrupt (possible on the main thread only); return what undoes it."""
    global _MAIN_PID
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _MAIN_PID = os.getpid()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"xcompile: warning: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line like every other error."""

    def error(self, message: str):
        self.exit(2, f"xcompile: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="xcompile",
        description="Compile ONNX models onto resistive crossbars, inspect the mapping, run it.",
        epilog="`xcompile MODEL.onnx -o mapping.bin` is short for `xcompile compile MODEL.onnx -o mapping.bin`.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("compile", help="compile an ONNX model into mapping.bin")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("-o", "--output", required=True, help="mapping file to write")
    for name, flag, kind, text in option_flags(Hardware):
        if name in STRUCTURAL:
            p.add_argument(flag, type=kind, help=text)
    _hardware_args(p, defaults=True)
    for name, flag, kind, text in option_flags(CompileOptions):
        if kind is bool:
            p.add_argument(flag, action="store_const", const=True, help=text)
        else:
            p.add_argument(flag, type=kind, help=text)
    p.add_argument("--calibration", metavar="DATA", help="'digits' or an .npz with x (and labels y): data for remap dynamic / taylor / perturbation")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary line")
    p.add_argument("--strict", action="store_true", help="a weight-bearing op left digital is an error, not a warning")
    p.add_argument("--allow-empty", action="store_true", help="compile a model that has nothing to map onto crossbars")
    p.set_defaults(handler=_compile)

    inspect_cmd.add_parser(sub)

    p = sub.add_parser("run", help="run a mapping on inputs from .npy files")
    p.add_argument("mapping", help="mapping file")
    p.add_argument("-i", "--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input (repeat per input; NAME= may be left out for a one-input model)")
    p.add_argument("-o", "--output", metavar="OUT.npz", help="write the outputs here (default: print a summary)")
    p.add_argument("--seed", type=int, default=0, help="Monte-Carlo seed (device draws, read noise)")
    p.add_argument("--calibration", metavar="NAME=FILE.npy", action="append", default=[], help="inputs to calibrate converter ranges on")
    _hardware_args(p)
    p.set_defaults(handler=_run)

    p = sub.add_parser("eval", help="accuracy: float model vs crossbars over Monte-Carlo trials")
    p.add_argument("mapping", help="mapping file")
    p.add_argument("--dataset", required=True, help="'digits' or 'mnist' (shipped) or an .npz with x (inputs) and y (labels)")
    p.add_argument("--trials", type=int, default=1, help="Monte-Carlo trials (seeds seed .. seed+trials-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--calibration", metavar="FILE.npz", help="inputs (key x) to calibrate converter ranges on")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--breakdown", action="store_true", help="trials with each non-ideality alone and all together, without and with compensation")
    p.add_argument("--plot", metavar="FILE", help="with --breakdown: plot the drops (.png, .pdf or .svg; needs matplotlib)")
    _hardware_args(p)
    p.set_defaults(handler=_eval)

    p = sub.add_parser("sweep", help="accuracy over a grid of compile and hardware options, Monte-Carlo trials per point (docs/sweep.md)")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--grid", required=True, metavar="GRID.toml", help="[grid] option = [values, ...] to sweep, [fixed] option = value")
    p.add_argument("--dataset", required=True, help="'digits' or 'mnist' (shipped) or an .npz with x (inputs) and y (labels)")
    p.add_argument("--trials", type=int, default=1, help="Monte-Carlo trials per point (seeds seed .. seed+trials-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("-o", "--output", required=True, metavar="FOLDER", help="results folder; rerunning the same sweep resumes it")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run on a Dask cluster: its scheduler's address (tcp://host:8786), or 'local' to start a LocalCluster")
    p.add_argument("--workers", type=int, help="local worker processes, or the LocalCluster's workers (default: all cores; 1 runs in this process)")
    p.add_argument("--calibration", metavar="DATA", help="'digits' or an .npz with x (and labels y): data for points with remap dynamic / taylor / perturbation")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print the summary (one record per point) as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_sweep)

    p = sub.add_parser("presets", help="list the named hardware presets with every value and its source")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(handler=_presets)
    p = sub.add_parser("train", help="fine-tune an ONNX classifier for crossbars (needs the train extra: torch)")
    p.add_argument("model", help="ONNX model file (Conv / Gemm / MatMul, ReLU, pooling, Flatten)")
    p.add_argument("--wct", action="store_true", help="weight-constrained training: more cells at low conductance (docs/training.md)")
    p.add_argument("--dataset", required=True, help="training data: 'digits' / 'mnist' (their shipped calibration split) or an .npz with x and y")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="the fine-tuned model")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--strength", type=float, default=1.0, help="weight of the low-conductance penalty (0: plain fine-tuning)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_train)
    return parser


def _train(args) -> int:
    from xcompile.data import load_data
    from xcompile.fileio import atomic_output
    from xcompile.train import low_conductance_share, train_wct

    if not args.wct:
        raise XCompileError("train: choose the method: --wct (weight-constrained training, the only one so far)")
    x, y = load_data(args.dataset, "calib")
    trained = train_wct(args.model, x, y, epochs=args.epochs, strength=args.strength, seed=args.seed)
    with atomic_output(args.output) as temp:
        temp.write_bytes(trained.SerializeToString())
    shares = low_conductance_share(trained)
    print(f"wrote {args.output}: {len(shares)} weight tensors, low-conductance share (|w| <= 10% of the layer's max) "
          + ", ".join(f"{v['low_share']:.0%}" for v in shares.values()))
    return 0


def _hardware_args(p: argparse.ArgumentParser, defaults: bool = False) -> None:
    """The hardware flags; their defaults are shown where they are the defaults (compile), not
    where the mapping's hardware is (run, eval)."""
    group = p.add_argument_group("hardware (SI units; override the preset / file)")
    group.add_argument("--preset", help="named hardware (`xcompile presets` lists them with their values and sources)")
    group.add_argument("--hardware", metavar="FILE", help="hardware description (TOML)")
    for name, flag, kind, text in option_flags(Hardware, defaults):
        if name not in STRUCTURAL:
            group.add_argument(flag, type=kind, help=text)


def _hardware_options(args) -> dict:
    """The hardware the flags describe: preset or file first, then single flags on top."""
    if args.preset and args.hardware:
        raise XCompileError("give --preset or --hardware, not both")
    options = {name: getattr(args, name) for name, *_ in option_flags(Hardware) if getattr(args, name, None) is not None}
    if args.preset or args.hardware:
        options["hardware"] = args.preset or args.hardware
    return options


def _compile(args) -> int:
    from xcompile.coverage import describe
    from xcompile.pipeline import compile_model

    options = {name: getattr(args, name) for name, *_ in option_flags(CompileOptions) if getattr(args, name) is not None}
    options.update(_hardware_options(args))
    if args.sensitivity is not None and (args.remap or "none") in ("none", "sparse"):
        raise XCompileError(f"--sensitivity ranks outputs for --remap static, dynamic or chain; --remap {args.remap or 'none'} does not use it")
    if args.calibration and not (args.remap == "dynamic" or (args.remap not in (None, "none") and args.sensitivity in ("taylor", "perturbation"))):
        warnings.warn("--calibration is used only by --remap dynamic and by --sensitivity taylor / perturbation; ignored here", stacklevel=2)
    started = time.perf_counter()
    mapping = compile_model(
        args.model, progress=False if args.quiet else None, calibration=args.calibration,
        strict=args.strict, allow_empty=args.allow_empty, **options,
    )
    mapping.save(args.output)
    if not args.quiet:
        info = mapping.summary()
        totals = info["totals"]
        print(
            f"wrote {args.output}: {totals['layers']} MVM layers, {totals['tiles']} tiles on "
            f"{mapping.hardware.rows}x{mapping.hardware.cols} crossbars, "
            f"{totals['utilisation']:.1%} of cells used, {describe(info['coverage'])} "
            f"({time.perf_counter() - started:.2f} s)"
        )
    return 0


def _run(args) -> int:
    from xcompile.fileio import atomic_output
    from xcompile.runtime.session import Session

    from xcompile.artifact import load

    mapping = load(args.mapping)
    names = [v.name for v in mapping.program.graph.graph.input]
    feeds = _feeds(args.input, names, "--input")
    calibration = _feeds(args.calibration, names, "--calibration") if args.calibration else None
    session = Session(mapping, seed=args.seed, calibration=calibration, **_hardware_options(args))
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


def _eval(args) -> int:
    from xcompile.artifact import load
    from xcompile.data import load_calibration
    from xcompile.evaluate import evaluate

    calibration = load_calibration(args.calibration)[0] if args.calibration else None
    if args.plot and not args.breakdown:
        raise XCompileError("--plot draws the breakdown: give --breakdown too")
    if args.breakdown:
        return _breakdown(args, calibration)
    result = evaluate(
        load(args.mapping), args.dataset, trials=args.trials, seed=args.seed, batch_size=args.batch_size,
        calibration=calibration, **_hardware_options(args),
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"dataset {result['dataset']}: {result['samples']} samples, {result['trials']} trial(s) from seed {args.seed}")
    print(f"float model (ONNX Runtime): {result['float_accuracy']:.2%}")
    print(f"crossbars:                  {result['crossbar_accuracy_mean']:.2%} +- {result['crossbar_accuracy_std']:.2%}")
    print(f"drop:                       {result['drop_mean'] * 100:.2f} points")
    print(f"ADC conversions clipped:    {result['adc_clipped_mean']:.0f} per trial (mean)")
    return 0


def _breakdown(args, calibration) -> int:
    from xcompile.artifact import load
    from xcompile.evaluate import breakdown, format_breakdown, plot_breakdown

    result = breakdown(
        load(args.mapping), args.dataset, trials=args.trials, seed=args.seed, batch_size=args.batch_size,
        calibration=calibration, **_hardware_options(args),
    )
    if args.plot:
        plot_breakdown(result, args.plot)
    print(json.dumps(result, indent=2) if args.json else format_breakdown(result))
    return 0


def _sweep(args) -> int:
    from xcompile.sweep import load_grid, summarize, sweep

    table = sweep(
        args.model, args.grid, dataset=args.dataset, output=args.output, trials=args.trials, seed=args.seed,
        scheduler=args.scheduler, workers=args.workers, calibration=args.calibration, batch_size=args.batch_size,
        progress=False if args.quiet else None,
    )
    summary = summarize(table)
    if args.json:
        print(summary.to_json(orient="records", indent=2))
        return 0
    swept = [axis.column for axis in load_grid(args.grid, calibration=args.calibration).axes]
    shown = summary[["point", *swept]].copy()
    shown["accuracy"] = [f"{m:.2%} +- {s:.2%}" for m, s in zip(summary["accuracy_mean"], summary["accuracy_std"])]
    shown["drop (points)"] = (summary["drop_mean"] * 100).round(2)
    shown["adc clipped"] = summary["adc_clipped_mean"].round(0)
    for column in ("cells", "crossbars_used", "writes"):
        shown[column] = summary[column]
    print(f"{args.model} on {args.dataset}: {len(summary)} points x {args.trials} trial(s) from seed {args.seed}; "
          f"float model {summary['float_accuracy'].iloc[0]:.2%}")
    print(shown.to_string(index=False))
    resumed = len(summary) - table.attrs["computed"]
    print(f"wrote {Path(args.output) / 'table.csv'}, summary.csv and plots/ there"
          + (f" ({resumed} of {len(summary)} points were there already)" if resumed else ""))
    return 0


def _presets(args) -> int:
    from xcompile.config import Hardware
    from xcompile.presets import CATALOGUE, NOT_FOUND

    defaults = Hardware().to_dict()
    if args.json:
        records = [
            {"name": p.name, "description": p.description, "values": Hardware(**p.values).to_dict(), "sources": p.sources}
            for p in CATALOGUE.values()
        ]
        print(json.dumps({"presets": records, "not_found": NOT_FOUND}, indent=2))
        return 0
    for preset in CATALOGUE.values():
        hw = Hardware(**preset.values)
        print(f"{preset.name}: {preset.description}")
        print(f"  device: r_on {1 / hw.g_on:.4g} ohm, r_off {1 / hw.g_off:.4g} ohm, on/off ratio {hw.g_on / hw.g_off:.4g}")
        for key, value in preset.values.items():
            print(f"  {key} = {value!r}  ({preset.sources[key]})")
        rest = sorted(k for k in defaults if k not in preset.values)
        print(f"  everything else at its default: {', '.join(f'{k}={defaults[k]!r}' for k in rest)}")
    for name, why in NOT_FOUND.items():
        print(f"{name}: not shipped: {why}")
    return 0


def _feeds(items: list[str], names: list[str], flag: str) -> dict[str, np.ndarray]:
    from xcompile.data import read_npy

    feeds = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            if len(names) != 1:
                raise XCompileError(f"{flag} '{item}': the model has inputs {names}; say which one as NAME=FILE.npy")
            name, path = names[0], item
        feeds[name] = read_npy(path)
    return feeds


if __name__ == "__main__":
    sys.exit(main())
