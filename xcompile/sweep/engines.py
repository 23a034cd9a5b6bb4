"""Where the points run. Each engine yields (task, result, None) or (task, None, error) as
points finish: this process, a local process pool whose workers die with the sweep, or Dask."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from xcompile.errors import XCompileError
from xcompile.sweep.work import PointTask, run_point

PR_SET_PDEATHSIG = 1  # prctl(2) on Linux: the signal a process gets when its parent dies


def execute(
    tasks: list[PointTask], model: Path, scheduler: str | None, workers: int, stack: contextlib.ExitStack
) -> Iterator[tuple[PointTask, dict | None, str | None]]:
    """The outcomes of `tasks` as they finish, a generator to close when the sweep ends (which
    stops a pool's workers); a Dask cluster is reached (or started) before this returns, and
    closed with `stack`. No tasks start nothing."""
    if not tasks or (scheduler is None and workers == 1):
        return _in_process_results(tasks, model)
    if scheduler is not None:
        return _dask_results(tasks, model, _dask_client(scheduler, workers, stack))
    return _pool_results(tasks, model, workers)


def _in_process_results(tasks, model):
    for task in tasks:
        try:
            yield task, run_point(task, str(model)), None
        except Exception as exc:  # one point's failure is reported with the others', not fatal
            yield task, None, _describe_error(exc)


_started = None  # in a pool worker: where it says which point it begins


def _init_pool_worker(started, parent: int) -> None:
    """A worker says where it reports the points it begins, dies with its parent, and gives
    tqdm a lock of its own: it shows no bars, and tqdm's default lock is a named semaphore that a
    stopped worker would leave for the resource tracker to complain of."""
    global _started
    _started = started
    tqdm.set_lock(threading.RLock())
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """A pool worker must not outlive the sweep: a parent killed outright (SIGKILL, the OOM
    killer) cannot stop its pool, and the workers would go on computing for nobody. On Linux the
    kernel kills the worker when the parent dies; elsewhere a thread watches the parent."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:  # it died before the request took effect
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent,), name="xcompile-parent-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


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
    pool = ProcessPoolExecutor(max_workers=width, mp_context=context, initializer=_init_pool_worker, initargs=(started, os.getpid()))
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
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): the running points are lost, so stop their workers now
        _stop_workers(pool)
        raise
    pool.shutdown()
    keys = set()
    while not started.empty():
        keys.add(started.get())
    return unfinished, keys


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's workers and cancel what has not started. ProcessPoolExecutor can
    only wait for running work before Python 3.14 (terminate_workers), so its process table is
    read directly; it is emptied by shutdown, hence read first."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        with contextlib.suppress(OSError):
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=5)


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


