"""Compile options and the hardware description, validated in one place.

Numbers are SI (ohms, siemens, volts). Both dataclasses are frozen and JSON-able, so they are
stored verbatim in mapping.bin and recorded with every pass that reads them.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from xcompile.errors import XCompileError

ENCODINGS = ("dual",)


@dataclass(frozen=True)
class Hardware:
    """One crossbar accelerator: array size and device window.

    Defaults describe a 128 x 128 RRAM crossbar with a 1 kOhm .. 100 kOhm window.
    """

    rows: int = 128
    cols: int = 128
    g_on: float = 1e-3
    g_off: float = 1e-5
    v_read: float = 0.2

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise XCompileError(f"hardware option '{name}' must be a whole number >= 1, got {value!r}")
        if self.cols < 2:
            raise XCompileError(f"hardware option 'cols' must be >= 2 (a signed weight needs two columns), got {self.cols}")
        for name in ("g_on", "g_off", "v_read"):
            _positive_finite(f"hardware option '{name}'", getattr(self, name))
        if self.g_off >= self.g_on:
            raise XCompileError(f"hardware option 'g_off' ({self.g_off} S) must be below 'g_on' ({self.g_on} S)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CompileOptions:
    """How weights are turned into cells.

    ideal: keep float weights (no quantisation); the equivalence mode.
    weight_bits: magnitude bits of a quantised weight (the sign is carried by the encoding).
    cell_bits: bits one cell stores; weight_bits / cell_bits slices (one slice for now).
    """

    ideal: bool = False
    weight_bits: int = 8
    cell_bits: int = 8
    encoding: str = "dual"

    def __post_init__(self) -> None:
        for name in ("weight_bits", "cell_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 16:
                raise XCompileError(f"option '{name}' must be a whole number from 1 to 16, got {value!r}")
        if self.cell_bits != self.weight_bits:
            raise XCompileError(
                f"option 'cell_bits' ({self.cell_bits}) must equal 'weight_bits' ({self.weight_bits}): "
                "bit slicing is not available yet, one cell holds one weight magnitude"
            )
        if self.encoding not in ENCODINGS:
            raise XCompileError(f"option 'encoding' must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive_finite(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
        raise XCompileError(f"{what} must be a finite number > 0, got {value!r}")


def split_options(options: dict[str, Any]) -> tuple[CompileOptions, Hardware]:
    """Sort flat keyword options into compile options and hardware; unknown keys are an error."""
    compile_keys = {f.name for f in fields(CompileOptions)}
    hardware_keys = {f.name for f in fields(Hardware)}
    unknown = sorted(set(options) - compile_keys - hardware_keys - {"hardware"})
    if unknown:
        raise XCompileError(
            f"unknown option(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(compile_keys | hardware_keys | {'hardware'}))}"
        )
    hardware = options.get("hardware")
    base = hardware_from(hardware) if hardware is not None else Hardware()
    hw_overrides = {k: v for k, v in options.items() if k in hardware_keys}
    try:
        hw = dataclasses.replace(base, **hw_overrides)
        opts = CompileOptions(**{k: v for k, v in options.items() if k in compile_keys})
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise XCompileError(str(exc)) from None
    return opts, hw


def hardware_from(source: Hardware | dict | str | Path) -> Hardware:
    """A Hardware from an instance, a dict, or a TOML file (keys at top level or under [hardware])."""
    if isinstance(source, Hardware):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise XCompileError(f"hardware file '{path}' does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise XCompileError(f"hardware file '{path}' is not valid TOML: {exc}") from None
        source = data.get("hardware", data)
    if not isinstance(source, dict):
        raise XCompileError(f"hardware must be a Hardware, a dict or a TOML path, got {type(source).__name__}")
    known = {f.name for f in fields(Hardware)}
    unknown = sorted(set(source) - known)
    if unknown:
        raise XCompileError(f"unknown hardware key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    return Hardware(**source)
