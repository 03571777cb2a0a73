"""`pip install featmap` is the client library; `pip install "featmap[cli]"` adds what the
`featmap` command needs to work with a server, `pip install "featmap[server]"` the server and the
embedded runtime. Checked without installing anything: pyproject's lists against what the
modules import (read with ast), and the `featmap` command with the extras' modules hidden.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pytest

from featmap.service.server import FeatmapServer
from tests.test_client_import import LAZY
from tests.test_layout import imported_names, module_files, resolve

ROOT = Path(__file__).parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The commands' modules that compile or run pipelines: they may import the server side.
SERVER_JOBS = {"bench.py", "bench_base.py", "bench_int8.py", "bench_job.py", "export_onnx.py",
               "visualize.py", "summary.py", "onnx_import.py"}  # fmt: skip
# The client's packages, and the command line's wherever it lives (client/ or a jobs/ package).
CLIENT_SIDE = ("contract", "client", "jobs")
# The service's modules that the commands of the `[cli]` install load too: the spec-file reader
# that `featmap serve --pipelines` shares with them.
CLI_SERVICE_FILES = (ROOT / "service" / "specfiles.py",)
SERVER_SIDE = ("service",)
# Imported only inside the functions that need them, each from its own extra.
OPTIONAL = {"pyarrow": "parquet", "ray": "ray", "fsspec": "store-fsspec"}


def distribution(requirement: str) -> str:
    """The normalized distribution name of a requirement ("grpcio>=1.8" -> "grpcio")."""
    name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_requirements(name: str) -> list[str]:
    return list(PROJECT["optional-dependencies"][name])


def extra(name: str) -> set[str]:
    """The distributions an extra names besides featmap's own extras (`featmap[cli]`)."""
    return {distribution(r) for r in extra_requirements(name)} - {"featmap"}


# Distributions an extra names only to leave out a release of a dependency's dependency
# (pyproject.toml says why), which featmap itself never imports.
CONSTRAINTS = {"ml-dtypes"}
CLIENT = {distribution(r) for r in PROJECT["dependencies"]}
CLI = extra("cli")
SERVER = extra("server") - CONSTRAINTS
# The spec's models, which the client library imports only inside functions, to parse a spec
# where pydantic is installed (tests/test_client_import.py: they load lazily).
SPEC_MODELS = {m for m in LAZY if m.startswith("featmap.")}


def third_party_imports(path: Path) -> set[str]:
    """The top-level names of what `path` imports from outside the standard library and
    featmap, at module level or inside functions alike."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "featmap"}


def files(packages: tuple[str, ...], jobs: bool) -> list[Path]:
    found = [path for package in packages for path in sorted((ROOT / package).rglob("*.py"))]
    return [path for path in found if (path.name in SERVER_JOBS) == jobs]


@functools.cache
def installed() -> dict[str, list[str]]:
    """Import names -> the distributions that install them, in this environment."""
    return dict(packages_distributions())


def providers(module: str) -> set[str]:
    """The distributions that install the import name `module`."""
    return {distribution(d) for d in installed().get(module, [])}


def uncovered(paths: list[Path], allowed: set[str]) -> dict[str, set[str]]:
    """Per imported name, the files that import it although no allowed distribution has it."""
    missing: dict[str, set[str]] = {}
    for path in paths:
        for module in third_party_imports(path):
            if module in OPTIONAL or providers(module) & allowed:
                continue
            missing.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    return missing


def test_the_client_install_brings_neither_onnx_nor_onnxruntime() -> None:
    assert not {"onnx", "onnxruntime", "onnxruntime-gpu"} & (CLIENT | CLI)
    assert {"onnx", "onnxruntime"} <= SERVER
    # The client library needs no pydantic, Pillow, PyYAML or tqdm: the command line does.
    assert not {"pydantic", "pillow", "pyyaml", "tqdm"} & CLIENT
    assert {"pydantic", "pillow", "pyyaml", "tqdm"} <= CLI
    # The server runs the commands too; development (and CI, and `pytest`) has everything.
    assert "featmap[cli]" in extra_requirements("server")
    assert "featmap[server]" in extra_requirements("dev")
    for name, extra_name in OPTIONAL.items():
        assert any(
            distribution(r).startswith(name) for r in PROJECT["optional-dependencies"][extra_name]
        )


def library_imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The repo's modules that `module` loads where pydantic is missing: all it imports but
    under `if TYPE_CHECKING:`, and inside functions, the spec's models (SPEC_MODELS)."""
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                source = ast.unparse(child)
                for name, _ in imported_names(module, path.name == "__init__.py", source):
                    target = resolve(name, modules)
                    if target is not None and not (in_function and target in SPEC_MODELS):
                        found.add(target)
            functions = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            visit(child, in_function or isinstance(child, functions))

    visit(ast.parse(path.read_text("utf-8")), False)
    return found


def client_library() -> dict[str, Path]:
    """featmap.client and every module of the repo it loads (library_imports), with the
    packages above each: what `from featmap.client import ...` may use on the base install."""
    modules = module_files()
    pending = [m for m in modules if m == "featmap.client" or m.startswith("featmap.client.")]
    library: dict[str, Path] = {}
    while pending:
        module = pending.pop()
        if module in library:
            continue
        library[module] = modules[module]
        parents = {module.rsplit(".", n)[0] for n in range(1, module.count("."))}
        pending += [*library_imports(module, modules[module], modules), *parents & set(modules)]
    return library


def test_the_base_install_has_what_the_client_library_imports() -> None:
    library = client_library()
    assert {"featmap.contract.precision", "featmap.contract.names", "featmap.v1"} <= set(library)
    assert not SPEC_MODELS & set(library)
    assert uncovered(list(library.values()), CLIENT) == {}


def test_the_cli_extra_has_what_the_commands_import() -> None:
    client_files = files(CLIENT_SIDE, jobs=False) + list(CLI_SERVICE_FILES)
    assert {"client.py", "cli.py", "extract.py", "spec.py"} <= {p.name for p in client_files}
    assert uncovered(client_files, CLIENT | CLI) == {}
    # ...and nothing the commands do not use.
    used = {d for path in client_files for m in third_party_imports(path) for d in providers(m)}
    assert used >= CLI


def test_the_server_extra_has_what_the_server_and_the_jobs_import() -> None:
    server_files = files(SERVER_SIDE, jobs=False) + files(CLIENT_SIDE, jobs=True)
    assert uncovered(server_files, CLIENT | CLI | SERVER) == {}
    # ...and nothing the server side does not use.
    used = {d for path in server_files for m in third_party_imports(path) for d in providers(m)}
    assert used >= SERVER


def featmap_script() -> Any:
    """The module of the `featmap` console script, as pyproject names it."""
    return importlib.import_module(PROJECT["scripts"]["featmap"].split(":")[0])


@pytest.mark.parametrize("name", ["cli", "server"])
def test_the_command_knows_which_modules_each_extra_brings(name: str) -> None:
    extra_dists = extra(name) - CONSTRAINTS
    known = set(getattr(featmap_script(), f"{name.upper()}_MODULES"))
    brought = {
        m for m, dists in installed().items() if {distribution(d) for d in dists} & extra_dists
    }
    assert known <= brought
    # Every distribution of the extra is known to the command by at least one module.
    assert {d for m in known for d in providers(m)} >= extra_dists


def run_without(uninstalled: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`featmap ARGS` in a fresh interpreter where the modules the command names in the
    constant `uninstalled` (SERVER_MODULES, CLI_MODULES, or both) cannot load."""
    script, _, function = PROJECT["scripts"]["featmap"].partition(":")
    probe = (
        "import sys\n"
        f"from {script} import CLI_MODULES, SERVER_MODULES, {function} as main\n"
        f"for name in {uninstalled}:\n"
        "    sys.modules[name] = None  # what an install without them gives: ModuleNotFoundError\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def cli_only(*args: str) -> subprocess.CompletedProcess[str]:
    """`featmap ARGS` where the server extra's modules cannot load (`featmap[cli]`)."""
    return run_without("SERVER_MODULES", *args)


def assert_says_install(result: subprocess.CompletedProcess[str], extra_name: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f'pip install "featmap[{extra_name}]"' in lines[0], result.stderr
    assert not list(ROOT.glob("unused.*"))


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--port", "0"],
        ["serve", "--help"],
        ["extract", "--pipeline", "examples/random_features.yaml", "--input", "examples/images",
         "--output", "unused.npz"],
        ["export-onnx", "--pipeline", "examples/random_features.yaml", "-o", "unused.onnx"],
        ["import", "unused.onnx", "-o", "unused.yaml"],
        ["visualize", "--pipeline", "examples/taps.yaml", "--image",
         "examples/images/shapes.png", "--layer", "block1_act", "-o", "unused.png"],
        ["bench", "--job"],
    ],
    ids=lambda args: " ".join(args[:2]),
)  # fmt: skip
def test_server_commands_on_a_cli_install_say_what_to_install(args: list[str]) -> None:
    assert_says_install(cli_only(*args), "server")


@pytest.mark.parametrize(
    ("args", "extra_name"),
    [
        (["schema"], "cli"),
        (["health", "--server", "127.0.0.1:9"], "cli"),
        (["summary", "--pipeline", "examples/random_features.yaml"], "cli"),
        (["extract", "--pipeline", "examples/random_features.yaml", "--input", "examples/images",
          "--output", "unused.npz", "--server", "127.0.0.1:9"], "cli"),
        (["extract", "--pipeline", "examples/random_features.yaml", "--input", "examples/images",
          "--output", "unused.npz"], "server"),
        (["serve", "--port", "0"], "server"),
        (["serve", "--help"], "server"),
        (["export-onnx", "--pipeline", "examples/random_features.yaml", "-o", "unused.onnx"],
         "server"),
        (["import", "unused.onnx", "-o", "unused.yaml"], "server"),
        (["visualize", "--pipeline", "examples/taps.yaml", "--image",
          "examples/images/shapes.png", "--layer", "block1_act", "-o", "unused.png"], "server"),
        (["bench", "--job"], "server"),
    ],
    ids=lambda value: " ".join(value[:2]) if isinstance(value, list) else value,
)  # fmt: skip
def test_every_command_on_the_client_library_alone_says_what_to_install(
    args: list[str], extra_name: str
) -> None:
    # `pip install featmap`: neither extra. A server command names `server`, which brings `cli`.
    assert_says_install(run_without("CLI_MODULES | SERVER_MODULES", *args), extra_name)


def test_remote_commands_run_on_a_cli_install(server: FeatmapServer, tmp_path: Path) -> None:
    address = server.address
    assert cli_only("schema").returncode == 0
    # A float32 pipeline's summary is arithmetic on the spec (int8's measures a session).
    summary = cli_only("summary", "--pipeline", "examples/random_features.yaml")
    assert summary.returncode == 0, summary.stderr
    health = cli_only("health", "--server", address)
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    output = tmp_path / "features.npz"
    extract = cli_only(
        "extract", "--pipeline", "examples/random_features.yaml", "--input", "examples/images",
        "--output", str(output), "--server", address, "--quiet",
    )  # fmt: skip
    assert extract.returncode == 0, extract.stderr
    assert output.exists()
