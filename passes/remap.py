"""Column remapping against line resistance (X-CHANGR, Agrawal et al.): static ranking.

Column positions far from the drivers and the sense amplifiers lose more of their current.
The pass ranks every output of a layer by sensitivity (`magnitude`: the sum of |w| of its
column, no data needed) and places the most sensitive outputs at the crossbar positions that
keep the most current; `Layer.output_order` records the permutation, which the runtime undoes
digitally with one gather. Position error comes from the physics model of the configured
hardware: the exact G_eff of a tile whose cells sit mid-window, as the fraction of its ideal
current each output position keeps. Grouped layers are left in place (their block-diagonal
structure fixes which outputs share rows). It runs before the encoding pass: which outputs
share a tile decides whether ACM's suffix sums fit, so the encoding must see the final order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xcompile.config import Hardware
from xcompile.ir import Encoding, Layer, PassResult, Program, frozen_array
from xcompile.passes.encode import encoding_for
from xcompile.runtime.physics import effective_conductance

NAME = "remap"


def run(program: Program, progress=None) -> PassResult:
    if program.options.remap == "none":
        return PassResult(program, changed=False)
    hw = program.hardware
    encoding = encoding_for(program.options)
    keep = kept_current(hw, encoding)
    layers, changed = [], False
    for layer in program.layers:
        if layer.groups == 1:
            layer = _static(layer, keep, encoding.outputs_per_tile(hw.cols))
            changed = True
        layers.append(layer)
        if progress:
            progress()
    return PassResult(program.replace_layers(layers), changed=changed)


def kept_current(hw: Hardware, encoding: Encoding) -> np.ndarray:
    """Fraction of its ideal current each output position of a full tile keeps (1 = no loss):
    the mean over the physical columns the output's recombination terms read."""
    outputs = encoding.outputs_per_tile(hw.cols)
    if hw.wires_ideal:
        return np.ones(outputs)
    g = np.full((hw.rows, hw.cols), (hw.g_on + hw.g_off) / 2)
    column_kept = effective_conductance(g, hw.r_wire, hw.r_source, hw.r_sink).sum(axis=0) / g.sum(axis=0)
    j = np.arange(outputs)
    return np.mean([column_kept[offset + step * j] for offset, step in zip(encoding.term_offset, encoding.term_step)], axis=0)


def _static(layer: Layer, kept: np.ndarray, per_tile: int) -> Layer:
    outputs = layer.outputs
    sensitivity = np.abs(layer.weight[0]).sum(axis=0)
    positions = np.arange(outputs)
    position_loss = 1.0 - kept[positions % per_tile]
    best_positions = positions[np.argsort(position_loss, kind="stable")]
    most_sensitive = np.argsort(-sensitivity, kind="stable")
    order = np.empty(outputs, dtype=np.int64)
    order[best_positions] = most_sensitive  # crossbar output q holds layer output order[q]
    return dataclasses.replace(
        layer,
        weight=frozen_array(layer.weight[:, :, order]),
        weight_q=None if layer.weight_q is None else frozen_array(layer.weight_q[:, :, order]),
        output_order=frozen_array(order),
        notes={**layer.notes, "remap": "static"},
    )
