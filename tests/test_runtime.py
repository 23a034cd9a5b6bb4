"""The non-ideal crossbar runtime: converters, devices, seeds, calibration, and bad input."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import xcompile
from xcompile.config import Hardware
from xcompile.runtime import devices
from builders import dense, small_cnn


@pytest.fixture(scope="module")
def cnn():
    return small_cnn(seed=4)


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(5).normal(size=(200, 3, 10, 10)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(cnn, batch):
    return ort.InferenceSession(cnn.SerializeToString()).run(None, {"x": batch})[0]


def _relative(got, expected):
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("rows, cols", [(128, 128), (16, 8), (7, 6)])
def test_fine_converters_on_the_crossbar_path_reproduce_onnxruntime(cnn, batch, reference, rows, cols):
    """The per-tile path (GEMM per row block, ADC, recombination) with 22-bit converters."""
    mapping = xcompile.compile_model(cnn, ideal=True, progress=False, rows=rows, cols=cols)
    session = xcompile.Session(mapping, dac_bits=22, adc_bits=22, calibration={"x": batch})
    assert not session._layers[0].crossbar.ideal
    assert _relative(session.run(None, {"x": batch})[0], reference) < 1e-5


def test_array_reads_split_into_several_graphs_compute_the_same(monkeypatch):
    """Row blocks past the protobuf size limit go to further ONNX Runtime graphs; the layer's
    numbers must not depend on how its row blocks are grouped."""
    from xcompile.runtime import crossbar

    mapping = xcompile.compile_model(dense(40, 30, seed=6), progress=False, rows=8, cols=8)
    x = np.random.default_rng(1).normal(size=(300, 40)).astype(np.float32)

    def run():
        session = xcompile.Session(mapping, seed=2, variation="lognormal", sigma=0.1, calibration={"x": x})
        return session, session.run(None, {"x": x})[0]

    together, expected = run()
    monkeypatch.setattr(crossbar._ArrayReads, "GROUP_BYTES", 1)
    apart, got = run()
    assert len(together._layers[0].crossbar._array_reads._groups) == 1
    assert len(apart._layers[0].crossbar._array_reads._groups) == len(apart._layers[0].crossbar.blocks) == 5
    np.testing.assert_array_equal(got, expected)


def test_quantised_weights_on_ideal_hardware_equal_the_integer_model():
    model = dense(40, 30, seed=2)
    mapping = xcompile.compile_model(model, progress=False, weight_bits=5, cell_bits=5)
    w = np.asarray(mapping.layers[0].weight[0], dtype=np.float64)
    scale = np.abs(w).max() / 31
    b = np.asarray(mapping.layers[0].bias, dtype=np.float64)
    x = np.random.default_rng(0).normal(size=(16, 40)).astype(np.float32)
    expected = x.astype(np.float64) @ (np.clip(np.rint(w / scale), -31, 31) * scale) + b
    got = xcompile.Session(mapping).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize(
    "hardware",
    [
        {"variation": "lognormal", "sigma": 0.1},
        {"variation": "gaussian", "sigma": 0.1, "stuck_off_rate": 0.02, "stuck_on_rate": 0.01},
        {"read_noise": 0.05, "adc_bits": 6, "dac_bits": 6},
        {"preset": "rram-harsh"},
    ],
)
def test_same_seed_same_numbers_other_seed_other_numbers(cnn, batch, hardware):
    mapping = xcompile.compile_model(cnn, progress=False)
    options = dict(hardware)
    preset = options.pop("preset", None)
    if preset:
        options["hardware"] = preset

    def run(seed):
        return xcompile.Session(mapping, seed=seed, calibration={"x": batch[:64]}, **options).run(None, {"x": batch})[0]

    first, again, other = run(3), run(3), run(4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_error_grows_with_device_variation(cnn, batch, reference):
    mapping = xcompile.compile_model(cnn, progress=False)
    errors = []
    for sigma in (0.01, 0.05, 0.2):
        runs = [
            _relative(xcompile.Session(mapping, seed=s, variation="lognormal", sigma=sigma).run(None, {"x": batch})[0], reference)
            for s in range(3)
        ]
        errors.append(np.mean(runs))
    assert errors[0] < errors[1] < errors[2]


def test_adc_bits_trade_accuracy(cnn, batch, reference):
    mapping = xcompile.compile_model(cnn, progress=False)
    errors = [
        _relative(xcompile.Session(mapping, adc_bits=bits, calibration={"x": batch}).run(None, {"x": batch})[0], reference)
        for bits in (4, 6, 10)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_adc_clipping_is_counted_never_nan(cnn, batch):
    mapping = xcompile.compile_model(cnn, progress=False)
    quiet = batch * 0.1
    session = xcompile.Session(mapping, adc_bits=8, dac_range="calibrated", calibration={"x": quiet})
    y = session.run(None, {"x": batch * 10})[0]  # far beyond the calibrated DAC and ADC ranges
    assert np.isfinite(y).all()
    assert session.adc_clipped > 0 and session.adc_conversions >= session.adc_clipped
    calm = xcompile.Session(mapping, adc_bits=8, adc_range="fixed")
    calm.run(None, {"x": batch})
    assert calm.adc_clipped == 0  # a fixed range holds the largest possible current


def test_runs_without_calibration_warn_and_calibrate_on_the_first_batch(cnn, batch):
    mapping = xcompile.compile_model(cnn, progress=False)
    session = xcompile.Session(mapping, adc_bits=8)
    with pytest.warns(UserWarning, match="calibrating"):
        first = session.run(None, {"x": batch})[0]
    explicit = xcompile.Session(mapping, adc_bits=8, calibration={"x": batch}).run(None, {"x": batch})[0]
    np.testing.assert_array_equal(first, explicit)


def test_stuck_cells_follow_their_rates():
    hw = Hardware(stuck_off_rate=0.1, stuck_on_rate=0.05)
    levels = np.full((200, 200), 100.0)
    g = devices.program(levels, 255.0, hw, np.random.default_rng(0))
    assert abs(np.mean(g == hw.g_off) - 0.1) < 0.01
    assert abs(np.mean(g == hw.g_on) - 0.05) < 0.01
    target = devices.level_conductance(levels, 255.0, hw)
    assert abs(np.mean(g == target) - 0.85) < 0.01


def test_lognormal_variation_has_the_asked_spread():
    hw = Hardware(variation="lognormal", sigma=0.2)
    levels = np.full((300, 300), 255.0)
    g = devices.program(levels, 255.0, hw, np.random.default_rng(1))
    assert abs(np.std(np.log(g / hw.g_on)) - 0.2) < 0.005


@pytest.mark.parametrize(
    "options, message",
    [
        ({"seed": -1}, "seed"),
        ({"rows": 64}, "recompile"),
        ({"sigma": -0.1}, "sigma"),
        ({"adc_bits": 2.5}, "adc_bits"),
        ({"variation": "uniform", "sigma": 0.1}, "variation"),
        ({"stuck_on_rate": 1.5}, "stuck_on_rate"),
        ({"input_mode": "bit_serial"}, "dac_bits"),
        ({"hardware": "rram-extreme"}, "rram-extreme"),
        ({"warp": 9}, "warp"),
    ],
)
def test_bad_runtime_options_are_named(cnn, options, message):
    mapping = xcompile.compile_model(cnn, progress=False)
    with pytest.raises(xcompile.XCompileError, match=message):
        xcompile.Session(mapping, **options)


def test_non_finite_inputs_are_refused(cnn, batch):
    session = xcompile.Session(xcompile.compile_model(cnn, progress=False))
    bad = batch.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(xcompile.XCompileError, match="NaN"):
        session.run(None, {"x": bad})


@pytest.mark.parametrize("hardware", [{}, {"r_wire": 1.0, "adc_bits": 8, "dac_bits": 8}])
def test_an_empty_batch_gives_an_empty_output_like_onnxruntime(cnn, batch, hardware):
    session = xcompile.Session(xcompile.compile_model(cnn, progress=False), calibration={"x": batch[:16]}, **hardware)
    expected = ort.InferenceSession(cnn.SerializeToString()).run(None, {"x": batch[:0]})[0]
    got = session.run(None, {"x": batch[:0]})[0]
    assert got.shape == expected.shape and got.dtype == expected.dtype


def _fused_and_stepwise(mapping, feeds):
    session = xcompile.Session(mapping)
    fused = session.run(None, feeds)
    assert session._fused, "ideal hardware runs as one ONNX Runtime graph"
    session._fused = False  # the step-by-step path: one crossbar runner per MVM node
    return fused, session.run(None, feeds)


def _conv_zoo():
    """Convolutions of every form the front end maps, plus a dense layer with its weight on the left."""
    from onnx import helper, numpy_helper

    from builders import model, tensor

    rng = np.random.default_rng(3)
    w = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    inits = {"wg": w(8, 2, 3, 3), "bg": w(8), "wd": w(8, 1, 3, 3), "wt": w(8, 4, 2, 2), "bt": w(4), "wl": w(6, 4), "w1": w(4, 3, 3)}
    inits["shape"] = np.array([0, 4, -1], np.int64)
    nodes = [
        helper.make_node("Conv", ["x", "wg", "bg"], ["g"], group=4, dilations=[2, 2], pads=[2, 1, 2, 1]),
        helper.make_node("Conv", ["g", "wd"], ["d"], group=8, strides=[2, 1], auto_pad="SAME_UPPER"),
        helper.make_node("ConvTranspose", ["d", "wt", "bt"], ["t"], strides=[2, 2], output_padding=[1, 0]),
        helper.make_node("Reshape", ["t", "shape"], ["flat"]),
        helper.make_node("MatMul", ["wl", "flat"], ["y"]),  # [6, 4] @ [N, 4, L]: the weight on the left
        helper.make_node("Conv", ["x1", "w1"], ["y1"], pads=[1, 1]),
    ]
    graph_inits = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    return model(nodes, [tensor("x", ["N", 8, 9, 7]), tensor("x1", ["N", 3, 11])], [tensor("y", ["N", 6, "L"]), tensor("y1", ["N", 4, 11])], graph_inits)


@pytest.mark.parametrize("options", [{"ideal": True}, {}, {"remap": "static", "rows": 16, "cols": 16}])
def test_ideal_hardware_runs_as_one_graph_with_the_step_by_step_answer(options):
    m = _conv_zoo()
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(2, 8, 9, 7)).astype(np.float32), "x1": rng.normal(size=(2, 3, 11)).astype(np.float32)}
    fused, stepwise = _fused_and_stepwise(xcompile.compile_model(m, progress=False, **options), feeds)
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for f, s, e in zip(fused, stepwise, expected):
        assert f.shape == s.shape == e.shape
        assert _relative(f, s) <= 1e-5
        if options.get("ideal"):
            assert _relative(f, e) <= 1e-5
