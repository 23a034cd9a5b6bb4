"""The package's import surface: cheap to import, every public name reachable."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("numba", "onnxruntime", "scipy", "pandas", "dask")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_import_and_help_load_no_heavy_module():
    assert _loaded_after("import xcompile") == set()
    help_run = "import contextlib, io\nfrom xcompile import cli\nwith contextlib.redirect_stdout(io.StringIO()):\n"
    for command in ([], ["compile"], ["run"], ["eval"], ["sweep"], ["inspect"]):
        code = help_run + f"    try:\n        cli.main({[*command, '--help']!r})\n    except SystemExit:\n        pass"
        assert _loaded_after(code) == set(), command


def test_public_names_resolve_on_first_use():
    import importlib

    import xcompile

    for name in xcompile.__all__:
        assert getattr(xcompile, name) is not None, name
    importlib.import_module("xcompile.sweep")
    assert callable(xcompile.sweep)  # still the function after the submodule is imported
    assert "onnxruntime" in _loaded_after("import xcompile\nxcompile.Session")
