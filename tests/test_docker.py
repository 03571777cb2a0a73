"""The CPU image and docker-compose.yml for real: build, scale out to three, a batch job, stop.

The replicas register examples/pipelines at start (--pipelines) and share one pipeline store
(a named volume): a pipeline registered once through the service name, from a container on the
compose network, is then extracted by name from every replica's own host port.

Marked `docker`: a plain `pytest` leaves these out, `pytest -m docker` runs them (.ci/run does
when it can start an engine), and they skip when no Docker engine answers. Under the vfs
storage driver every container start copies the image, so one Compose project serves every
assertion: three `featmap` replicas and one `extract` run, brought up once by `deployment`.

The engine's own CLI builds (BuildKit, `--network host`): FEATMAP_DOCKER names another one,
FEATMAP_COMPOSE another Compose command (default `docker-compose`, else `docker compose`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from featmap.client import FeatmapRpcError, FeatureClient
from featmap.contract.spec import Pipeline, content_id, parse_pipeline
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_cli import clean_env, run_featmap
from tests.test_pipeline_dir import IMAGES as STORED_IMAGES
from tests.test_pipeline_dir import TENSOR_SPEC, TENSORS

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "featmap:cpu"
REPLICAS = 3
IMAGES = 200
# Small batches: enough calls that round robin reaches every replica.
BATCH_SIZE = 8
# docker-compose.yml's stop_grace_period: the server drains for FEATMAP_SHUTDOWN_GRACE_S (10 s).
STOP_GRACE_S = 15
HEALTHY_TIMEOUT_S = 180
# The server's request log line (logger `featmap.requests`) for one call: its pipeline, images.
EXTRACT_LOG = re.compile(r"\brequest \w+ Extract OK pipeline=(\w+) images=(\d+)")
REGISTER_LOG = re.compile(r"\brequest \w+ RegisterPipeline OK pipeline=(\w+)")
# The compose file's spec folder, and the name its example registers under.
EXAMPLE_PIPELINES = ROOT / "examples" / "pipelines"
EXAMPLE = "blobs"
BLOB_IMAGES = np.random.default_rng(5).integers(0, 256, (2, 1, 20, 20), dtype=np.uint8)
# Registered once through the service name under this name, then extracted by it CALLS times.
STORED = "stored"
CALLS = 9
STORED_ID = content_id(parse_pipeline(TENSOR_SPEC), TENSORS)
# Run by `docker-compose run extract`'s python, on the compose network: /data is ./data.
REGISTER_ONCE = f"""
import json
import numpy as np
from featmap.client import FeatureClient
spec = json.load(open("/data/stored.json"))
with np.load("/data/stored.npz") as archive:
    weights = {{name: archive[name] for name in archive.files}}
images = np.load("/data/stored-images.npy")
with FeatureClient("dns:///featmap:50051", load_balancing=True, timeout=120) as client:
    client.wait_ready(timeout=60)
    print(client.register(spec, weights, name="{STORED}"))
    for _ in range({CALLS}):
        client.extract(images, "{STORED}")
"""


@dataclass
class Engine:
    """The Docker CLI and the Compose command to drive the engine with."""

    docker: str
    compose: list[str]

    def run(
        self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`docker ARGS` to completion, output captured."""
        return run([self.docker, *args], timeout=timeout, env=env)

    def inspect(self, template: str, *objects: str) -> list[str]:
        """`docker inspect -f TEMPLATE` of each object, one line each."""
        result = self.run("inspect", "-f", template, *objects)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()


def run(
    argv: list[str], timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A command to completion, output captured; its failure is the caller's to judge."""
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def find_engine() -> Engine | str:
    """The engine to test with, or why there is none."""
    docker = os.environ.get("FEATMAP_DOCKER") or (
        "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else shutil.which("docker")
    )
    if not docker:
        return "no docker CLI"
    info = run([docker, "info", "--format", "{{.ServerVersion}}"], timeout=30)
    if info.returncode != 0:
        return f"no Docker engine answers ({info.stderr.strip().splitlines()[-1:]})"
    if os.environ.get("FEATMAP_COMPOSE"):
        compose = shlex.split(os.environ["FEATMAP_COMPOSE"])
    elif shutil.which("docker-compose"):
        compose = ["docker-compose"]
    else:
        compose = [docker, "compose"]
    if run([*compose, "version"], timeout=30).returncode != 0:
        return f"no Compose: `{shlex.join(compose)} version` fails"
    return Engine(docker, compose)


def free_port_range(count: int) -> int:
    """The first of `count` consecutive ports that were free a moment ago on the host."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("0.0.0.0", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


@pytest.fixture(scope="module")
def engine() -> Engine:
    found = find_engine()
    if isinstance(found, str):
        pytest.skip(f"docker tests skipped: {found}")
    return found


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    """featmap:cpu, built from this checkout as the README says (BuildKit, the `cpu` target)."""
    result = engine.run(
        "build", "--network", "host", "--target", "cpu", "-t", IMAGE, str(ROOT),
        timeout=1200, env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )  # fmt: skip
    assert result.returncode == 0, f"docker build failed:\n{result.stderr[-4000:]}"
    return IMAGE


@dataclass
class Deployment:
    """What one `up --scale featmap=3`, one batch job and one `stop` showed."""

    project_dir: Path
    ports: list[int]
    replicas: dict[str, str]  # container id -> name
    health: dict[str, str] = field(default_factory=dict)
    uid: str = ""
    leftovers: str = ""
    host_health: dict[int, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    extract: subprocess.CompletedProcess[str] | None = None
    register: subprocess.CompletedProcess[str] | None = None
    # Per replica host port: what it answered, by name, for the stored and the example pipeline.
    stored: dict[int, dict[str, np.ndarray] | str] = field(default_factory=dict)
    example: dict[int, dict[str, np.ndarray] | str] = field(default_factory=dict)
    store_folder: str = ""
    logs: dict[str, str] = field(default_factory=dict)  # container id -> its log
    stop: subprocess.CompletedProcess[str] | None = None
    stop_seconds: float = 0.0
    exits: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.project_dir / "data"


def write_inputs(data: Path) -> None:
    """pipeline.yaml (the README example) and IMAGES small PNGs, as the extract job expects."""
    (data / "pipeline.yaml").write_text(yaml.safe_dump(README_SPEC), encoding="utf-8")
    images = data / "images"
    images.mkdir()
    pixels = np.random.default_rng(12).integers(0, 256, (IMAGES, 24, 24, 3), dtype=np.uint8)
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(images / f"image-{i:03d}.png")
    # What the in-network client registers once (REGISTER_ONCE), readable by uid 10001.
    (data / "stored.json").write_text(json.dumps(TENSOR_SPEC), encoding="utf-8")
    np.savez(data / "stored.npz", **TENSORS)
    np.save(data / "stored-images.npy", STORED_IMAGES)


def answer(client: FeatureClient, images: np.ndarray, name: str) -> dict[str, np.ndarray] | str:
    """The outputs of the pipeline called `name`, or the error the replica answered."""
    try:
        return client.extract(images, name)
    except FeatmapRpcError as exc:
        return f"{exc.code.name}: {exc}"


def example_pipeline() -> Pipeline:
    """The compose file's example spec, which every replica registers under EXAMPLE."""
    return parse_pipeline(yaml.safe_load((EXAMPLE_PIPELINES / f"{EXAMPLE}.yaml").read_text()))


def copy_example_pipelines(project_dir: Path) -> None:
    """The compose file's ./examples/pipelines, in the project folder, readable by uid 10001."""
    target = project_dir / "examples" / "pipelines"
    shutil.copytree(EXAMPLE_PIPELINES, target)
    for folder in (target.parent, target):
        folder.chmod(0o755)
    for path in target.iterdir():
        path.chmod(0o644)


def wait_healthy(engine: Engine, ids: list[str]) -> dict[str, str]:
    """Each container's health status, once all are healthy or HEALTHY_TIMEOUT_S has passed."""
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while True:
        statuses = dict(zip(ids, engine.inspect("{{.State.Health.Status}}", *ids), strict=True))
        if set(statuses.values()) == {"healthy"} or time.monotonic() > deadline:
            return statuses
        time.sleep(2)


@pytest.fixture(scope="module")
def deployment(engine: Engine, image: str) -> Iterator[Deployment]:
    """The README's scale-out and batch job, run once: each test asserts on what it showed."""
    project_dir = Path(tempfile.mkdtemp(prefix="featmap-compose-"))
    first = free_port_range(REPLICAS)
    ports = list(range(first, first + REPLICAS))
    # One host port per replica, as the README says to scale out.
    env = clean_env(FEATMAP_HOST_PORTS=f"{ports[0]}-{ports[-1]}")
    compose = [
        *engine.compose,
        "--file", str(ROOT / "docker-compose.yml"),
        "--project-directory", str(project_dir),  # ./data is project_dir/data
        "--project-name", project_dir.name.lower().replace("-", ""),
    ]  # fmt: skip
    try:
        project_dir.chmod(0o755)  # another user (the readability check) may pass through
        data = project_dir / "data"
        data.mkdir()
        data.chmod(0o777)  # the README: the extract container (uid 10001) must be able to write
        write_inputs(data)
        copy_example_pipelines(project_dir)
        up = run([*compose, "up", "-d", "--no-build", "--scale", f"featmap={REPLICAS}",
                  "featmap"], timeout=600, env=env)  # fmt: skip
        assert up.returncode == 0, f"compose up failed:\n{up.stderr[-4000:]}"
        ids = run([*compose, "ps", "-q", "featmap"], env=env).stdout.split()
        assert len(ids) == REPLICAS, f"compose ps: {ids}"
        names = [name.lstrip("/") for name in engine.inspect("{{.Name}}", *ids)]
        found = Deployment(project_dir, ports, dict(zip(ids, names, strict=True)))
        found.health = wait_healthy(engine, ids)
        assert set(found.health.values()) == {"healthy"}, f"health: {found.health}"

        found.uid = engine.run("exec", ids[0], "id", "-u").stdout.strip()
        found.leftovers = engine.run(
            "exec", "--user", "0", ids[0], "sh", "-c",
            "ls /opt/featmap/bin; find / -xdev \\( -path /proc -prune \\) -o \\( -path /src"
            " -o -path /root/.cache -o -path '/opt/featmap/*' -name tests \\) -print",
        ).stdout  # fmt: skip
        for port in ports:
            found.host_health[port] = run_featmap(
                "health", "--server", f"127.0.0.1:{port}", "--timeout", "10"
            )

        # One registration through the service name, from inside the compose network; then
        # each replica, on its own host port, extracts by that name and the example's.
        found.register = run(
            [*compose, "--profile", "batch", "run", "--rm", "-T", "--entrypoint", "python",
             "extract", "-c", REGISTER_ONCE],
            timeout=300, env=env,
        )  # fmt: skip
        for port in ports:
            with FeatureClient(f"127.0.0.1:{port}", timeout=60) as client:
                found.example[port] = answer(client, BLOB_IMAGES, EXAMPLE)
                found.stored[port] = answer(client, STORED_IMAGES, STORED)
        found.store_folder = engine.run(
            "exec", ids[0], "sh", "-c",
            "stat -c '%u %a' /var/lib/featmap/pipelines; find /var/lib/featmap/pipelines -type f",
        ).stdout  # fmt: skip

        # The batch profile's own command line, in smaller batches.
        services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
        command = services["extract"]["command"]
        found.extract = run(
            [*compose, "--profile", "batch", "run", "--rm", "-T", "extract", *command,
             "--batch-size", str(BATCH_SIZE)],
            timeout=600, env=env,
        )  # fmt: skip
        for replica in ids:  # the server logs to stderr
            found.logs[replica] = engine.run("logs", replica).stderr

        started = time.monotonic()
        found.stop = run([*compose, "stop"], timeout=120, env=env)
        found.stop_seconds = time.monotonic() - started
        found.exits = dict(
            zip(ids, engine.inspect("{{.State.Status}} {{.State.ExitCode}}", *ids), strict=True)
        )
        yield found
    finally:
        run([*compose, "--profile", "batch", "down", "--volumes", "--remove-orphans"],
            timeout=180, env=env)  # fmt: skip
        shutil.rmtree(project_dir, ignore_errors=True)


# --------------------------------------------------------------------------- the image


def test_image_runs_as_non_root(engine: Engine, image: str, deployment: Deployment) -> None:
    (user,) = engine.inspect("{{.Config.User}}", image)
    assert user == "10001:10001"
    assert deployment.uid == "10001", "the server runs as the image's user"


def test_image_holds_no_sources_pip_caches_or_test_suites(
    engine: Engine, image: str, deployment: Deployment
) -> None:
    leftovers = deployment.leftovers.split()
    assert "featmap" in leftovers, deployment.leftovers
    assert not {"pip", "pip3"} & set(leftovers), "pip stays in the build stage"
    assert not [path for path in leftovers if path.startswith("/")], deployment.leftovers
    (size,) = engine.inspect("{{.Size}}", image)
    (base,) = engine.inspect("{{.Size}}", "python:3.11-slim")
    # The venv is about 215 MB (onnxruntime, numpy, onnx, grpc, Pillow and their .pyc).
    assert int(size) - int(base) < 300_000_000, f"{image} adds {int(size) - int(base)} bytes"


# --------------------------------------------------------------------------- compose


def test_replicas_become_healthy_and_answer_on_their_host_ports(
    deployment: Deployment,
) -> None:
    assert list(deployment.health.values()) == ["healthy"] * REPLICAS
    for port, result in deployment.host_health.items():
        assert result.returncode == 0, f"127.0.0.1:{port}: {result.stderr}"
        assert "SERVING" in result.stdout


def test_batch_job_spreads_over_every_replica(deployment: Deployment) -> None:
    extract = deployment.extract
    assert extract is not None
    assert extract.returncode == 0, extract.stderr[-4000:]
    # The job's calls alone: not those by name (the stored pipeline's, the example's).
    by_name = {STORED_ID, example_pipeline().pipeline_id}
    images_per_replica = {
        deployment.replicas[replica]: sum(
            int(n) for pipeline, n in EXTRACT_LOG.findall(log) if pipeline not in by_name
        )
        for replica, log in deployment.logs.items()
    }
    assert all(images_per_replica.values()), f"a replica got no call: {images_per_replica}"
    assert sum(images_per_replica.values()) == IMAGES, images_per_replica


def test_one_registration_through_the_service_name_serves_every_replica(
    deployment: Deployment,
) -> None:
    register = deployment.register
    assert register is not None
    assert register.returncode == 0, register.stderr[-4000:]
    assert register.stdout.split() == [STORED_ID]
    registrations = [
        pipeline for log in deployment.logs.values() for pipeline in REGISTER_LOG.findall(log)
    ]
    assert registrations == [STORED_ID], "registered once, on one replica"
    # The in-network calls by name went round robin; every replica answered its own port.
    by_name = sum(
        1 for log in deployment.logs.values() for p, _ in EXTRACT_LOG.findall(log) if p == STORED_ID
    )
    assert by_name == CALLS + REPLICAS
    assert sorted(deployment.stored) == deployment.ports
    for port, outputs in deployment.stored.items():
        assert isinstance(outputs, dict), f"127.0.0.1:{port}: {outputs}"
        assert_matches_reference(outputs, parse_pipeline(TENSOR_SPEC), STORED_IMAGES, TENSORS)


def test_every_replica_registered_the_example_folder_at_start(deployment: Deployment) -> None:
    pipeline = example_pipeline()
    assert sorted(deployment.example) == deployment.ports
    for port, outputs in deployment.example.items():
        assert isinstance(outputs, dict), f"127.0.0.1:{port}: {outputs}"
        assert_matches_reference(outputs, pipeline, BLOB_IMAGES)


def test_the_store_volume_is_the_server_users_alone(deployment: Deployment) -> None:
    owner, *files = deployment.store_folder.split("\n")
    assert owner == "10001 700", deployment.store_folder
    assert any(STORED_ID in path for path in files), deployment.store_folder


def test_features_equal_the_embedded_run(deployment: Deployment, tmp_path: Path) -> None:
    local = tmp_path / "local.npz"
    result = run_featmap(
        "extract", "--pipeline", str(deployment.data / "pipeline.yaml"),
        "--input", str(deployment.data / "images"), "--output", str(local), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with (
        np.load(deployment.data / "features.npz", allow_pickle=False) as served,
        np.load(local, allow_pickle=False) as embedded,
    ):
        assert [Path(p).name for p in served["paths"]] == [Path(p).name for p in embedded["paths"]]
        assert len(served["paths"]) == IMAGES
        assert list(served["outputs"]) == list(embedded["outputs"])
        for name in embedded["outputs"]:
            assert served[name].shape == embedded[name].shape, name
            np.testing.assert_allclose(served[name], embedded[name], rtol=1e-5, err_msg=name)


def test_batch_output_is_readable_by_the_host_user(deployment: Deployment) -> None:
    output = deployment.data / "features.npz"
    status = output.stat()
    assert status.st_uid == 10001, "written by the container's user"
    assert oct(stat.S_IMODE(status.st_mode)) == oct(0o644), "open()'s mode under umask 022"
    assert not (deployment.data / "features.npz.parts").exists()
    assert not list(deployment.data.glob(".*.tmp")), "no temporary left behind"
    reader = ["wc", "--bytes", str(output)]
    if os.geteuid() == 0:  # root reads anything: read as nobody instead
        reader = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *reader]
    result = run(reader)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[0]) == status.st_size


def test_stop_exits_0_within_the_grace(deployment: Deployment) -> None:
    stop = deployment.stop
    assert stop is not None
    assert stop.returncode == 0, stop.stderr
    assert deployment.stop_seconds < STOP_GRACE_S, f"stop took {deployment.stop_seconds:.1f} s"
    # 137 would be the SIGKILL that follows an expired grace period.
    assert list(deployment.exits.values()) == ["exited 0"] * REPLICAS, json.dumps(
        {deployment.replicas[i]: state for i, state in deployment.exits.items()}
    )
