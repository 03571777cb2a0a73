"""Issues 10 and 20: hostile clients, one test per finding, acting as the attacker against real
servers.

Each test is named after the finding it reproduces (README "Threat model" says what each one
protects; issue 20's are test_finding_20_<n>_...). Shared-memory crash attempts run against a
`featmap serve` process: a SIGBUS there must not be able to take the test runner with it; issue
20's run against one too, measuring its memory and CPU through /proc.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from featmap.client import FeatureClient
from featmap.client.client import FeatmapRpcError
from featmap.client.shared_memory import SharedMemoryPool
from featmap.contract.errors import MAX_MESSAGE_CHARS
from featmap.contract.limits import MIB
from featmap.contract.ops import batch_cost
from featmap.contract.shared_memory import segment_prefix
from featmap.contract.spec import parse_pipeline
from featmap.contract.tensors import reply_message_bytes
from featmap.oip import grpc_predict_v2_pb2 as oip
from featmap.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from featmap.service.streams import ReadAhead
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_cli import clean_env, featmap_serve
from tests.test_hardening import settings

DEV_SHM = "/dev/shm"
needs_dev_shm = pytest.mark.skipif(not os.path.isdir(DEV_SHM), reason="no /dev/shm")
README_JSON = json.dumps(README_SPEC)
# Status messages must stay short whatever was sent: the cap, plus "field: " and the marker.
SHORT = MAX_MESSAGE_CHARS + 200


def images(n: int = 1, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


def extract_request(
    array: np.ndarray | None = None, spec: str = README_JSON, **fields: Any
) -> pb.ExtractRequest:
    request = pb.ExtractRequest(spec_json=spec, **fields)
    if array is not None:
        request.images.CopyFrom(
            pb.Tensor(dtype=pb.FLOAT32, shape=array.shape, data=array.tobytes())
        )
    return request


def failure(call: Any, request: Any, **kwargs: Any) -> grpc.RpcError:
    """The RpcError a call ends with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, **{"timeout": 60, **kwargs})
    return caught.value


def field_of(error: Any) -> str:
    return str(dict(error.trailing_metadata() or ()).get("featmap-field", ""))


def rss_kib(pid: int) -> int:
    """A process's resident set size in KiB (/proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def hostile() -> Iterator[FeatmapServer]:
    """A server with tight budgets, the attacker's target for the in-process findings."""
    with FeatmapServer(
        settings(
            session_cache_bytes=64 * MIB,
            registry_bytes=64 * MIB,
            spec_cache_bytes=64 * MIB,
            max_spec_bytes=MIB,
            metrics_port=0,
        )
    ) as running:
        yield running


@pytest.fixture(scope="module")
def stub(hostile: FeatmapServer) -> Iterator[pb_grpc.FeatureExtractorStub]:
    with grpc.insecure_channel(hostile.address) as channel:
        yield pb_grpc.FeatureExtractorStub(channel)


@pytest.fixture(scope="module")
def oip_stub(hostile: FeatmapServer) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(hostile.address) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


# --------------------------------------------------------------------------- 1, 2, 3: shared memory


@contextmanager
def shared_memory_server(tmp_path: Path, *more: str) -> Iterator[tuple[Any, str, str]]:
    """`featmap serve` with shared memory on a Unix socket: (process, TCP, Unix targets)."""
    socket = tmp_path / "featmap.sock"
    args = ("--port", "0", "--unix-socket", str(socket), "--shared-memory", "--workers", "4")
    with featmap_serve(*args, *more, env=clean_env(FEATMAP_INTRA_OP_THREADS="1")) as serving:
        port = serving.wait_listening()
        yield serving.process, f"127.0.0.1:{port}", f"unix:{socket}"


def register(
    stub: pb_grpc.FeatureExtractorStub, secret: str, region: str, key: str, size: int
) -> None:
    stub.RegisterSharedMemory(
        pb.RegisterSharedMemoryRequest(region=region, key=key, byte_size=size, owner=secret),
        timeout=30,
    )


def assert_serving(process: Any, address: str) -> None:
    """The server process lives and answers an ordinary Extract."""
    assert process.poll() is None, f"the server died with {process.poll()}"
    with FeatureClient(address, timeout=30) as client:
        client.extract(images(), README_SPEC)
    assert process.poll() is None


@needs_dev_shm
def test_finding_1_a_shrunk_segment_cannot_crash_the_server(tmp_path: Path) -> None:
    secret = secrets.token_hex(16)
    prefix = segment_prefix(secret)
    batch = images(2)
    with (
        shared_memory_server(tmp_path) as (process, tcp, unix),
        grpc.insecure_channel(unix) as channel,
    ):
        stub = pb_grpc.FeatureExtractorStub(channel)
        source = SharedMemory(name=f"{prefix}in", create=True, size=batch.nbytes)
        target = SharedMemory(name=f"{prefix}out", create=True, size=1 << 20)
        try:
            assert source.buf is not None
            source.buf[: batch.nbytes] = batch.tobytes()
            register(stub, secret, f"{prefix}images", source.name, batch.nbytes)
            register(stub, secret, f"{prefix}outputs", target.name, 1 << 20)
            header = pb.Tensor(dtype=pb.FLOAT32, shape=batch.shape)
            images_ref = pb.SharedMemoryRef(
                region=f"{prefix}images", byte_size=batch.nbytes, owner=secret
            )
            output_ref = pb.SharedMemoryRef(
                region=f"{prefix}outputs", byte_size=1 << 20, owner=secret
            )
            ok = stub.Extract(
                extract_request(images=header, images_region=images_ref, output_region=output_ref),
                timeout=30,
            )
            assert set(ok.output_regions) == {"conv1", "features"}

            # The attack: shrink each segment to nothing after registering, then use it.
            os.ftruncate(source._fd, 0)  # type: ignore[attr-defined]
            reading = failure(
                stub.Extract, extract_request(images=header, images_region=images_ref)
            )
            assert reading.code() == grpc.StatusCode.INVALID_ARGUMENT, reading.details()
            assert field_of(reading) == "images_region.region"
            assert "shrank" in reading.details()
            assert_serving(process, tcp)

            os.ftruncate(source._fd, batch.nbytes)  # type: ignore[attr-defined]
            os.ftruncate(target._fd, 0)  # type: ignore[attr-defined]
            writing = failure(
                stub.Extract,
                extract_request(images=header, images_region=images_ref, output_region=output_ref),
            )
            assert writing.code() == grpc.StatusCode.INVALID_ARGUMENT, writing.details()
            assert field_of(writing) == "output_region.region"
            assert os.fstat(target._fd).st_size == 0  # type: ignore[attr-defined]
            assert_serving(process, tcp)
        finally:
            for segment in (source, target):
                segment.close()
                segment.unlink()


@needs_dev_shm
def test_finding_2_only_the_callers_own_segments_are_reachable(tmp_path: Path) -> None:
    secret = secrets.token_hex(16)
    victim = SharedMemory(name=f"other_program_{secrets.token_hex(4)}", create=True, size=4096)
    assert victim.buf is not None
    victim.buf[:6] = b"secret"
    mine = SharedMemory(name=f"{segment_prefix(secret)}seg", create=True, size=4096)
    link = Path(DEV_SHM) / f"{segment_prefix(secret)}link"
    link.symlink_to(Path(DEV_SHM) / victim.name)
    try:
        with (
            shared_memory_server(tmp_path) as (process, tcp, unix),
            grpc.insecure_channel(unix) as local_channel,
            grpc.insecure_channel(tcp) as remote_channel,
        ):
            local = pb_grpc.FeatureExtractorStub(local_channel)
            remote = pb_grpc.FeatureExtractorStub(remote_channel)
            region = f"{segment_prefix(secret)}r"
            # Over TCP nothing is offered, whatever the names: no proof the caller is local.
            refused = failure(
                remote.RegisterSharedMemory,
                pb.RegisterSharedMemoryRequest(
                    region=region, key=mine.name, byte_size=16, owner=secret
                ),
            )
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
            ref = pb.SharedMemoryRef(region=region, byte_size=48 * 4, owner=secret)
            header = pb.Tensor(dtype=pb.FLOAT32, shape=[1, 3, 4, 4])
            via_tcp = failure(remote.Extract, extract_request(images=header, images_region=ref))
            assert via_tcp.code() == grpc.StatusCode.PERMISSION_DENIED
            # Locally: another program's segment, by name or through a link of ours: refused.
            for key, says in ((victim.name, "must start with"), (link.name, "cannot open")):
                error = failure(
                    local.RegisterSharedMemory,
                    pb.RegisterSharedMemoryRequest(
                        region=region, key=key, byte_size=16, owner=secret
                    ),
                )
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
                assert says in error.details()
            # A segment of ours that belongs to another user (only root can arrange that).
            if os.geteuid() == 0:
                os.fchown(mine._fd, 65534, 65534)  # type: ignore[attr-defined]
                error = failure(
                    local.RegisterSharedMemory,
                    pb.RegisterSharedMemoryRequest(
                        region=region, key=mine.name, byte_size=16, owner=secret
                    ),
                )
                assert "not owned by the server's user" in error.details()
            assert_serving(process, tcp)
        assert bytes(victim.buf[:6]) == b"secret"
    finally:
        link.unlink()
        for segment in (victim, mine):
            segment.close()
            segment.unlink()


def test_finding_2_shared_memory_is_off_by_default(server: FeatmapServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.FeatureExtractorStub(channel)
        error = failure(stub.RenewSharedMemory, pb.RenewSharedMemoryRequest(owner="x" * 32))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--shared-memory" in error.details()
    with pytest.raises(ValueError, match="unix_socket"):
        ServerSettings(shared_memory=True)
    with pytest.raises(ValueError, match="Unix socket"):
        FeatureClient(server.address, shared_memory=True)


def test_finding_3_another_client_cannot_use_a_region_by_name(
    shm_server: FeatmapServer,
) -> None:
    assert shm_server.unix_address is not None
    batch = images(1, 8)
    with (
        SharedMemoryPool() as victim,
        SharedMemoryPool() as attacker,
        grpc.insecure_channel(shm_server.unix_address) as channel,
    ):
        stub = pb_grpc.FeatureExtractorStub(channel)
        images_ref, registrations = victim.images_ref(batch)
        output_ref, more = victim.output_ref(1 << 16)
        for region, key, size in registrations + more:
            register(stub, victim.secret, region, key, size)
        header = pb.Tensor(dtype=pb.FLOAT32, shape=batch.shape)
        # The attacker knows every name (they are in /dev/shm), but not the secret.
        for owner in (attacker.secret, ""):
            stolen_in = pb.SharedMemoryRef(
                region=images_ref.region, byte_size=images_ref.byte_size, owner=owner
            )
            stolen_out = pb.SharedMemoryRef(
                region=output_ref.region, byte_size=output_ref.byte_size, owner=owner
            )
            for request in (
                extract_request(images=header, images_region=stolen_in),
                extract_request(batch, output_region=stolen_out),
            ):
                error = failure(stub.Extract, request)
                expected = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}
                assert error.code() in expected, error.details()
                assert field_of(error).endswith((".region", ".owner"))
        # Nor renew, unregister or re-point them: the names are not the attacker's to use.
        renewed = stub.RenewSharedMemory(pb.RenewSharedMemoryRequest(owner=attacker.secret))
        assert renewed.regions == 0
        _, theirs = attacker.images_ref(batch)
        repoint = failure(
            stub.RegisterSharedMemory,
            pb.RegisterSharedMemoryRequest(
                region=images_ref.region, key=theirs[0][1], byte_size=16, owner=attacker.secret
            ),
        )
        assert repoint.code() == grpc.StatusCode.INVALID_ARGUMENT
        gone = failure(
            stub.UnregisterSharedMemory,
            pb.UnregisterSharedMemoryRequest(region=images_ref.region, owner=attacker.secret),
        )
        assert gone.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The victim's regions still work, unchanged.
        ok = stub.Extract(extract_request(images=header, images_region=images_ref), timeout=30)
        assert set(ok.outputs) == {"conv1", "features"}
        stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(owner=victim.secret))


# --------------------------------------------------------------------------- 4: tenants


@pytest.fixture(scope="module")
def tenanted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatmapServer]:
    tokens = tmp_path_factory.mktemp("tenants") / "tokens"
    tokens.write_text("# tenant:token\nacme:acme-token\nglobex:globex-token\nshared-token\n")
    with FeatmapServer(settings(auth_tokens_file=tokens)) as running:
        yield running


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def test_finding_4_tenants_see_only_their_own_pipelines(tenanted: FeatmapServer) -> None:
    spec = {
        "input": {"channels": 3},
        "layers": [
            {"op": "conv2d", "name": "c", "filters": 2, "kernel_size": 1,
             "weights": {"tensor": "w"}},
        ],
    }  # fmt: skip
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1)}
    with (
        FeatureClient(tenanted.address, token="acme-token", timeout=30) as acme,
        FeatureClient(tenanted.address, token="globex-token", timeout=30) as globex,
        FeatureClient(tenanted.address, token="shared-token", timeout=30) as default,
        grpc.insecure_channel(tenanted.address) as channel,
    ):
        pipeline_id = acme.register(spec, weights=weights)
        assert [p.pipeline_id for p in acme.list_pipelines()] == [pipeline_id]
        for other in (globex, default):
            assert other.list_pipelines() == []
            with pytest.raises(FeatmapRpcError) as error:
                other.get_pipeline(pipeline_id, include_model=True)  # the weights: no
            assert error.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(FeatmapRpcError) as error:
                other.extract(images(), pipeline_id)
            assert error.value.code == grpc.StatusCode.NOT_FOUND
            assert other.delete_pipeline(pipeline_id) is False
        # OIP resolves model names within the caller's tenant too.
        inference = oip_grpc.GRPCInferenceServiceStub(channel)
        ready = inference.ModelReady(
            oip.ModelReadyRequest(name=pipeline_id), metadata=bearer("globex-token")
        )
        assert ready.ready is False
        error = failure(
            inference.ModelMetadata,
            oip.ModelMetadataRequest(name=pipeline_id),
            metadata=bearer("globex-token"),
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
        # The same content in another tenant is that tenant's own entry.
        assert globex.register(spec, weights=weights) == pipeline_id
        assert globex.delete_pipeline(pipeline_id) is True
        assert acme.get_pipeline(pipeline_id).pipeline_id == pipeline_id
        acme.extract(images(), pipeline_id)
        assert acme.delete_pipeline(pipeline_id) is True


def test_finding_4_token_lines_name_tenants(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("a:same\nb:same\n")
    with pytest.raises(ValueError, match="two tenants"):
        FeatmapServer(settings(auth_tokens_file=tokens))
    tokens.write_text("bad tenant:its-token\n")
    with pytest.raises(ValueError, match="tenant name") as error:
        FeatmapServer(settings(auth_tokens_file=tokens))
    assert "its-token" not in str(error.value)


# --------------------------------------------------------------------------- 5: streams


class Streams:
    """Streams an attacker opens and leaves: idle (nothing sent) or stalled (one message sent,
    no response read). Each is cancelled at close()."""

    def __init__(self, address: str) -> None:
        # Any reply size accepted: the client's own limit must not end a stalled stream.
        self.channel = grpc.insecure_channel(address, [("grpc.max_receive_message_length", -1)])
        self.stream = self.channel.stream_stream(
            "/featmap.v1.FeatureExtractor/ExtractStream",
            request_serializer=pb.ExtractRequest.SerializeToString,
            response_deserializer=pb.ExtractResponse.FromString,
        )
        self.release = threading.Event()
        self.calls: list[Any] = []

    def _requests(self, first: pb.ExtractRequest | None) -> Iterator[pb.ExtractRequest]:
        if first is not None:
            yield first
        self.release.wait()

    def open(self, count: int, first: pb.ExtractRequest | None = None) -> None:
        for _ in range(count):
            self.calls.append(self.stream(self._requests(first), timeout=120))

    def refused(self) -> int:
        """How many were refused at once as busy (max_streams)."""
        refused = 0
        for call in self.calls:
            if call.done() and call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refused += 1
        return refused

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()
        self.channel.close()


def unary_p50(address: str, count: int = 15) -> float:
    """Median seconds of a small Extract, from a client of its own."""
    with FeatureClient(address, timeout=30, retries=0) as client:
        client.extract(images(), README_SPEC)  # warm: the spec is cached, the session built
        seconds = []
        for _ in range(count):
            start = time.perf_counter()
            client.extract(images(), README_SPEC)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def stalling_message(size: int = 6 * MIB) -> pb.ExtractRequest:
    """About `size` bytes of images whose reply (conv1 of them) is bigger still."""
    side = int((size / 12) ** 0.5)
    return extract_request(images(1, side))


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_finding_5_idle_and_stalled_streams_leave_unary_latency_alone() -> None:
    """The stress test: N idle + N stalled streams while unary calls keep their latency."""
    n = 32
    config = settings(grpc_workers=8, max_streams=4, max_queued_requests=16)
    with FeatmapServer(config) as server:
        alone = unary_p50(server.address)
        streams = Streams(server.address)
        try:
            streams.open(n)
            streams.open(n, stalling_message())
            # Four are admitted (each holds a handler thread), the rest refused at once.
            wait_for(lambda: streams.refused() == 2 * n - 4)
            wait_for(lambda: server.stream_admission.in_flight == 4)
            held = unary_p50(server.address)
            wait_for(lambda: server.admission.in_flight == 0)  # streams hold no unary slot
        finally:
            streams.close()
        wait_for(lambda: server.stream_admission.in_flight == 0)
    print(f"unary p50 alone {alone * 1000:.1f} ms, with {n} idle + {n} stalled streams "
          f"{held * 1000:.1f} ms")  # fmt: skip
    assert held < 3 * alone + 0.1


def test_finding_5_idle_and_stalled_streams_are_ended() -> None:
    config = settings(grpc_workers=4, max_streams=3, stream_idle_timeout_s=1.0)
    with FeatmapServer(config) as server:
        streams = Streams(server.address)
        try:
            streams.open(1)  # sends nothing
            streams.open(1, stalling_message())  # sends one message, never reads the reply
            started = time.monotonic()
            wait_for(lambda: server.stream_admission.in_flight == 2)
            wait_for(lambda: server.stream_admission.in_flight == 0, timeout=15)
            assert time.monotonic() - started < 10  # slots and threads are free again
            assert server.servicer.watchdog.cancelled == 1
            idle, stalled = streams.calls
            assert idle.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "stream_idle_timeout_s" in idle.details()
            # The stalled one's reply could not reach it: the server cancelled the call.
            with pytest.raises(grpc.RpcError) as cancelled:
                list(stalled)
            assert cancelled.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
        finally:
            streams.close()
        # The slots are free again: a well-behaved stream runs.
        with FeatureClient(server.address, timeout=30) as client:
            assert len(list(client.extract_stream([images()] * 3, README_SPEC))) == 3


def test_finding_5_a_batch_refused_a_stream_is_streamed_again(readme_pipeline: Any) -> None:
    # One stream at a time, and an attacker holds it for a moment.
    with FeatmapServer(settings(max_streams=1)) as server:
        streams = Streams(server.address)
        streams.open(1)
        wait_for(lambda: server.stream_admission.in_flight == 1)
        threading.Timer(0.3, streams.close).start()
        batch = images(8, 32)  # 96 KiB: streamed in chunks of 64 KiB messages
        with FeatureClient(server.address, max_message_bytes=64 << 10, retries=10) as client:
            outputs = client.extract(batch, README_SPEC)
        assert server.stream_admission.refused >= 1
    assert_matches_reference(outputs, readme_pipeline, batch)


class Message:
    """A received request as ReadAhead sees it: something with a size."""

    def __init__(self, size: int) -> None:
        self.size = size


def test_finding_5_read_ahead_is_bounded_in_bytes_and_released() -> None:
    sent: list[Message] = []

    def requests() -> Iterator[Message]:
        for _ in range(50):
            message = Message(6 * MIB)
            sent.append(message)
            yield message

    read_ahead = ReadAhead(requests(), window=4, max_bytes=16 * MIB, idle_timeout_s=5)
    wait_for(lambda: len(sent) >= 3)
    time.sleep(0.2)  # give the reader every chance to read more than it may
    # Two 6 MiB messages fit in 16 MiB; the reader holds the third, blocked.
    assert read_ahead.peak == 2
    assert len(sent) == 3
    iterator = iter(read_ahead)
    next(iterator)
    wait_for(lambda: len(sent) == 4)
    read_ahead.close()
    assert read_ahead._bytes == 0 and not read_ahead._items  # dropped when the stream ends


# --------------------------------------------------------------------------- 6, 7: memory budgets


def relu_flood(layers: int, seed: int = 0) -> str:
    """A spec of `layers` relus (distinct per seed): refused by max_layers once parsed."""
    return json.dumps(
        {"input": {"channels": 3, "scale": seed + 1}, "layers": [{"op": "relu"}] * layers}
    )


def test_finding_6_refused_specs_are_not_kept(
    hostile: FeatmapServer, stub: pb_grpc.FeatureExtractorStub
) -> None:
    specs = hostile.service.inline_specs
    kept, budget = len(specs), specs.budget.kept
    # Over max_spec_bytes: refused before a byte is parsed.
    huge = json.dumps({"input": {"channels": 3}, "layers": [{"op": "relu"}] * 200_000})
    start = time.perf_counter()
    error = failure(stub.Extract, extract_request(images(), spec=huge))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert field_of(error) == "spec_json" and "max_spec_bytes=1048576" in error.details()
    assert time.perf_counter() - start < 2
    # Under it, but over max_layers: parsed, refused, and not kept.
    for layers in (60_000, 60_001):
        spec = json.dumps({"input": {"channels": 3}, "layers": [{"op": "relu"}] * layers})
        error = failure(stub.Extract, extract_request(images(), spec=spec))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert field_of(error) == "layers"
    assert len(specs) == kept and specs.budget.kept == budget
    assert specs.budget.in_flight == 0


def test_finding_6_the_spec_cache_is_bounded_in_bytes(hostile: FeatmapServer) -> None:
    specs = hostile.service.inline_specs
    with FeatureClient(hostile.address, timeout=30) as client:
        for n in range(40):  # 40 distinct texts of ~50 KB: ~128 MiB of estimates
            client.extract(images(), README_JSON + " " * (50_000 + n))
    assert specs.budget.used <= specs.budget.limit
    assert len(specs) < 40


def big_init_spec(filters: int, seed: int = 0) -> dict[str, Any]:
    """A tiny spec with filters x 512 x 8 x 8 = 32768 x filters initialized weights."""
    return {
        "input": {"channels": 512},
        "layers": [
            {"op": "conv2d", "filters": filters, "kernel_size": 8,
             "weights": {"init": "he_normal", "seed": seed}},
        ],
    }  # fmt: skip


def test_finding_7_parameters_are_charged_in_bytes_before_compiling(
    hostile: FeatmapServer, stub: pb_grpc.FeatureExtractorStub
) -> None:
    cache = hostile.service.cache
    # 2048 filters: 67 M weights (under max_parameters) in a ~170-byte spec. Compiling it would
    # peak near 2 GiB and keep 512 MiB: refused before anything is allocated.
    spec = json.dumps(big_init_spec(2048))
    assert len(spec) < 200
    batch = np.zeros((1, 512, 8, 8), np.float32)
    start = time.perf_counter()
    error = failure(stub.Extract, extract_request(batch, spec=spec))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "session_cache_bytes=67108864" in error.details()
    assert time.perf_counter() - start < 2
    assert cache.budget.in_flight == 0
    # Specs that fit are compiled and cached, evicting each other within the budget.
    with FeatureClient(hostile.address, timeout=60) as client:
        for seed in range(4):  # 32 filters: 1 M weights, 8 MiB kept, 33 MiB at the peak
            client.extract(batch, big_init_spec(32, seed))
            assert cache.budget.used <= cache.budget.limit
    # Registering is charged to registry_bytes the same way.
    registered = failure(
        stub.RegisterPipeline, pb.RegisterPipelineRequest(spec_json=json.dumps(big_init_spec(512)))
    )
    assert registered.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "registry_bytes=67108864" in registered.details()


def test_finding_7_a_budget_held_by_work_in_flight_is_busy_and_retryable() -> None:
    from featmap.contract.errors import Busy, LimitExceeded
    from featmap.service.budget import MemoryBudget

    budget = MemoryBudget("session_cache_bytes", 100)
    budget.reserve(60, "layers", "compiling")
    with pytest.raises(Busy) as busy:
        budget.reserve(60, "layers", "compiling")
    assert busy.value.retryable and busy.value.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    budget.keep(60, 40)
    with pytest.raises(LimitExceeded) as full:
        budget.reserve(70, "layers", "registering")  # nothing to evict: full, not busy
    assert not full.value.retryable
    assert "session_cache_bytes=100" in str(full.value)


def test_finding_7_values_specs_are_bounded_by_their_text(
    stub: pb_grpc.FeatureExtractorStub,
) -> None:
    values = np.zeros((4096, 3, 3, 3)).tolist()  # 110 592 numbers, ~600 KB of JSON
    spec = {
        "input": {"channels": 3},
        "layers": [{"op": "conv2d", "filters": 4096, "kernel_size": 3,
                    "weights": {"values": values * 4}}],
    }  # fmt: skip
    start = time.perf_counter()
    error = failure(stub.Extract, extract_request(images(), spec=json.dumps(spec)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_spec_bytes" in error.details()
    assert time.perf_counter() - start < 2


MEASURE_SESSION = """
import ctypes, gc, json, sys
import numpy as np
from featmap.contract.limits import session_memory
from featmap.contract.ops import parameter_count
from featmap.contract.spec import parse_pipeline
from featmap.service.runtime import SessionCache

def status(key):  # VmHWM, unlike ru_maxrss, starts afresh at exec: not the parent's peak
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def rss():
    return status("VmRSS")

cache = SessionCache(2, ["CPUExecutionProvider"], 1)
cache.get(parse_pipeline({"input": {"channels": 1}, "layers": [{"op": "relu"}]}))  # as a server
pipeline = parse_pipeline(json.loads(sys.argv[1]))
shape = json.loads(sys.argv[2])  # int8: the calibration images' shape, or null
calibration = None if shape is None else np.random.default_rng(0).random(shape, np.float32)
if pipeline.precision == "int8":  # as a server that built one: the quantization tools loaded
    warm = parse_pipeline({"input": {"channels": 1}, "precision": "int8", "layers": [
        {"op": "conv2d", "filters": 16, "kernel_size": 1, "weights": {"init": "he_normal"}}]})
    cache.get(warm, calibration=np.zeros((1, 1, 4, 4), np.float32))
gc.collect()
before = rss()
compiled = cache.get(pipeline, calibration=calibration)
del calibration
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # as featmap serve does once quiet
peak = status("VmHWM")
memory = session_memory(pipeline, None if shape is None else tuple(shape))
print(json.dumps({"steady": rss() - before, "peak": peak - before, "charged_steady":
    memory.steady, "charged_peak": memory.peak, "parameters": parameter_count(pipeline)}))
"""


def measure_session(spec: dict[str, Any], calibration: list[int] | None = None) -> dict[str, int]:
    """What building `spec`'s session costs (bytes: steady, peak) and what the budgets charge
    for it (charged_steady, charged_peak), in a process of its own with onnxruntime already
    loaded, as in a server; `calibration`: an int8 spec's calibration images' shape."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_SESSION, json.dumps(spec), json.dumps(calibration)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    measured: dict[str, int] = json.loads(done.stdout)
    print(measured)
    return measured


def test_measured_bytes_per_parameter_hold() -> None:
    """The constants the budgets charge (contract.limits) against what a session costs."""
    measured = measure_session(big_init_spec(256))  # 8.4 M weights
    assert measured["steady"] <= measured["charged_steady"] * 1.1
    assert measured["peak"] <= measured["charged_peak"] * 1.1


# --------------------------------------------------------------------------- 8: statuses


def test_finding_8_rank_65_tensors_are_invalid_everywhere(
    hostile: FeatmapServer,
    stub: pb_grpc.FeatureExtractorStub,
    oip_stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    shape = [1] * 65
    extract = extract_request()
    extract.images.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=b"\0" * 4))
    spec = {
        "input": {"channels": 1},
        "layers": [{"op": "conv2d", "filters": 1, "kernel_size": 1, "weights": {"tensor": "w"}}],
    }
    register = pb.RegisterPipelineRequest(
        spec_json=json.dumps(spec),
        weights={"w": pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=b"\0" * 4)},
    )
    with FeatureClient(hostile.address, timeout=30) as client:
        model = client.register(README_SPEC)
    infer = oip.ModelInferRequest(model_name=model, raw_input_contents=[b"\0" * 4])
    infer.inputs.add(name="images", datatype="FP32", shape=shape)
    for call, request, field in (
        (stub.Extract, extract, "images.shape"),
        (stub.RegisterPipeline, register, "weights['w'].shape"),
        (oip_stub.ModelInfer, infer, "inputs[0].shape"),
    ):
        error = failure(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert field_of(error) == field


@pytest.mark.parametrize(("sigma", "kernel_size"), [(1e155, 3), (1e-20, 4), (1e-200, 3)])
def test_finding_8_and_10_gaussian_sigma_out_of_range_is_invalid(
    stub: pb_grpc.FeatureExtractorStub, sigma: float, kernel_size: int
) -> None:
    spec = json.dumps(
        {"input": {"channels": 3}, "layers": [{"op": "conv2d", "filters": 1,
         "kernel_size": kernel_size, "weights": {"preset": "gaussian", "sigma": sigma}}]}
    )  # fmt: skip
    for call, request in (
        (stub.Extract, extract_request(images(), spec=spec)),
        (stub.RegisterPipeline, pb.RegisterPipelineRequest(spec_json=spec)),
    ):
        error = failure(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert field_of(error) == "layers[0].weights.sigma"
        assert "overflowed" not in error.details()


def scrape(server: FeatmapServer) -> dict[str, float]:
    import urllib.request

    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(featmap_\w+)(\{[^}]*\})? (\S+)$", line)
        if match:
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def test_finding_8_headers_cannot_drive_the_metrics(
    hostile: FeatmapServer, stub: pb_grpc.FeatureExtractorStub
) -> None:
    before = scrape(hostile)
    for shape in ([-1, 3, 8, 8], [2**31 - 1, 3, 1, 1], [-(2**62), 3, 8, 8]):
        request = extract_request()
        request.images.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=shape))
        error = failure(stub.Extract, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    after = scrape(hostile)
    assert after["featmap_images_total"] == before["featmap_images_total"]
    assert after["featmap_in_flight_requests"] == 0
    codes = 'featmap_requests_total{code="INVALID_ARGUMENT",method="Extract"}'
    assert after[codes] - before.get(codes, 0) == 3


# --------------------------------------------------------------------------- 9: echoes


def test_finding_9_big_names_come_back_short(
    hostile: FeatmapServer,
    stub: pb_grpc.FeatureExtractorStub,
    oip_stub: oip_grpc.GRPCInferenceServiceStub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = "x" * 900_000  # under max_spec_bytes: parsed, and refused as invalid
    spec = json.dumps({**README_SPEC, "outputs": [name]})
    error = failure(stub.Extract, extract_request(images(), spec=spec))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.details()) < SHORT
    # 60 MB of name: over max_spec_bytes, refused unread.
    error = failure(
        stub.Extract,
        extract_request(images(), spec=json.dumps({**README_SPEC, "outputs": [name * 67]})),
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(error.details()) < SHORT
    # Names of things that do not exist, a megabyte long.
    with caplog.at_level("INFO", logger="featmap.requests"):
        error = failure(stub.Extract, pb.ExtractRequest(pipeline_id="p" * MIB))
    assert error.code() == grpc.StatusCode.NOT_FOUND and len(error.details()) < SHORT
    assert all(len(record.getMessage()) < SHORT for record in caplog.records)
    for request in (
        oip.ModelInferRequest(model_name="m" * MIB),
        oip.ModelMetadataRequest(name="m" * MIB),
    ):
        call = (
            oip_stub.ModelInfer
            if isinstance(request, oip.ModelInferRequest)
            else oip_stub.ModelMetadata
        )
        error = failure(call, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND and len(error.details()) < SHORT


def test_finding_9_lists_in_messages_are_capped() -> None:
    from featmap.contract.errors import InvalidSpec
    from featmap.contract.spec import parse_pipeline

    spec = {"input": {"channels": 3}, "layers": [{"op": "relu"}] * 50_000, "outputs": ["nope"]}
    with pytest.raises(InvalidSpec) as error:
        parse_pipeline(spec)
    assert "49984 more" in str(error.value)
    assert len(str(error.value)) < SHORT


# --------------------------------------------------------------------------- 10: OIP parameters


@pytest.mark.parametrize("where", ["request", "input", "output"])
def test_finding_10_unknown_oip_parameters_are_refused(
    hostile: FeatmapServer, oip_stub: oip_grpc.GRPCInferenceServiceStub, where: str
) -> None:
    with FeatureClient(hostile.address, timeout=30) as client:
        model = client.register(README_SPEC)
    batch = images()
    request = oip.ModelInferRequest(model_name=model, raw_input_contents=[batch.tobytes()])
    tensor = request.inputs.add(name="images", datatype="FP32", shape=batch.shape)
    output = request.outputs.add(name="features")
    parameters = {"request": request.parameters, "input": tensor.parameters,
                  "output": output.parameters}[where]  # fmt: skip
    parameters["shared_memory_region"].string_param = "someone_elses"
    error = failure(oip_stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shared_memory_region" in field_of(error)


# --------------------------------------------------------------------------- RSS after it all


def test_rss_returns_after_a_hostile_run(tmp_path: Path) -> None:
    """Findings 5, 6, 7 and 9 against a `featmap serve` process: RSS comes back within 20 %."""
    env = clean_env(
        FEATMAP_INTRA_OP_THREADS="1",
        FEATMAP_GRPC_WORKERS="16",
        FEATMAP_MAX_STREAMS="8",
        FEATMAP_SESSION_CACHE_BYTES=str(256 * MIB),
        FEATMAP_REGISTRY_BYTES=str(256 * MIB),
    )
    with featmap_serve("--port", "0", env=env) as serving:
        address = f"127.0.0.1:{serving.wait_listening()}"
        pid = serving.process.pid
        with FeatureClient(address, timeout=60) as client:
            # Warm-up: what a well-behaved client does, including a stream of big chunks.
            client.wait_ready()
            for _ in range(10):
                client.extract(images(4, 32), README_SPEC)
            big = images(1, 700)
            list(client.extract_stream([big] * 4, README_SPEC))
            client.delete_pipeline(client.register(README_SPEC))
            time.sleep(2.5)  # quiet: the server trims its heap (service/allocator.py)
            warm = rss_kib(pid)

            with grpc.insecure_channel(address) as channel:
                stub = pb_grpc.FeatureExtractorStub(channel)
                inference = oip_grpc.GRPCInferenceServiceStub(channel)
                # 5: idle and stalled streams, then dropped.
                streams = Streams(address)
                streams.open(16)
                streams.open(16, stalling_message())
                wait_for(lambda: streams.refused() >= 16)
                time.sleep(1)
                streams.close()
                # 6: refused specs, over max_spec_bytes and over max_layers.
                for seed in range(4):
                    for spec in (relu_flood(1_000_000, seed), relu_flood(60_000, seed)):
                        failure(stub.Extract, extract_request(images(), spec=spec))
                # 7: a few hundred bytes asking for 67 M weights, inline and registered.
                batch = np.zeros((1, 512, 8, 8), np.float32)
                for seed in range(4):
                    spec = json.dumps(big_init_spec(2048, seed))
                    failure(stub.Extract, extract_request(batch, spec=spec))
                    failure(stub.RegisterPipeline, pb.RegisterPipelineRequest(spec_json=spec))
                # 9: big names.
                name_spec = json.dumps({**README_SPEC, "outputs": ["x" * 900_000]})
                for _ in range(4):
                    failure(stub.Extract, extract_request(images(), spec=name_spec))
                    failure(inference.ModelInfer, oip.ModelInferRequest(model_name="m" * MIB))
            client.extract(images(4, 32), README_SPEC)  # still serving
            time.sleep(2.5)
            after = rss_kib(pid)
        print(f"RSS KiB: warm {warm}, after the attack {after}")
        serving.process.send_signal(signal.SIGTERM)
        assert serving.process.wait(timeout=15) == 0
    assert after <= 1.2 * warm


# =========================================================================== issue 20: round two
#
# Against a `featmap serve` process, measured from outside through /proc/<pid>: its resident
# memory now, the peak it ever reached (VmHWM: a new peak is what an attack costs), and its CPU
# seconds; a bystander's request must succeed afterwards.

PEAK_BOUND_MB = 2500  # the whole attack set, any one server process
ZERO_SHAPE = [2**31 - 1, 2**31 - 1, 0, 2**31 - 1]  # no elements; the others overflow NumPy


def status_kib(pid: int, key: str) -> int:
    """A /proc/<pid>/status value in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerCost:
    """What a block of requests cost a server process: RSS growth, new peak, CPU seconds."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss_mb = self.peak_mb = self.cpu_s = 0.0

    def __enter__(self) -> ServerCost:
        self._rss = status_kib(self.pid, "VmRSS")
        self._peak = status_kib(self.pid, "VmHWM")
        self._cpu = cpu_seconds(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_mb = (status_kib(self.pid, "VmRSS") - self._rss) / 1024
        self.peak_mb = (status_kib(self.pid, "VmHWM") - self._peak) / 1024
        self.cpu_s = cpu_seconds(self.pid) - self._cpu
        print(f"server: RSS {self.rss_mb:+.1f} MB, new peak {self.peak_mb:+.1f} MB, "
              f"{self.cpu_s:.2f} s CPU")  # fmt: skip


class Served:
    """A warm `featmap serve` process: its pid, address, stderr, and a registered README model."""

    def __init__(
        self, serving: Any, address: str, model: str, outputs: Sequence[str] = ("conv1", "features")
    ) -> None:
        self.serving = serving
        self.pid: int = serving.process.pid
        self.address = address
        self.model = model
        self.outputs = list(outputs)

    def cost(self) -> ServerCost:
        return ServerCost(self.pid)

    def assert_serving(self) -> None:
        """The process lives; a bystander's Extract and ModelInfer succeed."""
        assert_serving(self.serving.process, self.address)
        with grpc.insecure_channel(self.address) as channel:
            reply = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(self.model, images(2, 16)), timeout=30
            )
        assert [output.name for output in reply.outputs] == self.outputs


def infer_request(model: str, batch: np.ndarray, *outputs: str) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, raw_input_contents=[batch.tobytes()])
    request.inputs.add(name="images", datatype="FP32", shape=batch.shape)
    for name in outputs:
        request.outputs.add(name=name)
    return request


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    env = clean_env(FEATMAP_INTRA_OP_THREADS="1", FEATMAP_GRPC_WORKERS="8")
    with featmap_serve("--port", "0", env=env) as serving:
        address = f"127.0.0.1:{serving.wait_listening()}"
        with FeatureClient(address, timeout=60) as client:
            client.wait_ready()
            model = client.register(README_SPEC)
            client.extract(images(2, 128), README_SPEC)  # warm: the inline spec's session too
        running = Served(serving, address, model)
        running.assert_serving()
        yield running
        peak = status_kib(running.pid, "VmHWM") / 1024
        assert peak < PEAK_BOUND_MB, f"server peak {peak:.0f} MB"


@pytest.fixture(scope="module")
def served_channel(served: Served) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.address) as channel:
        yield channel


def test_finding_20_3_repeated_oip_outputs_are_refused_before_any_reply_is_built(
    served: Served, served_channel: grpc.Channel
) -> None:
    inference = oip_grpc.GRPCInferenceServiceStub(served_channel)
    batch = images(1, 128)  # conv1 is 512 KiB of reply: 5,000 of it would be 2.6 GB
    for repeats in (5_000, 1_000, 2):
        request = infer_request(served.model, batch, "features", *["conv1"] * repeats)
        assert request.ByteSize() < 300_000
        with served.cost() as cost:
            error = failure(inference.ModelInfer, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert field_of(error) == "outputs[2].name"
        assert "repeats outputs[1].name" in error.details()
        assert cost.peak_mb < 100 and cost.rss_mb < 100
        assert cost.cpu_s < 2
    # Asked once each, in the order asked: answered.
    reply = inference.ModelInfer(infer_request(served.model, batch, "features", "conv1"))
    assert [output.name for output in reply.outputs] == ["features", "conv1"]
    assert [len(raw) for raw in reply.raw_output_contents] == [8 * 4, 8 * 128 * 128 * 4]
    served.assert_serving()


def test_finding_20_3_the_oip_reply_is_sized_by_the_outputs_asked_for() -> None:
    # conv1 of a 256x256 image is 2 MiB, features 32 bytes: a 1 MiB reply takes only features.
    with FeatmapServer(settings(max_message_bytes=MIB + 65536)) as server:
        with FeatureClient(server.address, timeout=30) as client:
            model = client.register(README_SPEC)
        with grpc.insecure_channel(server.address) as channel:
            inference = oip_grpc.GRPCInferenceServiceStub(channel)
            batch = images(1, 256)  # 768 KiB
            reply = inference.ModelInfer(infer_request(model, batch, "features"), timeout=30)
            assert [len(raw) for raw in reply.raw_output_contents] == [32]
            conv1 = 8 * 256 * 256 * 4
            # conv1, or all (the default); the reply counts its framing too.
            for outputs, size in ((("conv1",), conv1), ((), conv1 + 32)):
                error = failure(inference.ModelInfer, infer_request(model, batch, *outputs))
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                framed = reply_message_bytes(size, len(outputs) or 2)
                assert f"the reply would be {framed} bytes" in error.details()


def test_finding_20_4_zero_element_shapes_are_invalid_on_every_path(
    served: Served, served_channel: grpc.Channel, shm_server: FeatmapServer
) -> None:
    stub = pb_grpc.FeatureExtractorStub(served_channel)
    inference = oip_grpc.GRPCInferenceServiceStub(served_channel)
    weights_spec = json.dumps(
        {"input": {"channels": 3}, "layers": [{"op": "conv2d", "filters": 1, "kernel_size": 1,
         "weights": {"tensor": "w"}}]}
    )  # fmt: skip
    int8_spec = json.dumps({**README_SPEC, "precision": "int8"})
    for shape in (ZERO_SHAPE, [0, 3, 16, 16], [1, 3, 16, 0]):
        empty = pb.Tensor(dtype=pb.FLOAT32, shape=shape)
        by_id = pb.ExtractRequest(pipeline_id=served.model, images=empty)
        raw = oip.ModelInferRequest(model_name=served.model, raw_input_contents=[b""])
        raw.inputs.add(name="images", datatype="FP32", shape=shape)
        typed = oip.ModelInferRequest(model_name=served.model)
        typed.inputs.add(name="images", datatype="FP32", shape=shape, contents={})
        cases: list[tuple[str, Any, Any, str]] = [
            ("Extract inline", stub.Extract, extract_request(images=empty), "images.shape"),
            ("Extract by id", stub.Extract, by_id, "images.shape"),
            ("ExtractStream", lambda r, **kw: list(stub.ExtractStream(iter([r]), **kw)),
             extract_request(images=empty), "images.shape"),
            ("ModelInfer raw", inference.ModelInfer, raw, "inputs[0].shape"),
            ("ModelInfer typed", inference.ModelInfer, typed, "inputs[0].shape"),
            ("RegisterPipeline weights", stub.RegisterPipeline,
             pb.RegisterPipelineRequest(spec_json=weights_spec, weights={"w": empty}),
             "weights['w'].shape"),
            ("RegisterPipeline calibration", stub.RegisterPipeline,
             pb.RegisterPipelineRequest(spec_json=int8_spec, calibration=empty),
             "calibration.shape"),
        ]  # fmt: skip
        with served.cost() as cost:
            for path, call, request, field in cases:
                error = failure(call, request)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, error.details())
                assert field_of(error) == field, path
                assert "is empty: every dimension must be at least 1" in error.details(), path
        assert cost.peak_mb < 100 and cost.cpu_s < 2
    # Shared memory: the same rule, before the region is looked at.
    assert shm_server.unix_address is not None
    with grpc.insecure_channel(shm_server.unix_address) as channel:
        region = pb.SharedMemoryRef(region="r", byte_size=0, owner="o" * 32)
        request = extract_request(
            images=pb.Tensor(dtype=pb.FLOAT32, shape=ZERO_SHAPE), images_region=region
        )
        error = failure(pb_grpc.FeatureExtractorStub(channel).Extract, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == "images.shape"
    served.assert_serving()


def test_finding_20_5_names_per_pipeline_are_capped(
    served: Served, served_channel: grpc.Channel
) -> None:
    stub = pb_grpc.FeatureExtractorStub(served_channel)
    spec = json.dumps({**README_SPEC, "outputs": ["features"]})  # a pipeline of its own
    cap = stub.GetServerInfo(pb.GetServerInfoRequest()).limits.max_names_per_pipeline
    assert cap == 16
    for index in range(cap):
        stub.RegisterPipeline(pb.RegisterPipelineRequest(spec_json=spec, name=f"n{index}"))
    # The attacker's 8,000 names: the first 200 past the cap, each refused and keeping nothing.
    with served.cost() as cost:
        for index in range(cap, cap + 200):
            request = pb.RegisterPipelineRequest(spec_json=spec, name=f"n{index}")
            error = failure(stub.RegisterPipeline, request)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            assert field_of(error) == "name"
            assert "max_names_per_pipeline=16" in error.details()
    assert cost.rss_mb < 50
    # Names it has still work, and re-registering under one is still a no-op.
    pipeline_id = stub.RegisterPipeline(
        pb.RegisterPipelineRequest(spec_json=spec, name="n3")
    ).pipeline_id
    info = stub.GetPipeline(pb.GetPipelineRequest(pipeline_id="n0"))
    assert len(info.names) == cap and info.pipeline_id == pipeline_id
    listed = stub.ListPipelines(pb.ListPipelinesRequest())
    assert max(len(p.names) for p in listed.pipelines) == cap
    assert stub.DeletePipeline(pb.DeletePipelineRequest(pipeline_id="n15")).deleted
    served.assert_serving()


def test_finding_20_5_a_pipeline_id_cannot_forge_a_log_line(
    served: Served, served_channel: grpc.Channel
) -> None:
    stub = pb_grpc.FeatureExtractorStub(served_channel)
    forged = "2026-01-01 00:00:00,000 INFO featmap.requests: request 000000000000 Extract OK"
    attempts = [
        f"nope\n{forged}",
        f"nope\r\n{forged}",
        f"nope\x1b[2K\r{forged}",
        f"nope\u2028{forged}",
        "\n" * 100_000 + forged,  # shortened first: what is left is escaped too
    ]
    served.serving.stderr()  # what came before
    before = len(served.serving.seen)
    for pipeline_id in attempts:
        for call, request in (
            (stub.Extract, pb.ExtractRequest(pipeline_id=pipeline_id)),
            (stub.GetPipeline, pb.GetPipelineRequest(pipeline_id=pipeline_id)),
        ):
            assert failure(call, request).code() == grpc.StatusCode.NOT_FOUND
    stub.DeletePipeline(pb.DeletePipelineRequest(pipeline_id=attempts[0]))

    def ours(lines: list[str]) -> list[str]:
        # This test's calls; another test's late lines (a build its caller left) may interleave.
        return [line for line in lines if "pipeline=nope" in line or "pipeline=\\n" in line]

    wait_for(lambda: len(ours(served.serving.stderr().splitlines()[before:])) >= 11)
    lines = served.serving.stderr().splitlines()[before:]
    print("\n".join(lines))
    assert len(ours(lines)) == 11  # one line per call
    assert all("featmap.requests: request" in line for line in ours(lines))
    for line in lines:  # every line, ours or not: none forged, no control characters
        assert not line.startswith(forged)
        assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", line)
    for line in ours(lines):
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", line), line
        assert len(line) < 600  # ids are cut to 64 characters, escapes and all
    assert "pipeline=nope\\n2026-01-01" in ours(lines)[0]
    assert "pipeline=nope\\u001b[2K\\r2026" in "\n".join(lines)


def test_finding_20_5_the_oip_id_is_bounded_and_never_echoed_longer(
    served: Served, served_channel: grpc.Channel
) -> None:
    inference = oip_grpc.GRPCInferenceServiceStub(served_channel)
    request = infer_request(served.model, images(1, 16), "features")
    request.id = "r" * 256
    assert inference.ModelInfer(request, timeout=30).id == request.id  # at the limit: echoed
    with served.cost() as cost:
        for long_id in ("r" * 257, "é" * 129, "i" * (30 * MIB)):  # 257, 258 bytes, 30 MB
            request.id = long_id
            error = failure(inference.ModelInfer, request)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert field_of(error) == "id"
            assert "at most 256" in error.details() and len(error.details()) < 200
        time.sleep(2.5)  # quiet: the server trims its heap (service/allocator.py)
    # Receiving 30 MB costs its parse (about 4x, gone once trimmed); nothing is echoed or kept.
    assert cost.cpu_s < 2 and cost.peak_mb < 160 and cost.rss_mb < 20
    served.assert_serving()


# --------------------------------------------------------------------------- 20.1, 20.2: int8
#
# onnxruntime's int8 conv holds 8 bytes per kernel tap and output pixel (contract.ops
# INT8_CONV_BYTES_PER_TAP): every batch's estimate counts it, int8 kernels stop at 11 x 11, and
# quantizing is admitted and charged like an Extract of its images.


def int8_conv(filters: int, kernel: int, *more: dict[str, Any]) -> dict[str, Any]:
    """An int8 spec: one SAME conv of `kernel`, then `more` layers, no error threshold."""
    conv = {"op": "conv2d", "filters": filters, "kernel_size": kernel, "padding": "same",
            "weights": {"init": "he_normal", "seed": 0}}  # fmt: skip
    return {"input": {"channels": 3}, "precision": "int8", "max_error": 1.0,
            "layers": [conv, *more]}  # fmt: skip


def test_finding_20_1_a_large_int8_kernel_is_refused_before_any_work(
    served: Served, served_channel: grpc.Channel
) -> None:
    # 246 bytes that cost 13 GB and a minute of CPU: calibrating on 16 synthetic 224 x 224
    # images, whose int8 conv held 1.6 GB of pointers an image.
    request = extract_request(images(1, 16), json.dumps(int8_conv(16, 64)))
    stub = pb_grpc.FeatureExtractorStub(served_channel)
    with served.cost() as cost:
        error = failure(stub.Extract, request, timeout=3)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == "layers[0].kernel_size"
    assert "int8 convs take at most 121" in error.details()
    assert cost.peak_mb < 50 and cost.cpu_s < 1
    served.assert_serving()


def test_finding_20_1_a_caller_gone_stops_the_quantization(
    served: Served, served_channel: grpc.Channel
) -> None:
    # Six 16-filter 7 x 7 convs: ~15 s of quantizing on one thread, in ~200 MB. The caller
    # gives up after 1 s; the server stops at the next batch of images, not a minute later.
    deep = [{"op": "conv2d", "filters": 16, "kernel_size": 7, "padding": "same",
             "weights": {"init": "he_normal", "seed": seed}} for seed in range(1, 6)]  # fmt: skip
    spec = int8_conv(16, 7, *deep)
    request = extract_request(images(1, 16), json.dumps(spec))
    stub = pb_grpc.FeatureExtractorStub(served_channel)
    with served.cost() as cost:
        error = failure(stub.Extract, request, timeout=1)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(8)  # the batch in progress ends; nothing after it starts
        with served.cost() as after:
            time.sleep(2)
    assert after.cpu_s < 0.5, f"still quantizing: {after.cpu_s:.2f} s CPU in 2 s"
    assert cost.peak_mb < PEAK_BOUND_MB
    served.assert_serving()


# The largest int8 kernel, pooled to 16 numbers an image: replies stay small at any size.
POOLED_INT8 = int8_conv(16, 11, {"op": "global_avg_pool2d", "name": "features"})


def test_finding_20_1_a_caller_gone_stops_its_run(
    served: Served, served_channel: grpc.Channel
) -> None:
    # 4 x 10^11 FLOPs, several seconds on the server's one thread: the caller waits 1 s. The
    # run serves that caller alone, so onnxruntime is told to stop (RunOptions.terminate).
    convs = [{"op": "conv2d", "filters": 64, "kernel_size": 3, "padding": "same",
              "weights": {"init": "he_normal", "seed": seed}} for seed in range(6)]  # fmt: skip
    spec = {"input": {"channels": 3}, "layers": [*convs, {"op": "global_avg_pool2d"}]}
    request = extract_request(images(4, 512), json.dumps(spec))
    stub = pb_grpc.FeatureExtractorStub(served_channel)
    with served.cost() as cost:
        error = failure(stub.Extract, request, timeout=1)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.5)  # onnxruntime checks the flag between nodes
        with served.cost() as after:
            time.sleep(2)
    assert after.cpu_s < 0.5, f"still running: {after.cpu_s:.2f} s CPU in 2 s"
    assert cost.peak_mb < PEAK_BOUND_MB
    served.assert_serving()


@pytest.fixture(scope="module")
def int8_served() -> Iterator[Served]:
    """A server whose runs in flight may hold 1.5 GiB, with a 6 x 10^10 FLOPs request limit;
    its model is an int8 3 -> 16 conv of 11 x 11 (the largest int8 kernel)."""
    env = clean_env(
        FEATMAP_INTRA_OP_THREADS="1",
        FEATMAP_GRPC_WORKERS="8",
        FEATMAP_RUN_BYTES=str(1536 * MIB),
        FEATMAP_MAX_FLOPS=str(6 * 10**10),
    )
    with featmap_serve("--port", "0", env=env) as serving:
        address = f"127.0.0.1:{serving.wait_listening()}"
        with FeatureClient(address, timeout=120) as client:
            client.wait_ready()
            model = client.register(POOLED_INT8, calibration=images(16, 64))
            client.extract(images(1, 64), model)
        running = Served(serving, address, model, outputs=["features"])
        yield running
        peak = status_kib(running.pid, "VmHWM") / 1024
        assert peak < PEAK_BOUND_MB, f"server peak {peak:.0f} MB"


def test_finding_20_1_quantizing_is_admitted_like_an_extract_of_its_images(
    int8_served: Served,
) -> None:
    # One 16 x 16 image is 1.2 x 10^7 FLOPs; quantizing on the synthetic 224 x 224 images is
    # 48 image passes of 2.3 x 10^9, over max_flops: refused before any of it runs.
    request = extract_request(images(1, 16), json.dumps(int8_conv(64, 11)))
    with grpc.insecure_channel(int8_served.address) as channel:
        stub = pb_grpc.FeatureExtractorStub(channel)
        with int8_served.cost() as cost:
            error = failure(stub.Extract, request, timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert field_of(error) == "layers"
    assert "quantizing this int8 pipeline on the synthetic images needs" in error.details()
    assert cost.peak_mb < 50 and cost.cpu_s < 1
    int8_served.assert_serving()


BIG_MESSAGES = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def by_id(array: np.ndarray, model: str) -> pb.ExtractRequest:
    """An Extract of `array` by a registered pipeline's id."""
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=array.shape, data=array.tobytes())
    return pb.ExtractRequest(pipeline_id=model, images=tensor)


def test_finding_20_2_int8_runs_are_charged_their_conv_workspace(int8_served: Served) -> None:
    # 1024 x 1024 (a 12 MiB request): 1.0 GB of int8 conv workspace and 80 MB of activations,
    # admitted; 2048 x 2048 would be 4.4 GB: refused naming run_bytes, before it is allocated.
    with grpc.insecure_channel(int8_served.address, options=BIG_MESSAGES) as channel:
        stub = pb_grpc.FeatureExtractorStub(channel)
        big = images(1, 1024)
        with int8_served.cost() as cost:
            reply = stub.Extract(by_id(big, int8_served.model), timeout=120)
        assert reply.outputs["features"].shape == [1, 16, 1, 1]
        estimate = batch_cost(parse_pipeline(POOLED_INT8), 1, 1024, 1024, 4)
        assert estimate.workspace_bytes == 1024**2 * 121 * 8
        print(f"estimated {estimate.memory_bytes / MIB:.0f} MB")
        assert estimate.memory_bytes / MIB / 1.5 <= cost.peak_mb <= estimate.memory_bytes / MIB
        huge = by_id(images(1, 2048), int8_served.model)
        with int8_served.cost() as cost:
            error = failure(stub.Extract, huge, timeout=60)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert field_of(error) == "images.shape" and "run_bytes" in error.details()
        assert cost.peak_mb < 250  # the 50 MB request itself, parsed
        # Two callers at once: one runs, the other is told to retry (Busy), never both.
        results: list[Any] = []

        def call() -> None:
            try:
                results.append(stub.Extract(by_id(big, int8_served.model)))
            except grpc.RpcError as exc:
                results.append(exc)

        with int8_served.cost() as cost:
            callers = [threading.Thread(target=call) for _ in range(2)]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join(timeout=120)
        refused = [r for r in results if isinstance(r, grpc.RpcError)]
        assert len(results) == 2 and len(refused) <= 1
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(error.trailing_metadata())["featmap-retryable"] == "1"
    int8_served.assert_serving()
