"""The `featmap` console script as real processes: serve, schema, and usage errors."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

import numpy as np

from featmap.client import FeatureClient
from featmap.contract.spec import (
    LAYER_TYPES,
    Pipeline,
)
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc
from tests.conftest import DATA_ROOT, README_SPEC, assert_matches_reference

FEATMAP = Path(sys.executable).parent / "featmap"
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 20.0


def clean_env(**variables: str) -> dict[str, str]:
    """This process's environment without FEATMAP_* settings, plus `variables`; a data folder
    of its own, so that a server's default pipeline store starts empty (tests/conftest.py)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEATMAP_")}
    env["XDG_DATA_HOME"] = tempfile.mkdtemp(dir=DATA_ROOT)
    return {**env, **variables}


class Serving:
    """A running `featmap serve` whose stderr a thread collects line by line."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)  # EOF: the process closed stderr (it exited)

    def wait_listening(self) -> int:
        """The port from the "listening on 127.0.0.1:<port>" log line."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if match := LISTENING.search(line):
                return int(match.group(1))
        raise AssertionError(f"featmap serve never said it was listening:\n{self.stderr()}")

    def stderr(self) -> str:
        """Everything the process wrote to stderr so far (all of it once it has exited)."""
        if self.process.poll() is not None:
            self.reader.join(timeout=5)
        while not self.lines.empty():
            line = self.lines.get_nowait()
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)


@contextmanager
def featmap_serve(*args: str, env: dict[str, str] | None = None) -> Iterator[Serving]:
    """`featmap serve ARGS` in a subprocess, killed on the way out if still running."""
    with subprocess.Popen(
        [str(FEATMAP), "serve", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env() if env is None else env,
    ) as process:
        serving = Serving(process)
        try:
            yield serving
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
            serving.reader.join(timeout=5)


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_featmap(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`featmap ARGS` to completion, output captured."""
    return subprocess.run(
        [str(FEATMAP), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env() if env is None else env,
        check=False,
    )


def test_serve_answers_then_exits_0_on_sigterm(readme_pipeline: Pipeline) -> None:
    with featmap_serve("--port", "0") as serving:
        port = serving.wait_listening()
        assert port != 0
        with FeatureClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.wait_ready()
            images = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
            outputs = client.extract(images, README_SPEC)
        assert_matches_reference(outputs, readme_pipeline, images)
        serving.process.send_signal(signal.SIGTERM)
        assert serving.process.wait(timeout=5) == 0
        log = serving.stderr()
        assert "received SIGTERM" in log
        assert "stopped" in log


def test_serve_settings_from_env() -> None:
    env = clean_env(FEATMAP_PORT="0", FEATMAP_MAX_IMAGES_PER_REQUEST="3")
    with featmap_serve("--host", "127.0.0.1", env=env) as serving:
        port = serving.wait_listening()
        with FeatureClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.wait_ready()
            assert client.server_info().limits["max_images_per_request"] == 3
        serving.process.send_signal(signal.SIGTERM)
        assert serving.process.wait(timeout=5) == 0


def test_port_flag_wins_over_env() -> None:
    port = free_port()
    # FEATMAP_PORT alone would be rejected (see below); the flag replaces it before validation.
    with featmap_serve("--port", str(port), env=clean_env(FEATMAP_PORT="-1")) as serving:
        assert serving.wait_listening() == port


def test_invalid_env_setting_exits_nonzero() -> None:
    result = run_featmap("serve", env=clean_env(FEATMAP_PORT="-1"))
    assert result.returncode != 0
    assert "port" in result.stderr
    assert "listening" not in result.stderr


def test_schema_is_the_pipeline_json_schema() -> None:
    result = run_featmap("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["type"] == "object"
    assert set(schema["required"]) == {"input", "layers"}
    assert set(README_SPEC) <= set(schema["properties"])
    ops = {
        definition["properties"]["op"]["const"]
        for definition in schema["$defs"].values()
        if "op" in definition.get("properties", {})
    }
    layer_ops = {get_args(layer.model_fields["op"].annotation)[0] for layer in LAYER_TYPES}
    assert ops == layer_ops
    assert {"conv2d", "max_pool2d", "global_avg_pool2d", "flatten"} <= ops


def test_no_subcommand_prints_usage() -> None:
    result = run_featmap()
    assert result.returncode == 2
    assert result.stderr.startswith("usage: featmap")
    assert "serve" in result.stderr and "schema" in result.stderr
    assert result.stdout == ""


def test_the_schema_is_one_text_everywhere(client: FeatureClient) -> None:
    # featmap schema, the file beside the proto, and GetServerInfo all give the same bytes.
    committed = (Path(__file__).parent.parent / "proto/featmap/v1/pipeline.schema.json").read_text()
    assert run_featmap("schema").stdout == committed
    stub = pb_grpc.FeatureExtractorStub(client._channel)
    assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).spec_schema_json == committed


def test_a_taken_port_is_one_clear_line_and_status_2() -> None:
    # Held by another featmap serve, and by any other process: the same one line, no gRPC log.
    with featmap_serve("--port", "0") as serving:
        port = serving.wait_listening()
        again = run_featmap("serve", "--port", str(port))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        other = run_featmap("serve", "--port", str(held))
    for result, taken in ((again, port), (other, held)):
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"featmap serve: error: 127.0.0.1:{taken} is already in use: stop the process that "
            "holds it, or choose another port (--port; 0 picks a free one)"
        ]
