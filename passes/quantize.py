"""Quantise each layer's weights to signed integers of `weight_bits` magnitude bits.

weight_scale='layer': one symmetric scale per layer (max |w| maps to the top level).
weight_scale='channel': one scale per output (a crossbar column group): each output's max |w|
maps to the top level, and the runtime multiplies the recombined output by its own step, so a
layer whose outputs differ widely in magnitude keeps its small ones. Every encoding works on
the integers, so both are exact for dual, ACM and offset alike. In ideal mode the scales are
kept but the weights stay float, so cells hold exact values.
The note `rounded_to_zero` is the share of a layer's nonzero weights that one per-layer scale
rounds to zero; the pipeline warns when it is most of them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xcompile.ir import Layer, Program, frozen_array
from xcompile.passes.infra import Pass, PassContext, PassResult, PostconditionError


class Quantize(Pass):
    name = "quantize"
    options = ("weight_bits", "weight_scale", "ideal")

    def call(self, program: Program, context: PassContext) -> PassResult:
        opts = program.options
        top = 2**opts.weight_bits - 1
        layers = []
        for layer in program.layers:
            quantised = quantise(layer, top, opts.ideal, opts.weight_scale == "channel")
            notes = {**layer.notes, "rounded_to_zero": round(_rounded_to_zero(layer, top), 4)}
            layers.append(dataclasses.replace(quantised, notes=notes))
            context.step()
        return PassResult(program.replace_layers(layers), changed=True)

    def ensures(self, program: Program) -> None:
        top = 2**program.options.weight_bits - 1
        for layer in program.layers:
            if layer.scale is None:
                self.fail(f"layer '{layer.name}' has no scale", PostconditionError)
            if layer.weight_q is not None and int(np.abs(layer.weight_q).max(initial=0)) > top:
                self.fail(f"layer '{layer.name}' has levels beyond {program.options.weight_bits} weight bits", PostconditionError)


def quantise(layer: Layer, limit: int, ideal: bool, per_channel: bool) -> Layer:
    """The layer on a step that maps the largest |w| (of the layer, or of each output) to
    `limit`: scale, channel_scale (layer order) and, unless ideal, weight_q with |q| <= limit."""
    weight = layer.weight
    if layer.notes.get("integer_weights") and float(np.abs(weight).max(initial=0.0)) <= limit:
        layer = dataclasses.replace(layer, scale=1.0, channel_scale=None)  # a quantised model's integers: one level per step
    elif per_channel:
        largest = np.abs(weight).max(axis=1).reshape(-1).astype(np.float64)  # per output, crossbar order
        scale = float(largest.max(initial=0.0)) / limit or 1.0
        ratio = np.where(largest > 0, largest / limit / scale, 1.0)
        layer = dataclasses.replace(layer, scale=scale, channel_scale=frozen_array(layer.restore_order(ratio)))
    else:
        largest = float(np.abs(weight).max(initial=0.0))
        layer = dataclasses.replace(layer, scale=largest / limit if largest > 0 else 1.0, channel_scale=None)
    if ideal:
        return dataclasses.replace(layer, weight_q=None)
    weight_q = np.clip(np.rint(weight / layer.output_step()), -limit, limit).astype(np.int32)
    return dataclasses.replace(layer, weight_q=frozen_array(weight_q))


def _rounded_to_zero(layer: Layer, top: int) -> float:
    """Share of the nonzero weights that one per-layer scale rounds to zero."""
    magnitude = np.abs(layer.weight)
    nonzero = magnitude > 0
    if not nonzero.any():
        return 0.0
    step = float(magnitude.max()) / top
    return float((np.rint(magnitude[nonzero] / step) == 0).mean())
