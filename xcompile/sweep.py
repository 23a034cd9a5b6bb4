"""Parameter sweeps: every point of a grid of compile and hardware options is compiled once and
evaluated over seeded Monte-Carlo trials, on a local process pool or a Dask cluster.

The grid (a TOML file or the same as a dict, docs/sweep.md):

    [grid]                                   # one axis per key; the points are their product
    r_wire = [0.0, 1.0, 2.5]
    encoding = ["dual", "acm"]
    crossbar = { rows = [64, 128], cols = [64, 128] }   # a linked axis: options that move together
    [fixed]                                  # options every point shares
    variation = "lognormal"
    sigma = 0.05

A results folder holds manifest.json (model and dataset digests, grid, trials, seed: a folder
from another sweep is refused, never mixed), points/<key>.json (one per finished point, written
atomically: an interrupted sweep loses nothing that finished and a rerun computes only what is
missing), table.csv (one row per point and trial), summary.csv (mean and std per point) and
plots/accuracy_vs_<axis>.png.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
import tomllib
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from xcompile.config import PRESETS, CompileOptions, Hardware, split_options
from xcompile.errors import XCompileError
from xcompile.fileio import atomic_output

MANIFEST_FORMAT = "xcompile-sweep/1"
OPTIONS = tuple(f.name for f in fields(CompileOptions)) + tuple(f.name for f in fields(Hardware))
FLOAT_OPTIONS = frozenset(f.name for f in (*fields(CompileOptions), *fields(Hardware)) if isinstance(f.default, float))
TRIAL_COLUMNS = ("trial", "trial_seed", "float_accuracy", "accuracy", "drop", "adc_clipped", "adc_conversions", "run_seconds")
POINT_COLUMNS = ("cells", "tiles", "crossbars_used", "writes", "compile_seconds")
TIMING_COLUMNS = ("compile_seconds", "run_seconds")
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
        return _jsonable({"fixed": self.fixed, "axes": {a.column: list(a.settings) for a in self.axes}})


@dataclass(frozen=True)
class PointTask:
    """What a worker needs to compile one point and run its trials."""

    key: str
    options: dict[str, Any]
    dataset: str
    trials: int
    seed: int
    batch_size: int
    calibration: str | None


def sweep(
    model: str | os.PathLike,
    grid: str | os.PathLike | dict,
    *,
    dataset: str | os.PathLike,
    output: str | os.PathLike,
    trials: int = 1,
    seed: int = 0,
    scheduler: str | None = None,
    workers: int | None = None,
    calibration: str | os.PathLike | None = None,
    batch_size: int = 256,
    progress: bool | None = None,
):
    """Compile every grid point once, evaluate it over `trials` seeds (trial t: seed + t), and
    return the tidy table (pandas DataFrame, one row per point and trial; docs/sweep.md).

    Points already in `output` are not recomputed (`table.attrs["computed"]` counts the ones
    this call computed). scheduler: None runs on `workers` local
    processes (default all cores; 1 runs in this process), 'local' starts a Dask LocalCluster
    with `workers` workers, anything else is the address of a running Dask scheduler.
    calibration: data for points whose compile measures the model (remap 'dynamic', ...).
    Bad input is refused before any work starts; points that fail are named in one
    XCompileError after the others have finished and been saved.
    """
    import pandas as pd

    from xcompile.evaluate import load_dataset
    from xcompile.frontend import load_model

    for name, value, low in (("trials", trials, 1), ("seed", seed, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise XCompileError(f"sweep {name} must be a whole number >= {low}, got {value!r}")
    workers = _check_workers(workers, scheduler)
    model_path = Path(model)
    load_model(model_path)
    load_dataset(dataset)
    plan = load_grid(grid, calibration=calibration)
    plots = _plots_available()
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": {"name": model_path.name, "sha256": _sha256(model_path)},
        "dataset": _data_identity(dataset),
        "calibration": None if calibration is None else _data_identity(calibration),
        "trials": trials,
        "seed": seed,
        "batch_size": batch_size,
        "grid": plan.describe(),
        "points": [p.key for p in plan.points],
    }
    results = Results.open(output, manifest, plan)
    todo = [p for p in plan.points if p.key not in results.finished]
    tasks = [PointTask(p.key, p.options, _data_source(dataset), trials, seed, batch_size, _data_source(calibration)) for p in todo]
    failures = []
    with contextlib.ExitStack() as stack:
        outcomes = _execute(tasks, model_path, scheduler, workers, stack)  # reaches the cluster first
        if tasks:
            results.begin(manifest)
        bar = stack.enter_context(tqdm(total=len(todo) * trials, desc="sweep", unit="trial", disable=None if progress is None else not progress))
        bar.set_postfix_str(f"points {len(results.finished)}/{len(plan.points)}")
        for task, outcome, error in outcomes:
            if error is None:
                results.add(task.key, outcome)
            else:
                failures.append((results.point(task.key), error))
            bar.update(trials)
            bar.set_postfix_str(f"points {len(results.finished)}/{len(plan.points)}")
    results.save_tables()
    table = pd.read_csv(results.folder / "table.csv")  # as any later reader sees it (an unset option is NaN)
    table.attrs["computed"] = len(todo) - len(failures)  # the rest were already in the folder
    if plots and not table.empty:
        write_plots(table, plan.axes, results.folder / "plots")
    if failures:
        listed = "; ".join(f"point {p.index} ({_describe_point(p, plan.axes)}): {error}" for p, error in failures)
        raise XCompileError(
            f"{len(failures)} of {len(plan.points)} sweep points failed ({listed}); the finished points are saved in "
            f"'{results.folder}', run the same sweep again to retry the failed ones"
        )
    return table


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


def run_point(task: PointTask, model: str | bytes) -> dict[str, Any]:
    """Compile one point once and run its trials: the unit of work a worker gets.

    BLAS runs on one thread so that every engine (this process, a pool, a Dask worker) does
    the same arithmetic: the same seeds give the same table anywhere.
    """
    import onnx

    from xcompile.evaluate import evaluate
    from xcompile.pipeline import compile_model

    source = onnx.load_model_from_string(model) if isinstance(model, bytes) else model
    with threadpool_limits(limits=1, user_api="blas"):
        started = time.perf_counter()
        mapping = compile_model(source, progress=False, calibration=task.calibration, **task.options)
        compile_seconds = time.perf_counter() - started
        info = mapping.summary()
        trials = []
        for t in range(task.trials):
            started = time.perf_counter()
            result = evaluate(mapping, task.dataset, trials=1, seed=task.seed + t, batch_size=task.batch_size, progress=False)
            trial = result["per_trial"][0]
            trials.append(
                {
                    "trial": t,
                    "trial_seed": trial["seed"],
                    "float_accuracy": result["float_accuracy"],
                    "accuracy": trial["accuracy"],
                    "drop": result["float_accuracy"] - trial["accuracy"],
                    "adc_clipped": trial["adc_clipped"],
                    "adc_conversions": trial["adc_conversions"],
                    "run_seconds": time.perf_counter() - started,
                }
            )
    totals, schedule = info["totals"], info["schedule"]
    return {
        "cells": totals["cells_used"],
        "tiles": totals["tiles"],
        "crossbars_used": totals["crossbars"],
        "writes": totals["cells_used"] if schedule is None else schedule["writes_total"],
        "compile_seconds": compile_seconds,
        "trials": trials,
    }


class Results:
    """The results folder: the manifest, one file per finished point, the tables rebuilt from them."""

    def __init__(self, folder: Path, grid: Grid, finished: dict[str, dict]):
        self.folder = folder
        self.grid = grid
        self.finished = finished
        self._points = {p.key: p for p in grid.points}

    @classmethod
    def open(cls, output: str | os.PathLike, manifest: dict[str, Any], grid: Grid) -> "Results":
        """Read the points of this sweep already in `output`; a folder holding anything else is
        refused. Writes nothing: `begin` does, once the work can start."""
        folder = Path(output)
        path = folder / "manifest.json"
        if folder.exists() and not folder.is_dir():
            raise XCompileError(f"results folder '{folder}' is a file, expected a folder")
        if path.exists():
            try:
                previous = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise XCompileError(f"results folder '{folder}': manifest.json is unreadable ({exc}); give another folder") from None
            _check_same_sweep(folder, previous, manifest)
        elif folder.exists() and any(folder.iterdir()):
            raise XCompileError(f"results folder '{folder}' is not empty and holds no sweep (manifest.json); give an empty or new folder")
        finished = {}
        for point in grid.points:
            saved = _read_json(folder / "points" / f"{point.key}.json")
            if saved is not None and saved.get("key") == point.key:
                finished[point.key] = saved["result"]
        return cls(folder, grid, finished)

    def begin(self, manifest: dict[str, Any]) -> None:
        """Make the folder this sweep's: the manifest first, so nothing is ever written without it."""
        (self.folder / "points").mkdir(parents=True, exist_ok=True)
        if not (self.folder / "manifest.json").exists():
            with atomic_output(self.folder / "manifest.json") as temp:
                temp.write_text(json.dumps(manifest, indent=2))

    def point(self, key: str) -> Point:
        return self._points[key]

    def add(self, key: str, result: dict[str, Any]) -> None:
        """Save one finished point, then the tables: each file appears complete or not at all."""
        point = self._points[key]
        record = {"key": key, "point": point.index, "labels": point.labels, "options": point.options, "result": result}
        with atomic_output(self.folder / "points" / f"{key}.json") as temp:
            temp.write_text(json.dumps(record, indent=1))
        self.finished[key] = result
        self.save_tables()

    def save_tables(self) -> None:
        """table.csv and summary.csv from the finished points."""
        table = self.table()
        for name, frame in (("table.csv", table), ("summary.csv", summarize(table))):
            with atomic_output(self.folder / name) as temp:
                frame.to_csv(temp, index=False)

    def table(self):
        """One row per finished point and trial, in grid order; swept columns first."""
        import pandas as pd

        axis_columns = [a.column for a in self.grid.axes]
        columns = ["point", "point_key", *axis_columns, *(o for o in OPTIONS if o not in axis_columns), *TRIAL_COLUMNS, *POINT_COLUMNS]
        rows = []
        for point in self.grid.points:
            result = self.finished.get(point.key)
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


# ---- execution engines: each yields (task, result, None) or (task, None, error) as points finish


def _execute(
    tasks: list[PointTask], model: Path, scheduler: str | None, workers: int, stack: contextlib.ExitStack
) -> Iterator[tuple[PointTask, dict | None, str | None]]:
    """The outcomes of `tasks` as they finish; a Dask cluster is reached (or started) before
    this returns, and closed with `stack`."""
    if not tasks:
        return iter(())
    if scheduler is not None:
        return _dask_results(tasks, model, _dask_client(scheduler, workers, stack))
    if workers == 1:
        return _in_process_results(tasks, model)
    return _pool_results(tasks, model, workers)


def _in_process_results(tasks, model):
    for task in tasks:
        try:
            yield task, run_point(task, str(model)), None
        except Exception as exc:  # one point's failure is reported with the others', not fatal
            yield task, None, _describe_error(exc)


_started = None  # in a pool worker: where it says which point it begins


def _init_pool_worker(started) -> None:
    global _started
    _started = started


def _run_point_in_pool(task: PointTask, model: str) -> dict[str, Any]:
    _started.put(task.key)
    return run_point(task, model)


def _pool_results(tasks, model, workers):
    """Points on local processes. When one worker dies, ProcessPoolExecutor fails every
    unfinished point; the points not yet started go to a fresh pool, and the ones that were
    running are retried alone, so only a point that kills its worker by itself is lost."""
    queue, alone = list(tasks), []
    while queue or alone:
        if not queue:  # a point that was running when a worker died, retried alone
            task = alone.pop(0)
            unfinished, _ = yield from _pool_pass([task], model, 1)
            if unfinished:
                yield task, None, "its worker process died, also when the point ran alone"
            continue
        unfinished, started = yield from _pool_pass(queue, model, min(workers, len(queue)))
        if not unfinished:
            queue = []
        elif not started and len(unfinished) == len(queue):
            for task in unfinished:  # the pool could not start a single point
                yield task, None, "the worker processes died before running it"
            queue = []
        else:
            warnings.warn(f"a sweep worker process died; retrying {len(unfinished)} unfinished point(s)", stacklevel=2)
            queue = [t for t in unfinished if t.key not in started]
            alone += [t for t in unfinished if t.key in started]


def _pool_pass(tasks, model, width):
    """Run tasks on one process pool, yielding outcomes as they finish, until all are done or a
    worker dies; returns the unfinished tasks and the keys of every task a worker began."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked numba / ONNX Runtime threads
    started = context.SimpleQueue()
    pool = ProcessPoolExecutor(max_workers=width, mp_context=context, initializer=_init_pool_worker, initargs=(started,))
    unfinished = []
    try:
        futures = {pool.submit(_run_point_in_pool, task, str(model)): task for task in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                result = future.result()
            except BrokenProcessPool:
                unfinished.append(task)
                continue
            except Exception as exc:
                yield task, None, _describe_error(exc)
                continue
            yield task, result, None
    except BaseException:  # interrupted: leave now, the workers stop after their current point
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    keys = set()
    while not started.empty():
        keys.add(started.get())
    return unfinished, keys


def _dask_client(scheduler: str, workers: int, stack: contextlib.ExitStack):
    """A client of a new LocalCluster ('local', single-threaded workers) or of the running
    cluster at `scheduler`."""
    import dask
    import distributed

    if scheduler == "local":
        # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers (and in this process): freed
        # memory goes back to the OS at once, so a trial's large temporaries fault in anew every
        # time: trials ran ~25 % slower, and so did a process pool started after the cluster
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = stack.enter_context(
                distributed.LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None, silence_logs=40)
            )
        return stack.enter_context(distributed.Client(cluster))
    try:
        return stack.enter_context(distributed.Client(scheduler, timeout="10s"))
    except (OSError, TimeoutError, ValueError) as exc:
        raise XCompileError(f"cannot reach the Dask scheduler at '{scheduler}': {exc}") from None


def _dask_results(tasks, model, client):
    """Points as Dask tasks, one per point; the model travels as bytes, so the workers need no
    shared file system for it. A task whose worker dies is rerun by Dask elsewhere."""
    import distributed
    import onnx

    model_bytes = client.scatter(onnx.load(str(model)).SerializeToString(), broadcast=True)
    futures = {client.submit(run_point, task, model_bytes, pure=False): task for task in tasks}
    for future in distributed.as_completed(futures):
        task = futures.pop(future)
        if future.status == "finished":
            yield task, future.result(), None
        elif future.status == "error":
            yield task, None, _describe_error(future.exception())
        else:
            yield task, None, f"the Dask task ended {future.status}"
        future.release()


def _describe_error(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, XCompileError) else f"{type(exc).__name__}: {exc}"


# ---- checks and helpers


def _check_workers(workers, scheduler) -> int:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise XCompileError(f"sweep workers must be a whole number >= 1, got {workers!r}")
    if scheduler is not None:
        if not isinstance(scheduler, str) or not scheduler:
            raise XCompileError(f"scheduler must be 'local' or a Dask scheduler address such as tcp://host:8786, got {scheduler!r}")
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise XCompileError("running a sweep on Dask needs dask.distributed: pip install 'xcompile[cluster]'") from None
        if scheduler != "local" and workers is not None:
            raise XCompileError(f"workers applies to local runs and scheduler 'local'; the cluster at '{scheduler}' has its own workers")
    return workers or os.cpu_count() or 1


def _plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("the sweep writes no plots: they need matplotlib (pip install matplotlib)", stacklevel=3)
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _data_source(source: str | os.PathLike | None) -> str | None:
    """A built-in name as is, a file as an absolute path (workers may run elsewhere)."""
    from xcompile.evaluate import BUILTIN_DATASETS

    if source is None or str(source) in BUILTIN_DATASETS:
        return source
    return str(Path(source).resolve())


def _data_identity(source: str | os.PathLike) -> dict[str, Any]:
    """A built-in data set by name, a file by its digest (the name may change, the data not)."""
    from xcompile.evaluate import BUILTIN_DATASETS

    if str(source) in BUILTIN_DATASETS:
        return {"name": str(source), "sha256": None}
    path = Path(source)
    if not path.is_file():
        raise XCompileError(f"data file '{path}' does not exist")
    return {"name": path.name, "sha256": _sha256(path)}


def _check_same_sweep(folder: Path, previous: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Refuse to mix: the folder must hold this very sweep (model, data, points, trials, seed)."""
    if previous.get("format") != MANIFEST_FORMAT:
        raise XCompileError(f"results folder '{folder}': manifest.json is not an xcompile sweep manifest ({MANIFEST_FORMAT})")

    def identity(entry):
        return None if entry is None else (entry["sha256"] or entry["name"])

    def shown(entry):
        return "none" if entry is None else entry["name"] + (f" sha256 {entry['sha256'][:12]}" if entry["sha256"] else "")

    checks = [
        (what, identity(previous.get(key)), identity(manifest[key]), f" ({shown(previous.get(key))} there, {shown(manifest[key])} here)")
        for what, key in (("model", "model"), ("dataset", "dataset"), ("calibration data", "calibration"))
    ]
    checks += [
        (what, previous.get(key), manifest[key], f" ({previous.get(key)} there, {manifest[key]} here)")
        for what, key in (("number of trials", "trials"), ("first seed", "seed"), ("batch size", "batch_size"))
    ]
    # a point's key digests its resolved options: the same set of keys is the same grid, however written
    there = sorted(previous.get("points") or [])
    checks.append(("grid", there, sorted(manifest["points"]), _grid_difference(previous.get("grid"), _jsonable(manifest["grid"]))))
    for what, there, here, detail in checks:
        if there != here:
            raise XCompileError(
                f"results folder '{folder}' holds a sweep with a different {what}{detail}; "
                "give another output folder, or delete that one to start over"
            )


def _grid_difference(there: dict | None, here: dict) -> str:
    """The first entry in which two grids (Grid.describe) differ, as the user wrote them."""

    def shown(settings):
        if settings is None:
            return "not set"
        if isinstance(settings, list) and all(len(s) == 1 for s in settings):
            return repr([next(iter(s.values())) for s in settings])
        return repr(settings)

    there = there if isinstance(there, dict) else {}
    for section, key in (("fixed", "fixed"), ("grid", "axes")):
        old, new = there.get(key) or {}, here[key]
        for name in [*old, *(n for n in new if n not in old)]:
            if old.get(name) != new.get(name):
                return f" ([{section}] {name}: {shown(old.get(name))} there, {shown(new.get(name))} here)"
    return " (its points resolve to other options: did a hardware file change?)"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


def _describe_point(point: Point, axes: tuple[Axis, ...]) -> str:
    return ", ".join(
        f"{a.column} = {point.options[a.column]!r}" if a.is_option else f"{a.column} = {point.labels[a.column]!r}" for a in axes
    )


def _present(axis: Axis, table) -> list:
    """The axis' values that occur in the table, in grid order."""
    seen = set(table[axis.column])
    return [v for v in axis.labels if v in seen]


def _title(axis: Axis) -> str:
    return " / ".join(axis.settings[0]) if len(axis.settings[0]) > 1 else axis.column


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
