"""The placement graph: what sits where on the chip and how data flows, derived from a program.

No pass reads the graph, so nothing stores it in the program: this module builds it on demand
from the one source of truth, the layers' tilings (`Tiling.grid`, `row_range`, `out_range`,
`crossbar`), their encodings, the reprogramming schedule (`Program.schedule`) and the runtime
graph. mapping.bin keeps a copy in its manifest for tools that read the zip (docs/format.md).

Schema (docs/inspect.md shows how to query it with networkx). A `DiGraph` with graph attributes
`name` ("placement"), `rows` and `cols` (the crossbar array), and per MVM layer LAYER the nodes

- `LAYER/in`, kind `input`: `layer`, `size` (K, the rows the layer needs);
- `LAYER/tileR.C`, kind `tile` (R row block, C column block): `layer`, `row_block`, `col_block`,
  `crossbar` (the physical crossbar it is on), `rows_used`, `cols_used` (physical columns, the
  encoding's included), `outputs`; with a schedule also `round` (the round it is loaded in);
- `LAYER/addC`, kind `adder`: `layer`, `col_block`: the digital adder of column block C's
  partial sums over the row blocks;
- `LAYER/out`, kind `output`: `layer`, `size` (N);

and the edges `rows` (input -> tile: `first`, `count` rows of the input vector), `columns`
(tile -> adder: `first`, `count` outputs), `partial_sums` (adder -> output) and `dataflow`
(a layer's output -> the input of a layer it feeds through digital ONNX ops).
"""

from __future__ import annotations

import networkx as nx
import numpy as np

from xcompile.ir import Layer, Program


def placement_graph(program: Program) -> nx.DiGraph:
    """The placement graph of a tiled program (after the `tile` pass), schema above."""
    hw = program.hardware
    graph = nx.DiGraph(name="placement", rows=hw.rows, cols=hw.cols)
    rounds = _rounds(program)
    for layer in program.layers:
        if layer.tiling is None or layer.encoding is None:
            raise ValueError(f"layer '{layer.name}': the placement graph needs tiled layers (after the tile pass)")
        _add_layer(graph, layer, rounds.get(layer.index))
    _connect_layers(graph, program)
    return graph


def tile_node(layer: Layer, tile: int) -> str:
    """The node name of tile `tile` (its index in the layer's tiling)."""
    row_block, col_block = layer.tiling.grid[tile]
    return f"{layer.name}/tile{row_block}.{col_block}"


def _rounds(program: Program) -> dict[int, np.ndarray]:
    """Per layer index, the round each of its tiles is loaded in (empty without a schedule)."""
    schedule = program.schedule
    if schedule is None:
        return {}
    rounds = {}
    for layer in program.layers:
        mine = schedule.layer == layer.index
        rounds[layer.index] = np.empty(layer.tiling.count, dtype=np.int64)
        rounds[layer.index][schedule.tile[mine]] = schedule.round[mine]
    return rounds


def _add_layer(graph: nx.DiGraph, layer: Layer, rounds: np.ndarray | None) -> None:
    t, enc = layer.tiling, layer.encoding
    source, sink = f"{layer.name}/in", f"{layer.name}/out"
    graph.add_node(source, kind="input", layer=layer.name, size=layer.rows_in)
    graph.add_node(sink, kind="output", layer=layer.name, size=layer.outputs)
    for i, (r0, r1), (c0, c1) in layer.tiles():
        rb, cb = t.grid[i]
        tile = tile_node(layer, i)
        adder = f"{layer.name}/add{cb}"
        graph.add_node(
            tile,
            kind="tile",
            layer=layer.name,
            row_block=int(rb),
            col_block=int(cb),
            crossbar=int(t.crossbar[i]),
            rows_used=r1 - r0,
            cols_used=enc.columns_used(c1 - c0),
            outputs=c1 - c0,
            **({} if rounds is None else {"round": int(rounds[i])}),
        )
        if adder not in graph:
            graph.add_node(adder, kind="adder", layer=layer.name, col_block=int(cb))
            graph.add_edge(adder, sink, kind="partial_sums")
        graph.add_edge(source, tile, kind="rows", first=r0, count=r1 - r0)
        graph.add_edge(tile, adder, kind="columns", first=c0, count=c1 - c0)


def _connect_layers(graph: nx.DiGraph, program: Program) -> None:
    """Edges from a layer's output to the next layers fed by it through digital ONNX ops."""
    producers = {}
    for node in program.graph.graph.node:
        for out in node.output:
            producers[out] = node
    by_output = {layer.output_name: layer.name for layer in program.layers}
    for layer in program.layers:
        seen, stack = set(), [layer.input_name]
        while stack:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            node = producers.get(value)
            if node is None:
                continue
            upstream = next((by_output[o] for o in node.output if o in by_output), None)
            if upstream is not None:
                graph.add_edge(f"{upstream}/out", f"{layer.name}/in", kind="dataflow")
            else:
                stack.extend(i for i in node.input if i)
