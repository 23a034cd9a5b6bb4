"""Sorted weight sections (Kung & Farias, 2024): rows sorted by magnitude before they are cut into tiles.

With `schedule = 'sorted'` (and a reprogramming schedule, `crossbars`), each layer's rows
(inputs) are sorted by the L1 norm of their quantised weights, largest first, within each group,
so that row tiles hold sections of similar magnitude: low-magnitude sections leave the high-order
slice columns at zero and consecutive loads reuse more cell states. `Layer.input_order` records
the permutation (composed with one an earlier pass made) and the runtime applies it to the input
vector, so results do not change. `Layer.row_sort` keeps this pass's own permutation for the
schedule pass, which also simulates the rows in their unsorted order and keeps whichever writes
fewer cells (and then drops `row_sort`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xcompile.ir import Layer, Program, frozen_array
from xcompile.passes.infra import Pass, PassContext, PassResult


class SortSections(Pass):
    name = "sort_sections"
    options = ("schedule", "crossbars")

    def requires(self, program: Program) -> None:
        for layer in program.layers:
            if layer.encoding is None or layer.scale is None:
                self.fail(f"layer '{layer.name}': sorting sections needs the final quantised weights (after encode)")

    def call(self, program: Program, context: PassContext) -> PassResult:
        if program.options.crossbars is None or program.options.schedule != "sorted":
            return PassResult(program, changed=False)
        layers = []
        for layer in program.layers:
            layers.append(sorted_rows(layer))
            context.step()
        return PassResult(program.replace_layers(layers), changed=True)


def sorted_rows(layer: Layer) -> Layer:
    """The layer with its rows by falling magnitude within each group, not yet tiled."""
    source = layer.weight_q if layer.weight_q is not None else layer.weight
    magnitude = np.abs(source.astype(np.float64)).sum(axis=2)  # [groups, Kg]
    order = np.argsort(-magnitude, axis=1, kind="stable")
    row_sort = (order + np.arange(layer.groups)[:, None] * layer.weight.shape[1]).reshape(-1)
    input_order = row_sort if layer.input_order is None else layer.input_order[row_sort]  # compose: row r holds old row row_sort[r]
    return dataclasses.replace(
        layer,
        weight=permuted_rows(layer.weight, row_sort),
        weight_q=None if layer.weight_q is None else permuted_rows(layer.weight_q, row_sort),
        input_order=frozen_array(input_order, np.int64),
        row_sort=frozen_array(row_sort, np.int64),
        tiling=None,
        levels=None,
    )


def permuted_rows(weights: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per-group matrices [G, Kg, Ng] with global row r taken from row order[r] (same group)."""
    groups, kg, ng = weights.shape
    return frozen_array(weights.reshape(groups * kg, ng)[order].reshape(groups, kg, ng))
