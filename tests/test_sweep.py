"""Parameter sweeps: bad grids refused before any work, the same table from every engine (this
process, a process pool, a real Dask cluster on loopback), resuming, failures that lose
nothing else, a results folder one run holds at a time and checks as untrusted input, and
stopping (SIGTERM, SIGKILL) that leaves no worker and no half-written file behind."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

import xcompile
from xcompile.cli import main

sweep_module = importlib.import_module("xcompile.sweep")  # `xcompile.sweep` is the function
engines = importlib.import_module("xcompile.sweep.engines")
run_point = sweep_module.run_point
MODELS = Path(__file__).resolve().parent.parent / "models"
MLP = MODELS / "digits_mlp.onnx"
GRID = {"grid": {"r_wire": [0.0, 2.5], "encoding": ["dual", "acm"]}, "fixed": {"variation": "lognormal", "sigma": 0.05}}
GRID_TOML = '[grid]\nr_wire = [0.0, 2.5]\nencoding = ["dual", "acm"]\n[fixed]\nvariation = "lognormal"\nsigma = 0.05\n'
RUN = {"dataset": "digits", "trials": 2, "seed": 3, "batch_size": 512, "progress": False}


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    """The table without its wall-clock columns, which differ from run to run."""
    return table.drop(columns=list(sweep_module.TIMING_COLUMNS)).reset_index(drop=True)


def files_of(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The small grid run in this process: (results folder, table)."""
    folder = tmp_path_factory.mktemp("sweep") / "reference"
    table = xcompile.sweep(MLP, GRID, output=folder, workers=1, **RUN)
    return folder, table


def counting_run_point(monkeypatch, fail_after: int | None = None, error: BaseException | None = None) -> list:
    """Replace run_point (in-process runs) by one that records the points it computes and,
    after `fail_after` of them, raises `error`."""
    calls = []

    def counting(task, model):
        if fail_after is not None and len(calls) >= fail_after:
            raise error
        calls.append(task.key)
        return run_point(task, model)

    monkeypatch.setattr(engines, "run_point", counting)
    return calls


def test_table_has_a_row_per_point_and_trial_and_the_documented_columns(reference):
    folder, table = reference
    assert len(table) == 4 * RUN["trials"]
    assert list(table.columns[:4]) == ["point", "point_key", "r_wire", "encoding"]
    for column in ("sigma", "rows", "weight_bits", "accuracy", "drop", "adc_clipped", "cells", "crossbars_used", "writes",
                   "compile_seconds", "run_seconds", "trial_seed"):
        assert column in table.columns
    assert sorted(set(table["trial_seed"])) == [3, 4]
    assert (table["drop"] == table["float_accuracy"] - table["accuracy"]).all()
    dual = table[table["encoding"] == "dual"]["cells"].iloc[0]
    acm = table[table["encoding"] == "acm"]["cells"].iloc[0]
    assert acm < dual  # N + 1 columns per tile instead of 2N
    on_disk = pd.read_csv(folder / "table.csv")
    pd.testing.assert_frame_equal(comparable(on_disk), comparable(table), check_dtype=False)
    summary = pd.read_csv(folder / "summary.csv")
    assert len(summary) == 4 and {"accuracy_mean", "accuracy_std", "drop_mean", "adc_clipped_mean", "trials"} <= set(summary.columns)
    first = table[table["point"] == 0]["accuracy"]
    assert summary["accuracy_mean"].iloc[0] == pytest.approx(first.mean())
    assert summary["accuracy_std"].iloc[0] == pytest.approx(first.std(ddof=1))
    assert sorted(p.name for p in (folder / "plots").iterdir()) == ["accuracy_vs_encoding.png", "accuracy_vs_r_wire.png"]
    assert len(list((folder / "points").glob("*.json"))) == 4


@pytest.mark.parametrize(
    "grid, key",
    [
        ({"grid": {"r_wir": [0.0, 1.0]}}, "'r_wir'"),
        ({"grid": {"r_wire": [0.0, -1.0]}}, "r_wire = -1.0"),
        ({"grid": {"encoding": ["dual", "quad"]}}, "encoding = 'quad'"),
        ({"grid": {"r_wire": 1.0}}, "r_wire must be a non-empty list"),
        ({"grid": {"r_wire": [0.0, 0]}}, "r_wire repeats a value"),
        ({"grid": {"r_wire": [0.0]}, "fixed": {"r_wire": 1.0}}, "'r_wire' is both swept"),
        ({"grid": {"size": {"rows": [32, 64], "cols": [32]}}}, "size links options"),
        ({"grid": {"r_wire": [0.0]}, "fixed": {"sigmaa": 0.1}}, "'sigmaa' in [fixed]"),
        ({"grid": {"sigma": [0.0, 0.1]}}, "sigma = 0.1"),
        ({"grid": {"remap": ["none", "dynamic"]}}, "remap = 'dynamic'"),
        ({"grids": {"r_wire": [0.0]}}, "'grids'"),
        ({"fixed": {"r_wire": 1.0}}, "[grid] must name"),
    ],
    ids=["unknown", "negative", "choice", "not-a-list", "repeat", "swept-and-fixed", "linked-lengths", "unknown-fixed",
         "combination", "needs-calibration", "section", "no-grid"],
)
def test_bad_grid_is_refused_naming_the_key_before_any_work(tmp_path, monkeypatch, grid, key):
    calls = counting_run_point(monkeypatch)
    out = tmp_path / "results"
    with pytest.raises(xcompile.XCompileError) as error:
        xcompile.sweep(MLP, grid, output=out, workers=1, **RUN)
    assert key in str(error.value)
    assert not calls and not out.exists()


def test_bad_grid_file_on_the_command_line_is_one_line_exit_2(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text("[grid]\nr_wire = [0.0, 1.0]\nencoding = ['dual', 'quad']\n")
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "xcompile.cli", "sweep", str(MLP), "--grid", str(grid), "--dataset", "digits", "-o", str(out)],
        capture_output=True, text=True,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"xcompile: error: grid '{grid}'") and "encoding = 'quad'" in lines[0]
    assert not out.exists()


def test_process_pool_gives_the_same_table(reference, tmp_path):
    table = xcompile.sweep(MLP, GRID, output=tmp_path / "pool", workers=2, **RUN)
    pd.testing.assert_frame_equal(comparable(table), comparable(reference[1]))


@pytest.fixture
def dask_cluster(tmp_path):
    """A real Dask cluster on loopback: a scheduler and two single-threaded workers, each its own
    process; stopped at the end, also when the test fails."""
    distributed = pytest.importorskip("distributed")
    scheduler_file = tmp_path / "scheduler.json"
    common = ["--no-dashboard"]
    processes = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--scheduler-file", str(scheduler_file), *common],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert processes[0].poll() is None and time.monotonic() < deadline, "the Dask scheduler did not start"
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for i in range(2):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny", "--name", f"w{i}",
                 "--local-directory", str(tmp_path / "workers"), *common],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:  # the workers first: a worker whose scheduler is gone waits to reconnect
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_dask_cluster_gives_the_same_table(reference, dask_cluster, tmp_path, capsys):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID_TOML)
    out = tmp_path / "dask"
    argv = ["sweep", str(MLP), "--grid", str(grid), "--dataset", "digits", "--trials", "2", "--seed", "3",
            "--batch-size", "512", "-o", str(out), "-q", "--scheduler", dask_cluster]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 points x 2 trial(s) from seed 3" in printed
    pd.testing.assert_frame_equal(comparable(pd.read_csv(out / "table.csv")), comparable(pd.read_csv(reference[0] / "table.csv")))


@pytest.fixture
def environment_restored():
    """Dask's nanny writes its workers' environment variables into this process: put it back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_local_cluster_runs_the_same_points(reference, tmp_path, environment_restored):
    pytest.importorskip("distributed")
    trimming = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    one = {"grid": {"r_wire": [2.5]}, "fixed": {"encoding": "acm", "variation": "lognormal", "sigma": 0.05}}
    table = xcompile.sweep(MLP, one, output=tmp_path / "local", scheduler="local", workers=1, **RUN)
    expected = reference[1][(reference[1]["r_wire"] == 2.5) & (reference[1]["encoding"] == "acm")]
    assert list(table["accuracy"]) == list(expected["accuracy"])
    assert list(table["point_key"]) == list(expected["point_key"])  # the same options are the same point
    # the nanny's memory trimming (which slows trials) is left out, for its workers and here
    assert os.environ.get("MALLOC_TRIM_THRESHOLD_") == trimming


def test_rerun_computes_nothing_and_rewrites_no_point(reference, monkeypatch):
    folder, table = reference
    before = {name: entry for name, entry in files_of(folder).items() if name.startswith("points")}
    calls = counting_run_point(monkeypatch)
    again = xcompile.sweep(MLP, GRID, output=folder, workers=1, **RUN)
    assert calls == [] and again.attrs["computed"] == 0
    assert {name: entry for name, entry in files_of(folder).items() if name.startswith("points")} == before
    pd.testing.assert_frame_equal(again, table)


def test_interrupted_sweep_keeps_what_finished_and_resumes(reference, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    calls = counting_run_point(monkeypatch, fail_after=2, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        xcompile.sweep(MLP, GRID, output=out, workers=1, **RUN)
    assert len(calls) == 2 and sorted(p.stem for p in (out / "points").glob("*.json")) == sorted(calls)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no half-written file
    assert len(pd.read_csv(out / "table.csv")) == 2 * RUN["trials"]
    finished = list(calls)
    calls = counting_run_point(monkeypatch)
    table = xcompile.sweep(MLP, GRID, output=out, workers=1, **RUN)
    assert len(calls) == 2 and not set(calls) & set(finished) and table.attrs["computed"] == 2
    pd.testing.assert_frame_equal(comparable(table), comparable(reference[1]))


def test_an_interrupt_between_a_temporary_file_and_its_removal_leaves_no_litter(tmp_path, monkeypatch):
    make_temporary = tempfile.mkstemp

    def interrupted(*args, **kwargs):  # Ctrl-C or SIGTERM just after a point's file was begun
        handle, name = make_temporary(*args, **kwargs)
        if Path(name).parent.name == "points":
            os.close(handle)
            raise KeyboardInterrupt
        return handle, name

    monkeypatch.setattr(tempfile, "mkstemp", interrupted)
    out = tmp_path / "results"
    with pytest.raises(KeyboardInterrupt):
        xcompile.sweep(MLP, {"grid": {"r_wire": [0.0]}}, output=out, workers=1, **RUN)
    assert (out / "manifest.json").exists() and not [p for p in out.rglob("*") if p.name.startswith(".")]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": MODELS / "digits_cnn.onnx"}, "different model (digits_mlp.onnx"),
        ({"grid": {**GRID, "grid": {**GRID["grid"], "r_wire": [0.0, 1.0]}}}, "different grid ([grid] r_wire: [0.0, 2.5] there, [0.0, 1.0] here)"),
        ({"grid": {**GRID, "fixed": {"variation": "lognormal", "sigma": 0.1}}}, "different grid ([fixed] sigma: 0.05 there, 0.1 here)"),
        ({"trials": 3}, "different number of trials (2 there, 3 here)"),
        ({"seed": 0}, "different first seed (3 there, 0 here)"),
    ],
    ids=["model", "grid", "fixed", "trials", "seed"],
)
def test_results_folder_of_another_sweep_is_refused_untouched(reference, monkeypatch, change, message):
    folder = reference[0]
    before = files_of(folder)
    calls = counting_run_point(monkeypatch)
    arguments = {"model": MLP, "grid": GRID, **RUN, **change}
    with pytest.raises(xcompile.XCompileError) as error:
        xcompile.sweep(arguments.pop("model"), arguments.pop("grid"), output=folder, workers=1, **arguments)
    assert message in str(error.value) and str(folder) in str(error.value)
    assert not calls and files_of(folder) == before


def test_the_same_grid_written_in_another_order_resumes(reference, monkeypatch):
    calls = counting_run_point(monkeypatch)
    reordered = {"fixed": {"sigma": 0.05, "variation": "lognormal"}, "grid": {"encoding": ["dual", "acm"], "r_wire": [0.0, 2.5]}}
    table = xcompile.sweep(MLP, reordered, output=reference[0], workers=1, **RUN)
    assert not calls and len(table) == len(reference[1]) and list(table.columns[2:4]) == ["encoding", "r_wire"]


def test_folder_that_holds_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(xcompile.XCompileError, match="not empty and holds no sweep"):
        xcompile.sweep(MLP, GRID, output=tmp_path, workers=1, **RUN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_point_that_fails_to_compile_loses_no_other_point(tmp_path):
    # ACM cannot fit the MLP's suffix sums in 2-bit cells: valid options, an error at compile time
    grid = {"grid": {"encoding": ["dual", "acm"]}, "fixed": {"weight_bits": 2, "cell_bits": 2}}
    out = tmp_path / "failing"
    with pytest.raises(xcompile.XCompileError) as error:
        xcompile.sweep(MLP, grid, output=out, workers=1, **RUN)
    message = str(error.value)
    assert "1 of 2 sweep points failed" in message and "point 1 (encoding = 'acm')" in message and "ACM cannot hold" in message
    table = pd.read_csv(out / "table.csv")
    assert set(table["encoding"]) == {"dual"} and len(table) == RUN["trials"]
    assert len(list((out / "points").glob("*.json"))) == 1


def _run_or_die(task, model):
    """Stands in for the pool's worker function: the ACM points kill their worker process, as a
    crash in native code would."""
    engines._started.put(task.key)
    if task.options["encoding"] == "acm":
        os._exit(3)
    return run_point(task, model)


def test_a_worker_process_that_dies_loses_no_other_point(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "_run_point_in_pool", _run_or_die)
    grid = {"grid": {"encoding": ["dual", "acm", "offset"]}}
    out = tmp_path / "dying"
    with pytest.warns(UserWarning, match="worker process died"), pytest.raises(xcompile.XCompileError) as error:
        xcompile.sweep(MLP, grid, output=out, workers=2, **{**RUN, "trials": 1})
    assert "1 of 3 sweep points failed (point 1 (encoding = 'acm'): its worker process died, also when the point ran alone)" in str(error.value)
    assert sorted(pd.read_csv(out / "table.csv")["encoding"]) == ["dual", "offset"]


def test_a_points_trials_are_what_evaluate_gives_for_the_same_seeds():
    """The work unit's per-trial numbers are `evaluate`'s for the same mapping and seeds."""
    from xcompile.evaluate import evaluate

    point = sweep_module.load_grid({"grid": {"r_wire": [2.5]}, "fixed": GRID["fixed"]}).points[0]
    task = sweep_module.PointTask(point.key, point.options, "digits", 3, 5, 512, None)
    result = run_point(task, str(MLP))
    mapping = xcompile.compile_model(MLP, progress=False, **point.options)
    expected = evaluate(mapping, "digits", trials=3, seed=5, batch_size=512, progress=False)
    assert [t["trial_seed"] for t in result["trials"]] == [5, 6, 7]
    for trial, reference in zip(result["trials"], expected["per_trial"], strict=True):
        assert trial["float_accuracy"] == expected["float_accuracy"]
        assert (trial["accuracy"], trial["adc_clipped"], trial["adc_conversions"]) == (
            reference["accuracy"], reference["adc_clipped"], reference["adc_conversions"])
    assert len({t["accuracy"] for t in result["trials"]}) > 1  # the seeds differ, so do the trials


def test_the_float_model_runs_once_per_point_not_once_per_trial(monkeypatch):
    from xcompile.runtime.ort_session import inference_session

    evaluate_module = importlib.import_module("xcompile.evaluate")
    built = []

    def counting(model, *args, **kwargs):
        built.append(model)
        return inference_session(model, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "inference_session", counting)  # the float model's sessions only
    point = sweep_module.load_grid({"grid": {"r_wire": [0.0]}}).points[0]
    result = run_point(sweep_module.PointTask(point.key, point.options, "digits", 3, 0, 512, None), str(MLP))
    assert len(result["trials"]) == 3 and len(built) == 1


# ---- the results folder is untrusted input, and one run's at a time

GATED_SWEEP = """
import pathlib, sys, time
from xcompile.sweep import engines  # (`import xcompile.sweep.engines` meets the function xcompile.sweep)
from xcompile.cli import main
compute = engines.run_point
def gated(task, model):  # every point waits until the test opens the gate
    while not pathlib.Path(sys.argv[1]).exists():
        time.sleep(0.05)
    return compute(task, model)
engines.run_point = gated
sys.exit(main(sys.argv[2:]))
"""


def sweep_argv(grid: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", str(MLP), "--grid", str(grid), "--dataset", "digits", "--seed", "3", "--batch-size", "512", "-o", str(out), "-q", *extra]


def wait_for(condition, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_run_into_a_folder_in_use_is_refused_and_nothing_mixes(tmp_path, capsys):
    grid, out, gate = tmp_path / "grid.toml", tmp_path / "results", tmp_path / "gate"
    grid.write_text(GRID_TOML)
    first = subprocess.Popen([sys.executable, "-c", GATED_SWEEP, str(gate), *sweep_argv(grid, out, "--trials", "2", "--workers", "1")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "manifest.json").exists() or first.poll() is not None, "the first run to start")
        for trials in ("3", "2"):  # another sweep, and the same one again
            assert main(sweep_argv(grid, out, "--trials", trials, "--workers", "1")) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and "is in use by another sweep" in lines[0] and str(out) in lines[0]
        with pytest.raises(xcompile.XCompileError, match="in use by another sweep"):
            xcompile.sweep(MLP, GRID, output=out, workers=1, **{**RUN, "trials": 3})
        gate.touch()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        gate.touch()
        first.kill()
        first.wait()
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 4 * 2 and sorted(set(table["trial"])) == [0, 1]
    for path in (out / "points").glob("*.json"):
        assert json.loads(path.read_text())["made_by"]["trials"] == 2
    with pytest.raises(xcompile.XCompileError, match=r"different number of trials \(2 there, 3 here\)"):
        xcompile.sweep(MLP, GRID, output=out, workers=1, **{**RUN, "trials": 3})


def test_a_run_that_stops_before_writing_leaves_no_folder(tmp_path, monkeypatch):
    def unreachable(scheduler, workers, stack):
        raise xcompile.XCompileError(f"cannot reach the Dask scheduler at '{scheduler}'")

    monkeypatch.setattr(engines, "_dask_client", unreachable)
    out = tmp_path / "new" / "results"
    with pytest.raises(xcompile.XCompileError, match="cannot reach"):
        xcompile.sweep(MLP, GRID, output=out, scheduler="tcp://127.0.0.1:9", **RUN)
    assert not out.exists()  # its lock file went with it
    (tmp_path / "empty").mkdir()
    with pytest.raises(xcompile.XCompileError, match="cannot reach"):
        xcompile.sweep(MLP, GRID, output=tmp_path / "empty", scheduler="tcp://127.0.0.1:9", **RUN)
    assert list((tmp_path / "empty").iterdir()) == []


def trial(record: dict, t: int) -> dict:
    return record["result"]["trials"][t]


# each case edits a point's record in place, or returns the bytes to write instead; then the reason the warning gives
BAD_RECORDS = {
    "empty-list": (lambda r: b"[]", "a JSON list"),
    "number": (lambda r: b"42", "a JSON int"),
    "not-json": (lambda r: b'{"key": ', "not readable JSON"),
    "not-utf8": (lambda r: b"\xff\xfe{}", "not readable JSON"),
    "nested": (lambda r: b"[" * 10_000 + b"]" * 10_000, "not readable JSON"),
    "oversized": (lambda r: b"{}" + b" " * 100_000, "larger than a record of 2 trial(s) can be"),
    "no-result": (lambda r: r.pop("result"), "no 'result'"),
    "missing-key": (lambda r: r["result"].pop("cells"), "lacks cells"),
    "wrong-type": (lambda r: r["result"].update(cells="12"), "cells is '12'"),
    "accuracy-1.5": (lambda r: trial(r, 0).update(accuracy=1.5, drop=trial(r, 0)["float_accuracy"] - 1.5), "accuracy is 1.5"),
    "nan": (lambda r: trial(r, 1).update(accuracy=float("nan")), "it holds NaN"),
    "overflow": (lambda r: json.dumps({**r, "result": {**r["result"], "compile_seconds": "@"}}).replace('"@"', "1e400").encode(),
                 "compile_seconds is inf"),
    "duplicated-trial": (lambda r: r["result"]["trials"].__setitem__(1, dict(trial(r, 0))), "entry 1 is trial 0"),
    "missing-trial": (lambda r: r["result"]["trials"].pop(), "holds 1 trial(s), expected 2"),
    "other-trials": (lambda r: r["made_by"].update(trials=3), "made with trials 3"),
    "other-seed": (lambda r: trial(r, 1).update(trial_seed=99), "trial 1 has seed 99"),
    "other-options": (lambda r: r["options"].update(sigma=0.5), "options are not this point's"),
    "older-format": (lambda r: (r.pop("format"), r.pop("made_by")), "format is None"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_point_record_that_does_not_check_out_is_computed_again(reference, tmp_path, monkeypatch, case):
    rewrite, reason = BAD_RECORDS[case]
    folder = tmp_path / "copy"
    shutil.copytree(reference[0], folder)
    path = sorted((folder / "points").glob("*.json"))[1]
    record = json.loads(path.read_text())
    replaced = rewrite(record)
    path.write_bytes(replaced if isinstance(replaced, bytes) else json.dumps(record).encode())
    calls = counting_run_point(monkeypatch)
    with pytest.warns(UserWarning) as warned:
        table = xcompile.sweep(MLP, GRID, output=folder, workers=1, **RUN)
    messages = [str(w.message) for w in warned if "points/" in str(w.message)]
    assert len(messages) == 1 and f"points/{path.name}" in messages[0] and reason in messages[0] and "computing it again" in messages[0]
    assert calls == [path.stem] and table.attrs["computed"] == 1
    pd.testing.assert_frame_equal(comparable(table), comparable(reference[1]))
    fixed, original = (json.loads(p.read_text()) for p in (path, reference[0] / "points" / path.name))
    assert fixed.keys() == original.keys() and all(fixed[k] == original[k] for k in fixed if k != "result")


def test_a_bad_record_on_the_command_line_is_a_warning_line_and_the_sweep_completes(reference, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(reference[0], folder)
    path = sorted((folder / "points").glob("*.json"))[0]
    path.write_text("[]")
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID_TOML)
    assert main(sweep_argv(grid, folder, "--trials", "2", "--workers", "1")) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err and printed.err.count("xcompile: warning:") == 1 and f"points/{path.name}" in printed.err
    assert "(3 of 4 points were there already)" in printed.out


@pytest.mark.parametrize(
    "content, message",
    [(b"[]", "not an xcompile sweep manifest"), (b"42", "not an xcompile sweep manifest"), (b"{", "unreadable"),
     (b"[" * 100_000 + b"]" * 100_000, "unreadable"), (b"\xff", "unreadable")],
    ids=["list", "number", "truncated", "nested", "not-utf8"],
)
def test_a_manifest_that_is_not_one_is_one_line_and_the_folder_untouched(reference, tmp_path, content, message):
    folder = tmp_path / "copy"
    shutil.copytree(reference[0], folder)
    (folder / "manifest.json").write_bytes(content)
    before = files_of(folder)
    with pytest.raises(xcompile.XCompileError, match=message):
        xcompile.sweep(MLP, GRID, output=folder, workers=1, **RUN)
    assert files_of(folder) == before


def test_half_written_files_of_a_killed_run_are_removed_on_resume(reference, tmp_path, monkeypatch):
    folder = tmp_path / "copy"
    shutil.copytree(reference[0], folder)
    litter = [folder / ".table.csv.k2j4x.partial.csv", folder / "points" / ".0123.json.9fjw1.partial.json"]
    for path in litter:
        path.write_text("half")
    calls = counting_run_point(monkeypatch)
    xcompile.sweep(MLP, GRID, output=folder, workers=1, **RUN)
    assert not calls and not any(path.exists() for path in litter)


# ---- stopping: a killed sweep leaves no workers behind, a terminated one stops cleanly

def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def pool_workers(pid: int) -> list[int]:
    """The process pool workers that process `pid` started (its multiprocessing children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def finished_points(folder: Path) -> list[str]:
    """The keys of the point files in `folder` (not the temporary files written beside them)."""
    return sorted(p.stem for p in (folder / "points").glob("*.json") if not p.name.startswith("."))


SLOW_GRID = '[grid]\nr_wire = [0.0, 1.0, 2.5, 5.0]\n[fixed]\nvariation = "lognormal"\nsigma = 0.05\n'


def start_slow_sweep(tmp_path: Path, trials: int) -> tuple[subprocess.Popen, Path]:
    grid, out = tmp_path / "grid.toml", tmp_path / "results"
    grid.write_text(SLOW_GRID)
    process = subprocess.Popen([sys.executable, "-m", "xcompile.cli", *sweep_argv(grid, out, "--trials", str(trials), "--workers", "2")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return process, out


def test_pool_workers_die_with_a_killed_sweep(tmp_path):
    process, out = start_slow_sweep(tmp_path, trials=60)
    workers = []
    try:  # once a point has finished, the workers are past their start-up and computing
        wait_for(lambda: finished_points(out) or process.poll() is not None, "a first finished point")
        workers = pool_workers(process.pid)
        assert process.poll() is None and len(workers) == 2 and all(alive(pid) for pid in workers)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        wait_for(lambda: not any(alive(pid) for pid in workers), "the workers to die with the sweep", seconds=10)
    finally:
        process.kill()
        process.wait()
        for pid in filter(alive, workers):  # whatever the outcome, leave no process behind
            os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_the_sweep_keeping_what_finished(tmp_path, monkeypatch):
    trials = 60
    process, out = start_slow_sweep(tmp_path, trials)
    try:
        wait_for(lambda: finished_points(out) or process.poll() is not None, "a first finished point")
        workers = pool_workers(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 130
        err = process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "xcompile: interrupted"
    wait_for(lambda: not any(alive(pid) for pid in workers), "the workers to stop", seconds=10)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no half-written file
    finished = finished_points(out)
    assert 1 <= len(finished) < 4
    calls = counting_run_point(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every record kept checks out
        table = xcompile.sweep(MLP, tmp_path / "grid.toml", output=out, workers=1, **{**RUN, "trials": trials})
    assert sorted(calls) == sorted(set(table["point_key"]) - set(finished)) and len(table) == 4 * trials
