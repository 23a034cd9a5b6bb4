"""The tables and plots of a sweep, rebuilt from its finished points: table.csv (one row per
point and trial), summary.csv (mean and standard deviation per point), accuracy_vs_<axis>.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xcompile.fileio import atomic_output
from xcompile.sweep.grid import OPTIONS, Axis, Grid
from xcompile.sweep.work import POINT_COLUMNS, TRIAL_COLUMNS


def trial_table(grid: Grid, finished: dict[str, dict[str, Any]]):
    """One row per finished point and trial, in grid order; swept columns first."""
    import pandas as pd

    axis_columns = [a.column for a in grid.axes]
    columns = ["point", "point_key", *axis_columns, *(o for o in OPTIONS if o not in axis_columns), *TRIAL_COLUMNS, *POINT_COLUMNS]
    rows = []
    for point in grid.points:
        result = finished.get(point.key)
        if result is None:
            continue
        shared = {"point": point.index, "point_key": point.key, **point.labels, **point.options}
        shared.update({name: result[name] for name in POINT_COLUMNS})
        rows.extend({**shared, **trial} for trial in result["trials"])
    return pd.DataFrame.from_records(rows, columns=columns)


def summarize(table):
    """Mean and standard deviation over trials, one row per point (summary.csv)."""
    import pandas as pd

    constant = [c for c in table.columns if c not in ("trial", "trial_seed", "accuracy", "drop", "adc_clipped", "adc_conversions", "run_seconds")]
    rows = []
    for _, group in table.groupby("point", sort=True):
        row = group.iloc[0][constant].to_dict()
        row["trials"] = len(group)
        for name in ("accuracy", "drop", "adc_clipped"):
            values = group[name].to_numpy(dtype=float)
            row[f"{name}_mean"] = float(values.mean())
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        row["run_seconds_mean"] = float(group["run_seconds"].mean())
        rows.append(row)
    extra = ["trials", "accuracy_mean", "accuracy_std", "drop_mean", "drop_std", "adc_clipped_mean", "adc_clipped_std", "run_seconds_mean"]
    return pd.DataFrame.from_records(rows, columns=constant + extra)


def write_plots(table, axes: tuple[Axis, ...], folder: Path) -> list[Path]:
    """accuracy_vs_<axis>.png for every axis: one panel per value of the next axis, one line per
    value of the one after; further axes are averaged over (the title says which)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder.mkdir(exist_ok=True)
    float_accuracy = float(table["float_accuracy"].iloc[0])
    trials = int(table.groupby("point").size().max())
    written = []
    for axis in axes:
        others = [a for a in axes if a is not axis]
        facet = others[0] if others else None
        line = others[1] if len(others) > 1 else None
        averaged = others[2:]
        panels = _present(facet, table) if facet else [None]
        figure = Figure(figsize=(1.5 + 3.6 * len(panels), 3.8), layout="constrained")
        FigureCanvasAgg(figure)
        plots = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in axis.labels)
        for plot, panel in zip(plots, panels):
            subset = table if facet is None else table[table[facet.column] == panel]
            for value in _present(line, subset) if line else [None]:
                rows = subset if line is None else subset[subset[line.column] == value]
                stats = rows.groupby(axis.column, sort=False)["accuracy"].agg(["mean", "std"]).fillna(0.0)
                shown = [v for v in axis.labels if v in stats.index]
                x = shown if numeric else [axis.labels.index(v) for v in shown]
                plot.errorbar(
                    x, stats.loc[shown, "mean"] * 100, yerr=stats.loc[shown, "std"] * 100, marker="o", capsize=3,
                    label=None if line is None else f"{_title(line)} = {value}",
                )
            plot.axhline(float_accuracy * 100, color="grey", linestyle="--", label="float model")
            if not numeric:
                plot.set_xticks(range(len(axis.labels)), [str(v) for v in axis.labels])
            plot.set_xlabel(_title(axis))
            if facet is not None:
                plot.set_title(f"{_title(facet)} = {panel}")
        plots[0].set_ylabel("accuracy (%)")
        plots[0].legend(fontsize="small")
        note = f"mean ± std over {trials} trial(s)" + (f", averaged over {', '.join(_title(a) for a in averaged)}" if averaged else "")
        figure.suptitle(f"accuracy vs {_title(axis)} ({note})", fontsize="medium")
        target = folder / f"accuracy_vs_{axis.column}.png"
        with atomic_output(target) as temp:
            figure.savefig(temp, format="png", dpi=110)
        written.append(target)
    return written


def _present(axis: Axis, table) -> list:
    """The axis' values that occur in the table, in grid order."""
    seen = set(table[axis.column])
    return [v for v in axis.labels if v in seen]


def _title(axis: Axis) -> str:
    return " / ".join(axis.settings[0]) if len(axis.settings[0]) > 1 else axis.column

