"""Compile-time simulation: what a pass that measures the network on hardware gets (dynamic remap).

The compiler gives passes this through their context (passes/infra.py `PassContext.simulator`),
so no pass builds a runtime session and the session keeps only the user's API. It programs a
whole program once, then lets the caller reprogram one layer at a time (same trial draws), run
the calibration feeds and read what every layer's crossbars computed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xcompile.errors import XCompileError
from xcompile.ir import Layer, Program
from xcompile.runtime.crossbar import ProgrammedLayer, effective_weights
from xcompile.runtime.session import Session, _LayerRunner


class Simulator(Session):
    """A session on fixed feeds that can reprogram a layer and trace every layer's inputs and outputs.

    It always runs layer by layer (never the fused one-graph path), since tracing needs the
    crossbar outputs; with ideal hardware the two agree to float rounding.
    """

    def __init__(self, program: Program, feeds: dict[str, Any], hardware=None, seed: int = 0):
        super().__init__(program, seed=seed, calibration=feeds, hardware=hardware)
        self.feeds = feeds
        self._fused = False
        self._traces: dict[int, list] | None = None
        for index, runner in self._layers.items():
            self._layers[index] = _TracedRunner(runner.layer, runner.crossbar, self)

    def reprogram(self, layer: Layer) -> None:
        """Program `layer` in place of the layer with its index (same trial draws), then
        recalibrate on the feeds: one layer's placements are tried without reprogramming the rest."""
        if layer.index not in self._layers:
            raise XCompileError(f"layer index {layer.index} is not in this simulator's program")
        crossbar = ProgrammedLayer(layer, self.hardware, self._level_max, self.seed)
        self._layers[layer.index] = _TracedRunner(layer, crossbar, self)
        if crossbar.needs_calibration or crossbar.fits_on_data:
            self.calibrate(self.feeds)

    def outputs(self) -> list:
        """The model's outputs on the feeds."""
        return self.run(None, self.feeds)

    def trace(self) -> tuple[list, dict[int, tuple[np.ndarray, np.ndarray]]]:
        """Run the feeds; return the outputs and, per layer index, its input vectors [P, K] and
        outputs before bias [P, N] as the crossbars computed them."""
        self._traces = {index: [] for index in self._layers}
        try:
            outputs = self.run(None, self.feeds)
            traces = self._traces
        finally:
            self._traces = None
        return outputs, {i: (np.concatenate([r for r, _ in t]), np.concatenate([y for _, y in t])) for i, t in traces.items() if t}

    def gains(self) -> dict[int, np.ndarray]:
        """Per ungrouped layer and output, the least-squares gain of the crossbars' output over
        the exact product of the same inputs with the programmed target weights."""
        _, traces = self.trace()
        gains = {}
        for index, runner in self._layers.items():
            layer = runner.layer
            if layer.groups != 1 or index not in traces:
                continue
            rows, measured = traces[index]
            exact = layer.restore_order(layer.order_inputs(rows.astype(np.float64)) @ effective_weights(layer)[0])
            power = np.square(exact).sum(axis=0)
            gains[index] = np.where(power > 0, (measured * exact).sum(axis=0) / np.where(power > 0, power, 1.0), 1.0)
        return gains


class _TracedRunner(_LayerRunner):
    """A layer runner that hands its input vectors and outputs before bias to the simulator's trace."""

    def __init__(self, layer: Layer, crossbar: ProgrammedLayer, simulator: Simulator):
        super().__init__(layer, crossbar)
        self.simulator = simulator

    def _forward(self, rows: np.ndarray, add_bias: bool = True) -> np.ndarray:
        traces = self.simulator._traces
        if traces is None:
            return super()._forward(rows, add_bias)
        y = self.crossbar.forward(rows, add_bias=False)
        traces[self.layer.index].append((rows, y.copy()))  # y gets its bias in place
        return self.crossbar.add_bias(y) if add_bias else y
