"""Passes are pure functions program -> program; tiling and levels follow their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper, numpy_helper

import xcompile
from xcompile.config import CompileOptions, Hardware
from xcompile.frontend import extract_layers, load_model
from xcompile.ir import Program
from xcompile.passes.assign import Assign
from xcompile.passes.encode import Encode
from xcompile.passes.quantize import Quantize
from xcompile.passes.tile import Tile
from xcompile.placement import placement_graph
from builders import model, small_cnn, tensor


def _program(onnx_model, **options) -> Program:
    graph, layers, digital = extract_layers(load_model(onnx_model))
    hw = {k: options.pop(k) for k in list(options) if k in ("rows", "cols")}
    return Program(
        model=b"", graph=graph, layers=tuple(layers), options=CompileOptions(**options),
        hardware=Hardware(**hw), digital_ops=tuple(digital),
    )


def _grouped_conv(channels=12, group=12, kernel=3):
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(size=(channels, channels // group, kernel, kernel)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=[1, 1, 1, 1], name="dw")
    return model([node], [tensor("x", ["N", channels, 6, 6])], [tensor("y", ["N", channels, 6, 6])], [w])


def test_passes_do_not_mutate_their_input():
    program = _program(small_cnn())
    for compiler_pass in (Quantize(), Encode(), Tile(), Assign()):
        before = [(layer, dict(vars(layer))) for layer in program.layers]
        copies = [{k: v.copy() for k, v in fields.items() if isinstance(v, np.ndarray)} for _, fields in before]
        result = compiler_pass(program)
        for (layer, fields), arrays in zip(before, copies):
            assert all(vars(layer)[k] is v for k, v in fields.items())
            for name, array in arrays.items():
                np.testing.assert_array_equal(getattr(layer, name), array)
        assert program.layers == tuple(layer for layer, _ in before)
        assert result.program is not program and result.changed
        program = result.program
    # arrays handed out by the IR are read-only, so later code cannot mutate them either
    with pytest.raises(ValueError):
        program.layers[0].levels[0, 0, 0] = 1


@pytest.mark.parametrize("k, n, rows, cols", [(27, 6, 128, 128), (300, 200, 128, 128), (1000, 65, 64, 32), (5, 1, 4, 2)])
def test_tile_count_is_ceil_k_over_rows_times_ceil_n_over_outputs_per_tile(k, n, rows, cols):
    rng = np.random.default_rng(k)
    w = numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "w")
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", ["N", k])], [tensor("y", ["N", n])], [w])
    program = _program(m, rows=rows, cols=cols)
    for compiler_pass in (Quantize(), Encode(), Tile(), Assign()):
        program = compiler_pass(program).program
    layer = program.layers[0]
    per_tile = cols // 2  # dual array: two columns per output
    assert layer.tiling.count == math.ceil(k / rows) * math.ceil(n / per_tile)
    covered = np.zeros((k, n), dtype=int)
    for (r0, r1), (c0, c1) in zip(layer.tiling.row_range, layer.tiling.out_range):
        assert r1 - r0 <= rows and (c1 - c0) * 2 <= cols
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all()  # every weight on exactly one tile
    graph = placement_graph(program)
    assert sum(1 for _, d in graph.nodes(data=True) if d["kind"] == "tile") == layer.tiling.count


def test_depthwise_tiles_hold_only_the_block_diagonal():
    program = _program(_grouped_conv(channels=40, group=40), rows=32, cols=8)
    for compiler_pass in (Quantize(), Encode(), Tile(), Assign()):
        program = compiler_pass(program).program
    layer = program.layers[0]
    assert layer.weight.shape == (40, 9, 1)
    full_grid = math.ceil(360 / 32) * math.ceil(40 / 4)
    assert layer.tiling.count < full_grid
    # every nonzero of blockdiag(W) is in some placed tile
    covered = np.zeros((360, 40), dtype=bool)
    for (r0, r1), (c0, c1) in zip(layer.tiling.row_range, layer.tiling.out_range):
        covered[r0:r1, c0:c1] = True
    for g in range(40):
        assert covered[g * 9 : (g + 1) * 9, g].all()


def test_levels_reproduce_the_quantised_weights_with_the_dual_encoding():
    program = _program(small_cnn(), weight_bits=4, cell_bits=4)
    for compiler_pass in (Quantize(), Encode(), Tile(), Assign()):
        program = compiler_pass(program).program
    for layer in program.layers:
        top = 15
        assert layer.levels.max() <= top and layer.levels.dtype == np.uint8
        expected = np.clip(np.rint(layer.weight / (np.abs(layer.weight).max() / top)), -top, top)
        rebuilt = np.zeros(layer.weight.shape)
        for i, ((r0, r1), (c0, c1)) in enumerate(zip(layer.tiling.row_range, layer.tiling.out_range)):
            cells = layer.levels[i, : r1 - r0, : 2 * (c1 - c0)].astype(int)
            block = cells[:, 0::2] - cells[:, 1::2]  # W+ - W-
            assert not ((cells[:, 0::2] > 0) & (cells[:, 1::2] > 0)).any()  # one of the pair is off
            layer.add_block(rebuilt, (r0, r1), (c0, c1), block)
        np.testing.assert_array_equal(rebuilt, expected)


def test_pipeline_records_every_pass_with_its_options():
    mapping = xcompile.compile_model(small_cnn(), progress=False, rows=64, cols=32, weight_bits=6, cell_bits=6)
    history = {r.name: r for r in mapping.program.history}
    assert list(history) == ["quantize", "remap", "encode", "sort_sections", "tile", "assign", "schedule"]
    assert history["quantize"].options == {"weight_bits": 6, "weight_scale": "layer", "ideal": False}
    assert history["tile"].options == {"rows": 64, "cols": 32}
    assert all(r.seconds >= 0 for r in history.values())


def test_hardware_from_toml_and_keyword_overrides(tmp_path):
    path = tmp_path / "hw.toml"
    path.write_text("[hardware]\nrows = 64\ncols = 32\ng_on = 2e-4\ng_off = 2e-6\n")
    mapping = xcompile.compile_model(small_cnn(), progress=False, hardware=path, cols=16)
    assert (mapping.hardware.rows, mapping.hardware.cols, mapping.hardware.g_on) == (64, 16, 2e-4)
    with pytest.raises(xcompile.XCompileError, match="g_off"):
        xcompile.compile_model(small_cnn(), g_off=1e-3, g_on=1e-4)


def test_the_docs_example_pass_runs_and_is_recorded(capsys, monkeypatch):
    """docs/passes.md's example: a new pass is one class; the manager records its declared options."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    code = re.search(r"```python\n(.*?)```", (root / "docs" / "passes.md").read_text(), re.S).group(1)
    exec(compile(code, "docs/passes.md", "exec"), {"__name__": "docs_example"})
    printed = capsys.readouterr().out
    assert "('zero_share', {'weight_bits': 8})" in printed and "('quantize'," in printed


def test_a_pass_run_out_of_order_says_which_pass_and_why():
    from xcompile.passes.infra import PreconditionError

    program = _program(small_cnn())
    with pytest.raises(PreconditionError, match=r"pass 'tile': layer '.*': tiling needs an encoding first"):
        Tile()(program)
    with pytest.raises(xcompile.XCompileError, match=r"pass 'assign'"):
        Assign()(Quantize()(program).program)


def test_the_manager_records_what_each_pass_declares_and_refuses_twin_names():
    from xcompile.passes.infra import PassError, PassManager

    program = PassManager((Quantize(), Encode(), Tile(), Assign()))(_program(small_cnn(), rows=64, cols=32), progress=False)
    records = {r.name: r for r in program.history}
    for compiler_pass in (Quantize(), Encode(), Tile(), Assign()):
        assert set(records[compiler_pass.name].options) == set(compiler_pass.options)
    assert records["tile"].options == {"rows": 64, "cols": 32} and records["assign"].options["g_on"] == Hardware().g_on
    with pytest.raises(PassError, match="unique"):
        PassManager((Quantize(), Quantize()))


def test_sorted_sections_are_a_pass_of_their_own_before_tiling():
    mapping = xcompile.compile_model(small_cnn(), progress=False, rows=16, cols=16, cell_bits=2, crossbars=3, schedule="sorted")
    history = [(r.name, r.changed) for r in mapping.program.history]
    assert history.index(("sort_sections", True)) < history.index(("tile", True))
    assert all(layer.row_sort is None for layer in mapping.layers)  # the schedule consumed it
    plain = xcompile.compile_model(small_cnn(), progress=False, rows=16, cols=16, cell_bits=2, crossbars=3)
    assert ("sort_sections", False) in [(r.name, r.changed) for r in plain.program.history]
