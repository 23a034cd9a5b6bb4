"""The grid of a sweep: axes of option values (plain or linked), options every point shares,
and the points, their product, each identified by a digest of its resolved options."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from xcompile.config import PRESETS, CompileOptions, Hardware, split_options
from xcompile.errors import XCompileError
from xcompile.sweep.work import POINT_COLUMNS, TRIAL_COLUMNS

OPTIONS = tuple(f.name for f in fields(CompileOptions)) + tuple(f.name for f in fields(Hardware))
FLOAT_OPTIONS = frozenset(f.name for f in (*fields(CompileOptions), *fields(Hardware)) if isinstance(f.default, float))
RESERVED_COLUMNS = frozenset({"point", "point_key", *OPTIONS, *TRIAL_COLUMNS, *POINT_COLUMNS})


@dataclass(frozen=True)
class Axis:
    """One swept dimension. `column` is the table column it is plotted by: the option itself, or
    for `hardware` and linked axes a label column of its own."""

    column: str
    settings: tuple[dict[str, Any], ...]  # the options each value sets
    labels: tuple[Any, ...]  # the value each setting shows in the table and plots

    @property
    def is_option(self) -> bool:
        return self.column in OPTIONS


@dataclass(frozen=True)
class Point:
    index: int
    key: str  # digest of the resolved options: the same options are the same point
    labels: dict[str, Any]  # axis column -> value, for the axes that are not one option
    options: dict[str, Any]  # every compile and hardware option, resolved


@dataclass(frozen=True)
class Grid:
    axes: tuple[Axis, ...]
    fixed: dict[str, Any]
    points: tuple[Point, ...]

    def describe(self) -> dict[str, Any]:
        """The grid as written, for the manifest."""
        return jsonable({"fixed": self.fixed, "axes": {a.column: list(a.settings) for a in self.axes}})


def load_grid(grid: str | os.PathLike | dict, *, calibration=None) -> Grid:
    """Parse and validate a grid: every point's options are built before any work is done."""
    if isinstance(grid, dict):
        data, where, base = grid, "grid", Path.cwd()
    else:
        path = Path(grid)
        where, base = f"grid '{path}'", path.parent
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise XCompileError(f"{where} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise XCompileError(f"{where} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"grid", "fixed"})
    if unknown:
        raise XCompileError(f"{where}: unknown section(s) {', '.join(map(repr, unknown))}; a grid has [grid] (options to sweep) and [fixed] (options every point shares)")
    fixed, table = data.get("fixed", {}), data.get("grid")
    if not isinstance(fixed, dict):
        raise XCompileError(f"{where}: [fixed] must be a table of option = value")
    if not isinstance(table, dict) or not table:
        raise XCompileError(f"{where}: [grid] must name at least one option with a list of values, e.g. r_wire = [0.0, 1.0]")
    for key, value in fixed.items():
        _check_option_name(key, "[fixed]", where)
        if isinstance(value, list):
            raise XCompileError(f"{where}: [fixed] {key} must be one value; lists of values to sweep go under [grid]")
    fixed = {key: _resolved_value(key, value, base) for key, value in fixed.items()}
    axes = tuple(_axis(name, value, where, base) for name, value in table.items())
    set_by = {}
    for axis in axes:
        for option in axis.settings[0]:
            if option in fixed:
                raise XCompileError(f"{where}: option '{option}' is both swept in [grid] and set in [fixed]")
            if option in set_by:
                raise XCompileError(f"{where}: option '{option}' is swept by two axes, '{set_by[option]}' and '{axis.column}'")
            set_by[option] = axis.column
    points, seen = [], {}
    for index, choice in enumerate(itertools.product(*(range(len(a.settings)) for a in axes))):
        settings = {k: v for axis, i in zip(axes, choice) for k, v in axis.settings[i].items()}
        try:
            compile_options, hardware = split_options({**fixed, **settings})
        except XCompileError as exc:
            raise XCompileError(f"{where}: {_culprit(axes, choice, fixed, str(exc))}: {exc}") from None
        if compile_options.needs_calibration and calibration is None:
            mode = "remap 'dynamic'" if compile_options.remap == "dynamic" else f"sensitivity {compile_options.sensitivity!r}"
            raise XCompileError(
                f"{where}: the point {_describe_settings(settings)}: {mode} measures the model on data: "
                "give calibration data (--calibration 'digits' or an .npz with x and labels y)"
            )
        options = {k: _as_float(k, v) for k, v in {**compile_options.to_dict(), **hardware.to_dict()}.items()}
        key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
        if key in seen:
            raise XCompileError(f"{where}: the points {_describe_settings(seen[key])} and {_describe_settings(settings)} are the same options")
        seen[key] = settings
        labels = {axis.column: axis.labels[i] for axis, i in zip(axes, choice) if not axis.is_option}
        points.append(Point(index, key, labels, options))
    return Grid(axes, fixed, tuple(points))


def _axis(name: str, value: Any, where: str, base: Path) -> Axis:
    """A [grid] entry: option = [values], or name = {option = [values], ...} (a linked axis)."""
    if isinstance(value, dict):
        if name in RESERVED_COLUMNS or name == "hardware":
            raise XCompileError(f"{where}: [grid] {name} is a table of linked options, so it needs a name of its own, not a column name such as '{name}'")
        if not value:
            raise XCompileError(f"{where}: [grid] {name} links no options")
        lengths = set()
        for option, values in value.items():
            _check_option_name(option, f"[grid] {name}", where)
            _check_values(f"[grid] {name}.{option}", option, values, where)
            lengths.add(len(values))
        if len(lengths) > 1:
            raise XCompileError(f"{where}: [grid] {name} links options that move together, so their lists need the same length; got {sorted(lengths)}")
        settings = tuple(
            {option: _resolved_value(option, values[i], base) for option, values in value.items()} for i in range(lengths.pop())
        )
        labels = tuple(" / ".join(str(value[o][i]) for o in value) for i in range(len(settings)))
        if len(set(labels)) < len(labels):
            raise XCompileError(f"{where}: [grid] {name} repeats a combination of values")
        return Axis(name, settings, labels)
    _check_option_name(name, "[grid]", where)
    _check_values(f"[grid] {name}", name, value, where)
    settings = tuple({name: _resolved_value(name, v, base)} for v in value)
    labels = tuple(_as_float(name, v) for v in value) if name in OPTIONS else tuple(str(v) for v in value)
    return Axis(name, settings, labels)


def _check_option_name(key: str, section: str, where: str) -> None:
    if key not in OPTIONS and key != "hardware":
        raise XCompileError(f"{where}: unknown option '{key}' in {section}; known: {', '.join(sorted((*OPTIONS, 'hardware')))}")


def _check_values(what: str, option: str, values: Any, where: str) -> None:
    if not isinstance(values, list) or not values:
        raise XCompileError(f"{where}: {what} must be a non-empty list of values to sweep, got {values!r}")
    if any(isinstance(v, (list, dict)) for v in values):
        raise XCompileError(f"{where}: {what} must list single values, got {values!r}")
    normalised = [json.dumps(_as_float(option, v), default=str) for v in values]
    if len(set(normalised)) < len(values):
        raise XCompileError(f"{where}: {what} repeats a value: {values!r}")


def _resolved_value(option: str, value: Any, base: Path) -> Any:
    """Whole numbers for float options become floats (1 and 1.0 are one point); a hardware file
    is found next to the grid file."""
    if option == "hardware" and isinstance(value, str) and value not in PRESETS and (base / value).is_file():
        return str(base / value)
    return _as_float(option, value)


def _as_float(option: str, value: Any) -> Any:
    if option in FLOAT_OPTIONS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _culprit(axes: tuple[Axis, ...], choice: tuple[int, ...], fixed: dict, message: str) -> str:
    """Where a point's error comes from: one [grid] value that fails the same way with [fixed]
    alone, else [fixed] by itself, else the combination."""
    fixed_fails = _error_of(fixed) == message
    for axis, i in zip(axes, choice):
        if not fixed_fails and _error_of({**fixed, **axis.settings[i]}) == message:
            return f"[grid] {_describe_settings(axis.settings[i])}"
    if fixed_fails:
        return "[fixed]"
    return "the point " + _describe_settings({k: v for a, i in zip(axes, choice) for k, v in a.settings[i].items()})


def _error_of(options: dict) -> str | None:
    try:
        split_options(options)
    except XCompileError as exc:
        return str(exc)
    return None


def _describe_settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {v!r}" for k, v in settings.items()) or "(no options)"


def describe_point(point: Point, axes: tuple[Axis, ...]) -> str:
    """The point by its values on the axes, as the grid names them."""
    return ", ".join(
        f"{a.column} = {point.options[a.column]!r}" if a.is_option else f"{a.column} = {point.labels[a.column]!r}" for a in axes
    )


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON: what a manifest or record compares against."""
    return json.loads(json.dumps(value, default=str))
