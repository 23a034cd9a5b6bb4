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
from xcompile.presets import CATALOGUE

ENCODINGS = ("dual", "acm", "offset")
REMAPS = ("none", "static", "dynamic", "chain", "sparse")
SENSITIVITIES = ("magnitude", "taylor", "perturbation")
DATA_SENSITIVITIES = ("taylor", "perturbation")
ACM_FITS = ("scale", "clip")
SCHEDULES = ("layer", "sorted")


VARIATIONS = ("none", "lognormal", "gaussian")
DAC_RANGES = ("absmax", "calibrated")
ADC_RANGES = ("fixed", "calibrated", "per_column")
INPUT_MODES = ("analog", "bit_serial")
COMPENSATIONS = ("none", "column", "row-column", "predistort")
WEIGHT_SCALES = ("layer", "channel")
MAX_HARDWARE_FILE_BYTES = 1 << 20  # a hardware description is a few lines


MAX_TILE_BYTES = 2 << 30  # memory one tile may take to program (see tile_bytes)


def _option(default, help_text: str, kind: type | None = None):
    """A dataclass field with its command-line help: the CLI makes its flags from these."""
    return dataclasses.field(default=default, metadata={"help": help_text, "type": kind or type(default)})


def option_flags(cls, defaults: bool = True) -> list[tuple[str, str, type, str]]:
    """(field name, --flag, type, help) of every field of CompileOptions or Hardware; the help
    names the default unless `defaults` is False (where the default is a mapping's own value)."""
    flags = []
    for f in fields(cls):
        shown = "" if not defaults or f.default is None or f.metadata["type"] is bool else f" (default {f.default:g})" if isinstance(f.default, float) else f" (default {f.default})"
        flags.append((f.name, "--" + f.name.replace("_", "-"), f.metadata["type"], f.metadata["help"] + shown))
    return flags


def tile_bytes(rows: int, cols: int) -> int:
    """Memory (bytes) the runtime takes at most to program one rows x cols tile: the wire
    network's nested-dissection solve keeps about 3.4 (rows + cols + min(rows, cols))^2 float64
    entries (runtime/physics.py; 28 bytes per entry bounds it), and the cell levels, drawn
    conductances and G_eff take 24 bytes per cell."""
    return 28 * (rows + cols + min(rows, cols)) ** 2 + 24 * rows * cols


@dataclass(frozen=True)
class Hardware:
    """One crossbar accelerator: array, devices, wires and converters (SI units).

    The defaults are a 128 x 128 crossbar with a 1 kOhm .. 100 kOhm window and every non-ideality
    off (ideal wires, devices and converters); presets (`PRESETS`) describe realistic chips.
    A bit count of 0 means an ideal converter. `compensation` is what the chip fits per tile
    when it is programmed (runtime/compensation.py): none | column | row-column | predistort.
    """

    rows: int = _option(128, "crossbar rows")
    cols: int = _option(128, "crossbar columns")
    g_on: float = _option(1e-3, "ON conductance, S")
    g_off: float = _option(1e-5, "OFF conductance, S")
    v_read: float = _option(0.2, "read voltage, V")
    r_wire: float = _option(0.0, "wire resistance per cell segment, ohm")
    r_source: float = _option(0.0, "driver resistance per row, ohm")
    r_sink: float = _option(0.0, "sense resistance per column, ohm")
    dac_bits: int = _option(0, "DAC bits (0 = ideal)")
    dac_range: str = _option("absmax", "absmax | calibrated")
    input_mode: str = _option("analog", "analog | bit_serial")
    adc_bits: int = _option(0, "ADC bits (0 = ideal)")
    adc_range: str = _option("calibrated", "fixed | calibrated | per_column")
    adc_nonlinearity: float = _option(0.0, "ADC transfer nonlinearity alpha (0 = linear)")
    variation: str = _option("none", "none | lognormal | gaussian")
    sigma: float = _option(0.0, "relative programming variation")
    stuck_off_rate: float = _option(0.0, "fraction of cells stuck at g_off")
    stuck_on_rate: float = _option(0.0, "fraction of cells stuck at g_on")
    read_noise: float = _option(0.0, "relative read noise per cell and MVM")
    compensation: str = _option("none", "line-resistance compensation fitted per tile when programmed: none | column | row-column | predistort")

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            _whole(f"hardware option '{name}'", getattr(self, name), 1, 1 << 16)
        if self.cols < 2:
            raise XCompileError(f"hardware option 'cols' must be >= 2 (a signed weight needs two columns), got {self.cols}")
        if tile_bytes(self.rows, self.cols) > MAX_TILE_BYTES:
            raise XCompileError(
                f"a {self.rows} x {self.cols} crossbar needs about {tile_bytes(self.rows, self.cols) / 2**30:.1f} GiB to "
                f"program one tile, more than the {MAX_TILE_BYTES >> 30} GiB limit (e.g. 2048 x 2048 fits; docs/hardware.md)"
            )
        for name in ("g_on", "g_off", "v_read"):
            _positive_finite(f"hardware option '{name}'", getattr(self, name))
        if self.g_off >= self.g_on:
            raise XCompileError(f"hardware option 'g_off' ({self.g_off} S) must be below 'g_on' ({self.g_on} S)")
        for name in ("r_wire", "r_source", "r_sink", "sigma", "read_noise", "adc_nonlinearity"):
            _non_negative_finite(f"hardware option '{name}'", getattr(self, name))
        for name in ("dac_bits", "adc_bits"):
            _whole(f"hardware option '{name}' (0 = ideal converter)", getattr(self, name), 0, 24)
        for name in ("stuck_off_rate", "stuck_on_rate"):
            value = getattr(self, name)
            _non_negative_finite(f"hardware option '{name}'", value)
            if value > 1:
                raise XCompileError(f"hardware option '{name}' is a fraction of cells and must be in [0, 1], got {value}")
        if self.stuck_off_rate + self.stuck_on_rate > 1:
            raise XCompileError("hardware options 'stuck_off_rate' + 'stuck_on_rate' must not exceed 1")
        for name, allowed in (("variation", VARIATIONS), ("dac_range", DAC_RANGES), ("adc_range", ADC_RANGES), ("input_mode", INPUT_MODES), ("compensation", COMPENSATIONS)):
            if getattr(self, name) not in allowed:
                raise XCompileError(f"hardware option '{name}' must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.variation == "none" and self.sigma > 0:
            raise XCompileError("hardware option 'sigma' is set but 'variation' is 'none': choose lognormal or gaussian")
        if self.input_mode == "bit_serial" and self.dac_bits < 1:
            raise XCompileError("hardware option 'input_mode' = 'bit_serial' needs 'dac_bits' >= 1 (the input bits)")

    @property
    def wires_ideal(self) -> bool:
        return self.r_wire == 0 and self.r_source == 0 and self.r_sink == 0

    @property
    def ideal(self) -> bool:
        """True when nothing differs from exact arithmetic on the programmed levels."""
        return (
            self.wires_ideal
            and self.dac_bits == 0
            and self.adc_bits == 0
            and self.sigma == 0
            and self.stuck_off_rate == 0
            and self.stuck_on_rate == 0
            and self.read_noise == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Named hardware descriptions: `--preset NAME` / `hardware="NAME"`; explicit options override them.
# Every value and its source: xcompile/presets.py, docs/hardware.md, `xcompile presets`.
PRESETS: dict[str, dict[str, Any]] = {name: dict(preset.values) for name, preset in CATALOGUE.items()}


@dataclass(frozen=True)
class CompileOptions:
    """How weights are turned into cells.

    ideal: keep float weights (no quantisation); the equivalence mode.
    weight_bits: bits of a quantised weight's magnitude (the sign is carried by the encoding).
    weight_scale: layer (one symmetric scale per layer) | channel (one per output channel, i.e. per
        crossbar column group, applied digitally after recombination).
    cell_bits: bits one cell stores; a weight takes ceil(weight_bits / cell_bits) slices.
    encoding: dual | acm | offset (passes/encode.py).
    acm_fit: what ACM does with a row whose suffix sums overflow the cells: scale | clip.
    remap: output (column) remapping against line resistance: none | static | dynamic | chain |
        sparse (passes/remap.py; dynamic needs calibration data).
    sensitivity: how remapping ranks a layer's outputs: magnitude (sum of |w|, needs no data),
        taylor or perturbation (measured on calibration data).
    remap_rows: also permute the inputs (rows): the rows expected to carry the most current go
        to the row positions that keep the most (nearest the sense end).
    crossbars: physical crossbars on the chip; fewer than the tiles makes a reprogramming
        schedule (passes/schedule.py, docs/schedules.md). None: one crossbar per tile.
    schedule: load order with `crossbars`: layer (network order) | sorted (sorted weight sections).
    stuck_fraction, stuck_slices: bit stucking: in the `stuck_slices` lowest-order slice columns
        only this fraction of the cells whose level should change is rewritten (1: all of them).
    seed: seed of the random compile decisions (which cells bit stucking rewrites).
    """

    ideal: bool = _option(False, "float weights, no quantisation, no non-idealities")
    weight_bits: int = _option(8, "weight magnitude bits")
    weight_scale: str = _option("layer", "layer (one scale per layer) or channel (one per output, applied digitally)")
    cell_bits: int = _option(8, "bits per cell; weight_bits / cell_bits slices")
    encoding: str = _option("dual", "signed-weight encoding: dual, acm, offset")
    acm_fit: str = _option("scale", "ACM rows that overflow the cells: scale or clip")
    remap: str = _option("none", "output remapping against line resistance: none, static, dynamic (X-CHANGR), chain (ours), sparse")
    sensitivity: str = _option("magnitude", "how remap static / dynamic / chain rank outputs: magnitude, taylor, perturbation")
    remap_rows: bool = _option(False, "remap the inputs (rows) too: heaviest rows nearest the sense end")
    crossbars: int | None = _option(None, "physical crossbars P; fewer than the tiles makes a reprogramming schedule (docs/schedules.md)", int)
    schedule: str = _option("layer", "load order with --crossbars: layer (network order) or sorted (sorted weight sections)")
    stuck_fraction: float = _option(1.0, "bit stucking: share p of changed cells rewritten in the stuck slices")
    stuck_slices: int = _option(0, "bit stucking: the k lowest-order slice columns it applies to")
    seed: int = _option(0, "seed of random compile decisions (which cells bit stucking rewrites)")

    def __post_init__(self) -> None:
        for name in ("weight_bits", "cell_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 16:
                raise XCompileError(f"option '{name}' must be a whole number from 1 to 16, got {value!r}")
        if self.cell_bits > self.weight_bits:
            raise XCompileError(
                f"option 'cell_bits' ({self.cell_bits}) must not exceed 'weight_bits' ({self.weight_bits}): "
                "a cell holds one slice of a weight"
            )
        if self.encoding not in ENCODINGS:
            raise XCompileError(f"option 'encoding' must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.acm_fit not in ACM_FITS:
            raise XCompileError(f"option 'acm_fit' must be one of {', '.join(ACM_FITS)}, got {self.acm_fit!r}")
        for name, allowed in (("remap", REMAPS), ("sensitivity", SENSITIVITIES), ("weight_scale", WEIGHT_SCALES)):
            if getattr(self, name) not in allowed:
                raise XCompileError(f"option '{name}' must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.sensitivity != "magnitude" and self.remap in ("none", "sparse"):
            raise XCompileError(
                f"option 'sensitivity' ({self.sensitivity}) ranks outputs for remap static, dynamic or chain; "
                f"remap '{self.remap}' does not use it"
            )
        if not isinstance(self.remap_rows, bool):
            raise XCompileError(f"option 'remap_rows' must be true or false, got {self.remap_rows!r}")
        if self.remap_rows and self.remap == "none":
            raise XCompileError("option 'remap_rows' permutes rows as part of remapping: set 'remap' (static, dynamic, chain or sparse) too")
        if self.encoding == "offset" and self.weight_bits < 2:
            raise XCompileError("the offset encoding needs 'weight_bits' >= 2 (one bit goes to the offset)")
        self._check_schedule()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _check_schedule(self) -> None:
        if self.crossbars is not None:
            _whole("option 'crossbars' (physical crossbars on the chip)", self.crossbars, 1, 1 << 31)
        if self.schedule not in SCHEDULES:
            raise XCompileError(f"option 'schedule' must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        p = self.stuck_fraction
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise XCompileError(f"option 'stuck_fraction' (share of changed cells rewritten) must be in [0, 1], got {p!r}")
        slices = 1 if self.ideal else -(-self.weight_bits // self.cell_bits)
        _whole("option 'stuck_slices' (lowest-order slice columns under bit stucking)", self.stuck_slices, 0, 1 << 31)
        if self.stuck_slices > slices:
            raise XCompileError(
                f"option 'stuck_slices' ({self.stuck_slices}) exceeds the {slices} slice(s) of a weight "
                f"(weight_bits {self.weight_bits} / cell_bits {self.cell_bits}{', ideal mode' if self.ideal else ''})"
            )
        if p < 1 and self.stuck_slices == 0:
            raise XCompileError("option 'stuck_fraction' < 1 needs 'stuck_slices' >= 1: which low-order slice columns it applies to")
        if self.crossbars is None and (self.schedule != "layer" or self.stuck_slices > 0):
            raise XCompileError("options 'schedule' and 'stuck_slices' shape a reprogramming schedule: give 'crossbars' (P physical crossbars)")
        _whole("option 'seed'", self.seed, 0, (1 << 63) - 1)

    @property
    def needs_calibration(self) -> bool:
        """Whether compiling measures the model on data (remapping in the loop, or by data)."""
        return self.remap == "dynamic" or (self.remap != "none" and self.sensitivity in DATA_SENSITIVITIES)

    @property
    def level_max(self) -> float:
        """The top level a cell of the mapping holds: a whole weight in ideal mode (one slice),
        else one slice of cell_bits."""
        return float(2 ** (self.weight_bits if self.ideal else self.cell_bits) - 1)


def _whole(what: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise XCompileError(f"{what} must be a whole number from {low} to {high}, got {value!r}")


def _non_negative_finite(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < float("inf")):
        raise XCompileError(f"{what} must be a finite number >= 0, got {value!r}")


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


STRUCTURAL = ("rows", "cols")  # what a mapping was cut for; fixed once compiled


def runtime_hardware(compiled: Hardware, hardware=None, options: dict[str, Any] | None = None) -> Hardware:
    """The hardware a compiled mapping runs on: `compiled`, or `hardware` (a preset name, dict,
    TOML path or Hardware) with the structural keys (array size) taken from `compiled`, then
    single `options` on top. Only an explicit option that contradicts the array size is an error:
    a preset or file describes devices, wires and converters for whatever array it is given.
    """
    options = dict(options or {})
    known = {f.name for f in fields(Hardware)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise XCompileError(f"unknown hardware option(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    for name in STRUCTURAL:
        if name in options and options[name] != getattr(compiled, name):
            raise XCompileError(
                f"hardware option '{name}' is {options[name]!r} but the mapping was compiled for "
                f"{getattr(compiled, name)}: recompile to change the array size"
            )
    base = compiled if hardware is None else hardware_from(hardware)
    structure = {name: getattr(compiled, name) for name in STRUCTURAL}
    return dataclasses.replace(base, **{**options, **structure})


def hardware_from(source: Hardware | dict | str | Path) -> Hardware:
    """A Hardware from an instance, a preset name, a dict, or a TOML file (top level or [hardware]).

    A dict or file may name a `preset` to start from, and may give `r_on` and `on_off_ratio`
    instead of `g_on` and `g_off`.
    """
    if isinstance(source, Hardware):
        return source
    if isinstance(source, str) and source in PRESETS:
        return Hardware(**PRESETS[source])
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            if isinstance(source, str) and path.suffix == "" and len(path.parts) == 1:
                raise XCompileError(
                    f"unknown hardware preset {source!r}; presets: {', '.join(PRESETS)} (`xcompile presets` shows their "
                    "values), or give a TOML file"
                )
            raise XCompileError(f"hardware file '{path}' does not exist (presets: {', '.join(PRESETS)})")
        if not path.is_file():
            raise XCompileError(f"hardware file '{path}' is not a file, expected a TOML file")
        if path.stat().st_size > MAX_HARDWARE_FILE_BYTES:
            raise XCompileError(f"hardware file '{path}' is {path.stat().st_size} bytes, more than a hardware description's {MAX_HARDWARE_FILE_BYTES}")
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise XCompileError(f"hardware file '{path}' cannot be read: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise XCompileError(f"hardware file '{path}' is not valid TOML: {exc}") from None
        source = data.get("hardware", data)
    if not isinstance(source, dict):
        raise XCompileError(f"hardware must be a Hardware, a dict or a TOML path, got {type(source).__name__}")
    values = dict(source)
    preset = values.pop("preset", None)
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise XCompileError(f"unknown hardware preset {preset!r}; presets: {', '.join(PRESETS)}")
    values = {**PRESETS.get(preset, {}), **_resistance_form(values)}
    known = {f.name for f in fields(Hardware)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise XCompileError(f"unknown hardware key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    return Hardware(**values)


def _resistance_form(values: dict[str, Any]) -> dict[str, Any]:
    """Turn `r_on` (ohms) and `on_off_ratio` into `g_on` and `g_off` (siemens)."""
    if "r_on" not in values and "on_off_ratio" not in values:
        return values
    if "g_on" in values or "g_off" in values:
        raise XCompileError("give the device window as g_on / g_off or as r_on / on_off_ratio, not both")
    values = dict(values)
    r_on, ratio = values.pop("r_on", 1e3), values.pop("on_off_ratio", 100.0)
    _positive_finite("hardware option 'r_on'", r_on)
    _positive_finite("hardware option 'on_off_ratio'", ratio)
    if ratio <= 1:
        raise XCompileError(f"hardware option 'on_off_ratio' must be > 1, got {ratio}")
    return {**values, "g_on": 1.0 / r_on, "g_off": 1.0 / (r_on * ratio)}
