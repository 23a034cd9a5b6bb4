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


def _imports(path) -> set[str]:
    """Every module a source file imports (top level or inside functions), absolute names."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_imports_run_one_way_between_the_rooms():
    """passes/ and runtime/ use the IR; passes never build a session; the runtime never imports a
    pass; nobody imports the CLI."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / "passes").glob("*.py")):
        bad = {n for n in _imports(path) if n.startswith(("xcompile.runtime.session", "xcompile.runtime.simulator", "xcompile.cli"))}
        assert not bad, f"{path.name} imports {bad}"
    for path in sorted((root / "runtime").glob("*.py")):
        bad = {n for n in _imports(path) if n.startswith(("xcompile.passes", "xcompile.cli"))}
        assert not bad, f"runtime/{path.name} imports {bad}"
    for path in sorted((root / "xcompile").rglob("*.py")):
        if path.name not in ("cli.py", "__main__.py"):
            assert not {n for n in _imports(path) if n.startswith("xcompile.cli")}, path


def test_no_module_is_over_450_lines():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sizes = {
        str(path.relative_to(root)): len(path.read_text().splitlines())
        for room in ("xcompile", "passes", "runtime")
        for path in (root / room).rglob("*.py")
    }
    assert {name: lines for name, lines in sizes.items() if lines > 450} == {}
