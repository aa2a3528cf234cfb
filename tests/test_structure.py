"""The package's import structure: dependencies run downhill. No import cycle among ftexp's
modules, and no ftexp module imported inside a function (which is how a cycle hides). Read from
the source with ``ast``, so it also runs where optional libraries are missing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "ftexp"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(node: ast.AST, modules: dict) -> set[str]:
    """The ftexp modules an import statement names."""
    names = set()
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        base = node.module
        names |= {f"{base}.{a.name}" for a in node.names} | {base}
    elif isinstance(node, ast.Import):
        names |= {a.name for a in node.names}
    return {n for n in names if n in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        graph[name] = {d for node in tree.body for d in _imported(node, modules) if d != name and d != "ftexp"}
    return graph


def test_no_import_cycle_among_ftexp_modules():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_no_ftexp_module_is_imported_inside_a_function():
    modules = _modules()
    found = []
    for name, path in modules.items():
        for func in ast.walk(ast.parse(path.read_text())):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if _imported(node, modules):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} in {func.name}()")
    assert found == [], "function-level imports of ftexp modules:\n" + "\n".join(found)


def test_the_check_sees_a_cycle_and_a_function_level_import(tmp_path, monkeypatch):
    """The two checks above can fail: a package with a cycle and a lazy import trips both."""
    pkg = tmp_path / "ftexp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from ftexp import b\n")
    (pkg / "b.py").write_text("import ftexp.a\n\ndef f():\n    from ftexp import a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    for check, needle in ((test_no_import_cycle_among_ftexp_modules, "ftexp.a -> ftexp.b -> ftexp.a"),
                          (test_no_ftexp_module_is_imported_inside_a_function, "b.py:4 in f()")):
        with pytest.raises(AssertionError, match=re.escape(needle)):
            check()


def test_trl_is_used_through_the_names_it_exports():
    """TRL's internals move between releases; ftexp imports only what ``trl`` itself exports."""
    import trl

    found = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trl":
                for alias in node.names:
                    if node.module != "trl" or not hasattr(trl, alias.name):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}" for a in node.names
                          if a.name.startswith("trl.")]
    assert found == [], "\n".join(found)
