"""Output remapping against line resistance: X-CHANGR (static, dynamic), chain-gain matching, sparse.

Crossbar output positions far from the drivers and the sense amplifiers lose more of their
current. Every mode permutes the outputs (columns) of each layer before tiling and records the
permutation in `Layer.output_order`; the runtime undoes it with one gather after the ADC.

- static: X-CHANGR's static remapping strategy (Agrawal et al. 2019, arXiv 1907.00285). Every
  layer's outputs are ranked by `--sensitivity` and the most sensitive go to the positions that
  keep the most of their current (least line-resistance error), one sort per layer
  (`_placement`); no data unless the sensitivity needs it, no network simulation.
- dynamic: X-CHANGR's dynamic strategy, the non-ideal model in the loop. Start from static; then
  layer by layer, simulate the whole network on the configured hardware, measure what each
  position actually keeps (crossbar vs exact output of that layer on its real inputs), re-rank by
  Taylor sensitivity with the other layers at their measured gains, re-place by the same rule,
  and keep the new order only if the simulated calibration loss falls; a few seeded random
  transpositions are tried beside it (ours: the paper re-ranks only); repeat per layer until no
  gain. `--sensitivity` ranks the starting (static) placement; the loop always re-ranks by Taylor.
- chain (ours): chain-gain matching, from the physics of the layer's own cells (no data, no
  network simulation). With ideal converters nothing undoes a column's loss, so output k's signal
  reaches the next MVM layer scaled twice: by the gain of the crossbar column it sits in and by
  the gain of the next layer's rows that read channel k. Chain gives the positions that keep
  least the channels the next layer reads strongest, so that every channel's product of the two
  is as even as the profiles allow (`_matched_placement`). Channels are followed to the next
  layer through activations, pooling and one Flatten (`channel_consumers`); a layer whose outputs
  reach no single ungrouped MVM layer that way (the classifier, branches) is ranked by
  `--sensitivity` instead, the most sensitive outputs at the positions whose kept share is nearest
  the layer's median (`_median_placement`: with no later layer to rescale them, a common gain is
  free and the deviation from it is the error).
- sparse (pruned models): deal columns across the layer's column blocks by conductance load so
  every crossbar carries a balanced, low load (pruned, all-zero columns spread between tiles),
  then give each tile's heaviest columns its best positions.

The position loss comes from the physics model of the configured hardware: the exact G_eff of a
tile whose cells sit mid-window, as the fraction of its ideal current each output position keeps.
Sensitivity (static, and dynamic's start): `magnitude` (sum of |w| of the column, no data),
`taylor` (first-order |dLoss/dg_k| for a gain g_k on output k, i.e. |sum dLoss/dy_k * y_k|, per
calibration sample and averaged, by central finite differences through ONNX Runtime: see
xcompile/probe.py), or `perturbation` (loss increase when output k is attenuated by the layer's
mean position loss). Sparse ranks by load only and refuses another sensitivity
(CompileOptions). Placement is chosen for the compile-time wires; the runtime warns when a run
overrides them. Grouped layers are left in place (their block-diagonal structure fixes which
outputs share rows). The pass runs before encoding: which outputs share a tile decides whether
ACM's suffix sums fit, so the encoding must see the final order.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx

from xcompile.config import Hardware
from xcompile.ir import Encoding, Layer, Program, frozen_array
from xcompile.passes.encode import encoding_for
from xcompile.passes.infra import Pass, PassContext, PassResult, PreconditionError
from xcompile.probe import GainProbe
from xcompile.runtime import devices
from xcompile.runtime.physics import effective_conductance

TAYLOR_STEP = 0.01  # relative gain step of the central difference
DYNAMIC_ROUNDS = 12  # a cap only: a layer's search stops at the first round without gain
DYNAMIC_CANDIDATES = 6  # placements simulated per round
SEARCH_SEED = 0  # seeds the random transpositions: the same model compiles to the same placement


class Remap(Pass):
    name = "remap"
    options = ("remap", "sensitivity", "remap_rows", "r_wire", "r_source", "r_sink")

    def requires(self, program: Program) -> None:
        for layer in program.layers:
            if layer.scale is None or layer.encoding is not None:
                self.fail(f"layer '{layer.name}': remapping runs on quantised layers before encoding")

    def record(self, program: Program, context: PassContext) -> dict:
        data = context.calibration if program.options.needs_calibration else None
        return {**super().record(program, context), "calibration": None if data is None else data.describe()}

    def call(self, program: Program, context: PassContext) -> PassResult:
        opts = program.options
        if opts.remap == "none":
            return PassResult(program, changed=False)
        encoding = encoding_for(opts)
        kept = kept_current(program.hardware, encoding)
        per_tile = encoding.outputs_per_tile(program.hardware.cols)
        if opts.remap_rows:
            row_kept = kept_current(program.hardware, encoding, axis=1)
            program = program.replace_layers([_rows_reordered(layer, row_kept) if layer.groups == 1 else layer for layer in program.layers])
        movable = [layer for layer in program.layers if layer.groups == 1]
        dynamic_notes: dict[int, dict] = {}
        if opts.remap == "sparse":
            orders = {layer.index: _sparse_order(layer, kept, per_tile) for layer in movable}
        else:
            probe = GainProbe(program, context.calibration) if opts.needs_calibration else None
            orders = {}
            if opts.remap == "chain":
                consumers = {} if program.hardware.wires_ideal else channel_consumers(program)
                for layer in movable:  # network order: a layer's consumer is still in its own order when it is placed
                    if layer.index in consumers:
                        orders[layer.index] = _matched_placement(program, context.lower, layer, *consumers[layer.index])
                    else:
                        orders[layer.index] = _median_placement(_sensitivity(opts.sensitivity, layer, probe, kept, per_tile), kept, per_tile)
            else:
                for layer in movable:
                    orders[layer.index] = _placement(_sensitivity(opts.sensitivity, layer, probe, kept, per_tile), kept, per_tile)
            if opts.remap == "dynamic":
                if program.hardware.wires_ideal:
                    warnings.warn("remap 'dynamic': the hardware has ideal wires (r_wire = 0), nothing to measure; static order kept", stacklevel=3)
                else:
                    orders, dynamic_notes = _dynamic(_InTheLoop(program, probe, orders, context), probe, orders, per_tile)
        layers = []
        for layer in program.layers:
            if layer.index in orders:
                layer = _reordered(layer, orders[layer.index], opts.remap, dynamic_notes.get(layer.index, {}))
            layers.append(layer)
            context.step()
        return PassResult(program.replace_layers(layers), changed=bool(orders))


def kept_current(hw: Hardware, encoding: Encoding, axis: int = 0) -> np.ndarray:
    """Fraction of its ideal current each position of a full tile keeps (1 = no loss), for a
    tile whose cells sit mid-window. axis 0: per output position, the mean over the physical
    columns the output's recombination terms read; axis 1: per row (input) position."""
    if axis == 1:
        if hw.wires_ideal:
            return np.ones(hw.rows)
        g = np.full((hw.rows, hw.cols), (hw.g_on + hw.g_off) / 2)
        return effective_conductance(g, hw.r_wire, hw.r_source, hw.r_sink).sum(axis=1) / g.sum(axis=1)
    outputs = encoding.outputs_per_tile(hw.cols)
    if hw.wires_ideal:
        return np.ones(outputs)
    g = np.full((hw.rows, hw.cols), (hw.g_on + hw.g_off) / 2)
    return _per_output(effective_conductance(g, hw.r_wire, hw.r_source, hw.r_sink).sum(axis=0) / g.sum(axis=0), encoding, outputs)


def _per_output(per_column: np.ndarray, encoding: Encoding, outputs: int) -> np.ndarray:
    """A per-physical-column quantity of a tile as one value per output: the mean over the
    columns the output's recombination terms read."""
    j = np.arange(outputs)
    return np.mean([per_column[offset + step * j] for offset, step in zip(encoding.term_offset, encoding.term_step)], axis=0)


CHANNEL_OPS = {  # ops that keep a tensor's channels where they are (element-wise, pooling)
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "Elu", "Selu", "Softplus", "HardSwish", "Gelu",
    "MaxPool", "AveragePool", "Identity", "Dropout",
}


def channel_consumers(program: Program) -> dict[int, tuple[Layer, np.ndarray]]:
    """Per layer whose outputs reach exactly one other (ungrouped) MVM layer through channel-keeping
    ops only (activations, pooling, one Flatten): that layer and, per crossbar row of it, which
    output channel of the first layer the row reads (-1: none)."""
    model = onnx.load_from_string(program.model)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except onnx.shape_inference.InferenceError:  # shapes only help Flatten; without them such paths are not followed
        pass
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    }
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    by_input: dict[str, list[Layer]] = {}
    for layer in program.layers:
        by_input.setdefault(layer.input_name, []).append(layer)
    found = {}
    for layer in program.layers:
        name, spatial = layer.output_name, 1
        while name not in outputs and len(readers.get(name, [])) == 1 and name not in by_input:
            node = readers[name][0]
            if node.op_type == "Flatten" and spatial == 1:
                shape = shapes.get(name)
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                if axis != 1 or not shape or len(shape) < 3 or any(d is None for d in shape[2:]) or shape[1] != layer.outputs:
                    break
                spatial = int(np.prod(shape[2:]))
            elif node.op_type not in CHANNEL_OPS or node.input[0] != name:
                break
            name = node.output[0]
        consumer = by_input.get(name, [])
        if len(consumer) != 1 or len(readers.get(name, [])) != 1 or consumer[0].groups != 1:
            continue
        consumer = consumer[0]
        rows = consumer.rows_in
        if consumer.kind == "conv" and spatial == 1 and rows % layer.outputs == 0:
            channel = np.arange(rows) % layer.outputs  # patch rows: kernel offset, then channel
        elif consumer.kind == "dense" and rows == layer.outputs * spatial:
            channel = np.arange(rows) // spatial  # flattened [C, H, W] or a plain vector
        else:
            continue
        if consumer.input_order is not None:
            channel = channel[consumer.input_order]
        found[layer.index] = (consumer, channel)
    return found


def _matched_placement(program: Program, lower, layer: Layer, consumer: Layer, channel: np.ndarray) -> np.ndarray:
    """Chain-gain matching. Output k's signal reaches the next layer scaled twice: by the gain of
    the crossbar column it sits in, about p_q u_k (p_q: what position q keeps, u_k: what output k's
    own load costs it), and by the gain t_k of the next layer's rows that read it. Positions sorted
    by p (lowest first) take the outputs sorted by u t (highest first), so that the products
    p u t are as even as the profiles allow (the rearrangement inequality: the assignment that
    minimises the spread of log p + log u t). p comes from a tile whose columns all carry the
    layer's average column, u from the layer's own tiles in its own order, both by the exact G_eff.
    `lower`: the passes that put layers into cells."""
    expected, effective = _effective_matrices(program, lower(program.replace_layers([consumer])).layers[0])
    power = np.zeros(layer.outputs)
    cross = np.zeros(layer.outputs)
    reads = channel >= 0
    np.add.at(power, channel[reads], np.square(expected[reads]).sum(axis=1))
    np.add.at(cross, channel[reads], (expected * effective)[reads].sum(axis=1))
    downstream = _gains(cross, power)
    compiled = lower(program.replace_layers([layer])).layers[0]
    expected, effective = _effective_matrices(program, compiled)
    own = _gains((expected * effective).sum(axis=0), np.square(expected).sum(axis=0))  # output k sits at position k
    profile = _position_profile(program, compiled)
    order = np.empty(layer.outputs, dtype=np.int64)
    order[np.argsort(profile, kind="stable")] = np.argsort(-(own / profile) * downstream, kind="stable")
    return order


def _position_profile(program: Program, compiled: Layer) -> np.ndarray:
    """Per output position of the layer, the share of its current a position keeps when every
    column of the tile carries the layer's average column (the row means of its levels): what the
    position costs, apart from what the output placed there costs itself. Averaged over the row
    blocks, weighted by their cells' squared levels. `compiled`: the layer encoded and tiled."""
    hw, enc = program.hardware, compiled.encoding
    kept, weight = np.zeros(compiled.outputs), np.zeros(compiled.outputs)
    for i, (r0, r1), (c0, c1) in compiled.tiles():
        used = enc.columns_used(c1 - c0)
        levels = compiled.levels[i].astype(np.float64)
        energy = float(np.square(levels[: r1 - r0, :used]).sum())
        levels[:, :used] = levels[:, :used].mean(axis=1, keepdims=True)
        g = devices.level_conductance(levels, program.options.level_max, hw)
        g_eff = effective_conductance(g, hw.r_wire, hw.r_source, hw.r_sink)
        kept[c0:c1] += energy * _per_output(g_eff[: r1 - r0].sum(axis=0) / g[: r1 - r0].sum(axis=0), enc, c1 - c0)
        weight[c0:c1] += energy
    return np.where(weight > 0, kept / np.where(weight > 0, weight, 1.0), 1.0)


def _gains(cross: np.ndarray, power: np.ndarray) -> np.ndarray:
    """Least-squares gains cross / power; where nothing is read (power 0), the median gain."""
    gains = np.divide(cross, power, out=np.zeros_like(cross), where=power > 0)
    return np.where(power > 0, gains, np.median(gains[power > 0]) if (power > 0).any() else 1.0)


def _effective_matrices(program: Program, compiled: Layer) -> tuple[np.ndarray, np.ndarray]:
    """The layer's matrix [K, N] in crossbar order as its cells encode it, and as the crossbars
    compute it with their wires (the exact G_eff of every tile, cells at their target levels).
    `compiled`: the layer encoded and tiled."""
    hw, enc = program.hardware, compiled.encoding
    expected = np.zeros(compiled.weight.shape)
    effective = np.zeros(compiled.weight.shape)
    for i, (r0, r1), (c0, c1) in compiled.tiles():
        g = devices.level_conductance(compiled.levels[i], program.options.level_max, hw)
        g_eff = effective_conductance(g, hw.r_wire, hw.r_source, hw.r_sink)
        compiled.add_block(expected, (r0, r1), (c0, c1), enc.combine(g[: r1 - r0], c1 - c0))
        compiled.add_block(effective, (r0, r1), (c0, c1), enc.combine(g_eff[: r1 - r0], c1 - c0))
    return expected[0], effective[0]


def _position_kept(outputs: int, kept: np.ndarray, per_tile: int) -> np.ndarray:
    """What each crossbar output position q of a layer keeps: its place within its tile."""
    return kept[np.arange(outputs) % per_tile]


def _placement(sensitivity: np.ndarray, kept: np.ndarray, per_tile: int) -> np.ndarray:
    """X-CHANGR's rule. order[q] = the layer output placed at crossbar position q: the outputs by
    falling sensitivity to the positions by falling kept share (least line-resistance error)."""
    outputs = sensitivity.shape[0]
    kept = kept if kept.shape[0] == outputs else _position_kept(outputs, kept, per_tile)
    best_positions = np.argsort(-kept, kind="stable")
    order = np.empty(outputs, dtype=np.int64)
    order[best_positions] = np.argsort(-sensitivity, kind="stable")
    return order


def _median_placement(sensitivity: np.ndarray, kept: np.ndarray, per_tile: int) -> np.ndarray:
    """Chain's rule for layers no chain reaches: most sensitive -> the position whose kept share
    is nearest the layer's median (smallest relative error once a common gain is taken out)."""
    outputs = sensitivity.shape[0]
    kept = _position_kept(outputs, kept, per_tile)
    best_positions = np.argsort(np.abs(kept / np.median(kept) - 1.0), kind="stable")
    order = np.empty(outputs, dtype=np.int64)
    order[best_positions] = np.argsort(-sensitivity, kind="stable")
    return order


def _sensitivity(mode: str, layer: Layer, probe: GainProbe | None, kept: np.ndarray, per_tile: int, base=None) -> np.ndarray:
    if mode == "magnitude":
        return np.abs(layer.weight[0]).sum(axis=0)
    n = layer.outputs
    if mode == "taylor":
        centre = np.ones(n) if base is None or layer.index not in base else base[layer.index]
        patterns = np.repeat(centre[None], 2 * n, axis=0)
        patterns[2 * np.arange(n), np.arange(n)] *= 1 + TAYLOR_STEP
        patterns[2 * np.arange(n) + 1, np.arange(n)] *= 1 - TAYLOR_STEP
        losses = probe.losses(layer.index, patterns, base)
        return np.abs(losses[0::2] - losses[1::2]).mean(axis=1) / (2 * TAYLOR_STEP)
    attenuation = float(np.mean(1.0 - _position_kept(n, kept, per_tile)))
    patterns = np.ones((n + 1, n))
    patterns[np.arange(n), np.arange(n)] = 1.0 - attenuation
    losses = probe.losses(layer.index, patterns).mean(axis=1)
    return losses[:n] - losses[n]


def _sparse_order(layer: Layer, kept: np.ndarray, per_tile: int) -> np.ndarray:
    """Deal columns by load (sum |w|) over the column blocks in snake order, so every tile gets a
    balanced share of heavy and empty columns; then best positions to each tile's heaviest."""
    load = np.abs(layer.weight[0]).sum(axis=0)
    outputs = load.shape[0]
    blocks = -(-outputs // per_tile)
    capacity = np.array([min(per_tile, outputs - b * per_tile) for b in range(blocks)])
    members: list[list[int]] = [[] for _ in range(blocks)]
    sweep = 0
    heaviest_first = np.argsort(-load, kind="stable")
    position = 0
    while position < outputs:
        lane = range(blocks) if sweep % 2 == 0 else range(blocks - 1, -1, -1)
        for b in lane:
            if position < outputs and len(members[b]) < capacity[b]:
                members[b].append(int(heaviest_first[position]))
                position += 1
        sweep += 1
    best_positions = np.argsort(1.0 - kept[:per_tile], kind="stable")
    order = np.empty(outputs, dtype=np.int64)
    for b, columns in enumerate(members):  # `columns` is heaviest first already
        slots = best_positions[best_positions < capacity[b]]
        order[b * per_tile + slots] = columns
    return order


def _rows_reordered(layer: Layer, row_kept: np.ndarray) -> Layer:
    """Inputs by load (sum |w| of the row: the current it drives) to the row positions that keep
    the most; `Layer.input_order` records it and the runtime gathers the inputs to match."""
    load = np.abs(layer.weight[0]).sum(axis=1)
    rows = load.shape[0]
    best_positions = np.argsort(-row_kept[np.arange(rows) % row_kept.shape[0]], kind="stable")
    order = np.empty(rows, dtype=np.int64)
    order[best_positions] = np.argsort(-load, kind="stable")  # crossbar row r holds input order[r]
    return dataclasses.replace(
        layer,
        weight=frozen_array(layer.weight[:, order]),
        weight_q=None if layer.weight_q is None else frozen_array(layer.weight_q[:, order]),
        input_order=frozen_array(order if layer.input_order is None else layer.input_order[order]),
    )


def _reordered(layer: Layer, order: np.ndarray, mode: str, notes: dict | None = None) -> Layer:
    return dataclasses.replace(
        layer,
        weight=frozen_array(layer.weight[:, :, order]),
        weight_q=None if layer.weight_q is None else frozen_array(layer.weight_q[:, :, order]),
        output_order=frozen_array(order),
        notes={**layer.notes, "remap": mode, **(notes or {})},
    )


def _dynamic(loop: "_InTheLoop", probe: GainProbe, orders: dict[int, np.ndarray], per_tile: int) -> tuple[dict, dict]:
    """Local search with the non-ideal model in the loop, layer by layer in network order.

    Start from whichever of the layer's own order and the static order simulates better; then
    per round: measure what each position keeps, propose the Taylor placement under those gains
    plus a few seeded random transpositions of the current order, simulate each (only this
    layer reprogrammed), and move to the best if it lowers the calibration loss; stop when a
    round does not. Returns the orders and, per layer, what the search did (for `inspect`).
    """
    loss = loop.loss()
    notes = {}
    for index in list(orders):
        layer = loop.source[index]
        before, tried, accepted = loss, 0, 0
        identity = np.arange(layer.outputs)
        loop.place(index, identity)
        identity_loss = loop.loss()
        tried += 1
        if identity_loss < loss:
            orders, loss = {**orders, index: identity}, identity_loss
        else:
            loop.place(index, orders[index])
        for round_ in range(DYNAMIC_ROUNDS):
            gains = loop.simulator.gains()
            kept_here = gains[index][orders[index]]  # what each position keeps in the current mapping
            candidates = [_placement(_sensitivity("taylor", layer, probe, kept_here, per_tile, base=gains), kept_here, per_tile)]
            rng = np.random.default_rng([SEARCH_SEED, index, round_])
            for _ in range(DYNAMIC_CANDIDATES - 1):
                candidate = orders[index].copy()
                for _ in range(2):
                    a, b = rng.choice(layer.outputs, 2, replace=False)
                    candidate[[a, b]] = candidate[[b, a]]
                candidates.append(candidate)
            best, best_loss = None, loss
            for candidate in candidates:
                if np.array_equal(candidate, orders[index]):
                    continue
                loop.place(index, candidate)
                tried += 1
                candidate_loss = loop.loss()
                if candidate_loss < best_loss:
                    best, best_loss = candidate, candidate_loss
            loop.place(index, orders[index] if best is None else best)
            if best is None:
                break
            orders, loss = {**orders, index: best}, best_loss
            accepted += 1
        notes[index] = {"remap_tried": tried, "remap_accepted": accepted, "remap_loss_before": round(before, 6), "remap_loss_after": round(loss, 6)}
    return orders, notes


class _InTheLoop:
    """The calibration data run on the configured hardware (one fixed trial), with one layer
    reprogrammed at a time: the oracle of the dynamic search, on the context's simulator."""

    def __init__(self, program: Program, probe: GainProbe, orders: dict[int, np.ndarray], context: PassContext):
        if context.simulator is None or context.lower is None:
            raise PreconditionError("pass 'remap': remap 'dynamic' simulates the network, so its context needs a simulator and the lowering passes (the pipeline gives both)")
        self.probe = probe
        self.lower = lambda layers: context.lower(program.replace_layers(layers))
        self.source = {layer.index: layer for layer in program.layers}
        compiled = self.lower([_reordered(layer, orders[i], "dynamic") if i in orders else layer for i, layer in self.source.items()])
        # the deterministic physics only: one placement serves every chip, so no device draw
        deterministic = dataclasses.replace(program.hardware, sigma=0.0, variation="none", stuck_off_rate=0.0, stuck_on_rate=0.0, read_noise=0.0)
        self.simulator = context.simulator(compiled, {probe.input_name: probe.x}, deterministic)

    def place(self, index: int, order: np.ndarray) -> None:
        self.simulator.reprogram(self.lower([_reordered(self.source[index], order, "dynamic")]).layers[0])

    def loss(self) -> float:
        return float(self.probe.sample_losses(self.simulator.outputs()[0]).mean())
