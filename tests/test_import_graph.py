"""The `threedis` package has no import cycle, and every source package is listed in pyproject.

Why read the source instead of importing it: a cycle that Python happens to resolve
today (one side imports inside a function) breaks as soon as someone moves that
import to the top, and it ties two modules into one. Two graphs are checked: the
module-level imports (what runs at import time) and all imports, functions included
(the design; `triton_attention` <-> `triton_op` was a cycle of that kind).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]


def package_dirs(root: Path) -> dict[str, Path]:
    """Package name -> folder, from pyproject's [tool.setuptools] packages and package-dir."""
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    mapping = config.get("package-dir", {})
    return {name: root / mapping.get(name, name.replace(".", "/")) for name in config["packages"]}


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module of the listed packages: `pkg` for its __init__.py, `pkg.name` for name.py."""
    modules = {}
    for package, folder in packages.items():
        for file in sorted(folder.glob("*.py")):
            modules[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return modules


def _module_level(body: list[ast.stmt]):
    """Statements that run at import: the top level and inside if/try/with/class, never inside functions."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        if isinstance(node, ast.ClassDef):
            yield from _module_level(node.body)
        for field in ("body", "orelse", "finalbody"):
            if not isinstance(node, ast.ClassDef) and isinstance(getattr(node, field, None), list):
                yield from _module_level(getattr(node, field))
        for handler in getattr(node, "handlers", []):
            yield from _module_level(handler.body)


def _every_statement(body: list[ast.stmt]):
    for top in body:
        yield from ast.walk(top)


def imports_of(name: str, file: Path, modules: dict[str, Path], in_functions: bool = False) -> set[str]:
    """The known modules that `name` imports (`from p import m` counts as p.m if m is a module).

    Module-level imports only, unless `in_functions`.
    """
    is_package = file.name == "__init__.py"
    found = set()
    body = ast.parse(file.read_text(encoding="utf-8"), str(file)).body
    for node in (_every_statement if in_functions else _module_level)(body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package holding this module
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def import_graph(root: Path, in_functions: bool = False) -> dict[str, set[str]]:
    modules = module_files(package_dirs(root))
    return {name: imports_of(name, file, modules, in_functions) for name, file in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with an explicit stack)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


@pytest.mark.parametrize("in_functions", [False, True], ids=["module-level", "all-imports"])
def test_no_import_cycle_in_threedis(in_functions):
    graph = import_graph(REPO_ROOT, in_functions)
    assert len(graph) > 30 and "threedis.kernels.triton_attention" in graph, sorted(graph)
    assert sum(len(targets) for targets in graph.values()) > 40, "the graph should hold the package's imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_source_package_is_listed_in_pyproject():
    """A folder with __init__.py under a listed package that pyproject omits would not be installed."""
    packages = package_dirs(REPO_ROOT)
    listed = {folder.resolve() for folder in packages.values()}
    for folder in packages.values():
        for init in folder.rglob("__init__.py"):
            assert init.parent.resolve() in listed, f"{init.parent} is a package missing from pyproject.toml"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_checker_finds_cycles_it_should_and_ignores_function_imports(tmp_path):
    """The same code on a made-up package: a cycle through `from . import`, and one hidden in a function."""
    pyproject = ('[tool.setuptools]\npackages = ["pkg", "pkg.sub"]\n'
                 '[tool.setuptools.package-dir]\n"pkg" = "src"\n"pkg.sub" = "src/sub"\n')
    _write(tmp_path, {
        "pyproject.toml": pyproject,
        "src/__init__.py": "",
        "src/a.py": "import os\nfrom pkg.sub import b\n",
        "src/sub/__init__.py": "",
        "src/sub/b.py": "try:\n    from ..c import thing\nexcept ImportError:\n    pass\n",
        "src/c.py": "class K:\n    from pkg import a\n",
        "src/d.py": "def later():\n    from pkg import e\n",
        "src/e.py": "from pkg import d\n",
    })
    graph = import_graph(tmp_path)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == set()
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (tmp_path / "src/c.py").write_text("def later():\n    from pkg import a\n")
    assert find_cycle(import_graph(tmp_path)) is None
    assert find_cycle(import_graph(tmp_path, in_functions=True)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    assert import_graph(tmp_path, in_functions=True)["pkg.d"] == {"pkg.e"}
