"""The onnx wheel's node test cases (model + inputs), built from its case generators: the wheel
ships the generators, not the data folders. Collected once per process."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
from onnx import numpy_helper


@functools.cache
def _all_cases() -> dict:
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators divide by zero on purpose
        return {case.name: case for case in node.collect_testcases(None)}


def names(*prefixes: str) -> list[str]:
    return sorted(n for n in _all_cases() if n.startswith(prefixes))


def with_constant_weights(name: str, weights: dict[str, tuple[int, ...]]):
    """(model, feeds): the case's model with the inputs in `weights` (op type -> input positions)
    made initializers, as a deployed model holds them, and the feeds that remain."""
    case = _all_cases()[name]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    feeds = dict(zip((i.name for i in model.graph.input), case.data_sets[0][0]))
    moved = {
        node.input[i] for node in model.graph.node for i in weights.get(node.op_type, ())
        if i < len(node.input) and node.input[i] in feeds
    }
    keep = [i for i in model.graph.input if i.name not in moved]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(feeds[n]), n) for n in sorted(moved))
    return model, {n: v for n, v in feeds.items() if n not in moved}


def expected(name: str) -> list:
    """The case's expected outputs (ONNX's reference implementation)."""
    return list(_all_cases()[name].data_sets[0][1])
