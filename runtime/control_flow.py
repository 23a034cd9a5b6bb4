"""If, Loop and Scan as the ONNX operator specifications define them, run by the executor when a
body holds crossbar layers (ONNX Runtime cannot run those bodies itself).

Each function takes the node's attributes, its input values (None where omitted) and
`run_body(attribute name, body input values) -> body output values`; it returns the node's outputs.
"""

from __future__ import annotations

import numpy as np


def _scalar(value) -> bool | int:
    return np.asarray(value).reshape(-1)[0].item()


def run_if(attributes: dict, values: list, run_body, bodies) -> list:
    return run_body("then_branch" if _scalar(values[0]) else "else_branch", [])


def run_loop(attributes: dict, values: list, run_body, bodies) -> list:
    """Loop(M, cond, v_initial...): body(iteration_num, cond, v...) -> (cond, v..., scan outputs...)."""
    trip, condition, carried = values[0], values[1], list(values[2:])
    limit = None if trip is None else int(_scalar(trip))
    going = True if condition is None else bool(_scalar(condition))
    scans: list[list] = [[] for _ in range(len(bodies["body"].outputs) - 1 - len(carried))]
    iteration = 0
    while going and (limit is None or iteration < limit):
        out = run_body("body", [np.array(iteration, np.int64), np.array(going), *carried])
        going = bool(_scalar(out[0]))
        carried = out[1 : 1 + len(carried)]
        for collected, value in zip(scans, out[1 + len(carried) :]):
            collected.append(np.asarray(value))
        iteration += 1
    return carried + [np.stack(c) if c else np.zeros((0,), np.float32) for c in scans]


def run_scan(attributes: dict, values: list, run_body, bodies) -> list:
    """Scan (opset 9 onward): states and scan inputs sliced along their axes, per direction."""
    count = int(attributes["num_scan_inputs"])
    states, scanned = list(values[: len(values) - count]), [np.asarray(v) for v in values[len(values) - count :]]
    in_axes = [a % x.ndim for a, x in zip(attributes.get("scan_input_axes", [0] * count), scanned)]
    in_reverse = attributes.get("scan_input_directions", [0] * count)
    outputs = len(bodies["body"].outputs) - len(states)
    out_axes = list(attributes.get("scan_output_axes", [0] * outputs))
    out_reverse = attributes.get("scan_output_directions", [0] * outputs)
    steps = scanned[0].shape[in_axes[0]]
    collected: list[list] = [[] for _ in range(outputs)]
    for t in range(steps):
        slices = [np.take(x, steps - 1 - t if r else t, axis=a) for x, a, r in zip(scanned, in_axes, in_reverse)]
        out = run_body("body", states + slices)
        states = out[: len(states)]
        for gathered, value in zip(collected, out[len(states) :]):
            gathered.append(np.asarray(value))
    results = []
    for gathered, axis, reverse in zip(collected, out_axes, out_reverse):
        gathered = gathered[::-1] if reverse else gathered
        stacked = np.stack(gathered) if gathered else np.zeros((0,), np.float32)
        results.append(np.moveaxis(stacked, 0, axis % stacked.ndim) if gathered else stacked)
    return states + results


RUN = {"If": run_if, "Loop": run_loop, "Scan": run_scan}
