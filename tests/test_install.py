"""`pip install featmap` is the client; `pip install "featmap[server]"` adds the server and the
embedded runtime. Checked without installing anything: pyproject's lists against what the
modules import (read with ast), and the `featmap` command with the server's modules hidden.
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

ROOT = Path(__file__).parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The commands' modules that compile or run pipelines: they may import the server side.
SERVER_JOBS = {"bench.py", "bench_base.py", "bench_int8.py", "bench_job.py", "export_onnx.py",
               "visualize.py", "summary.py", "onnx_import.py"}  # fmt: skip
# The client's packages, and the command line's wherever it lives (client/ or a jobs/ package).
CLIENT_SIDE = ("contract", "client", "jobs")
SERVER_SIDE = ("service",)
# Imported only inside the functions that need them, each from its own extra.
OPTIONAL = {"pyarrow": "parquet", "ray": "ray"}


def distribution(requirement: str) -> str:
    """The normalized distribution name of a requirement ("grpcio>=1.8" -> "grpcio")."""
    name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_requirements(name: str) -> list[str]:
    return list(PROJECT["optional-dependencies"][name])


def extra(name: str) -> set[str]:
    return {distribution(r) for r in extra_requirements(name)}


CLIENT = {distribution(r) for r in PROJECT["dependencies"]}
SERVER = extra("server")


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
    assert not {"onnx", "onnxruntime", "onnxruntime-gpu"} & CLIENT
    assert {"onnx", "onnxruntime"} <= SERVER
    # Development (and CI, and `pytest`) has everything.
    assert "featmap[server]" in extra_requirements("dev")
    for name, extra_name in OPTIONAL.items():
        assert any(
            distribution(r).startswith(name) for r in PROJECT["optional-dependencies"][extra_name]
        )


def test_the_client_install_has_what_the_client_and_its_commands_import() -> None:
    client_files = files(CLIENT_SIDE, jobs=False)
    assert {"client.py", "cli.py", "extract.py", "spec.py"} <= {p.name for p in client_files}
    assert uncovered(client_files, CLIENT) == {}


def test_the_server_extra_has_what_the_server_and_the_jobs_import() -> None:
    server_files = files(SERVER_SIDE, jobs=False) + files(CLIENT_SIDE, jobs=True)
    assert uncovered(server_files, CLIENT | SERVER) == {}
    # ...and nothing the server side does not use.
    used = {d for path in server_files for m in third_party_imports(path) for d in providers(m)}
    assert used >= SERVER


def featmap_script() -> Any:
    """The module of the `featmap` console script, as pyproject names it."""
    return importlib.import_module(PROJECT["scripts"]["featmap"].split(":")[0])


def test_the_command_knows_which_modules_the_server_extra_brings() -> None:
    brought = {m for m, dists in installed().items() if SERVER & {
        distribution(d) for d in dists}}  # fmt: skip
    assert set(featmap_script().SERVER_MODULES) <= brought
    # Every distribution of the extra is known to the command by at least one module.
    assert {d for m in featmap_script().SERVER_MODULES for d in providers(m)} >= SERVER


def client_only(*args: str) -> subprocess.CompletedProcess[str]:
    """`featmap ARGS` in a fresh interpreter where the server extra's modules cannot load."""
    script, _, function = PROJECT["scripts"]["featmap"].partition(":")
    probe = (
        "import sys\n"
        f"from {script} import SERVER_MODULES, {function} as main\n"
        "for name in SERVER_MODULES:\n"
        "    sys.modules[name] = None  # what a client-only install gives: ModuleNotFoundError\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--port", "0"],
        ["serve", "--help"],
        ["extract", "--pipeline", "examples/random_features.yaml", "--input", "examples/images",
         "--output", "unused.npz"],
        ["export-onnx", "--pipeline", "examples/random_features.yaml", "-o", "unused.onnx"],
        ["visualize", "--pipeline", "examples/taps.yaml", "--image",
         "examples/images/shapes.png", "--layer", "block1_act", "-o", "unused.png"],
        ["bench", "--job"],
    ],
    ids=lambda args: " ".join(args[:2]),
)  # fmt: skip
def test_server_commands_on_a_client_only_install_say_what_to_install(args: list[str]) -> None:
    result = client_only(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "featmap[server]"' in lines[0], result.stderr
    assert not list(ROOT.glob("unused.*"))


def test_remote_commands_run_on_a_client_only_install(
    server: FeatmapServer, tmp_path: Path
) -> None:
    address = server.address
    assert client_only("schema").returncode == 0
    # A float32 pipeline's summary is arithmetic on the spec (int8's measures a session).
    summary = client_only("summary", "--pipeline", "examples/random_features.yaml")
    assert summary.returncode == 0, summary.stderr
    health = client_only("health", "--server", address)
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    output = tmp_path / "features.npz"
    extract = client_only(
        "extract", "--pipeline", "examples/random_features.yaml", "--input", "examples/images",
        "--output", str(output), "--server", address, "--quiet",
    )  # fmt: skip
    assert extract.returncode == 0, extract.stderr
    assert output.exists()
