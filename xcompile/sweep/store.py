"""The results folder: locked for the length of a run, its manifest (what makes it one sweep's),
one record per finished point, and the tables rebuilt from them. The folder is untrusted input:
another sweep's folder is refused, never mixed, and a record that does not check out is computed
again."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from xcompile.errors import XCompileError
from xcompile.fileio import atomic_output
from xcompile.sweep.grid import Grid, Point, jsonable
from xcompile.sweep.records import BadRecord, make_record, read_record
from xcompile.sweep.tables import summarize, trial_table

MANIFEST_FORMAT = "xcompile-sweep/1"
LOCK_NAME = "sweep.lock"
MANIFEST_BYTES = 1 << 26  # far above the manifest of any grid that could run


class Results:
    """The finished points of one sweep in its folder; writes happen while the folder is locked."""

    def __init__(self, folder: Path, manifest: dict[str, Any], grid: Grid, finished: dict[str, dict]):
        self.folder = folder
        self.manifest = manifest  # as the folder has it: point records repeat what made them from it
        self.grid = grid
        self.finished = finished
        self._points = {p.key: p for p in grid.points}

    @classmethod
    @contextlib.contextmanager
    def open(cls, output: str | os.PathLike, manifest: dict[str, Any], grid: Grid) -> Iterator["Results"]:
        """The folder of this sweep, locked until the block ends, with the points that check out.

        Refused with one line: a file, a folder that holds something other than a sweep, one that
        holds another sweep, one another run holds. Nothing but the lock file is written before
        `begin`, and a folder left without a manifest is as it was (or gone, if this made it)."""
        folder = Path(output)
        if folder.exists() and not folder.is_dir():
            raise XCompileError(f"results folder '{folder}' is a file, expected a folder")
        _check_holds_a_sweep(folder)
        with _locked(folder):
            previous = _read_manifest(folder)
            if previous is None:
                _check_holds_a_sweep(folder)
            else:
                _check_same_sweep(folder, previous, manifest)
                _remove_leftovers(folder)
            own = {**jsonable(manifest), **(previous or {})}  # the folder's own entries where it has them
            finished = {}
            for point in grid.points:
                result = _served(folder, point, own)
                if result is not None:
                    finished[point.key] = result
            try:
                yield cls(folder, own, grid, finished)
            finally:  # an interrupt can land between a temporary file's creation and its removal
                _remove_leftovers(folder)

    def begin(self) -> None:
        """Make the folder this sweep's: the manifest first, so nothing is ever written without it."""
        if not (self.folder / "manifest.json").exists():
            with atomic_output(self.folder / "manifest.json") as temp:
                temp.write_text(json.dumps(self.manifest, indent=2))
        try:
            (self.folder / "points").mkdir(exist_ok=True)
        except OSError as exc:
            raise XCompileError(f"results folder '{self.folder}': cannot make points/ ({exc.strerror})") from None

    def point(self, key: str) -> Point:
        return self._points[key]

    def add(self, key: str, result: dict[str, Any]) -> None:
        """Save one finished point, then the tables: each file appears complete or not at all."""
        record = make_record(self._points[key], self.manifest, result)
        with atomic_output(self.folder / "points" / f"{key}.json") as temp:
            temp.write_text(json.dumps(record, indent=1, allow_nan=False))
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
        return trial_table(self.grid, self.finished)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder (flock on its lock file) for the block: a second run
    into the same folder meanwhile is refused. The lock file stays once the folder holds a sweep;
    before that, leaving the folder empty again takes it away."""
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise XCompileError(f"cannot make results folder '{folder}': {exc.strerror}") from None
    path = folder / LOCK_NAME
    handle = _lock(path, folder)
    try:
        yield
    finally:
        if not (folder / "manifest.json").exists():
            path.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        handle.close()  # releases the lock


def _lock(path: Path, folder: Path) -> BinaryIO:
    """The open lock file, locked; refused at once if another run holds it."""
    while True:
        try:
            handle = open(path, "ab")
        except OSError as exc:
            raise XCompileError(f"results folder '{folder}': cannot open its lock file {LOCK_NAME} ({exc.strerror})") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise XCompileError(
                f"results folder '{folder}' is in use by another sweep (it holds {LOCK_NAME}); "
                "wait for that run to end, or give another output folder"
            ) from None
        except OSError as exc:
            handle.close()
            raise XCompileError(f"results folder '{folder}': cannot lock {LOCK_NAME} ({exc.strerror})") from None
        try:  # the run before may have removed the file between our open and our lock: lock the one there now
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(handle.fileno())
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            return handle
        handle.close()


def _check_holds_a_sweep(folder: Path) -> None:
    """A folder without a manifest must be empty (its lock file aside): it is not ours to fill."""
    if folder.is_dir() and not (folder / "manifest.json").exists() and any(p.name != LOCK_NAME for p in folder.iterdir()):
        raise XCompileError(f"results folder '{folder}' is not empty and holds no sweep (manifest.json); give an empty or new folder")


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        if path.stat().st_size > MANIFEST_BYTES:
            raise ValueError(f"it is over {MANIFEST_BYTES} bytes")
        previous = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise XCompileError(f"results folder '{folder}': manifest.json is unreadable ({exc}); give another folder") from None
    if not isinstance(previous, dict) or previous.get("format") != MANIFEST_FORMAT:
        raise XCompileError(f"results folder '{folder}': manifest.json is not an xcompile sweep manifest ({MANIFEST_FORMAT})")
    return previous


def _remove_leftovers(folder: Path) -> None:
    """Half-written files (atomic_output's temporaries) of a run that was killed or interrupted:
    with the folder locked, no run is writing them."""
    for where in (folder, folder / "points", folder / "plots"):
        if where.is_dir():
            for temp in where.glob(".*.partial*"):
                temp.unlink(missing_ok=True)


def _served(folder: Path, point: Point, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """A finished point's result, or None: not there, or not a record this sweep can serve (said
    in a warning naming the file; the point is computed again)."""
    path = folder / "points" / f"{point.key}.json"
    if not path.exists():
        return None
    try:
        return read_record(path, point, manifest)
    except BadRecord as exc:
        warnings.warn(f"results folder '{folder}': points/{path.name} is not a valid record of this sweep: {exc}; computing it again", stacklevel=2)
        return None


def _check_same_sweep(folder: Path, previous: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Refuse to mix: the folder must hold this very sweep (model, data, points, trials, seed)."""

    def identity(entry):
        return entry if not isinstance(entry, dict) else (entry.get("sha256") or entry.get("name"))

    def shown(entry):
        if not isinstance(entry, dict):
            return "none" if entry is None else repr(entry)
        digest = entry.get("sha256")
        return str(entry.get("name")) + (f" sha256 {str(digest)[:12]}" if digest else "")

    checks = [
        (what, identity(previous.get(key)), identity(manifest[key]), f" ({shown(previous.get(key))} there, {shown(manifest[key])} here)")
        for what, key in (("model", "model"), ("dataset", "dataset"), ("calibration data", "calibration"))
    ]
    checks += [
        (what, previous.get(key), manifest[key], f" ({previous.get(key)} there, {manifest[key]} here)")
        for what, key in (("number of trials", "trials"), ("first seed", "seed"), ("batch size", "batch_size"))
    ]
    # a point's key digests its resolved options: the same set of keys is the same grid, however written
    keys = previous.get("points")
    there = sorted(keys) if isinstance(keys, list) and all(isinstance(k, str) for k in keys) else keys
    checks.append(("grid", there, sorted(manifest["points"]), _grid_difference(previous.get("grid"), jsonable(manifest["grid"]))))
    for what, there, here, detail in checks:
        if there != here:
            raise XCompileError(
                f"results folder '{folder}' holds a sweep with a different {what}{detail}; "
                "give another output folder, or delete that one to start over"
            )


def _grid_difference(there: Any, here: dict) -> str:
    """The first entry in which two grids (Grid.describe) differ, as the user wrote them."""

    def shown(settings):
        if settings is None:
            return "not set"
        if isinstance(settings, list) and all(isinstance(s, dict) and len(s) == 1 for s in settings):
            return repr([next(iter(s.values())) for s in settings])
        return repr(settings)

    there = there if isinstance(there, dict) else {}
    for section, key in (("fixed", "fixed"), ("grid", "axes")):
        old, new = there.get(key), here[key]
        old = old if isinstance(old, dict) else {}
        for name in [*old, *(n for n in new if n not in old)]:
            if old.get(name) != new.get(name):
                return f" ([{section}] {name}: {shown(old.get(name))} there, {shown(new.get(name))} here)"
    return " (its points resolve to other options: did a hardware file change?)"
