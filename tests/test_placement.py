"""The placement graph, built in one place from the program, and `inspect --graph` / `--plot`."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import xcompile
from xcompile.cli import main
from xcompile.ir import Program
from xcompile.placement import placement_graph, tile_node
from builders import model, small_cnn, tensor

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _kinds(graph, kind):
    return {name: data for name, data in graph.nodes(data=True) if data["kind"] == kind}


def _branching() -> onnx.ModelProto:
    """a and b read x; c reads a + b: dataflow a -> c and b -> c, none between a and b."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=(20, 12)).astype(np.float32), n) for n in ("wa", "wb")]
    weights.append(numpy_helper.from_array(rng.normal(size=(12, 3)).astype(np.float32), "wc"))
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="a"),
        helper.make_node("MatMul", ["x", "wb"], ["b"], name="b"),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("MatMul", ["r", "wc"], ["y"], name="c"),
    ]
    return model(nodes, [tensor("x", ["N", 20])], [tensor("y", ["N", 3])], weights)


def test_the_graph_holds_every_tile_of_the_tilings_with_its_place():
    program = xcompile.compile_model(small_cnn(), progress=False, rows=16, cols=8).program
    graph = placement_graph(program)
    tiles = _kinds(graph, "tile")
    assert len(tiles) == sum(layer.tiling.count for layer in program.layers) > len(program.layers)
    assert (graph.graph["rows"], graph.graph["cols"]) == (16, 8)
    for layer in program.layers:
        t = layer.tiling
        for i in range(t.count):
            (r0, r1), (c0, c1) = t.row_range[i], t.out_range[i]
            data = tiles[tile_node(layer, i)]
            assert (data["layer"], data["row_block"], data["col_block"]) == (layer.name, *t.grid[i].tolist())
            assert (data["crossbar"], data["rows_used"], data["outputs"]) == (t.crossbar[i], r1 - r0, c1 - c0)
            assert data["cols_used"] == (c1 - c0) * layer.encoding.columns_per_output + layer.encoding.shared_columns
            assert "round" not in data  # no schedule
            assert graph.edges[f"{layer.name}/in", tile_node(layer, i)] == {"kind": "rows", "first": r0, "count": r1 - r0}
            assert graph.edges[tile_node(layer, i), f"{layer.name}/add{t.grid[i, 1]}"] == {"kind": "columns", "first": c0, "count": c1 - c0}
        adders = {f"{layer.name}/add{c}" for c in t.grid[:, 1].tolist()}
        assert adders == {n for n, d in _kinds(graph, "adder").items() if d["layer"] == layer.name}
        assert all(graph.edges[a, f"{layer.name}/out"]["kind"] == "partial_sums" for a in adders)
        assert graph.nodes[f"{layer.name}/in"]["size"] == layer.rows_in and graph.nodes[f"{layer.name}/out"]["size"] == layer.outputs
    assert [(u, v) for u, v, k in graph.edges(data="kind") if k == "dataflow"] == [("conv/out", "fc/in")]


@pytest.mark.parametrize("order", ["layer", "sorted"])
def test_crossbar_and_round_of_every_tile_are_the_schedules(order):
    program = xcompile.compile_model(small_cnn(), progress=False, rows=8, cols=16, cell_bits=4, crossbars=3, schedule=order).program
    graph, s = placement_graph(program), program.schedule
    tiles = _kinds(graph, "tile")
    assert len(tiles) == s.layer.size == sum(layer.tiling.count for layer in program.layers)
    layers = {layer.index: layer for layer in program.layers}
    for layer, tile, crossbar, round_ in zip(s.layer, s.tile, s.crossbar, s.round):
        data = tiles[tile_node(layers[int(layer)], int(tile))]
        assert (data["crossbar"], data["round"]) == (crossbar, round_)


def test_dataflow_follows_the_digital_ops_between_layers():
    graph = placement_graph(xcompile.compile_model(_branching(), progress=False).program)
    assert sorted((u, v) for u, v, k in graph.edges(data="kind") if k == "dataflow") == [("a/out", "c/in"), ("b/out", "c/in")]


def test_one_source_the_program_holds_no_graph_and_the_manifest_copy_is_the_derived_one(tmp_path):
    assert "placement" not in {f.name for f in dataclasses.fields(Program)}
    mapping = xcompile.compile_model(small_cnn(), progress=False, crossbars=2, cell_bits=4)
    mapping.save(tmp_path / "m.bin")
    with zipfile.ZipFile(tmp_path / "m.bin") as archive:
        stored = nx.node_link_graph(json.loads(archive.read("manifest.json"))["placement"], edges="edges")
    loaded = placement_graph(xcompile.load(tmp_path / "m.bin").program)
    assert nx.utils.graphs_equal(stored, loaded) and nx.utils.graphs_equal(loaded, placement_graph(mapping.program))


def test_an_untiled_program_has_no_placement_yet():
    program = xcompile.compile_model(small_cnn(), progress=False).program
    untiled = program.replace_layers(dataclasses.replace(layer, tiling=None) for layer in program.layers)
    with pytest.raises(ValueError, match="'conv': the placement graph needs tiled layers"):
        placement_graph(untiled)


@pytest.fixture(scope="module")
def mappings(tmp_path_factory):
    """small_cnn without and with a schedule, and on crossbars so small that its picture is cut."""
    folder = tmp_path_factory.mktemp("placement")
    paths = {}
    for name, options in {
        "plain": {}, "scheduled": {"crossbars": 2, "cell_bits": 4}, "many_rounds": {"rows": 8, "cols": 8, "crossbars": 2}, "many_tiles": {"rows": 4, "cols": 4},
    }.items():
        paths[name] = folder / f"{name}.bin"
        xcompile.compile_model(small_cnn(), progress=False, **options).save(paths[name])
    return paths


def test_graph_says_what_it_wrote(mappings, tmp_path, capsys):
    target = tmp_path / "g.json"
    assert main(["inspect", str(mappings["plain"]), "--graph", str(target), "--json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)  # stdout stays JSON
    graph = placement_graph(xcompile.load(mappings["plain"]).program)
    assert err == f"wrote {target} ({graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges)\n"
    assert len(json.loads(target.read_text())["nodes"]) == graph.number_of_nodes() == 9


def _pixels(path: Path, colour) -> int:
    from matplotlib import image

    rgb = image.imread(path)[..., :3]
    return int((np.abs(rgb - np.array(colour[:3])).max(axis=-1) < 2 / 255).sum())


@pytest.mark.parametrize("name, drawn", [("plain", "3 crossbars of 128x128 cells, 3 tiles of 2 layers"),
                                         ("scheduled", "2 crossbars x 2 rounds of 128x128 cells, 3 tiles of 2 layers")])
def test_plot_draws_the_crossbars_with_the_cells_of_each_layer(mappings, tmp_path, capsys, name, drawn):
    from matplotlib import colormaps

    target = tmp_path / "placement.png"
    assert main(["inspect", str(mappings[name]), "--plot", str(target)]) == 0
    assert capsys.readouterr().err == f"wrote {target} ({drawn})\n"
    assert target.read_bytes().startswith(PNG)
    conv, fc = colormaps["tab10"](0), colormaps["tab10"](1)
    assert _pixels(target, conv) > 0 and _pixels(target, fc) > 0  # both layers' cells are drawn in their colours
    assert _pixels(target, (0.88, 0.88, 0.88)) > 10 * _pixels(target, conv)  # most cells unused: utilisation shows


@pytest.mark.parametrize("name", ["many_rounds", "many_tiles"])
def test_plot_of_a_large_chip_says_what_it_left_out(mappings, tmp_path, capsys, name):
    program = xcompile.load(mappings[name]).program
    tiles = sum(layer.tiling.count for layer in program.layers)
    cut = f"first 16 of {program.schedule.rounds} rounds drawn" if program.schedule else f"first 64 of {tiles} crossbars drawn"
    assert (program.schedule.rounds if program.schedule else tiles) > {"many_rounds": 16, "many_tiles": 64}[name]
    assert main(["inspect", str(mappings[name]), "--plot", str(tmp_path / "p.svg")]) == 0
    assert cut in capsys.readouterr().err
    assert cut in (tmp_path / "p.svg").read_text()  # the title says it too


def test_plot_of_a_mapping_with_no_tiles_is_one_clear_error(tmp_path, capsys):
    relu = model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 4])], [tensor("y", ["N", 4])])
    xcompile.compile_model(relu, progress=False, allow_empty=True).save(tmp_path / "empty.bin")
    assert main(["inspect", str(tmp_path / "empty.bin"), "--plot", str(tmp_path / "p.png")]) == 2
    assert "the mapping has no crossbar tiles to draw" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("name, message", [
    ("placement.txt", "placement plot '{path}' must end in one of .png, .pdf, .svg"),
    ("missing/placement.png", "output folder '{folder}' does not exist"),
])
def test_plot_refuses_a_bad_file_name_in_one_line(mappings, tmp_path, capsys, name, message):
    target = tmp_path / name
    assert main(["inspect", str(mappings["plain"]), "--plot", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == "xcompile: error: " + message.format(path=target, folder=target.parent) + "\n"
    assert not target.exists()


def test_plot_without_matplotlib_says_how_to_get_it(mappings, tmp_path, capsys, monkeypatch):
    for name in {"matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))}:
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["inspect", str(mappings["plain"]), "--plot", str(tmp_path / "p.png")]) == 2
    assert "the placement plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


def test_the_networkx_example_in_docs_inspect_runs_and_prints_what_the_doc_shows(tmp_path):
    text = (ROOT / "docs" / "inspect.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    shown = re.search(r"prints\n\n```\n(.*?)```", text, re.S).group(1)
    (tmp_path / "models").mkdir()
    shutil.copy(ROOT / "models" / "digits_cnn.onnx", tmp_path / "models")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown
