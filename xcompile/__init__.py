"""xcompile: compile ONNX models onto resistive crossbars and run them on simulated hardware.

    mapping = xcompile.compile_model("model.onnx")          # or an onnx.ModelProto
    mapping.save("mapping.bin")
    session = xcompile.Session("mapping.bin")               # ONNX Runtime's run() signature
    outputs = session.run(None, {"input": x})

The public names load on first use (PEP 562), so `import xcompile` and `xcompile --help` pay for
none of numba, ONNX Runtime, SciPy, pandas or Dask.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# `passes/` and `runtime/` sit beside this folder in a checkout and install as xcompile.passes and
# xcompile.runtime. Where this package is the checkout's folder (it shadows an installed copy when
# Python runs in the repository root), the sub-packages are found one level up.
_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "passes").is_dir() and (_checkout / "passes" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - the package's own search path

_EXPORTS = {
    "CompileOptions": "xcompile.config",
    "Hardware": "xcompile.config",
    "Mapping": "xcompile.artifact",
    "Session": "xcompile.runtime.session",
    "XCompileError": "xcompile.errors",
    "compile_model": "xcompile.pipeline",
    "load": "xcompile.artifact",
}

# Bound now, not lazily: importing the submodule xcompile.sweep sets the package attribute `sweep`
# to the module, and only a from-import after it makes the name the function. The sweep package
# imports its heavy parts (pandas, Dask, the runtime) inside the functions that need them.
from xcompile.sweep import sweep  # noqa: E402

__all__ = sorted([*_EXPORTS, "sweep"])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'xcompile' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
