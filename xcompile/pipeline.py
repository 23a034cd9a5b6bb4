"""The pass pipeline: front end, then each pass in order, each recorded with its options."""

from __future__ import annotations

import os
import warnings
from typing import Any

import onnx

from xcompile.artifact import Mapping
from xcompile.checks import check_layer_has_weights
from xcompile.config import split_options
from xcompile.coverage import coverage, describe
from xcompile.frontend import extract_layers, load_model
from xcompile.errors import XCompileError
from xcompile.ir import Program
from xcompile.passes.assign import Assign
from xcompile.passes.encode import Encode
from xcompile.passes.infra import PassManager
from xcompile.passes.quantize import Quantize
from xcompile.passes.remap import Remap
from xcompile.passes.schedule import Reprogram
from xcompile.passes.sort_sections import SortSections
from xcompile.passes.tile import Tile
from xcompile.probe import Calibration

PIPELINE = PassManager((Quantize(), Remap(), Encode(), SortSections(), Tile(), Assign(), Reprogram()))


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
        digital_ops=tuple(digital),
    )
    program = PIPELINE(program, calibration=data, simulator=_simulator, progress=progress)
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


def _simulator(program: Program, feeds: dict, hardware):
    """The runtime's compile-time simulator (imported only by a pass that simulates)."""
    from xcompile.runtime.simulator import Simulator

    return Simulator(program, feeds, hardware)
