"""The reprogramming schedule as data: what it holds, how mapping.bin stores it, how inspect shows it.

A chip with P physical crossbars runs a model of T > P tiles in rounds: in each round every
crossbar is loaded with (at most) one tile, then the round's tiles compute. The schedule lists
the loads of one inference pass in order and what each cost in cell writes; passes/schedule.py
makes it, docs/schedules.md explains the counts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xcompile.errors import XCompileError
from xcompile.fileio import atomic_output

# per-load arrays, in load order (round by round); plus one per physical crossbar
LOAD_ARRAYS = ("layer", "tile", "crossbar", "round", "writes", "changed", "stale")
CROSSBAR_ARRAYS = ("cell_writes_max",)


@dataclass(frozen=True, eq=False)
class Schedule:
    """Which tile is loaded on which physical crossbar in which round, and the writes it takes.

    Counts are for one inference pass in steady state: a crossbar's first load of the pass
    follows the last load of the previous pass on it. `writes` are the cells a load actually
    rewrites; `changed` the cells whose target level differs from the previous tile's (the
    writes with no bit stucking); `stale` the cells left holding an older level when the tile
    computes. `cell_writes_max[c]`: the most writes any one cell of crossbar c takes in a pass.
    """

    crossbars: int
    order: str  # layer | sorted
    stuck_fraction: float
    stuck_slices: int
    seed: int
    layer: np.ndarray  # int64 [loads]: layer index of the tile loaded
    tile: np.ndarray  # int64 [loads]: tile index within its layer
    crossbar: np.ndarray  # int64 [loads]: physical crossbar it is loaded on
    round: np.ndarray  # int64 [loads]
    writes: np.ndarray  # int64 [loads]
    changed: np.ndarray  # int64 [loads]
    stale: np.ndarray  # int64 [loads]
    cell_writes_max: np.ndarray  # int64 [crossbars]

    @property
    def rounds(self) -> int:
        return int(self.round.max(initial=-1)) + 1

    def writes_per_round(self) -> np.ndarray:
        return np.bincount(self.round, weights=self.writes, minlength=self.rounds).astype(np.int64)

    def writes_per_crossbar(self) -> np.ndarray:
        return np.bincount(self.crossbar, weights=self.writes, minlength=self.crossbars).astype(np.int64)

    def to_manifest(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {
            "crossbars": self.crossbars,
            "order": self.order,
            "stuck_fraction": self.stuck_fraction,
            "stuck_slices": self.stuck_slices,
            "seed": self.seed,
        }
        return meta, {name: getattr(self, name) for name in LOAD_ARRAYS + CROSSBAR_ARRAYS}

    @classmethod
    def from_manifest(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "Schedule":
        return cls(**meta, **{name: arrays[name] for name in LOAD_ARRAYS + CROSSBAR_ARRAYS})


def summary(schedule: Schedule | None) -> dict[str, Any] | None:
    """The `schedule` key of `inspect --json` (docs/inspect.md); None without a schedule."""
    if schedule is None:
        return None
    loads = np.bincount(schedule.crossbar, minlength=schedule.crossbars)
    return {
        "crossbars": schedule.crossbars,
        "order": schedule.order,
        "stuck_fraction": schedule.stuck_fraction,
        "stuck_slices": schedule.stuck_slices,
        "seed": schedule.seed,
        "tiles": int(schedule.layer.size),
        "rounds": schedule.rounds,
        "loads_per_crossbar_max": int(loads.max(initial=0)),
        "writes_total": int(schedule.writes.sum()),
        "writes_without_stucking": int(schedule.changed.sum()),
        "stale_cells": int(schedule.stale.sum()),
        "max_cell_writes": int(schedule.cell_writes_max.max(initial=0)),
        "writes_per_round": schedule.writes_per_round().tolist(),
        "writes_per_crossbar": schedule.writes_per_crossbar().tolist(),
    }


def format_schedule(info: dict[str, Any] | None) -> list[str]:
    """Lines for the text summary."""
    if info is None:
        return []
    stucking = (
        f", bit stucking: {info['stuck_fraction']:g} of changed cells rewritten in the "
        f"{info['stuck_slices']} lowest slice column(s), seed {info['seed']}"
        if info["stuck_slices"]
        else ""
    )
    per_crossbar, per_round = info["writes_per_crossbar"], info["writes_per_round"]
    return [
        "",
        f"schedule: {info['order']} order, {info['tiles']} tiles on {info['crossbars']} physical crossbars in "
        f"{info['rounds']} rounds (up to {info['loads_per_crossbar_max']} loads per crossbar){stucking}",
        f"  cell writes per inference pass: {info['writes_total']:,}"
        + (f" (without stucking {info['writes_without_stucking']:,}; {info['stale_cells']:,} cells compute stale)" if info["stuck_slices"] else ""),
        f"  per crossbar: min {min(per_crossbar):,}, mean {sum(per_crossbar) / len(per_crossbar):,.0f}, max {max(per_crossbar):,};  "
        f"per round: min {min(per_round):,}, max {max(per_round):,}",
        f"  most writes one cell takes per pass (endurance): {info['max_cell_writes']}",
    ]


def write_writes_plot(schedule: Schedule | None, path: str | os.PathLike) -> Path:
    """A PNG of the writes per physical crossbar and per round (matplotlib, Agg backend)."""
    target = Path(path)
    if schedule is None:
        raise XCompileError("this mapping has no reprogramming schedule (compile with --crossbars P) to plot writes of")
    if target.suffix.lower() != ".png":
        raise XCompileError(f"writes plot '{target}' must end in .png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise XCompileError("the writes plot needs matplotlib: pip install matplotlib") from None
    figure, (by_crossbar, by_round) = plt.subplots(1, 2, figsize=(11, 3.8))
    by_crossbar.bar(np.arange(schedule.crossbars), schedule.writes_per_crossbar(), width=1.0, color="tab:blue")
    by_crossbar.set_xlabel("physical crossbar")
    by_crossbar.set_ylabel("cell writes per inference pass")
    by_round.bar(np.arange(schedule.rounds), schedule.writes_per_round(), width=1.0, color="tab:orange")
    by_round.set_xlabel("round")
    by_round.set_ylabel("cell writes")
    stucking = f", stucking p={schedule.stuck_fraction:g} k={schedule.stuck_slices}" if schedule.stuck_slices else ""
    figure.suptitle(
        f"{schedule.order} schedule on {schedule.crossbars} crossbars{stucking}: {int(schedule.writes.sum()):,} writes, "
        f"max {int(schedule.cell_writes_max.max(initial=0))} per cell"
    )
    figure.tight_layout()
    with atomic_output(target) as temp:
        figure.savefig(temp, dpi=110, format="png")
    plt.close(figure)
    return target


def writes_by_slice_and_magnitude(program, crossbars: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Cell writes of one steady-state `layer` pass, by slice (0 = lowest) and by the |q| (0..255)
    of the weight half being written: where reprogramming costs sit (docs/schedules.md). Dual
    encoding, 8-bit weights: a weight half's slices sit in S neighbouring columns."""
    from xcompile.passes import schedule as schedule_pass  # the pass imports this module
    from xcompile.passes.encode import slices_of

    if program.layers[0].encoding.name != "dual" or program.options.weight_bits != 8:
        raise XCompileError("writes by slice and magnitude are counted for the dual encoding with 8-bit weights")
    tiles = schedule_pass._TileTable(program.layers)
    loads = schedule_pass._layer_loads(tiles, crossbars)
    hw, encoding = program.hardware, program.layers[0].encoding
    slices, bits = slices_of(encoding), program.options.cell_bits
    edges = [0, 1, 4, 16, 64, 256]
    names = ["0", "1-3", "4-15", "16-63", "64-255"]
    by_slice, by_magnitude = np.zeros(slices, np.int64), np.zeros(len(names), np.int64)
    state = np.zeros((crossbars, tiles.cells), dtype=tiles.dtype)
    for counted in (False, True):
        for tile, crossbar in zip(loads.tile, loads.crossbar):
            target = tiles.flat[tile]
            changed = (state[crossbar] != target).reshape(hw.rows, hw.cols)
            state[crossbar] = target
            if not counted:
                continue
            levels = target.reshape(hw.rows, hw.cols // slices, slices).astype(np.int64)
            magnitude = (levels << (bits * np.arange(slices))).sum(axis=2)
            bucket = np.digitize(magnitude, edges[1:-1])  # [rows, groups]
            changed = changed.reshape(hw.rows, hw.cols // slices, slices)
            by_slice += changed.sum(axis=(0, 1))
            np.add.at(by_magnitude, np.repeat(bucket[:, :, None], slices, axis=2)[changed], 1)
    return by_slice, by_magnitude, names
