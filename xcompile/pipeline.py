"""The pass pipeline: front end, then each pass in order, each recorded with its options."""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import onnx
from tqdm.auto import tqdm

from xcompile.artifact import Mapping
from xcompile.checks import check_layer_has_weights
from xcompile.config import split_options
from xcompile.coverage import coverage, describe
from xcompile.frontend import extract_layers, load_model
from xcompile.errors import XCompileError
from xcompile.ir import PassRecord, Program
from xcompile.passes import assign, encode, quantize, remap, schedule, tile
from xcompile.probe import Calibration

PIPELINE = (quantize, remap, encode, tile, assign, schedule)


def compile_model(
    source: str | os.PathLike | onnx.ModelProto, *, progress: bool | None = None, calibration=None,
    strict: bool = False, allow_empty: bool = False, **options: Any,
) -> Mapping:
    """Compile an ONNX model (path or ModelProto) for crossbars; options as in `xcompile --help`.

    progress: show a progress bar (None: only when stderr is a terminal).
    calibration: data the data-driven passes measure the model on (remap='dynamic', or
    sensitivity='taylor' / 'perturbation'): 'digits', an .npz with x (and labels y), (x, y) or x.
    strict: a weight-bearing op left digital is an error (else a warning names it).
    allow_empty: compile a model with no crossbar layer (it then runs on ONNX Runtime alone); without
    it such a model is an error, as it is usually the wrong file.
    """
    compile_options, hardware = split_options(options)
    if compile_options.needs_calibration and calibration is None:
        mode = "remap 'dynamic'" if compile_options.remap == "dynamic" else f"sensitivity {compile_options.sensitivity!r}"
        raise XCompileError(f"{mode} measures the model on data: give calibration inputs (--calibration FILE.npz with x and labels y, or 'digits')")
    data = Calibration.load(calibration) if compile_options.needs_calibration else None
    model = load_model(source)
    graph, layers, digital = extract_layers(model)
    for layer in layers:
        check_layer_has_weights(layer)
    program = Program(
        model=model.SerializeToString(),
        graph=graph,
        layers=tuple(layers),
        options=compile_options,
        hardware=hardware,
        digital_nodes=tuple(digital),
    )
    steps = len(PIPELINE) * max(1, len(layers))
    with tqdm(total=steps, desc="compiling", unit="step", disable=None if progress is None else not progress, leave=False) as bar:
        for compiler_pass in PIPELINE:
            started = time.perf_counter()
            if compiler_pass is remap:
                result = compiler_pass.run(program, progress=bar.update, calibration=data)
            else:
                result = compiler_pass.run(program, progress=bar.update)
            record = PassRecord(
                name=compiler_pass.NAME,
                options=_pass_options(compiler_pass.NAME, result.program, data),
                changed=result.changed,
                seconds=round(time.perf_counter() - started, 6),
            )
            program = dataclasses.replace(result.program, history=program.history + (record,))
    _check_coverage(program, strict, allow_empty)
    for layer in program.layers:
        if layer.notes.get("acm_clipped_cells"):
            warnings.warn(
                f"layer '{layer.name}': ACM clipped {layer.notes['acm_clipped_cells']} cells whose suffix sums overflow the "
                f"cell range (weight RMSE {layer.notes['acm_weight_rmse']:.3g}); acm_fit='scale' avoids it",
                stacklevel=2,
            )
    if not compile_options.ideal and compile_options.weight_scale == "layer":
        for layer in program.layers:
            if layer.notes.get("rounded_to_zero", 0) > 0.5:
                warnings.warn(
                    f"layer '{layer.name}': one {compile_options.weight_bits}-bit scale per layer rounds "
                    f"{layer.notes['rounded_to_zero']:.0%} of its nonzero weights to zero; --weight-scale channel "
                    "gives each output its own scale",
                    stacklevel=2,
                )
    return Mapping(program)


def _check_coverage(program: Program, strict: bool, allow_empty: bool) -> None:
    """Never a silent skip: weight-bearing ops left digital are named (an error with strict), and a
    model with nothing on crossbars is an error unless allowed."""
    info = coverage(program)
    left = info["left_digital"]
    shown = "; ".join(f"{e['node']} ({e['op_type']}, {e['weights']:,} weights): {e['reason']}" for e in left[:5])
    shown += f"; and {len(left) - 5} more (xcompile inspect lists them)" if len(left) > 5 else ""
    if not program.layers and not allow_empty:
        raise XCompileError(
            "the model has nothing to map onto crossbars: no MVM layer (Gemm, MatMul, Conv, ConvTranspose, LSTM, GRU, "
            "RNN or their quantised forms with constant weights)"
            + (f" (left digital: {shown})" if left else "")
            + "; allow_empty (--allow-empty) compiles it anyway"
        )
    if left:
        if strict:
            raise XCompileError(f"strict: {describe(info)}: {shown}")
        warnings.warn(f"{describe(info)}: {shown}", stacklevel=3)


def _pass_options(name: str, program: Program, calibration: Calibration | None) -> dict[str, Any]:
    """The options (and data) a pass read, so the artifact says how every step was made."""
    opts, hw = program.options, program.hardware
    return {
        "quantize": {"weight_bits": opts.weight_bits, "weight_scale": opts.weight_scale, "ideal": opts.ideal},
        "remap": {
            "remap": opts.remap, "sensitivity": opts.sensitivity, "remap_rows": opts.remap_rows, "r_wire": hw.r_wire, "r_source": hw.r_source, "r_sink": hw.r_sink,
            "calibration": None if calibration is None else calibration.describe(),
        },
        "encode": {"encoding": opts.encoding, "acm_fit": opts.acm_fit, "cell_bits": opts.cell_bits},
        "tile": {"rows": hw.rows, "cols": hw.cols},
        "assign": {"cell_bits": opts.cell_bits, "g_on": hw.g_on, "g_off": hw.g_off},
        "schedule": {
            "crossbars": opts.crossbars, "schedule": opts.schedule, "stuck_fraction": opts.stuck_fraction,
            "stuck_slices": opts.stuck_slices, "seed": opts.seed,
        },
    }[name]
