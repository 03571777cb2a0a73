"""Production hardening: cost limits, non-finite input, backpressure, deadlines, failures."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from featmap.client import AsyncFeatureClient, FeatureClient
from featmap.client.client import FeatmapRpcError, extract_methods, request_for
from featmap.client.retry import backoff_delays, is_retryable
from featmap.contract.errors import LimitExceeded
from featmap.contract.limits import RequestLimits, admit_batch, admit_pipeline
from featmap.contract.ops import batch_cost
from featmap.contract.spec import (
    Pipeline,
    parse_pipeline,
)
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from tests.conftest import README_SPEC, assert_matches_reference


def normal(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def spec(*layers: dict[str, Any], channels: int = 3, **input_fields: Any) -> dict[str, Any]:
    return {"input": {"channels": channels, **input_fields}, "layers": list(layers)}


def conv(filters: int, kernel_size: Any, **fields: Any) -> dict[str, Any]:
    return {
        "op": "conv2d",
        "filters": filters,
        "kernel_size": kernel_size,
        "weights": {"init": "he_normal", "seed": 0},
        **fields,
    }


# --------------------------------------------------------------------------- the arithmetic


def test_cost_of_the_readme_pipeline(readme_pipeline: Pipeline) -> None:
    # (2, 3, 16, 16) -> conv 8x3x3 same (2, 8, 16, 16) -> relu -> max pool 2 (2, 8, 8, 8) -> gap
    cost = batch_cost(readme_pipeline, 2, 16, 16, input_itemsize=4)
    conv_flops = 2 * 2 * 16 * 16 * 8 * 3 * 3 * 3  # 221184: a multiply and an add per tap
    relu_flops = 2 * 8 * 16 * 16  # 4096: one per element
    pool_flops = 2 * 8 * 8 * 8 * 2 * 2  # 4096: one per window element
    gap_flops = 2 * 8 * 8 * 8  # 1024: one per input element
    assert cost.flops == conv_flops + relu_flops + pool_flops + gap_flops == 230400
    # outputs in bytes: conv 16384, relu 16384, pool 4096, gap 64; the largest pair is 32768
    input_bytes = 4 * 2 * 3 * 16 * 16  # 6144
    assert cost.activation_bytes == input_bytes + 16384 + 16384 == 38912


def test_cost_of_a_grouped_strided_conv() -> None:
    pipeline = parse_pipeline(spec(conv(4, [3, 1], stride=2, groups=2), channels=4, dtype="uint8"))
    # (1, 4, 8, 8) -> (1, 4, 3, 4): floor((8 - 3) / 2) + 1 = 3, floor((8 - 1) / 2) + 1 = 4
    cost = batch_cost(pipeline, 1, 8, 8, input_itemsize=1)
    assert cost.flops == 2 * 1 * 3 * 4 * 4 * (4 // 2) * 3 * 1 == 576
    # one layer, so no pair: uint8 input 256 bytes + float32 output 4 * 48
    assert cost.activation_bytes == 256 + 192 == 448


def test_kernel_size_limit_names_the_layer_and_axis() -> None:
    pipeline = parse_pipeline(spec(conv(2, [3, 9]), {"op": "max_pool2d", "pool_size": 8}))
    admit_pipeline(pipeline, RequestLimits(max_kernel_size=9))
    with pytest.raises(LimitExceeded, match=r"kernel_size=\[3, 9\] exceeds max_kernel_size=8"):
        admit_pipeline(pipeline, RequestLimits(max_kernel_size=8))
    pool = parse_pipeline(spec({"op": "avg_pool2d", "pool_size": [2, 12]}))
    with pytest.raises(LimitExceeded) as failure:
        admit_pipeline(pool, RequestLimits(max_kernel_size=8))
    assert failure.value.field == "layers[0].pool_size"


def test_cost_limits_at_the_limit_pass() -> None:
    # (1, 1, 2, 2) -> conv 1x1, one filter: 2 * 4 outputs * 1 tap = 8 FLOPs; activations are
    # the float32 input (16 bytes) plus the one layer's output (16 bytes) = 32
    pipeline = parse_pipeline(spec(conv(1, 1), channels=1))
    images = np.ones((1, 1, 2, 2), dtype=np.float32)
    plan = admit_batch(pipeline, images, RequestLimits(max_flops=8, max_activation_bytes=32))
    assert (plan.cost.flops, plan.cost.activation_bytes) == (8, 32)
    with pytest.raises(LimitExceeded, match="8 FLOPs, over max_flops=7"):
        admit_batch(pipeline, images, RequestLimits(max_flops=7))
    with pytest.raises(LimitExceeded, match="32 bytes of activations"):
        admit_batch(pipeline, images, RequestLimits(max_activation_bytes=31))


# --------------------------------------------------------------------------- tight limits


def settings(**overrides: Any) -> ServerSettings:
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "intra_op_threads": 1,
        "grpc_workers": 4,
        **overrides,
    }
    return ServerSettings(**fields)


@pytest.fixture(scope="module")
def tight() -> Iterator[FeatmapServer]:
    """A server with small kernel, FLOPs and activation limits."""
    limits = settings(max_kernel_size=5, max_flops=1_000_000, max_activation_bytes=1_000_000)
    with FeatmapServer(limits) as running:
        yield running


NAN_IMAGES = normal(2, 3, 16, 16)
NAN_IMAGES[1, 0, 2, 3] = np.nan

# (what, images, spec, status, field)
BAD: list[tuple[str, np.ndarray, Any, grpc.StatusCode, str]] = [
    # README pipeline: 230400 FLOPs per 2 images of 16x16, so 8 of 32x32 need 16x that
    (
        "flops",
        normal(8, 3, 32, 32),
        README_SPEC,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "images.shape",
    ),
    # relu alone: 196608 FLOPs, but input + output = 8 * 196608 bytes
    (
        "activations",
        normal(1, 3, 256, 256),
        spec({"op": "relu"}),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "images.shape",
    ),
    (
        "conv kernel",
        normal(1, 3, 16, 16),
        spec({"op": "relu"}, conv(2, [1, 7])),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "layers[1].kernel_size",
    ),
    (
        "pool window",
        normal(1, 3, 16, 16),
        spec({"op": "max_pool2d", "pool_size": 6}),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "layers[0].pool_size",
    ),
    (
        "unknown pipeline id",
        normal(1, 3, 16, 16),
        "0" * 32,
        grpc.StatusCode.NOT_FOUND,
        "pipeline_id",
    ),
    ("nan input", NAN_IMAGES, README_SPEC, grpc.StatusCode.INVALID_ARGUMENT, "images.data"),
]


@pytest.mark.parametrize(
    ("images", "pipeline", "code", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_request(
    tight: FeatmapServer, images: np.ndarray, pipeline: Any, code: grpc.StatusCode, field: str
) -> None:
    with (
        FeatureClient(tight.address, timeout=30) as client,
        pytest.raises(FeatmapRpcError) as failure,
    ):
        client.extract(images, pipeline)
    assert failure.value.code == code, failure.value
    assert failure.value.field == field, failure.value
    assert failure.value.details.startswith(field)


def test_register_refuses_a_kernel_over_the_limit(tight: FeatmapServer) -> None:
    with FeatureClient(tight.address, timeout=30) as client, pytest.raises(FeatmapRpcError) as e:
        client.register(spec(conv(2, 3), conv(2, [9, 1])))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.field == "layers[1].kernel_size"


def test_async_client_retries_a_busy_server(readme_pipeline: Pipeline) -> None:
    images = normal(2, 3, 16, 16)

    async def extract(address: str) -> dict[str, np.ndarray]:
        async with AsyncFeatureClient(address, timeout=30, retries=8) as client:
            return await client.extract(images, README_SPEC)

    with FeatmapServer(settings(max_queued_requests=1, batching=False)) as server:
        held = Held(server)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(raw_extract, server.address, images)
            assert held.entered.acquire(timeout=10)
            retried = pool.submit(asyncio.run, extract(server.address))
            deadline = time.monotonic() + 10
            while not server.admission.refused and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.admission.refused >= 1  # refused at least once while held
            held.release.set()
            assert_matches_reference(retried.result(timeout=30), readme_pipeline, images)
            first.result(timeout=30)


def test_limits_are_listed(tight: FeatmapServer) -> None:
    with FeatureClient(tight.address, timeout=30) as client:
        limits = client.server_info().limits
    assert limits["max_kernel_size"] == 5
    assert limits["max_flops"] == limits["max_activation_bytes"] == 1_000_000
    assert limits["max_queued_requests"] == 16  # 4 x grpc_workers


def test_good_request_after_the_bad_ones(tight: FeatmapServer, readme_pipeline: Pipeline) -> None:
    images = normal(2, 3, 16, 16, seed=1)
    with FeatureClient(tight.address, timeout=30) as client:
        for _, bad_images, pipeline, _, _ in BAD:
            with pytest.raises(FeatmapRpcError):
                client.extract(bad_images, pipeline)
        assert_matches_reference(client.extract(images, README_SPEC), readme_pipeline, images)


# Cheap arithmetic, wide activations: 96 channels of 28x28 from a 1x1 conv, then a 7x7 pool.
WIDE_SPEC = spec(conv(96, 1), {"op": "avg_pool2d", "pool_size": 7, "name": "features"}, channels=1)


@pytest.mark.parametrize("batching", [True, False])
def test_a_request_run_in_pieces_is_charged_a_piece_and_its_outputs(batching: bool) -> None:
    wide = parse_pipeline(WIDE_SPEC)
    images = normal(512, 1, 28, 28)
    whole = batch_cost(wide, 512, 28, 28, input_itemsize=4).memory_bytes
    piece = batch_cost(wide, 32, 28, 28, input_itemsize=4).memory_bytes  # max_batch_size
    outputs = 512 * 96 * 4 * 4 * 4  # (96, 4, 4) float32 an image
    run_bytes = 64 * 2**20
    assert piece + 2 * outputs < run_bytes < whole  # 16 MB and 159 MB
    with (
        FeatmapServer(settings(batching=batching, run_bytes=run_bytes)) as server,
        FeatureClient(server.address, timeout=60) as client,
    ):
        if batching:  # the batcher runs 16 pieces of 32: admitted
            got = client.extract(images, WIDE_SPEC)
            assert_matches_reference(got, wide, images)
        else:  # one run of all 512: over run_bytes for good, not Busy
            with pytest.raises(FeatmapRpcError) as refused:
                client.extract(images, WIDE_SPEC)
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "run_bytes" in str(refused.value) and f"{whole} bytes" in str(refused.value)
        assert server.service.extractor.runs.in_flight == 0


# --------------------------------------------------------------------------- non-finite input


def test_non_finite_input_allowed_when_configured() -> None:
    with (
        FeatmapServer(settings(allow_non_finite_input=True)) as server,
        FeatureClient(server.address, timeout=30) as client,
    ):
        assert client.server_info().limits["allow_non_finite_input"] is True
        for dtype in ("float32", "float16"):
            outputs = client.extract(NAN_IMAGES, README_SPEC, output_dtype=dtype)
            assert np.isnan(outputs["features"][1]).any()
            assert np.isfinite(outputs["features"][0]).all()  # the other image is unharmed


# --------------------------------------------------------------------------- backpressure


class Held:
    """Holds every Extract of a server inside `point` until released; counts the calls."""

    def __init__(self, server: FeatmapServer, point: str = "run") -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = 0
        # "run": the dynamic batcher, which every admitted batch passes right before onnxruntime
        owner: Any = server.service.batcher if point == "run" else server.service.cache
        method = "run" if point == "run" else "get"
        original: Callable[..., Any] = getattr(owner, method)

        def held(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.entered.release()
            assert self.release.wait(timeout=30)
            return original(*args, **kwargs)

        setattr(owner, method, held)


def raw_extract(address: str, images: np.ndarray, timeout: float = 30) -> Any:
    """One Extract without the client's retries: the server's first answer."""
    with grpc.insecure_channel(address) as channel:
        extract, _ = extract_methods(channel)
        return extract(request_for(images, README_SPEC, "float32"), timeout=timeout)


def test_busy_server_refuses_at_once_and_client_retries(readme_pipeline: Pipeline) -> None:
    images = normal(2, 3, 16, 16)
    with FeatmapServer(settings(max_queued_requests=1, batching=False)) as server:
        held = Held(server)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(raw_extract, server.address, images)
            assert held.entered.acquire(timeout=10)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                raw_extract(server.address, images)
            error: Any = refused.value
            assert time.monotonic() - started < 2.0  # at once, not after the first finishes
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server busy" in error.details()
            assert is_retryable(error)
            with FeatureClient(server.address, timeout=30, retries=8) as client:
                retried = pool.submit(client.extract, images, README_SPEC)
                deadline = time.monotonic() + 10
                while server.admission.refused < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)  # until the client has been refused once
                held.release.set()
                assert_matches_reference(retried.result(timeout=30), readme_pipeline, images)
            first.result(timeout=30)
        assert server.admission.refused >= 2  # the raw call and at least one client attempt
        assert server.admission.in_flight == 0


def test_client_does_not_retry_invalid_or_over_limit() -> None:
    limits = settings(max_flops=1_000_000)
    with FeatmapServer(limits) as server:
        seen = []
        original = server.service.extract

        def counting(*args: Any, **kwargs: Any) -> Any:
            seen.append(1)
            return original(*args, **kwargs)

        server.service.extract = counting  # type: ignore[method-assign]
        with FeatureClient(server.address, timeout=30, retries=5) as client:
            with pytest.raises(FeatmapRpcError) as invalid:
                client.extract(NAN_IMAGES, README_SPEC)
            assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert len(seen) == 1
            with pytest.raises(FeatmapRpcError) as over:
                client.extract(normal(8, 3, 32, 32), README_SPEC)
            assert over.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(seen) == 2


def test_client_retries_unavailable_then_gives_up() -> None:
    with FeatureClient("127.0.0.1:1", timeout=30, retries=2) as client:
        started = time.monotonic()
        with pytest.raises(FeatmapRpcError) as failure:
            client.server_info()
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 10


def test_backoff_is_jittered_exponential_and_capped() -> None:
    import random

    delays = list(backoff_delays(8, random.Random(0)))
    assert len(delays) == 8
    caps = [min(2.0, 0.05 * 2**i) for i in range(8)]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert caps[-1] == 2.0


# --------------------------------------------------------------------------- deadlines


def test_expired_request_is_dropped_before_running(readme_pipeline: Pipeline) -> None:
    images = normal(2, 3, 16, 16)
    with FeatmapServer(settings(batching=False)) as server:
        held = Held(server, point="cache")
        runs = []
        original_run = server.service.batcher.run

        def counting_run(*args: Any, **kwargs: Any) -> Any:
            runs.append(1)
            return original_run(*args, **kwargs)

        server.service.batcher.run = counting_run  # type: ignore[method-assign]
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(raw_extract, server.address, images)
            assert held.entered.acquire(timeout=10)
            with pytest.raises(grpc.RpcError) as late:
                raw_extract(server.address, images, timeout=0.3)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            held.release.set()
            first.result(timeout=30)
        deadline = time.monotonic() + 10
        while server.admission.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.admission.in_flight == 0
        assert len(runs) == 1  # the late one never reached onnxruntime
        with FeatureClient(server.address, timeout=30) as client:
            assert_matches_reference(client.extract(images, README_SPEC), readme_pipeline, images)


# --------------------------------------------------------------------------- onnxruntime failures


def test_run_failure_is_internal_with_request_id_and_does_not_poison_the_cache(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, readme_pipeline: Pipeline
) -> None:
    images = normal(2, 3, 16, 16)
    original = ort.InferenceSession.run
    failures = [RuntimeError("injected failure")]

    def failing_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", failing_once)
    with (
        FeatmapServer(settings(batching=False)) as server,
        FeatureClient(server.address, timeout=30, retries=0) as client,
    ):
        with caplog.at_level(logging.ERROR, logger="featmap"), pytest.raises(FeatmapRpcError) as e:
            client.extract(images, README_SPEC)
        assert e.value.code == grpc.StatusCode.INTERNAL
        assert "injected failure" in e.value.details
        request_id = e.value.details.rsplit("request id ", 1)[1].rstrip(")")
        assert len(request_id) == 12
        assert any(request_id in record.getMessage() for record in caplog.records)
        assert_matches_reference(client.extract(images, README_SPEC), readme_pipeline, images)


def test_build_failure_does_not_poison_the_cache(
    monkeypatch: pytest.MonkeyPatch, readme_pipeline: Pipeline
) -> None:
    images = normal(2, 3, 16, 16)
    original = ort.InferenceSession.__init__
    failures = [RuntimeError("injected build failure")]

    def failing_once(self: Any, *args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        original(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", failing_once)
    with (
        FeatmapServer(settings(batching=False)) as server,
        FeatureClient(server.address, timeout=30, retries=0) as client,
    ):
        with pytest.raises(FeatmapRpcError) as failure:
            client.extract(images, README_SPEC)
        assert failure.value.code == grpc.StatusCode.INTERNAL
        assert "request id" in failure.value.details
        assert_matches_reference(client.extract(images, README_SPEC), readme_pipeline, images)
