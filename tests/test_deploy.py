"""Dockerfile and docker-compose.yml, checked without a Docker engine.

The files are parsed and cross-checked (build contexts, targets, profiles, health checks,
volumes, every command a real `featmap` subcommand), and the commands the containers run are
run here directly: `featmap serve` as a process, `featmap health` against it, then SIGTERM.
tests/test_docker.py builds the image and runs the Compose file for real (`pytest -m docker`).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from featmap.jobs.cli import build_parser
from tests.test_cli import featmap_serve, run_featmap

ROOT = Path(__file__).resolve().parent.parent
PORT = "50051"


@dataclass
class Stage:
    """One FROM ... AS name stage of the Dockerfile and its instructions, in order."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str:
        """The argument of the stage's last `keyword` instruction (the one that counts)."""
        values = [arg for key, arg in self.instructions if key == keyword]
        assert values, f"stage {self.name} has no {keyword}"
        return values[-1]

    def all(self, keyword: str) -> list[str]:
        """Arguments of every `keyword` instruction."""
        return [arg for key, arg in self.instructions if key == keyword]


def dockerfile_stages(text: str) -> list[Stage]:
    """The Dockerfile's stages: comments dropped, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    stages: list[Stage] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, argument = line.strip().partition(" ")
        keyword, argument = keyword.upper(), " ".join(argument.split())
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", argument, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {argument}"
            stages.append(Stage(name=match.group(2), base=match.group(1)))
        elif stages:
            stages[-1].instructions.append((keyword, argument))
    return stages


def exec_form(argument: str) -> list[str]:
    """A JSON-array (exec form) instruction argument as a list."""
    value = json.loads(argument)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), argument
    return value


def parse_featmap(argv: list[str]) -> argparse.Namespace:
    """argv as `featmap` parses it; fails the test if it is not a valid command line."""
    subcommands = subcommand_names()
    if argv and argv[0] not in subcommands:
        pytest.fail(f"`featmap {argv[0]}` is not a subcommand; featmap has {sorted(subcommands)}")
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`featmap {shlex.join(argv)}` does not parse")


def subcommand_names() -> set[str]:
    """The subcommands build_parser() knows."""
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {stage.name: stage for stage in dockerfile_stages((ROOT / "Dockerfile").read_text())}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


# --------------------------------------------------------------------------- Dockerfile


def test_stages_cpu_default_and_cuda(stages: dict[str, Stage]) -> None:
    # The classic builder (docker-compose v1) builds every stage up to its target: the CPU
    # stages come first, so that `target: cpu` never pulls the CUDA base.
    assert list(stages) == ["cpu-build", "cpu", "cuda-build", "cuda", "default"]
    # The last stage is what a plain `docker build .` gives: the CPU image as it is.
    assert (stages["default"].base, stages["default"].instructions) == ("cpu", [])
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, flags=re.MULTILINE)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-\S+$", text, flags=re.MULTILINE)
    for target, base in (("cpu", "${PYTHON_IMAGE}"), ("cuda", "${CUDA_IMAGE}")):
        # The venv's interpreter links to the base's python: both stages have the same base.
        assert stages[target].base == stages[f"{target}-build"].base == base


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_build_stage_installs_the_package_alone_into_a_venv(
    stages: dict[str, Stage], target: str
) -> None:
    stage = stages[f"{target}-build"]
    runs = stage.all("RUN")
    assert any(re.search(r"\bvenv /opt/featmap$", run) for run in runs)
    assert "PATH=/opt/featmap/bin:$PATH" in stage.all("ENV")
    # The whole context (what .dockerignore lets through), installed with the server's extra
    # (`pip install /src` alone is the client) and without dev extras.
    assert stage.all("COPY") == [". /src"]
    steps = [step.strip() for step in " && ".join(runs).split("&&")]
    assert 'pip install "/src[server]"' in steps
    assert not [step for step in steps if "[dev]" in step]
    # pip goes last: nothing may need it after.
    assert steps.index("pip uninstall -y pip setuptools") > max(
        i for i, step in enumerate(steps) if step.startswith("pip install")
    )


def test_both_build_stages_leave_the_same_things_out(stages: dict[str, Stage]) -> None:
    def cleanup(stage: Stage) -> str:
        last = stage.all("RUN")[-1]
        return last[last.index("pip uninstall -y pip setuptools") :]

    assert cleanup(stages["cpu-build"]) == cleanup(stages["cuda-build"])
    assert "-name tests" in cleanup(stages["cpu-build"])


@pytest.mark.parametrize("stage_name", ["cpu", "cuda"])
def test_stage_runs_featmap_serve_as_non_root(stages: dict[str, Stage], stage_name: str) -> None:
    stage = stages[stage_name]
    # The image gets its build stage's venv and nothing else: no sources, no pip install.
    assert stage.all("COPY") == [f"--from={stage_name}-build /opt/featmap /opt/featmap"]
    assert not [run for run in stage.all("RUN") if "pip " in run]
    assert "PATH=/opt/featmap/bin:$PATH" in stage.last("ENV")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it (deploy/k8s runs uid 10001).
    assert stage.last("USER") == "10001:10001"
    assert "--uid 10001" in " ".join(stage.all("RUN"))
    # USER comes after the installs: apt and useradd run as root, the server does not.
    keywords = [key for key, _ in stage.instructions]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in ("RUN", "COPY"))

    assert exec_form(stage.last("ENTRYPOINT")) == ["featmap"]
    cmd = exec_form(stage.last("CMD"))
    args = parse_featmap(cmd)
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", int(PORT))
    assert stage.last("EXPOSE") == PORT

    options, _, check = stage.last("HEALTHCHECK").partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    health = parse_featmap(exec_form(check)[1:])
    assert exec_form(check)[0] == "featmap"
    assert (health.command, health.server) == ("health", f"127.0.0.1:{PORT}")


def test_cuda_stage_swaps_onnxruntime_for_onnxruntime_gpu(stages: dict[str, Stage]) -> None:
    installs = " && ".join(stages["cuda-build"].all("RUN"))
    steps = [step.strip() for step in installs.split("&&")]
    install = steps.index('pip install "/src[server]"')
    uninstall = steps.index("pip uninstall -y onnxruntime")
    gpu = next(i for i, s in enumerate(steps) if s.startswith("pip install") and "gpu" in s)
    assert install < uninstall < gpu
    assert "onnxruntime-gpu" not in " ".join(stages["cpu-build"].all("RUN"))


def test_dockerignore_lets_through_what_the_package_is_built_from() -> None:
    """A whitelist: `*`, then `!` for pyproject.toml, the readme and each package-dir root."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "everything is left out unless named"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = project["tool"]["setuptools"]["package-dir"].values()
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {Path(folder).parts[0] for folder in package_dirs}
    assert needed <= allowed, f"add `!{sorted(needed - allowed)[0]}/` to .dockerignore"
    assert not {"tests", "scripts", "examples", "data", ".git", ".venv"} & allowed
    # Nothing a local build or run leaves inside the source folders.
    assert {"**/__pycache__", "**/*.pyc", "**/*.egg-info"} <= set(patterns)


# --------------------------------------------------------------------------- compose


def test_services_and_profiles(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"featmap", "extract", "featmap-gpu"}
    assert "profiles" not in services["featmap"], "`docker compose up` starts the server"
    assert services["extract"]["profiles"] == ["batch"]
    assert services["featmap-gpu"]["profiles"] == ["gpu"]


def test_builds_name_existing_contexts_and_targets(
    services: dict[str, dict[str, Any]], stages: dict[str, Stage]
) -> None:
    built_images: dict[str, str] = {}
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        context = ROOT / build["context"]
        assert context.resolve() == ROOT, f"{name}: build context {build['context']}"
        assert (context / build.get("dockerfile", "Dockerfile")).is_file()
        assert build["target"] in stages, f"{name}: no stage {build['target']!r} in Dockerfile"
        # One tag, one stage: two services sharing an image tag must build the same thing.
        assert built_images.setdefault(service["image"], build["target"]) == build["target"]
    assert services["featmap"]["build"]["target"] == "cpu"
    assert services["featmap-gpu"]["build"]["target"] == "cuda"
    assert services["extract"]["image"] == services["featmap"]["image"]


def test_every_command_is_a_featmap_subcommand(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        command = service["command"]
        assert isinstance(command, list), f"{name}: exec form, no shell"
        assert "entrypoint" not in service, f"{name}: the image's ENTRYPOINT is featmap"
        args = parse_featmap(command)
        if args.command == "serve":
            assert (args.host, args.port) == ("0.0.0.0", int(PORT))
    assert parse_featmap(services["featmap"]["command"]).command == "serve"


def test_extract_job(services: dict[str, dict[str, Any]]) -> None:
    extract = services["extract"]
    if "extract" not in subcommand_names():
        pytest.skip("`featmap extract` is not in this checkout yet")
    args = parse_featmap(extract["command"])
    assert args.command == "extract"
    assert args.server == ["dns:///featmap:50051"]
    for path in (args.pipeline, args.output, *args.input):
        assert path.startswith("/data/"), f"{path} is outside the mounted volume"
    assert extract["depends_on"] == {"featmap": {"condition": "service_healthy"}}
    assert extract.get("restart") == "no"


def test_volumes_are_relative_and_inside_the_project(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    mounts = [(name, v) for name, s in services.items() for v in s.get("volumes", [])]
    assert mounts, "the batch job mounts ./data"
    named_volumes = set(compose.get("volumes") or {})
    for name, volume in mounts:
        host, container, *_ = volume.split(":")
        assert container.startswith("/") and container != "/", f"{name}: {container}"
        if host in named_volumes:  # a volume Compose makes and names, not a host path
            continue
        assert host.startswith("./"), f"{name}: {host} is not relative to the compose file"
        assert ".." not in Path(host).parts, f"{name}: {host} leaves the project"
        assert (ROOT / host).exists() or host == "./data", f"{name}: {host} is not in the repo"
    assert ("extract", "./data:/data") in mounts


@pytest.mark.parametrize("service_name", ["featmap", "featmap-gpu"])
def test_servers_register_the_example_folder_and_share_one_store(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], service_name: str
) -> None:
    service = services[service_name]
    args = parse_featmap(service["command"])
    mounts = {v.split(":")[1]: v.split(":") for v in service["volumes"]}
    host, _, mode = mounts[args.pipelines]
    assert (host, mode) == ("./examples/pipelines", "ro")
    assert list((ROOT / host).glob("*.yaml")), "an example spec to register"
    store, _ = mounts[args.pipeline_store]
    assert store in compose["volumes"], "a named volume: every replica mounts the same one"


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_image_makes_the_store_folder_its_users(stages: dict[str, Stage], target: str) -> None:
    # Docker seeds a new named volume with the owner and mode of the image's folder under it.
    runs = " && ".join(stages[target].all("RUN"))
    assert "install -d -o 10001 -g 10001 -m 0700 /var/lib/featmap /var/lib/featmap/pipelines" in (
        runs
    )


@pytest.mark.parametrize("service_name", ["featmap", "featmap-gpu"])
def test_servers_have_health_checks_and_ports(
    services: dict[str, dict[str, Any]], service_name: str
) -> None:
    service = services[service_name]
    test = service["healthcheck"]["test"]
    assert test[:2] == ["CMD", "featmap"]
    health = parse_featmap(test[2:])
    assert (health.command, health.server) == ("health", f"127.0.0.1:{PORT}")
    assert health.timeout < float(service["healthcheck"]["timeout"].rstrip("s"))
    for port in service["ports"]:
        assert str(port).rsplit(":", 1)[-1] == PORT


def test_gpu_service_reserves_nvidia_devices(services: dict[str, dict[str, Any]]) -> None:
    devices = services["featmap-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "CUDAExecutionProvider" in services["featmap-gpu"]["environment"]["FEATMAP_PROVIDERS"]


def test_server_scales_out(services: dict[str, dict[str, Any]]) -> None:
    assert services["featmap"]["deploy"]["replicas"] >= 1
    assert "container_name" not in services["featmap"], "a fixed name prevents --scale"


# --------------------------------------------------------------------------- the real commands


def test_container_commands_run_here(stages: dict[str, Stage]) -> None:
    """CMD (on loopback, any port), then HEALTHCHECK's command, then `docker stop`'s SIGTERM."""
    cmd = exec_form(stages["cpu"].last("CMD"))
    serve_args = list(cmd[1:])
    serve_args[serve_args.index("--host") + 1] = "127.0.0.1"
    serve_args[serve_args.index("--port") + 1] = "0"
    _, _, check = stages["cpu"].last("HEALTHCHECK").partition(" CMD ")
    health = exec_form(check)[1:]
    with featmap_serve(*serve_args) as serving:
        port = serving.wait_listening()
        address = f"127.0.0.1:{port}"
        health[health.index("--server") + 1] = address
        result = run_featmap(*health)
        assert result.returncode == 0, result.stderr
        assert "SERVING" in result.stdout
        serving.process.send_signal(signal.SIGTERM)
        assert serving.process.wait(timeout=15) == 0
    after = run_featmap("health", "--server", address, "--timeout", "2")
    assert after.returncode == 2, "a stopped server is unreachable"
