"""Static column remapping: a permutation chosen from the physics, undone digitally, exact."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st

import xcompile
from xcompile.config import Hardware
from xcompile.passes.encode import make_encoding
from xcompile.passes.remap import kept_current
from builders import small_cnn


@pytest.mark.filterwarnings("ignore:remap .* placed the outputs for the compiled wires")  # run on ideal wires on purpose
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


@pytest.mark.parametrize("seed", [3, 8])
def test_static_is_x_changr_most_sensitive_outputs_where_the_most_current_is_kept(seed):
    """X-CHANGR's rule on every layer: rank by sensitivity, best positions (highest kept share of
    the physics model) to the most sensitive outputs, so sensitivity never rises with position loss."""
    model = small_cnn(seed=seed, channels=20)
    mapping = xcompile.compile_model(model, progress=False, remap="static", r_wire=5.0, r_source=50.0, r_sink=50.0, rows=32, cols=16)
    kept = kept_current(mapping.hardware, make_encoding("dual", 1, 8))
    assert kept[0] > kept[-1]  # positions near the drivers keep more current
    for layer in mapping.layers:
        order = layer.output_order
        assert sorted(order.tolist()) == list(range(layer.outputs))
        magnitude = np.abs(layer.restore_order(layer.weight[0])).sum(axis=0)  # back in ONNX order
        at_position = magnitude[order]
        kept_at = kept[np.arange(layer.outputs) % kept.size]
        assert at_position[np.argmax(kept_at)] == magnitude.max()
        more_kept = kept_at[:, None] > kept_at[None, :]
        assert np.all(at_position[:, None] >= at_position[None, :], where=more_kept)


def test_chain_ranks_the_classifier_around_the_median_position():
    """Chain (ours): a layer no chain reaches puts its most sensitive outputs where the kept share
    is nearest the median, the rest by distance from it."""
    model = small_cnn(seed=3, channels=20)
    mapping = xcompile.compile_model(model, progress=False, remap="chain", r_wire=5.0, r_source=50.0, r_sink=50.0, rows=32, cols=16)
    kept = kept_current(mapping.hardware, make_encoding("dual", 1, 8))
    layer = mapping.layers[-1]
    magnitude = np.abs(layer.restore_order(layer.weight[0])).sum(axis=0)
    at_position = magnitude[layer.output_order]
    kept_at = kept[np.arange(layer.outputs) % kept.size]
    loss_at = np.abs(kept_at / np.median(kept_at) - 1)
    assert at_position[np.argmin(loss_at)] == magnitude.max()
    assert np.all(at_position[:, None] >= at_position[None, :], where=loss_at[:, None] < loss_at[None, :])


def test_sensitivity_a_mode_does_not_use_is_refused_and_overridden_wires_warn(tmp_path):
    for remap in ("none", "sparse"):
        with pytest.raises(xcompile.XCompileError, match="sensitivity"):
            xcompile.compile_model(small_cnn(), progress=False, remap=remap, sensitivity="taylor", calibration=_calibration())
    mapping = xcompile.compile_model(small_cnn(seed=3), progress=False, remap="static", r_wire=2.0)
    x = _calibration(2)
    with pytest.warns(UserWarning, match="remap static placed the outputs for the compiled wires"):
        xcompile.Session(mapping, r_wire=1.0).run(None, {"x": x})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xcompile.Session(mapping).run(None, {"x": x})  # the wires it was placed for: no note


@pytest.mark.parametrize("remap", ["static", "chain", "sparse"])
def test_ideal_mode_is_unchanged_by_any_remap(remap):
    model = small_cnn(seed=9, channels=12)
    x = _calibration(6, seed=3)
    plain = xcompile.Session(xcompile.compile_model(model, progress=False, ideal=True, r_wire=2.0), r_wire=0.0).run(None, {"x": x})[0]
    placed = xcompile.compile_model(model, progress=False, ideal=True, remap=remap, r_wire=2.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the wires are overridden on purpose
        got = xcompile.Session(placed, r_wire=0.0).run(None, {"x": x})[0]
    assert np.abs(got - plain).max() <= 1e-5 * np.abs(plain).max()


def _chain_gains(mapping, index: int) -> np.ndarray:
    """Per output of layer `index` (layer order): the least-squares gain of its crossbar column
    times that of the next layer's rows reading it, both from the exact G_eff of the mapping."""
    from xcompile.passes.remap import _effective_matrices, channel_consumers

    layer = mapping.layers[index]
    expected, effective = _effective_matrices(mapping.program, layer)
    column = layer.restore_order((expected * effective).sum(axis=0) / np.square(expected).sum(axis=0))
    consumer, channel = channel_consumers(mapping.program)[index]
    expected, effective = _effective_matrices(mapping.program, consumer)
    rows = np.array([(expected * effective)[channel == k].sum() / np.square(expected[channel == k]).sum() for k in range(layer.outputs)])
    return column * rows


def test_static_evens_out_the_gain_each_channel_sees_through_two_layers():
    """An output's signal is scaled by the column it sits in and then by the rows of the next
    layer that read it; chain pairs weak positions with strongly read channels, so the chain
    gains spread less than in the layer's own order, measured on the placed crossbars."""
    model = small_cnn(seed=3, channels=16)
    options = dict(progress=False, r_wire=4.0, rows=64, cols=32)
    placed = xcompile.compile_model(model, remap="chain", **options)
    own = xcompile.compile_model(model, remap="none", **options)
    conv = placed.layers[0]
    assert not np.array_equal(conv.output_order, np.arange(conv.outputs))
    assert np.std(np.log(_chain_gains(placed, 0))) < 0.8 * np.std(np.log(_chain_gains(own, 0)))


def test_channel_consumers_follow_activations_pooling_and_flatten_only():
    from xcompile.passes.remap import channel_consumers

    mapping = xcompile.compile_model(small_cnn(seed=1, channels=4), progress=False, remap="none", r_wire=1.0)
    consumers = channel_consumers(mapping.program)
    assert set(consumers) == {0}  # the classifier feeds no MVM layer
    consumer, channel = consumers[0]
    assert consumer.index == 1 and channel.shape == (4 * 5 * 5,)
    assert np.array_equal(channel, np.repeat(np.arange(4), 25))  # Flatten of [4, 5, 5]: channel-major
    from onnx import helper, numpy_helper

    from builders import model as make_model, tensor

    w = np.ones((4, 4), np.float32)
    branching = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["b"]), helper.make_node("Add", ["b", "r"], ["y"])],
        [tensor("x", ["N", 4])], [tensor("y", ["N", 4])], [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(w, "w2")],
    )
    assert channel_consumers(xcompile.compile_model(branching, progress=False, r_wire=1.0).program) == {}  # r is read twice


def test_ideal_wires_keep_every_position_and_bad_remap_is_named():
    assert np.all(kept_current(Hardware(), make_encoding("acm", 2, 4)) == 1.0)
    with pytest.raises(xcompile.XCompileError, match="remap"):
        xcompile.compile_model(small_cnn(), progress=False, remap="shuffle")


def _calibration(n: int = 32, seed: int = 0):
    return np.random.default_rng(seed).normal(size=(n, 3, 10, 10)).astype(np.float32)


DATA_MODES = [("static", "taylor"), ("static", "perturbation"), ("chain", "taylor"), ("dynamic", "magnitude"), ("sparse", "magnitude")]


@pytest.mark.filterwarnings("ignore:remap .* placed the outputs for the compiled wires")  # run on ideal wires on purpose
@pytest.mark.parametrize("remap, sensitivity", DATA_MODES)
def test_every_mode_is_a_permutation_undone_exactly(remap, sensitivity):
    model = small_cnn(seed=4, channels=20)
    x = _calibration(8, seed=1)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    mapping = xcompile.compile_model(
        model, progress=False, ideal=True, remap=remap, sensitivity=sensitivity, calibration=_calibration(),
        r_wire=3.0, r_source=20.0, r_sink=20.0, rows=32, cols=16,
    )
    for layer in mapping.layers:
        assert sorted(layer.output_order.tolist()) == list(range(layer.outputs))
    got = xcompile.Session(mapping, r_wire=0.0, r_source=0.0, r_sink=0.0).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_data_driven_remapping_needs_data_and_says_which():
    model = small_cnn()
    for options in ({"remap": "dynamic"}, {"remap": "static", "sensitivity": "taylor"}):
        with pytest.raises(xcompile.XCompileError, match="calibration"):
            xcompile.compile_model(model, progress=False, r_wire=1.0, **options)
    with pytest.raises(xcompile.XCompileError, match=r"shape \[4, 3, 9, 9\].*'x'"):
        xcompile.compile_model(model, progress=False, remap="dynamic", r_wire=1.0, calibration=np.zeros((4, 3, 9, 9), np.float32))
    with pytest.raises(xcompile.XCompileError, match="empty"):
        xcompile.compile_model(model, progress=False, remap="dynamic", r_wire=1.0, calibration=np.zeros((0, 3, 10, 10), np.float32))
    with pytest.raises(xcompile.XCompileError, match="labels run 0..9; the model has 5 classes"):
        xcompile.compile_model(model, progress=False, remap="dynamic", r_wire=1.0, calibration=(_calibration(10), np.arange(10)))
    with pytest.raises(xcompile.XCompileError, match="does not exist"):
        xcompile.compile_model(model, progress=False, remap="dynamic", r_wire=1.0, calibration="missing.npz")


def test_gain_probe_scales_exactly_the_outputs_it_names():
    from xcompile.probe import Calibration, GainProbe

    model = small_cnn(seed=5, channels=4, classes=5)
    x = _calibration(6, seed=2)
    mapping = xcompile.compile_model(model, progress=False, ideal=True)
    probe = GainProbe(mapping.program, Calibration(x))
    logits = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert (probe.labels == logits.argmax(1)).all()  # no labels: agreement with the float model
    fc = next(layer for layer in mapping.layers if layer.kind == "dense")
    gains = np.array([[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 1.0, 1.0, 2.0]])
    losses = probe.losses(fc.index, gains)
    np.testing.assert_allclose(losses[0], probe.sample_losses(logits), rtol=1e-5)
    np.testing.assert_allclose(losses[1], probe.sample_losses(logits * gains[1]), rtol=1e-5)
    # the common scale of a layer's outputs is free: no decision depends on it
    np.testing.assert_allclose(probe.losses(fc.index, np.full((1, 5), 0.3))[0], probe.sample_losses(logits), rtol=1e-5)


def test_dynamic_search_only_keeps_what_lowers_the_simulated_loss_and_is_repeatable():
    model = small_cnn(seed=6, channels=24)
    options = dict(progress=False, remap="dynamic", calibration=_calibration(24), r_wire=4.0, rows=32, cols=16, sigma=0.2, variation="lognormal")
    first = xcompile.compile_model(model, **options)
    second = xcompile.compile_model(model, **options)
    for a, b in zip(first.layers, second.layers):
        assert np.array_equal(a.output_order, b.output_order)  # same model, same placement
        assert a.notes["remap_loss_after"] <= a.notes["remap_loss_before"]
        assert a.notes["remap_tried"] >= 1
    record = next(r for r in first.program.history if r.name == "remap")
    assert record.options["calibration"]["samples"] == 24 and record.options["calibration"]["labels"] is False


def test_sparse_spreads_the_load_over_tiles_and_puts_empty_columns_last():
    rng = np.random.default_rng(7)
    weights = rng.normal(size=(16, 40)).astype(np.float32)
    weights[:, rng.choice(40, 28, replace=False)] = 0.0  # 70% of the columns pruned
    weights[:, :12] *= np.linspace(3, 1, 12)  # uneven loads among the kept ones
    from onnx import helper, numpy_helper

    from builders import model as make_model, tensor

    graph = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", ["N", 16])], [tensor("y", ["N", 40])],
                       [numpy_helper.from_array(weights, "w")])
    mapping = xcompile.compile_model(graph, progress=False, remap="sparse", r_wire=2.0, rows=16, cols=16)
    layer = mapping.layers[0]
    per_tile = 8  # dual: 16 columns hold 8 outputs
    load = np.abs(weights).sum(axis=0)[layer.output_order]  # load at each crossbar position
    tile_loads = [load[b : b + per_tile].sum() for b in range(0, 40, per_tile)]
    in_order = [np.abs(weights).sum(axis=0)[b : b + per_tile].sum() for b in range(0, 40, per_tile)]
    assert max(tile_loads) - min(tile_loads) < max(in_order) - min(in_order)
    assert max(tile_loads) <= 1.5 * np.mean(tile_loads)
    for b in range(0, 40, per_tile):
        tile = load[b : b + per_tile]
        assert tile[0] == tile.max()  # the position nearest the drivers holds the heaviest column
        nonzero = np.flatnonzero(tile > 0)
        assert nonzero.size == 0 or nonzero.max() < np.flatnonzero(tile == 0).min(initial=per_tile)


def test_trace_returns_each_layers_vectors_and_outputs():
    from xcompile.runtime.simulator import Simulator

    model = small_cnn(seed=8)
    x = _calibration(4)
    mapping = xcompile.compile_model(model, progress=False, ideal=True)
    session = Simulator(mapping.program, {"x": x})
    outputs, traces = session.trace()
    fused = xcompile.Session(mapping).run(None, {"x": x})[0]  # ideal: one ONNX Runtime graph, float rounding apart from the traced steps
    np.testing.assert_allclose(outputs[0], fused, rtol=1e-5, atol=1e-5 * np.abs(fused).max())
    for layer in session.program.layers:
        rows, y = traces[layer.index]
        assert rows.shape == (x.shape[0] * layer.notes["vectors_per_sample"], layer.rows_in)
        np.testing.assert_allclose(y, rows @ layer.weight[0], rtol=1e-4, atol=1e-4)  # before bias


def test_cli_remap_needs_calibration_and_inspect_shows_the_order(tmp_path, capsys):
    import onnx

    from xcompile.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(small_cnn(seed=9, channels=12), path)
    out = tmp_path / "m.bin"
    assert main([str(path), "-o", str(out), "--remap", "dynamic", "--r-wire", "2", "--rows", "32", "--cols", "16"]) == 2
    assert "calibration" in capsys.readouterr().err and not out.exists()
    np.savez(tmp_path / "cal.npz", x=_calibration(16))
    assert main([str(path), "-o", str(out), "--remap", "static", "--sensitivity", "taylor", "--calibration", str(tmp_path / "cal.npz"),
                 "--r-wire", "2", "--rows", "32", "--cols", "16", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "remap static (taylor): crossbar output position -> layer output" in text
    # options the chosen mode does not use: an error for --sensitivity, a warning for --calibration
    assert main([str(path), "-o", str(out), "--remap", "sparse", "--sensitivity", "magnitude", "-q"]) == 2
    assert "--remap sparse does not use it" in capsys.readouterr().err
    assert main([str(path), "-o", str(out), "--remap", "static", "--calibration", str(tmp_path / "cal.npz"), "-q"]) == 0
    assert "warning: --calibration is used only by" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:remap .* placed the outputs for the compiled wires")  # run on ideal wires on purpose
def test_row_remapping_puts_heavy_rows_nearest_the_sense_end_and_stays_exact():
    model = small_cnn(seed=10, channels=12)
    x = _calibration(6, seed=3)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    mapping = xcompile.compile_model(model, progress=False, ideal=True, remap="static", remap_rows=True, r_wire=3.0, r_sink=10.0, rows=32, cols=16)
    row_kept = kept_current(mapping.hardware, make_encoding("dual", 1, 8), axis=1)
    assert row_kept[-1] > row_kept[0]  # the bit lines are sensed at the last row
    for layer in mapping.layers:
        order = layer.input_order
        assert sorted(order.tolist()) == list(range(layer.rows_in))
        load = np.abs(layer.weight[0]).sum(axis=1)  # in crossbar row order
        best = min(32, layer.rows_in) - 1  # the used row nearest the sense end
        assert load[best] == load.max()
    got = xcompile.Session(mapping, r_wire=0.0, r_sink=0.0).run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    with pytest.raises(xcompile.XCompileError, match="remap_rows"):
        xcompile.compile_model(model, progress=False, remap_rows=True)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0, 10, allow_nan=False), min_size=n, max_size=n),
    st.lists(st.floats(0.05, 1, allow_nan=False), min_size=n, max_size=n),
)))
def test_x_changr_placement_is_a_permutation_that_never_puts_a_more_sensitive_output_at_a_lossier_position(data):
    from xcompile.passes.remap import _placement

    sensitivity, kept = (np.array(v) for v in data)
    order = _placement(sensitivity, kept, kept.size)
    assert sorted(order.tolist()) == list(range(kept.size))
    placed = sensitivity[order]  # sensitivity of the output at each position
    assert np.all(placed[:, None] >= placed[None, :], where=kept[:, None] > kept[None, :])
