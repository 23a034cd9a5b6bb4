"""Reprogramming schedules: sorted sections undone exactly, write counts that a replay confirms,
stale cells of bit stucking that the runtime really computes with."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import xcompile
from xcompile.artifact import Mapping
from xcompile.cli import main
from xcompile.passes.assign import Assign
from xcompile.passes.sort_sections import SortSections
from xcompile.passes.tile import Tile
from xcompile.passes.encode import slices_of
from xcompile.placement import placement_graph
from xcompile.runtime.crossbar import effective_weights
from builders import dense, model, small_cnn, tensor

SMALL = {"rows": 8, "cols": 16}


def _grouped_conv_and_transposed():
    """Conv with 4 groups -> ConvTranspose: block-diagonal rows, and inputs formed channel-last."""
    rng = np.random.default_rng(5)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 2, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 3, 2, 2)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], group=4, pads=[1, 1, 1, 1], name="grouped"),
        helper.make_node("ConvTranspose", ["a", "w2"], ["y"], strides=[2, 2], name="convT"),
    ]
    return model(nodes, [tensor("x", ["N", 8, 5, 5])], [tensor("y", ["N", 3, 10, 10])], [w1, w2])


def _uneven_rows(seed: int = 0) -> onnx.ModelProto:
    """A Gemm whose input rows differ in magnitude by orders, as trained layers' inputs do."""
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(96, 48)) * np.exp(rng.normal(scale=1.5, size=(96, 1)))).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")]
    return model(nodes, [tensor("x", ["N", 96])], [tensor("y", ["N", 48])], [numpy_helper.from_array(w, "w")])


def _input(onnx_model, batch=4, seed=1):
    shape = [d.dim_value or batch for d in onnx_model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _run(mapping, x, **hardware):
    return xcompile.Session(mapping, **hardware).run(None, {"x": x})[0]


def _sorted_sections(program):
    """A compiled program with its sections sorted and tiled and assigned again (no schedule)."""
    program = dataclasses.replace(program, options=dataclasses.replace(program.options, crossbars=1, schedule="sorted"))
    for compiler_pass in (SortSections(), Tile(), Assign()):
        program = compiler_pass(program).program
    return dataclasses.replace(program, options=dataclasses.replace(program.options, crossbars=None, schedule="layer"))


def _in_layer_order(layer, rows_first):
    """Per-group matrices [G, Kg, Ng] in crossbar row order, put back in the layer's input order."""
    groups, kg, ng = rows_first.shape
    back = np.empty((groups * kg, ng), dtype=rows_first.dtype)
    back[layer.input_order] = rows_first.reshape(groups * kg, ng)
    return back.reshape(groups, kg, ng)


@pytest.mark.parametrize("encoding, weight_bits, cell_bits", [("dual", 8, 2), ("acm", 6, 3), ("offset", 8, 4), ("dual", 4, 1)])
@pytest.mark.parametrize("build", [small_cnn, _grouped_conv_and_transposed], ids=["conv+dense", "grouped+convT"])
def test_sorted_sections_are_undone_exactly(build, encoding, weight_bits, cell_bits):
    onnx_model = build()
    options = dict(progress=False, encoding=encoding, weight_bits=weight_bits, cell_bits=cell_bits, **SMALL)
    plain = xcompile.compile_model(onnx_model, **options)
    sorted_ = Mapping(_sorted_sections(plain.program))  # the sections alone (the schedule may keep the own order)
    for before, after in zip(plain.layers, sorted_.layers):
        order, kg = after.input_order, after.weight.shape[1]
        assert sorted(order.tolist()) == list(range(after.rows_in))
        np.testing.assert_array_equal(order // kg, np.arange(after.rows_in) // kg)  # rows stay in their group
        assert (np.diff(np.abs(after.weight_q).sum(axis=2), axis=1) <= 0).all()  # largest rows first
        assert not np.array_equal(order, np.arange(after.rows_in))  # something really moved
        # the cells realise the plain layer's quantised weights, row for row, in exact integers
        realised = np.rint(effective_weights(after) / after.scale)
        np.testing.assert_array_equal(_in_layer_order(after, realised), before.weight_q)
    x = _input(onnx_model)
    expected = _run(plain, x)
    assert np.abs(_run(sorted_, x) - expected).max() <= 1e-5 * np.abs(expected).max()
    # the converter path (per row block GEMMs) permutes its inputs too
    fine = dict(dac_bits=20, adc_bits=22, calibration={"x": x})
    assert np.abs(_run(sorted_, x, **fine) - _run(plain, x, **fine)).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("encoding, weight_bits, cell_bits", [("dual", 8, 2), ("acm", 6, 3), ("offset", 8, 4)])
@pytest.mark.parametrize("build", [small_cnn, _grouped_conv_and_transposed], ids=["conv+dense", "grouped+convT"])
@pytest.mark.parametrize("remap_rows", [False, True])
def test_the_schedule_rebuilds_the_unsorted_levels_exactly(build, encoding, weight_bits, cell_bits, remap_rows):
    """The layer-order candidate of a sorted schedule comes from the sorted levels, rows moved back:
    it must be the very program an unsorted compile gives, cell for cell."""
    from xcompile.passes.schedule import _unsorted

    options = dict(progress=False, encoding=encoding, weight_bits=weight_bits, cell_bits=cell_bits, **SMALL)
    if remap_rows:
        options.update(remap="static", remap_rows=True, r_wire=1.0)
    plain = xcompile.compile_model(build(), **options)
    for before, after in zip(plain.layers, _sorted_sections(plain.program).layers):
        assert after.row_sort is not None and not np.array_equal(after.levels, before.levels)
        back = _unsorted(after)
        np.testing.assert_array_equal(back.levels, before.levels)
        np.testing.assert_array_equal(back.weight_q, before.weight_q)
        np.testing.assert_array_equal(back.weight, before.weight)
        assert (back.input_order is None) == (before.input_order is None)
        if before.input_order is not None:
            np.testing.assert_array_equal(back.input_order, before.input_order)


def test_sorted_sections_compose_with_rows_already_remapped():
    """remap_rows moves the rows first; sorting them again must keep track of both moves."""
    onnx_model = small_cnn()
    options = dict(progress=False, remap="static", remap_rows=True, **SMALL)
    remapped = xcompile.compile_model(onnx_model, **options)
    both = Mapping(_sorted_sections(remapped.program))
    for before, after in zip(remapped.layers, both.layers):
        assert not np.array_equal(after.input_order, before.input_order)
        realised = np.rint(effective_weights(after) / after.scale)
        unsorted = np.rint(effective_weights(before) / before.scale)
        np.testing.assert_array_equal(_in_layer_order(after, realised), _in_layer_order(before, unsorted))
    x = _input(onnx_model)
    expected = _run(remapped, x)
    assert np.abs(_run(both, x) - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("order", ["layer", "sorted"])
@pytest.mark.parametrize("crossbars", [1, 3, 7, 1000])
def test_every_tile_is_loaded_once_per_pass_in_network_order(order, crossbars):
    mapping = xcompile.compile_model(small_cnn(), progress=False, cell_bits=4, crossbars=crossbars, schedule=order, **SMALL)
    s = mapping.program.schedule
    total = sum(layer.tiling.count for layer in mapping.layers)
    assert sorted(zip(s.layer.tolist(), s.tile.tolist())) == [(l.index, t) for l in mapping.layers for t in range(l.tiling.count)]
    assert s.rounds == math.ceil(total / crossbars)
    for r in range(s.rounds):
        on = s.crossbar[s.round == r]
        assert on.size == len(set(on.tolist())) <= crossbars and on.max() < crossbars
    # a round only starts a layer once the layers before it have all been loaded
    place = {layer.index: i for i, layer in enumerate(mapping.layers)}
    positions = np.array([place[i] for i in s.layer])
    for r in range(s.rounds - 1):
        assert positions[s.round == r].max() <= positions[s.round == r + 1].min()
    if order == "layer":
        np.testing.assert_array_equal(s.crossbar, np.arange(total) % crossbars)
        np.testing.assert_array_equal(s.round, np.arange(total) // crossbars)
    graph = placement_graph(mapping.program)
    for layer in mapping.layers:
        mine = s.layer == layer.index
        np.testing.assert_array_equal(layer.tiling.crossbar[s.tile[mine]], s.crossbar[mine])
        for tile, crossbar, round_ in zip(s.tile[mine], s.crossbar[mine], s.round[mine]):
            rb, cb = layer.tiling.grid[tile]
            assert graph.nodes[f"{layer.name}/tile{rb}.{cb}"]["crossbar"] == crossbar
            assert graph.nodes[f"{layer.name}/tile{rb}.{cb}"]["round"] == round_


def _replay(mapping):
    """Per load: levels the tile computes with, and what its crossbar held before (steady state)."""
    s = mapping.program.schedule
    layers = {layer.index: layer for layer in mapping.layers}
    loaded = {i: layer.as_loaded().levels for i, layer in layers.items()}
    computed = [loaded[l][t] for l, t in zip(s.layer, s.tile)]
    targets = [layers[l].levels[t] for l, t in zip(s.layer, s.tile)]
    last = {}
    for position, crossbar in enumerate(s.crossbar):  # the previous pass ends with these
        last[crossbar] = position
    before = []
    for position, crossbar in enumerate(s.crossbar):
        before.append(computed[last[crossbar]])
        last[crossbar] = position
    return s, computed, targets, before


@pytest.mark.parametrize("order", ["layer", "sorted"])
def test_write_counts_match_a_replay_of_the_schedule(order):
    mapping = xcompile.compile_model(small_cnn(), progress=False, cell_bits=2, crossbars=5, schedule=order, **SMALL)
    s, computed, targets, before = _replay(mapping)
    for position in range(s.layer.size):
        np.testing.assert_array_equal(computed[position], targets[position])  # nothing stale without stucking
        assert s.writes[position] == s.changed[position] == np.count_nonzero(before[position] != targets[position])
    assert s.stale.sum() == 0
    per_cell = np.zeros((s.crossbars,) + targets[0].shape, dtype=int)
    for position, crossbar in enumerate(s.crossbar):
        per_cell[crossbar] += before[position] != targets[position]
    np.testing.assert_array_equal(s.cell_writes_max, per_cell.reshape(s.crossbars, -1).max(axis=1))
    assert s.writes_per_crossbar().sum() == s.writes_per_round().sum() == s.writes.sum() > 0
    np.testing.assert_array_equal(s.writes_per_round(), [s.writes[s.round == r].sum() for r in range(s.rounds)])


def test_enough_crossbars_means_no_reprogramming():
    mapping = xcompile.compile_model(small_cnn(), progress=False, crossbars=1000, **SMALL)
    s = mapping.program.schedule
    assert s.rounds == 1 and s.writes.sum() == 0 and s.cell_writes_max.max() == 0


def test_sorted_sections_need_fewer_writes_when_rows_differ_in_magnitude():
    """Only cells holding equal levels on consecutive tiles are saved (docs/schedules.md), so the
    gain is modest, but it is there (8,281 -> 7,790 writes here)."""
    counts = {}
    for order in ("layer", "sorted"):
        mapping = xcompile.compile_model(_uneven_rows(), progress=False, cell_bits=2, crossbars=3, schedule=order, **SMALL)
        counts[order] = int(mapping.program.schedule.writes.sum())
    assert counts["sorted"] < 0.97 * counts["layer"]


def test_bit_stucking_leaves_stale_low_order_cells_that_the_runtime_computes_with():
    onnx_model = dense(40, 24, seed=3)
    options = dict(progress=False, cell_bits=2, crossbars=3, schedule="sorted", stuck_slices=2, **SMALL)
    stuck = xcompile.compile_model(onnx_model, stuck_fraction=0.3, seed=4, **options)
    s, computed, targets, before = _replay(stuck)
    slices = slices_of(stuck.layers[0].encoding)
    low_columns = np.arange(SMALL["cols"]) % slices < 2
    assert 0 < s.stale.sum() and (s.writes < s.changed).any() and (s.writes <= s.changed).all()
    for position in range(s.layer.size):
        stale = computed[position] != targets[position]
        assert not stale[:, ~low_columns].any()  # only the stuck slice columns keep old levels
        np.testing.assert_array_equal(computed[position][stale], before[position][stale])  # ... the previous tile's
        assert s.stale[position] == np.count_nonzero(stale)
        assert s.writes[position] == np.count_nonzero(computed[position] != before[position])
    # the runtime's MVM uses exactly the stale levels
    layer = stuck.layers[0]
    x = _input(onnx_model, batch=6)
    realised = _in_layer_order(layer, effective_weights(layer.as_loaded()))[0]
    np.testing.assert_allclose(_run(stuck, x), x @ realised.astype(np.float32) + layer.bias, rtol=1e-5, atol=1e-5)
    plain = xcompile.compile_model(onnx_model, progress=False, cell_bits=2, **SMALL)
    assert np.abs(_run(stuck, x) - _run(plain, x)).max() > 1e-3 * np.abs(_run(plain, x)).max()
    # same seed, same schedule and outputs; another seed, other cells
    again = xcompile.compile_model(onnx_model, stuck_fraction=0.3, seed=4, **options)
    np.testing.assert_array_equal(again.layers[0].stale_cells, layer.stale_cells)
    np.testing.assert_array_equal(_run(again, x), _run(stuck, x))
    other = xcompile.compile_model(onnx_model, stuck_fraction=0.3, seed=5, **options)
    assert not np.array_equal(other.layers[0].stale_cells, layer.stale_cells)


def test_rewriting_every_changed_cell_is_the_same_as_no_schedule():
    onnx_model = small_cnn()
    x = _input(onnx_model)
    options = dict(progress=False, cell_bits=2, **SMALL)
    full = xcompile.compile_model(onnx_model, crossbars=4, stuck_slices=2, stuck_fraction=1.0, **options)
    assert full.program.schedule.stale.sum() == 0 and all(layer.stale_cells is None for layer in full.layers)
    np.testing.assert_array_equal(_run(full, x), _run(xcompile.compile_model(onnx_model, **options), x))


def test_never_rewriting_keeps_in_the_stuck_slices_what_each_crossbars_first_load_programmed():
    """Stucking applies to reprogramming: deploying the chip programs every cell of a crossbar's
    first tile; with p = 0 its stuck slices keep those levels for every later tile."""
    mapping = xcompile.compile_model(small_cnn(), progress=False, cell_bits=2, crossbars=4, stuck_slices=1, stuck_fraction=0.0, **SMALL)
    s = mapping.program.schedule
    slices = slices_of(mapping.layers[0].encoding)
    low_columns = np.arange(SMALL["cols"]) % slices < 1
    by_index = {layer.index: layer for layer in mapping.layers}
    first = {}
    for layer, tile, crossbar in zip(s.layer, s.tile, s.crossbar):
        first.setdefault(int(crossbar), by_index[int(layer)].levels[tile])
    moved = 0
    for layer, tile, crossbar in zip(s.layer, s.tile, s.crossbar):
        loaded = by_index[int(layer)].as_loaded().levels[tile]
        np.testing.assert_array_equal(loaded[:, low_columns], first[int(crossbar)][:, low_columns])
        np.testing.assert_array_equal(loaded[:, ~low_columns], by_index[int(layer)].levels[tile][:, ~low_columns])
        moved += int((by_index[int(layer)].levels[tile][:, low_columns] != loaded[:, low_columns]).any())
    assert moved > 0  # the targets did differ there


def test_schedule_survives_mapping_bin(tmp_path):
    onnx_model = small_cnn()
    mapping = xcompile.compile_model(
        onnx_model, progress=False, cell_bits=2, crossbars=4, schedule="sorted", stuck_slices=1, stuck_fraction=0.5, **SMALL
    )
    loaded = xcompile.load(mapping.save(tmp_path / "m.bin"))
    before, after = mapping.program.schedule, loaded.program.schedule
    assert (after.crossbars, after.order, after.stuck_fraction, after.stuck_slices, after.seed) == (4, "sorted", 0.5, 1, 0)
    for name in ("layer", "tile", "crossbar", "round", "writes", "changed", "stale", "cell_writes_max"):
        np.testing.assert_array_equal(getattr(before, name), getattr(after, name))
    for a, b in zip(mapping.layers, loaded.layers):
        for name in ("input_order", "stale_cells", "stale_levels", "levels"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(a.tiling.crossbar, b.tiling.crossbar)
    x = _input(onnx_model)
    np.testing.assert_array_equal(_run(mapping, x), _run(loaded, x))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"crossbars": 0}, "crossbars"),
        ({"crossbars": 2.5}, "crossbars"),
        ({"crossbars": 4, "stuck_slices": 1, "stuck_fraction": 1.5}, r"stuck_fraction.*\[0, 1\]"),
        ({"crossbars": 4, "stuck_slices": 1, "stuck_fraction": -0.1}, r"stuck_fraction.*\[0, 1\]"),
        ({"crossbars": 4, "stuck_slices": 1, "stuck_fraction": float("nan")}, r"stuck_fraction.*\[0, 1\]"),
        ({"crossbars": 4, "cell_bits": 2, "stuck_slices": 5, "stuck_fraction": 0.5}, "exceeds the 4 slice"),
        ({"crossbars": 4, "stuck_fraction": 0.5}, "needs 'stuck_slices'"),
        ({"crossbars": 4, "schedule": "random"}, "schedule"),
        ({"schedule": "sorted"}, "give 'crossbars'"),
    ],
)
def test_bad_schedule_options_are_one_clear_error(options, message):
    with pytest.raises(xcompile.XCompileError, match=message):
        xcompile.compile_model(small_cnn(), progress=False, **options)


def test_a_schedule_for_a_model_without_tiles_is_an_error():
    no_mvm = model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 4])], [tensor("y", ["N", 4])])
    with pytest.raises(xcompile.XCompileError, match="no crossbar tiles"):
        xcompile.compile_model(no_mvm, progress=False, crossbars=2, allow_empty=True)


def test_cli_compiles_a_schedule_and_inspect_shows_its_writes(tmp_path, capsys):
    onnx.save(small_cnn(), tmp_path / "cnn.onnx")
    out = tmp_path / "m.bin"
    flags = ["--rows", "8", "--cols", "16", "--cell-bits", "2", "--crossbars", "3", "--schedule", "sorted"]
    assert main([str(tmp_path / "cnn.onnx"), "-o", str(out), "-q", *flags, "--stuck-fraction", "0.5", "--stuck-slices", "1", "--seed", "7"]) == 0
    assert main(["inspect", str(out), "--writes-plot", str(tmp_path / "writes.png")]) == 0
    text = capsys.readouterr().out
    assert "schedule: sorted order" in text and "cell writes per inference pass" in text and "endurance" in text
    assert (tmp_path / "writes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["schedule"]
    schedule = xcompile.load(out).program.schedule
    assert (info["crossbars"], info["order"], info["seed"], info["stuck_slices"]) == (3, "sorted", 7, 1)
    assert info["writes_total"] == sum(info["writes_per_crossbar"]) == sum(info["writes_per_round"]) == int(schedule.writes.sum())
    assert info["writes_without_stucking"] > info["writes_total"] and info["max_cell_writes"] <= info["rounds"]
    assert len(info["writes_per_crossbar"]) == 3 and len(info["writes_per_round"]) == info["rounds"]
    # a mapping without a schedule has none to show, and a bad flag is one line and exit code 2
    assert main([str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "plain.bin"), "-q"]) == 0
    assert main(["inspect", str(tmp_path / "plain.bin"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"] is None
    assert main(["inspect", str(tmp_path / "plain.bin"), "--writes-plot", str(tmp_path / "none.png")]) == 2
    assert main([str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "bad.bin"), "--crossbars", "0"]) == 2
    assert "crossbars" in capsys.readouterr().err and not (tmp_path / "bad.bin").exists()


SHIPPED_CNN = __import__("pathlib").Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


@pytest.mark.parametrize(
    "source, options",
    [
        (SHIPPED_CNN, dict(cell_bits=2, crossbars=2)),
        (SHIPPED_CNN, dict(cell_bits=2, crossbars=8, stuck_slices=1, stuck_fraction=0.5)),
        (small_cnn, dict(cell_bits=2, crossbars=3, **SMALL)),
        (_uneven_rows, dict(cell_bits=1, crossbars=5, **SMALL)),
    ],
    ids=["digits-cnn-P2", "digits-cnn-P8-stuck", "small-cnn-P3", "uneven-P5"],
)
def test_sorted_never_writes_more_than_layer_order(source, options):
    onnx_model = source if isinstance(source, __import__("pathlib").Path) else source()
    writes = {
        order: int(xcompile.compile_model(onnx_model, progress=False, schedule=order, **options).program.schedule.writes.sum())
        for order in ("layer", "sorted")
    }
    assert writes["sorted"] <= writes["layer"]


def test_writes_by_slice_and_magnitude_split_the_layer_schedules_own_count():
    from xcompile.reprogramming import writes_by_slice_and_magnitude

    mapping = xcompile.compile_model(small_cnn(), progress=False, cell_bits=2, crossbars=3, **SMALL)
    by_slice, by_magnitude, names = writes_by_slice_and_magnitude(mapping.program, 3)
    total = int(mapping.program.schedule.writes.sum())
    assert by_slice.shape == (4,) and len(by_magnitude) == len(names)
    assert by_slice.sum() == total and by_magnitude.sum() == total
    assert by_slice[0] > by_slice[-1]  # the low slice of a weight changes more often than its top one
