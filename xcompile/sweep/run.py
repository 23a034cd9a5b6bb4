"""Running a sweep: check the input, lock the results folder, run the points not yet there on
an engine, save each as it finishes, rebuild the tables and plots."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from xcompile.errors import XCompileError
from xcompile.sweep.engines import execute
from xcompile.sweep.grid import describe_point, load_grid
from xcompile.sweep.store import MANIFEST_FORMAT, Results
from xcompile.sweep.tables import write_plots
from xcompile.sweep.work import PointTask


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

    Points already in `output` whose records check out are not recomputed
    (`table.attrs["computed"]` counts the ones this call computed); `output` is locked for the
    call, so another run into it meanwhile is refused. SIGTERM ends the call as Ctrl-C does
    (KeyboardInterrupt), finished points kept. scheduler: None runs on `workers` local
    processes (default all cores; 1 runs in this process), 'local' starts a Dask LocalCluster
    with `workers` workers, anything else is the address of a running Dask scheduler.
    calibration: data for points whose compile measures the model (remap 'dynamic', ...).
    Bad input is refused before any work starts; points that fail are named in one
    XCompileError after the others have finished and been saved.
    """
    import pandas as pd

    from xcompile.data import load_calibration, load_dataset
    from xcompile.frontend import load_model

    for name, value, low in (("trials", trials, 1), ("seed", seed, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise XCompileError(f"sweep {name} must be a whole number >= {low}, got {value!r}")
    workers = _check_workers(workers, scheduler)
    model_path = Path(model)
    load_model(model_path)
    load_dataset(dataset)
    if calibration is not None:
        load_calibration(calibration)
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
    failures = []
    with _terminate_as_interrupt(), Results.open(output, manifest, plan) as results:
        todo = [p for p in plan.points if p.key not in results.finished]
        tasks = [PointTask(p.key, p.options, _data_source(dataset), trials, seed, batch_size, _data_source(calibration)) for p in todo]
        with contextlib.ExitStack() as stack:
            outcomes = execute(tasks, model_path, scheduler, workers, stack)  # reaches the cluster first
            stack.enter_context(contextlib.closing(outcomes))  # an interrupted sweep stops its workers
            if tasks:
                results.begin()
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
        listed = "; ".join(f"point {p.index} ({describe_point(p, plan.axes)}): {error}" for p, error in failures)
        raise XCompileError(
            f"{len(failures)} of {len(plan.points)} sweep points failed ({listed}); the finished points are saved in "
            f"'{results.folder}', run the same sweep again to retry the failed ones"
        )
    return table


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, a job scheduler's stop) ends the sweep as Ctrl-C does: the finished points
    stay, the workers stop, nothing is left half-written. Only where SIGTERM would otherwise end
    the process on the spot: in the main thread, when no handler is set."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
    from xcompile.data import BUILTIN_DATASETS

    if source is None or str(source) in BUILTIN_DATASETS:
        return source
    return str(Path(source).resolve())


def _data_identity(source: str | os.PathLike) -> dict[str, Any]:
    """A built-in data set by name, a file by its digest (the name may change, the data not);
    sweep() has read it already, so it is there."""
    from xcompile.data import BUILTIN_DATASETS

    if str(source) in BUILTIN_DATASETS:
        return {"name": str(source), "sha256": None}
    path = Path(source)
    return {"name": path.name, "sha256": _sha256(path)}

