"""ONNX Runtime sessions as xcompile builds them: CPU only, integer arithmetic as ONNX specifies it.

On x86 CPUs without VNNI, ONNX Runtime's uint8 x int8 GEMM kernels (behind QLinearConv,
QLinearMatMul, MatMulInteger, ConvInteger and the ops its quantiser and optimiser write) add pairs
of products in saturating 16-bit registers, so a quantised model's outputs can differ from the
exact integer sums the ONNX specification defines, and from one CPU to the next. The session
option `session.x64quantprecision` makes ONNX Runtime widen first (exact, slower). Every session
xcompile builds sets it where ONNX Runtime can load the model with it — digital segments, the fused ideal graph, `eval`'s float reference, the
remapping probe, constant folding — so what runs digitally follows the specification, as the
crossbar layers do.
"""

from __future__ import annotations

import onnxruntime as ort


def inference_session(model: bytes, *, log_level: int = 3, threads: int | None = None, spinning: bool = True) -> ort.InferenceSession:
    """A CPU session of `model` (serialised ONNX). log_level 3 shows errors only, 4 nothing (for
    callers that raise their own message); threads: intra- and inter-op threads (None: ORT's
    default); spinning False keeps idle pool threads from competing with the crossbar kernels.
    Exact integer GEMMs where ONNX Runtime has them: some kernels (e.g. int8 QLinearMatMul, uint8
    QGemm) exist only without the option, and a model that needs one loads without it."""

    def options(exact: bool) -> ort.SessionOptions:
        made = ort.SessionOptions()
        made.log_severity_level = 4 if exact else log_level  # a refusal with the option is retried without it
        if threads is not None:
            made.intra_op_num_threads = made.inter_op_num_threads = threads
        if not spinning:
            made.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if exact:
            made.add_session_config_entry("session.x64quantprecision", "1")
        return made

    try:
        return ort.InferenceSession(model, options(exact=True), providers=["CPUExecutionProvider"])
    except (ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.Fail):
        return ort.InferenceSession(model, options(exact=False), providers=["CPUExecutionProvider"])
