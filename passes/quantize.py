"""Quantise each layer's weights to signed integers of `weight_bits` magnitude bits.

One symmetric scale per layer (max |w| maps to the top level): every encoding, including ACM's
column differences, needs all columns of a layer on one scale. In ideal mode the scale is kept
but the weights stay float, so cells hold exact values.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xcompile.ir import Layer, PassResult, Program, frozen_array

NAME = "quantize"


def run(program: Program, progress=None) -> PassResult:
    bits = program.options.weight_bits
    top = 2**bits - 1
    layers = []
    for layer in program.layers:
        layers.append(_quantize(layer, top, program.options.ideal))
        if progress:
            progress()
    for layer in layers:
        if layer.weight_q is not None:
            assert int(np.abs(layer.weight_q).max(initial=0)) <= top, "postcondition: levels within the weight bits"
    return PassResult(program.replace_layers(layers), changed=True)


def _quantize(layer: Layer, top: int, ideal: bool) -> Layer:
    largest = float(np.abs(layer.weight).max(initial=0.0))
    scale = largest / top if largest > 0 else 1.0
    if layer.notes.get("integer_weights") and largest <= top:  # a quantised model's integers: one level per step
        scale = 1.0
    if ideal:
        return dataclasses.replace(layer, scale=scale, weight_q=None)
    weight_q = np.clip(np.rint(layer.weight / scale), -top, top).astype(np.int32)
    return dataclasses.replace(layer, scale=scale, weight_q=frozen_array(weight_q))
