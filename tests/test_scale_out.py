"""Scale-out: three real `featmap serve` processes behind one round-robin client.

Each server logs one JSON line per call; counting them per process shows where calls landed.
One server is SIGKILLed mid-job: gRPC resends the calls it never answered to the others, and
every image still comes back, equal to the NumPy reference.
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import yaml

from featmap.client import AsyncFeatureClient, FeatureClient
from featmap.contract.spec import parse_pipeline
from featmap.jobs.targets import grpc_target
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_cli import FEATMAP, Serving, clean_env, featmap_serve

REPLICAS = 3
SPEC = {**README_SPEC, "outputs": ["features"]}  # (N, 8, 1, 1): small replies
PIPELINE = parse_pipeline(SPEC)
RNG = np.random.default_rng(0)
# One image per call: many calls, so they can be counted per server.
SMALL = RNG.standard_normal((60, 3, 12, 12)).astype(np.float32)
# 270 KB per call: over gRPC's 256 KiB retry buffer, so gRPC's own retry policy cannot resend
# these, as it cannot resend real batches; the client must.
LARGE = RNG.standard_normal((96, 3, 150, 150)).astype(np.float32)


def is_extract_call(line: str) -> bool:
    """Whether a JSON log line is the request line of a finished Extract call."""
    if not line.startswith("{"):
        return False
    record = json.loads(line)
    return bool(record.get("logger") == "featmap.requests" and record.get("method") == "Extract")


def extract_calls(serving: Serving) -> int:
    """Extract calls the server finished, from its JSON request log lines."""
    return sum(is_extract_call(line) for line in serving.stderr().splitlines())


def wait_for_calls(serving: Serving, calls: int, timeout: float = 30.0) -> None:
    """Block until the server has logged `calls` finished Extract calls."""
    deadline = time.monotonic() + timeout
    seen = sum(is_extract_call(line) for line in serving.seen)
    while seen < calls:
        try:
            line = serving.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"only {seen} Extract calls logged:\n{serving.stderr()}") from None
        if line is None:
            raise AssertionError(f"the server exited:\n{serving.stderr()}")
        serving.seen.append(line)
        seen += is_extract_call(line)


def featmap_extract(
    tmp_path: Path, images: np.ndarray, addresses: list[str]
) -> subprocess.Popen[str]:
    """`featmap extract --server A --server B ...` over `images`, one image per call."""
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(yaml.safe_dump(SPEC))
    np.save(tmp_path / "images.npy", images)
    servers = [arg for address in addresses for arg in ("--server", address)]
    return subprocess.Popen(
        [str(FEATMAP), "extract", "--pipeline", str(pipeline_file),
         "--input", str(tmp_path / "images.npy"), "--output", str(tmp_path / "out.npz"),
         "--batch-size", "1", "--request-images", "1", "--in-flight", "4", "--quiet",
         *servers],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip


def npz_outputs(path: Path) -> dict[str, np.ndarray]:
    """The pipeline's outputs from an extract .npz, rows in input order."""
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in PIPELINE.output_names}


def joined(outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-call outputs concatenated along the batch axis."""
    return {name: np.concatenate([out[name] for out in outputs]) for name in PIPELINE.output_names}


@pytest.fixture
def replicas() -> Iterator[list[tuple[Serving, str]]]:
    """Three `featmap serve --port 0` processes on 127.0.0.1 and their addresses."""
    with ExitStack() as stack:
        servers = [
            stack.enter_context(
                featmap_serve("--port", "0", "--log-format", "json", "--threads", "1")
            )
            for _ in range(REPLICAS)
        ]
        yield [(serving, f"127.0.0.1:{serving.wait_listening()}") for serving in servers]


def addresses(replicas: list[tuple[Serving, str]]) -> list[str]:
    return [address for _, address in replicas]


def test_extract_command_spreads_over_every_replica(
    replicas: list[tuple[Serving, str]], tmp_path: Path
) -> None:
    with featmap_extract(tmp_path, SMALL, addresses(replicas)) as job:
        _, stderr = job.communicate(timeout=60)
    assert job.returncode == 0, stderr
    counts = [extract_calls(serving) for serving, _ in replicas]
    assert sum(counts) == len(SMALL) and min(counts) >= 1, counts
    assert_matches_reference(npz_outputs(tmp_path / "out.npz"), PIPELINE, SMALL)


def test_extract_command_survives_a_killed_replica(
    replicas: list[tuple[Serving, str]], tmp_path: Path
) -> None:
    victim, _ = replicas[0]
    with featmap_extract(tmp_path, LARGE, addresses(replicas)) as job:
        wait_for_calls(victim, 6)  # under way: about 18 of its 96 calls are done
        victim.process.send_signal(signal.SIGKILL)
        _, stderr = job.communicate(timeout=60)
    assert job.returncode == 0, stderr
    assert victim.process.wait(timeout=10) == -signal.SIGKILL
    assert_matches_reference(npz_outputs(tmp_path / "out.npz"), PIPELINE, LARGE)
    counts = [extract_calls(serving) for serving, _ in replicas]
    assert sum(counts) >= len(LARGE) and min(counts[1:]) >= 1, counts


def test_client_loses_no_image_when_a_replica_is_killed(
    replicas: list[tuple[Serving, str]],
) -> None:
    target, balanced = grpc_target(addresses(replicas))
    assert balanced and target.startswith("ipv4:")
    victim, _ = replicas[1]
    kill_after = 20

    def batches() -> Iterator[np.ndarray]:
        for index in range(len(LARGE)):
            if index == kill_after:  # with calls in flight on every replica
                victim.process.send_signal(signal.SIGKILL)
            yield LARGE[index : index + 1]

    with FeatureClient(target, timeout=30, load_balancing=True, in_flight=6) as client:
        client.wait_ready()
        outputs = list(client.extract_iter(batches(), SPEC))
    assert victim.process.wait(timeout=10) == -signal.SIGKILL
    assert len(outputs) == len(LARGE)
    assert_matches_reference(joined(outputs), PIPELINE, LARGE)
    survivors = [extract_calls(serving) for serving, _ in (replicas[0], replicas[2])]
    # The victim answered part of the first `kill_after` calls; the survivors did the rest.
    assert sum(survivors) >= len(LARGE) - kill_after, survivors
    assert min(survivors) >= 1, survivors


def test_async_client_balances_too(replicas: list[tuple[Serving, str]]) -> None:
    target, _ = grpc_target(addresses(replicas))

    async def extract_each() -> list[dict[str, np.ndarray]]:
        async with AsyncFeatureClient(target, timeout=30, load_balancing=True) as client:
            return [await client.extract(image[None], SPEC) for image in SMALL]

    outputs = asyncio.run(extract_each())
    assert_matches_reference(joined(outputs), PIPELINE, SMALL)
    counts = [extract_calls(serving) for serving, _ in replicas]
    assert sum(counts) == len(SMALL) and min(counts) >= 1, counts
