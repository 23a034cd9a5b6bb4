"""Point records: one finished point as a JSON file that says what made it, and the check every
record passes before a resumed sweep serves it (a results folder is untrusted input)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from xcompile.sweep.grid import Point, jsonable
from xcompile.sweep.work import POINT_COLUMNS, TRIAL_COLUMNS

POINT_FORMAT = "xcompile-sweep-point/1"
MADE_BY = ("model", "dataset", "calibration", "trials", "seed", "batch_size")  # manifest entries a record repeats
COUNT_COLUMNS = ("cells", "tiles", "crossbars_used", "writes")
RECORD_BYTES = 1 << 16  # a record's fixed part is well under this; each trial adds under TRIAL_BYTES
TRIAL_BYTES = 1 << 10


class BadRecord(ValueError):
    """A point file that cannot be served: the message says which rule it breaks."""


def make_record(point: Point, sweep: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The file of a finished point: its identity, what made it (model, data, trials, seeds,
    batch size: the manifest's entries) and its results."""
    return {
        "format": POINT_FORMAT,
        "key": point.key,
        "point": point.index,
        "labels": point.labels,
        "options": point.options,
        "made_by": {name: sweep[name] for name in MADE_BY},
        "result": result,
    }


def read_record(path: Path, point: Point, sweep: dict[str, Any]) -> dict[str, Any]:
    """The result in `path` if the record there is one of this point made by this sweep, and
    whole: every trial once, in order, with its seed, finite numbers in their ranges."""
    limit = RECORD_BYTES + TRIAL_BYTES * sweep["trials"]
    try:
        if path.stat().st_size > limit:
            raise BadRecord(f"it is larger than a record of {sweep['trials']} trial(s) can be ({limit} bytes)")
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except BadRecord:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRecord(f"it is not readable JSON ({type(exc).__name__}: {exc})") from None
    _require(isinstance(data, dict), f"it holds a JSON {type(data).__name__}, expected an object")
    _require(data.get("format") == POINT_FORMAT, f"its format is {data.get('format')!r}, expected {POINT_FORMAT!r}")
    _require(data.get("key") == point.key, f"its key is {data.get('key')!r}, expected {point.key!r}")
    _require(data.get("options") == jsonable(point.options), "its options are not this point's")
    made_by = data.get("made_by")
    _require(isinstance(made_by, dict), "it does not say what made it ('made_by')")
    for name in MADE_BY:
        _require(name in made_by and made_by[name] == sweep[name], f"it was made with {name} {made_by.get(name)!r}, this sweep has {sweep[name]!r}")
    result = data.get("result")
    _require(isinstance(result, dict), "it holds no 'result' object")
    _check_result(result, sweep["trials"], sweep["seed"])
    return result


def _check_result(result: dict[str, Any], trials: int, seed: int) -> None:
    missing = [name for name in (*POINT_COLUMNS, "trials") if name not in result]
    _require(not missing, f"its result lacks {', '.join(missing)}")
    for name in COUNT_COLUMNS:
        _require(_is_count(result[name]), f"its {name} is {result[name]!r}, expected a whole number >= 0")
    _require(_is_seconds(result["compile_seconds"]), f"its compile_seconds is {result['compile_seconds']!r}, expected a finite number >= 0")
    rows = result["trials"]
    _require(isinstance(rows, list) and len(rows) == trials, f"it holds {len(rows) if isinstance(rows, list) else 'no list of'} trial(s), expected {trials}")
    for t, row in enumerate(rows):
        _require(isinstance(row, dict) and sorted(row) == sorted(TRIAL_COLUMNS), f"trial {t} is not an object with {', '.join(TRIAL_COLUMNS)}")
        _require(row["trial"] == t and _is_count(row["trial"]), f"entry {t} is trial {row['trial']!r}: trials must run 0..{trials - 1}, each once")
        _require(row["trial_seed"] == seed + t and _is_count(row["trial_seed"]), f"trial {t} has seed {row['trial_seed']!r}, expected {seed + t}")
        for name in ("float_accuracy", "accuracy"):
            _require(_is_fraction(row[name]), f"trial {t}: {name} is {row[name]!r}, expected a fraction in [0, 1]")
        _require(row["float_accuracy"] == rows[0]["float_accuracy"], f"trial {t}: float_accuracy differs from trial 0's")
        _require(row["drop"] == row["float_accuracy"] - row["accuracy"], f"trial {t}: drop is not float_accuracy - accuracy")
        for name in ("adc_clipped", "adc_conversions"):
            _require(_is_count(row[name]), f"trial {t}: {name} is {row[name]!r}, expected a whole number >= 0")
        _require(row["adc_clipped"] <= row["adc_conversions"], f"trial {t}: more ADC conversions clipped than made")
        _require(_is_seconds(row["run_seconds"]), f"trial {t}: run_seconds is {row['run_seconds']!r}, expected a finite number >= 0")


def _require(condition: bool, rule: str) -> None:
    if not condition:
        raise BadRecord(rule)


def _refuse_constant(name: str):
    raise BadRecord(f"it holds {name}, not a finite number")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_seconds(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _is_fraction(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= 1
