"""The rooms hold: the client library stays light, no circle of files, one service module alone.

The import graph is read from the source files (AST), as a path-based tool reads it: every
import statement anywhere in a file (at module level, inside functions, under TYPE_CHECKING),
absolute `featmap.x.y` or relative, resolved to the file it names. What a module loads is
checked in a fresh interpreter, where nothing imported earlier hides it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Dotted package name -> its folder, as pyproject.toml's [tool.setuptools.package-dir] maps them.
PACKAGE_DIRS: dict[str, Path] = {
    package: ROOT / folder
    for package, folder in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]["package-dir"].items()
}
# The packages written by hand (featmap.v1 and featmap.oip are generated stubs).
HAND_WRITTEN = ["featmap.contract", "featmap.service", "featmap.client", "featmap.jobs"]
# The client library's forbidden imports: the server side and the runtime it brings.
CLIENT_FORBIDDEN = ("featmap.service", "onnxruntime", "onnx")
# What the server alone loads: featmap's server modules, gRPC's health and reflection
# services, Prometheus.
SERVER_MACHINERY = (
    "featmap.service.server",
    "featmap.service.oip",
    "featmap.service.calls",
    "featmap.service.api",
    "featmap.service.admission",
    "featmap.service.observe",
    "featmap.service.metrics",
    "grpc._server",
    "grpc_health.v1.health",
    "grpc_reflection.v1alpha.reflection",
    "prometheus_client",
)


def module_files() -> dict[str, Path]:
    """Every module of the repo's packages by its dotted name (a package by its __init__.py)."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_names(module: str, is_package: bool, source: str) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of everything a module's source imports, relative imports made
    absolute: `import a.b` gives a.b, `from a.b import c` gives a.b.c (c a module or not)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            for alias in node.names:
                yield f"{origin}.{alias.name}", node.lineno


def file_imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """What the file of `module` imports (see imported_names)."""
    yield from imported_names(module, path.name == "__init__.py", path.read_text("utf-8"))


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The repo's module that an imported name lives in: itself, or the nearest enclosing one
    (`featmap.contract.spec.Pipeline` -> featmap.contract.spec); None outside the repo."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the repo's modules it imports."""
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {resolve(name, modules) for name, _ in file_imports(module, path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `statement`."""
    probe = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return set(result.stdout.split())


def under(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(f"{p}.") for p in prefixes))


def test_the_graph_sees_every_package_and_both_kinds_of_import() -> None:
    graph = import_graph()
    assert {"featmap.contract.spec", "featmap.client.client", "featmap.jobs.cli"} <= set(graph)
    assert "featmap.service.graph" in graph["featmap.jobs.export_onnx"]  # absolute
    # A relative import resolves to the file an absolute one names, and a name to its module.
    source = "from .graph import compile_pipeline\nfrom ..contract import spec\nimport numpy\n"
    names = [name for name, _ in imported_names("featmap.service.example", False, source)]
    modules = module_files()
    assert [resolve(name, modules) for name in names] == [
        "featmap.service.graph",
        "featmap.contract.spec",
        None,
    ]
    assert [name for name, _ in imported_names("featmap.client", True, "from . import x")] == [
        "featmap.client.x"
    ]


def test_no_circle_of_files() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_find_cycle_names_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_client_file_imports_the_service_or_the_runtime() -> None:
    found: dict[str, str] = {}
    for module, path in module_files().items():
        if module == "featmap.client" or module.startswith("featmap.client."):
            for name, line in file_imports(module, path):
                if under({name}, CLIENT_FORBIDDEN):
                    found.setdefault(f"{path.relative_to(ROOT)}:{line}", name)
    assert not found, "\n".join(f"{where} imports {name}" for where, name in found.items())


@pytest.mark.parametrize("package", HAND_WRITTEN)
def test_every_file_says_what_it_is_for(package: str) -> None:
    silent = [
        str(path.relative_to(ROOT))
        for module, path in module_files().items()
        if (module == package or module.startswith(f"{package}."))
        and not ast.get_docstring(ast.parse(path.read_text("utf-8")))
    ]
    assert not silent, f"files without a docstring: {silent}"


def test_importing_the_client_loads_neither_the_service_nor_onnx() -> None:
    loaded = loaded_after(
        "import featmap.client\n"
        "from featmap.client import AsyncFeatureClient, FeatureClient, FeatmapRpcError\n"
        "import featmap.client.channel, featmap.client.retry, featmap.client.shared_memory"
    )
    assert "featmap.client.client" in loaded
    assert under(loaded, CLIENT_FORBIDDEN) == []


def test_an_embedded_job_loads_no_grpc(tmp_path: Path) -> None:
    # An embedded `featmap extract` neither sends nor receives: the client and gRPC are ~0.1 s
    # of start-up it would pay for nothing (errors carry their status by name).
    spec = tmp_path / "pipeline.json"
    spec.write_text('{"input": {"channels": 1}, "layers": [{"op": "global_avg_pool2d"}]}')
    np.save(tmp_path / "images.npy", np.ones((3, 1, 4, 4), dtype=np.float32))
    loaded = loaded_after(
        "from featmap.jobs.cli import main\n"
        f"code = main(['extract', '--pipeline', {str(spec)!r}, '--input',"
        f" {str(tmp_path / 'images.npy')!r}, '--output', {str(tmp_path / 'f.npy')!r}, '--quiet'])\n"
        "assert code == 0, code"
    )
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), np.ones((3, 1, 1, 1)))
    assert "featmap.service.runtime" in loaded
    assert under(loaded, ("grpc", "featmap.client")) == []


@pytest.mark.parametrize("module", ["featmap.service.graph", "featmap.service.settings"])
def test_one_service_module_does_not_load_the_server(module: str) -> None:
    loaded = loaded_after(f"import {module}")
    assert module in loaded
    assert under(loaded, SERVER_MACHINERY) == []


def test_the_service_package_still_hands_out_its_names() -> None:
    loaded = loaded_after("from featmap.service import FeatmapServer, compile_pipeline")
    assert "featmap.service.server" in loaded  # loaded when asked for, not before


def test_modules_import_featmap_relatively() -> None:
    # What a path-based tool follows: `from .spec import ...`, `from ..contract.spec import ...`;
    # the generated stubs (featmap.v1, featmap.oip) as `..v1` alike.
    absolute = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for module, path in module_files().items()
        if module.startswith(tuple(HAND_WRITTEN))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.level == 0
        and (node.module or "").split(".")[0] == "featmap"
    ]
    assert not absolute, f"absolute featmap imports: {absolute}"
