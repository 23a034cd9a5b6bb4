"""Static column remapping: a permutation chosen from the physics, undone digitally, exact."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import xcompile
from xcompile.config import Hardware
from xcompile.passes.encode import make_encoding
from xcompile.passes.remap import kept_current
from builders import small_cnn


def test_remapped_mapping_still_equals_onnxruntime(tmp_path):
    model = small_cnn(seed=2, channels=20)
    x = np.random.default_rng(0).normal(size=(8, 3, 10, 10)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    mapping = xcompile.compile_model(model, ideal=True, progress=False, remap="static", r_wire=2.0, rows=32, cols=16)
    mapping.save(tmp_path / "m.bin")
    for m in (mapping, xcompile.load(tmp_path / "m.bin")):
        got = xcompile.Session(m, r_wire=0.0).run(None, {"x": x})[0]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    fine = xcompile.Session(mapping, r_wire=0.0, adc_bits=22, dac_bits=22, calibration={"x": x}).run(None, {"x": x})[0]
    assert np.abs(fine - expected).max() <= 1e-5 * np.abs(expected).max()


def test_most_sensitive_outputs_sit_where_the_least_current_is_lost():
    model = small_cnn(seed=3, channels=20)
    mapping = xcompile.compile_model(model, progress=False, remap="static", r_wire=5.0, r_source=50.0, r_sink=50.0, rows=32, cols=16)
    hw = mapping.hardware
    kept = kept_current(hw, make_encoding("dual", 1, 8))
    per_tile = 8
    assert kept[0] > kept[-1]  # positions near the drivers keep more current
    for layer in mapping.layers:
        order = layer.output_order
        assert sorted(order.tolist()) == list(range(layer.outputs))
        original = np.abs(layer.restore_order(layer.weight[0])).sum(axis=0)  # back in ONNX order
        sensitivity_at = original[order]  # sensitivity of the output at each crossbar position
        loss_at = 1 - kept[np.arange(layer.outputs) % per_tile]
        best = np.argmin(loss_at)
        assert sensitivity_at[best] == original.max()
        # more sensitive outputs never sit at a strictly worse position than less sensitive ones
        for a in range(layer.outputs):
            for b in range(layer.outputs):
                if loss_at[a] < loss_at[b]:
                    assert sensitivity_at[a] >= sensitivity_at[b]


def test_ideal_wires_keep_every_position_and_bad_remap_is_named():
    assert np.all(kept_current(Hardware(), make_encoding("acm", 2, 4)) == 1.0)
    with pytest.raises(xcompile.XCompileError, match="remap"):
        xcompile.compile_model(small_cnn(), progress=False, remap="shuffle")
