"""Reprogramming schedule (Kung & Farias, 2024): load T tiles onto P < T physical crossbars.

One inference pass runs in rounds of up to P loads; tiles are taken in network order (a layer's
tiles after every tile of the layers before it), so data dependencies hold. A load rewrites the
cells whose level differs from what the crossbar holds; the counts are for a pass in steady
state (each crossbar starts from what the previous pass left on it), simulated as the second of
two passes from an erased chip.

- `layer`: tile i of the network order goes to crossbar i mod P in round i div P (the baseline).
- `sorted`: sorted weight sections. Each layer's rows (inputs) are sorted by magnitude (the L1
  norm of the row's quantised weights, within each group) before the levels are cut into row
  tiles; `Layer.input_order` records the permutation and the runtime applies it to the input
  vector, so results do not change. Within a layer, tiles are loaded in order of their count of
  non-zero cells (low-magnitude sections leave the high-order slice columns at zero); each
  round is then placed greedily: every crossbar is offered the tiles near its rank in that
  count (CANDIDATES either side), the exact number of differing cells decides, and the pair
  with the fewest goes first. The layer's own rows in layer order are simulated too and kept
  if they write fewer cells: `sorted` never writes more than `layer`.
- bit stucking (`stuck_slices` k, `stuck_fraction` p): in the k lowest-order slice columns of
  a tile (physical column c holds slice c mod S), each cell that should change is rewritten
  with probability p when its crossbar is reprogrammed (a crossbar's first load ever programs
  every cell), else it keeps its old level. The draws come from `seed` and belong to the
  schedule (every pass repeats them). The stale levels are recorded per layer
  (`Layer.stale_cells`, `stale_levels`) and the runtime computes with them, so the accuracy cost
  is measured.

It runs after `assign` (the counts need the cell levels); the sections are sorted before tiling
(passes/sort_sections.py), and the rows' unsorted order is rebuilt here from the sorted levels. The
schedule (`Program.schedule`) and each tile's physical crossbar (`Tiling.crossbar`) are recorded in
the program; the placement graph's tile nodes show both (xcompile/placement.py).
"""

from __future__ import annotations

import dataclasses

import numba
import numpy as np

from xcompile.errors import XCompileError
from xcompile.ir import Layer, Program, frozen_array
from xcompile.passes.encode import slices_of
from xcompile.passes.infra import Pass, PassContext, PassResult
from xcompile.passes.sort_sections import permuted_rows
from xcompile.reprogramming import Schedule

CANDIDATES = 8  # tiles either side of its rank a crossbar is offered in a `sorted` round


class Reprogram(Pass):
    """The reprogramming schedule of T tiles on P physical crossbars."""

    name = "schedule"
    options = ("crossbars", "schedule", "stuck_fraction", "stuck_slices", "seed")

    def requires(self, program: Program) -> None:
        for layer in program.layers:
            if layer.levels is None:
                self.fail(f"layer '{layer.name}': a schedule counts cell writes, so it needs the levels (run assign first)")

    def call(self, program: Program, context: PassContext) -> PassResult:
        opts = program.options
        if opts.crossbars is None:
            return PassResult(program, changed=False)
        if not any(layer.tiling is not None and layer.tiling.count for layer in program.layers):
            raise XCompileError(f"option 'crossbars' ({opts.crossbars}) asks for a reprogramming schedule, but the model has no crossbar tiles (no MVM layers)")
        stuck_cells = None
        if opts.stuck_slices and opts.stuck_fraction < 1:
            slices = slices_of(program.layers[0].encoding)
            stuck_cells = np.flatnonzero(np.tile(np.arange(program.hardware.cols) % slices < opts.stuck_slices, program.hardware.rows))
        plans = [(program, _layer_loads)]
        if any(layer.row_sort is not None for layer in program.layers):  # sorted sections; unsorted layer order stays a candidate
            plans = [(program, _sorted_loads), (program.replace_layers([_unsorted(layer) for layer in program.layers]), _layer_loads)]
        best = None
        for candidate, make_loads in plans:
            tiles = _TileTable(candidate.layers)
            loads = make_loads(tiles, opts.crossbars)
            counts, stale = _simulate(tiles, loads, opts.crossbars, stuck_cells, opts.stuck_fraction, opts.seed)
            if best is None or counts["writes"].sum() < best[3]["writes"].sum():
                best = (candidate, tiles, loads, counts, stale)
        program, tiles, loads, counts, stale = best
        schedule = Schedule(
            crossbars=opts.crossbars,
            order=opts.schedule,
            stuck_fraction=float(opts.stuck_fraction),
            stuck_slices=opts.stuck_slices,
            seed=opts.seed,
            layer=frozen_array(tiles.layer[loads.tile], np.int64),
            tile=frozen_array(tiles.local[loads.tile], np.int64),
            crossbar=frozen_array(loads.crossbar, np.int64),
            round=frozen_array(loads.round, np.int64),
            **{name: frozen_array(values, np.int64) for name, values in counts.items()},
        )
        layers = []
        for layer in program.layers:
            layers.append(dataclasses.replace(_placed(layer, schedule, stale.get(layer.index)), row_sort=None))
            context.step()
        return PassResult(
            dataclasses.replace(program.replace_layers(layers), schedule=schedule),
            changed=True,
        )


def _unsorted(layer: Layer) -> Layer:
    """The layer with its rows back in their order before sorted sections. A cell's level depends
    only on its own row's weights (passes/encode.py), so the rows of each column block's levels
    move with the rows of the weights. Rows stay in their group, so a row whose source tile is not
    placed (it holds only another group's outputs) holds the same structural-zero cells already."""
    if layer.row_sort is None:
        return layer
    back = np.argsort(layer.row_sort)  # the row that was at r now sits at back[r]
    padded = layer.tiling.rows * (int(layer.tiling.grid[:, 0].max(initial=0)) + 1)
    levels = np.array(layer.levels)
    for column_block in np.unique(layer.tiling.grid[:, 1]):
        members = np.flatnonzero(layer.tiling.grid[:, 1] == column_block)
        stacked = np.zeros((padded,) + levels.shape[2:], dtype=levels.dtype)
        present = np.zeros(padded, dtype=bool)
        for i in members:
            (r0, r1) = layer.tiling.row_range[i]
            stacked[r0:r1], present[r0:r1] = levels[i, : r1 - r0], True
        for i in members:
            (r0, r1) = layer.tiling.row_range[i]
            source = back[r0:r1]
            found = present[source]
            levels[i, : r1 - r0][found] = stacked[source[found]]
    input_order = layer.input_order[back]
    return dataclasses.replace(
        layer,
        weight=permuted_rows(layer.weight, back),
        weight_q=None if layer.weight_q is None else permuted_rows(layer.weight_q, back),
        input_order=None if np.array_equal(input_order, np.arange(input_order.size)) else frozen_array(input_order),
        levels=frozen_array(levels),
        row_sort=None,
    )


class _TileTable:
    """Every tile of the program under one global index, in network order, as flat cell vectors."""

    def __init__(self, layers: tuple[Layer, ...]):
        self.flat, layer_of, position, local = [], [], [], []
        for place, layer in enumerate(layers):
            self.flat.extend(layer.levels.reshape(layer.tiling.count, -1))
            layer_of.extend([layer.index] * layer.tiling.count)
            position.extend([place] * layer.tiling.count)
            local.extend(range(layer.tiling.count))
        self.layer = np.array(layer_of, dtype=np.int64)  # Layer.index of each tile
        self.position = np.array(position, dtype=np.int64)  # its layer's place in network order
        self.local = np.array(local, dtype=np.int64)
        self.cells = self.flat[0].size
        self.dtype = self.flat[0].dtype
        self.nonzero = np.array([np.count_nonzero(cells) for cells in self.flat], dtype=np.int64)

    def stack(self, tiles: np.ndarray) -> np.ndarray:
        return np.stack([self.flat[t] for t in tiles])


@dataclasses.dataclass
class _Loads:
    """One inference pass, in load order: global tile, physical crossbar, round."""

    tile: np.ndarray
    crossbar: np.ndarray
    round: np.ndarray

    def rounds(self):
        """Slices of the load arrays, one per round."""
        bounds = np.flatnonzero(np.diff(self.round)) + 1
        starts = np.concatenate([[0], bounds])
        stops = np.concatenate([bounds, [self.round.size]])
        return [slice(int(a), int(b)) for a, b in zip(starts, stops)]


def _layer_loads(tiles: _TileTable, crossbars: int) -> _Loads:
    order = np.arange(tiles.layer.size)
    return _Loads(tile=order, crossbar=order % crossbars, round=order // crossbars)


def _sorted_loads(tiles: _TileTable, crossbars: int) -> _Loads:
    """Network order of layers, each layer's tiles by falling non-zero count; rounds placed greedily."""
    sequence = np.lexsort((-tiles.nonzero, tiles.position))
    rounds = np.arange(sequence.size) // crossbars
    held = np.zeros((crossbars, tiles.cells), dtype=tiles.dtype)  # erased chip before the first round
    held_nonzero = np.zeros(crossbars, dtype=np.int64)
    placed = np.empty(sequence.size, dtype=np.int64)
    for start in range(0, sequence.size, crossbars):
        members = sequence[start : start + crossbars]
        targets = tiles.stack(members)
        chosen = _place_round(held, held_nonzero, targets, tiles.nonzero[members])
        placed[start : start + members.size] = chosen
        held[chosen] = targets
        held_nonzero[chosen] = tiles.nonzero[members]
    order = np.lexsort((placed, rounds))  # within a round, by crossbar
    return _Loads(tile=sequence[order], crossbar=placed[order], round=rounds[order])


def _place_round(held: np.ndarray, held_nonzero: np.ndarray, targets: np.ndarray, target_nonzero: np.ndarray) -> np.ndarray:
    """The crossbar for each of a round's tiles: greedy on exact differing cells among rank neighbours."""
    crossbars, count = held.shape[0], targets.shape[0]
    crossbar_rank = np.argsort(-held_nonzero, kind="stable")
    tile_rank = np.argsort(-target_nonzero, kind="stable")
    centre = np.arange(crossbars) * count // crossbars
    offsets = np.arange(-CANDIDATES, CANDIDATES + 1)
    rank = centre[:, None] + offsets[None, :]
    valid = (rank >= 0) & (rank < count)
    pair_crossbar = np.broadcast_to(crossbar_rank[:, None], rank.shape)[valid]
    pair_tile = tile_rank[rank[valid]]
    distance = np.empty(pair_tile.size, dtype=np.int64)
    _differing_cells(held, targets, pair_crossbar, pair_tile, distance)
    gap = np.abs(np.broadcast_to(offsets[None, :], rank.shape)[valid])
    chosen = np.full(count, -1, dtype=np.int64)
    taken = np.zeros(crossbars, dtype=bool)
    for p in np.lexsort((gap, distance)):
        tile, crossbar = pair_tile[p], pair_crossbar[p]
        if chosen[tile] < 0 and not taken[crossbar]:
            chosen[tile] = crossbar
            taken[crossbar] = True
    left = tile_rank[chosen[tile_rank] < 0]
    chosen[left] = crossbar_rank[~taken[crossbar_rank]][: left.size]  # the rest in rank order
    return chosen


@numba.njit(cache=True)
def _differing_cells(held, targets, pair_crossbar, pair_tile, out):
    for p in range(pair_tile.size):
        a, b = held[pair_crossbar[p]], targets[pair_tile[p]]
        count = 0
        for i in range(a.size):
            count += a[i] != b[i]
        out[p] = count


def _simulate(tiles: _TileTable, loads: _Loads, crossbars: int, stuck_cells, fraction: float, seed: int):
    """Run the loads twice from an erased chip and count the second pass (steady state).

    Bit stucking's decisions are part of the schedule: round r draws, from
    np.random.default_rng([seed, r]), one uniform number per load and stuck cell (flat cell
    indices `stuck_cells`), and that cell is rewritten, if it should change, when the number is
    below `fraction`. Stucking applies to reprogramming: a crossbar's first load ever (deploying
    the chip) programs every cell. Every pass repeats the draws, so after one pass each cell
    holds the level of its last load that rewrote it (or of that first programming), the same
    every pass: the second pass is the steady state.
    Returns the per-load and per-crossbar counts, and per layer index the stale cells
    (flat index into its levels, level held) as the tiles compute.
    """
    state = np.zeros((crossbars, tiles.cells), dtype=tiles.dtype)  # what the cells hold
    wanted = np.zeros_like(state)  # the last target on each crossbar (writes with no stucking)
    cell_writes = np.zeros((crossbars, tiles.cells), dtype=np.int32)
    counts = {name: np.zeros(loads.tile.size, dtype=np.int64) for name in ("writes", "changed", "stale")}
    found = []
    programmed = np.zeros(crossbars, dtype=bool)  # a crossbar's first load ever programs it whole
    for counted in (False, True):
        for round_, part in enumerate(loads.rounds()):
            members, placed = loads.tile[part], loads.crossbar[part]
            targets = tiles.stack(members)
            current = state[placed]
            change = current != targets
            write = change
            if stuck_cells is not None:
                rewrite = np.ones_like(change)
                rewrite[:, stuck_cells] = np.random.default_rng([seed, round_]).random((members.size, stuck_cells.size)) < fraction
                rewrite[~programmed[placed]] = True
                write = change & rewrite
            programmed[placed] = True
            np.copyto(current, targets, where=write)
            state[placed] = current
            if counted:
                counts["writes"][part] = np.count_nonzero(write, axis=1)
                counts["changed"][part] = np.count_nonzero(wanted[placed] != targets, axis=1)
                cell_writes[placed] += write
                if stuck_cells is not None:
                    stale = change & ~write
                    counts["stale"][part] = np.count_nonzero(stale, axis=1)
                    load, cell = np.nonzero(stale)
                    found.append((tiles.layer[members[load]], tiles.local[members[load]] * tiles.cells + cell, current[load, cell]))
            wanted[placed] = targets
    counts["cell_writes_max"] = cell_writes.max(axis=1)
    stale_by_layer = {}
    if found:
        layer_of, index, level = (np.concatenate(parts) for parts in zip(*found))
        for layer in np.unique(layer_of):
            mine = layer_of == layer
            order = np.argsort(index[mine], kind="stable")
            stale_by_layer[int(layer)] = (index[mine][order], level[mine][order])
    return counts, stale_by_layer


def _placed(layer: Layer, schedule: Schedule, stale) -> Layer:
    """The layer with each tile's physical crossbar and the stale cells its tiles compute with."""
    mine = schedule.layer == layer.index
    crossbar = np.empty(layer.tiling.count, dtype=np.int64)
    crossbar[schedule.tile[mine]] = schedule.crossbar[mine]
    changes = {"tiling": dataclasses.replace(layer.tiling, crossbar=frozen_array(crossbar))}
    if stale is not None:
        changes.update(stale_cells=frozen_array(stale[0], np.int64), stale_levels=frozen_array(stale[1]))
    return dataclasses.replace(layer, **changes)
