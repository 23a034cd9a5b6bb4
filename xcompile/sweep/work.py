"""The unit of work: one grid point, compiled once, its float model run once, then its seeded
trials on the crossbars."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from threadpoolctl import threadpool_limits

TRIAL_COLUMNS = ("trial", "trial_seed", "float_accuracy", "accuracy", "drop", "adc_clipped", "adc_conversions", "run_seconds")
POINT_COLUMNS = ("cells", "tiles", "crossbars_used", "writes", "compile_seconds")
TIMING_COLUMNS = ("compile_seconds", "run_seconds")


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


def run_point(task: PointTask, model: str | bytes) -> dict[str, Any]:
    """Compile one point once, run the float model once, then its trials (trial t: seed + t),
    each trial the same numbers as `evaluate` gives for its seed.

    BLAS runs on one thread so that every engine (this process, a pool, a Dask worker) does
    the same arithmetic: the same seeds give the same table anywhere.
    """
    import onnx

    from xcompile.evaluate import FloatReference, crossbar_trial
    from xcompile.pipeline import compile_model

    source = onnx.load_model_from_string(model) if isinstance(model, bytes) else model
    with threadpool_limits(limits=1, user_api="blas"):
        started = time.perf_counter()
        mapping = compile_model(source, progress=False, calibration=task.calibration, **task.options)
        compile_seconds = time.perf_counter() - started
        info = mapping.summary()
        reference = FloatReference.measure(mapping, task.dataset, batch_size=task.batch_size)
        trials = []
        for t in range(task.trials):
            started = time.perf_counter()
            trial = crossbar_trial(mapping, reference, task.seed + t)
            trials.append(
                {
                    "trial": t,
                    "trial_seed": trial["seed"],
                    "float_accuracy": reference.float_accuracy,
                    "accuracy": trial["accuracy"],
                    "drop": reference.float_accuracy - trial["accuracy"],
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
