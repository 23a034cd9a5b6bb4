"""xcompile: compile ONNX models onto resistive crossbars and run them on simulated hardware.

    mapping = xcompile.compile_model("model.onnx")          # or an onnx.ModelProto
    mapping.save("mapping.bin")
    session = xcompile.Session("mapping.bin")               # ONNX Runtime's run() signature
    outputs = session.run(None, {"input": x})
"""

from xcompile.artifact import Mapping, load
from xcompile.config import CompileOptions, Hardware
from xcompile.errors import XCompileError
from xcompile.pipeline import compile_model
from xcompile.runtime.session import Session
from xcompile.sweep import sweep

__all__ = ["CompileOptions", "Hardware", "Mapping", "Session", "XCompileError", "compile_model", "load", "sweep"]
