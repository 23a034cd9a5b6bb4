"""Named hardware descriptions, each value with where it comes from.

A preset sets some hardware keys; every key it leaves out keeps its default (ideal). Each value
names its source: a publication (what it states, and where we read it), or "assumption" when
it is this project's own choice. docs/hardware.md explains every preset; `xcompile presets`
prints them. Plain data: xcompile.config builds `PRESETS` (name -> values) from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WAGONN = (
    "Victor, Kim, Wang, Roy & Gupta, \"WAGONN\" (2024), arXiv 2406.14706: 2-10 ohm per bit-cell at 45-65 nm, "
    "up to 20 ohm at 7 nm (as quoted in public crossbar-study notes; not checked against the paper's text)"
)
XCHANGR = (
    "Agrawal, Lee & Roy, \"X-CHANGR\" (2019), arXiv 1907.00285: 2 ohm per crossbar node at 65 nm "
    "(as quoted in public crossbar-study notes; not checked against the paper's text)"
)
ASSUMED = "assumption"


@dataclass(frozen=True)
class Preset:
    """A named hardware description: its values and, per value, its source."""

    name: str
    description: str
    values: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)


def _preset(name: str, description: str, **entries: tuple) -> Preset:
    """entries: key=(value, source)."""
    return Preset(name, description, {k: v for k, (v, _) in entries.items()}, {k: s for k, (_, s) in entries.items()})


_RRAM_WINDOW = dict(
    g_on=(1e-3, f"{ASSUMED}: 1 kOhm ON state, a low-resistance filamentary RRAM; the strong end for wire losses"),
    g_off=(1e-5, f"{ASSUMED}: ON/OFF ratio 100"),
)
_CONVERTERS = dict(
    dac_bits=(8, f"{ASSUMED}: 8-bit input DAC"),
    adc_bits=(8, f"{ASSUMED}: 8-bit column ADC"),
    adc_range=("calibrated", f"{ASSUMED}: ADC full scale per tile from calibration data"),
)

# drivers, sense amplifiers, converters and programming spread of the rram presets, whatever the wiring
_RRAM_PERIPHERY = dict(
    r_source=(100.0, f"{ASSUMED}: row driver output resistance"),
    r_sink=(100.0, f"{ASSUMED}: column sense (virtual ground) input resistance"),
    **_CONVERTERS,
    variation=("lognormal", f"{ASSUMED}: multiplicative spread around the target"),
    sigma=(0.05, f"{ASSUMED}: 5% after write-verify"),
)

CATALOGUE: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("ideal", "every non-ideality off: exact arithmetic on the programmed levels (the default hardware)"),
        _preset(
            "rram",
            "a 1T1R RRAM macro with 1 kOhm cells on a 45-65 nm metal stack, 8-bit converters, 5% programming spread",
            **_RRAM_WINDOW,
            r_wire=(2.5, f"inside the 2-10 ohm per cell of 45-65 nm wiring: {WAGONN}"),
            **_RRAM_PERIPHERY,
        ),
        _preset(
            "rram-harsh",
            "long, thin lines, 6-bit converters, a wide spread and stuck cells: where mapping tricks matter",
            **_RRAM_WINDOW,
            r_wire=(10.0, f"the top of 45-65 nm wiring: {WAGONN}"),
            r_source=(500.0, f"{ASSUMED}: weak row drivers"),
            r_sink=(500.0, f"{ASSUMED}: weak sense amplifiers"),
            dac_bits=(6, f"{ASSUMED}: 6-bit input DAC"),
            adc_bits=(6, f"{ASSUMED}: 6-bit column ADC"),
            adc_range=("calibrated", f"{ASSUMED}: ADC full scale per tile from calibration data"),
            variation=("lognormal", f"{ASSUMED}: multiplicative spread around the target"),
            sigma=(0.15, f"{ASSUMED}: 15% without write-verify"),
            stuck_off_rate=(0.01, f"{ASSUMED}: 1% of cells stuck at g_off"),
            stuck_on_rate=(0.001, f"{ASSUMED}: 0.1% of cells stuck at g_on"),
        ),
        _preset(
            "rram-7nm",
            "the rram preset on 7 nm wiring: the same devices and converters, 20 ohm per cell",
            **_RRAM_WINDOW,
            r_wire=(20.0, f"7 nm wiring: {WAGONN}"),
            **_RRAM_PERIPHERY,
        ),
        _preset(
            "pcm",
            "a phase-change memory array: a 25 uS window (40 kOhm ON), Gaussian programming noise, read noise",
            g_on=(25e-6, f"{ASSUMED}: 25 uS full scale, the order of analog-inference PCM work"),
            g_off=(0.25e-6, f"{ASSUMED}: ON/OFF ratio 100"),
            r_wire=(2.5, f"inside the 2-10 ohm per cell of 45-65 nm wiring: {WAGONN}"),
            r_source=(100.0, f"{ASSUMED}: row driver output resistance"),
            r_sink=(100.0, f"{ASSUMED}: column sense (virtual ground) input resistance"),
            **_CONVERTERS,
            variation=("gaussian", f"{ASSUMED}: additive-looking spread, relative to the target"),
            sigma=(0.04, f"{ASSUMED}: 4% programming noise after iterative programming"),
            read_noise=(0.01, f"{ASSUMED}: 1% per read"),
        ),
        _preset(
            "x-changr",
            "X-CHANGR's line-resistance setting: 2 ohm per node at 65 nm, every other effect off (the paper studies "
            "line resistance alone; its device and converter values were not found, so they stay ideal here)",
            r_wire=(2.0, XCHANGR),
        ),
    )
}

# Seed papers whose parameter sets we looked for and did not find stated in what we could read.
NOT_FOUND = {
    "rxnn": (
        "Jain, Sengupta, Roy & Raghunathan, \"RxNN\", IEEE TCAD 2020 (arXiv 1809.00072): the text we could read "
        "names the non-idealities it models (driver and sensing resistance, interconnect parasitics, sneak paths, "
        "peripheral non-linearity, stochastic writes, process variation) but not their values; no preset"
    ),
}
