"""Graceful shutdown of a real `featmap serve`: SIGTERM while requests are in flight."""

from __future__ import annotations

import contextlib
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from featmap.client import FeatureClient
from featmap.client.client import FeatmapRpcError
from featmap.contract.spec import parse_pipeline
from tests.conftest import assert_matches_reference
from tests.test_cli import clean_env, featmap_serve

# About 3 GFLOPs a request: 16 of them sharing the CPU are still running when SIGTERM comes.
SLOW_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {
            "op": "conv2d",
            "filters": 32,
            "kernel_size": 7,
            "padding": "same",
            "weights": {"init": "he_normal", "seed": 1},
        },
        {"op": "relu"},
        {
            "op": "conv2d",
            "filters": 32,
            "kernel_size": 5,
            "padding": "same",
            "weights": {"init": "he_normal", "seed": 2},
        },
        {"op": "global_avg_pool2d", "name": "features"},
    ],
}
REQUESTS = 16


def health_goes_down(address: str, within_s: float = 10.0) -> bool:
    """True once health says NOT_SERVING or the server refuses new calls with UNAVAILABLE."""
    deadline = time.monotonic() + within_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # 16 sessions busy on every core can starve the server for a while
                return bool(code == grpc.StatusCode.UNAVAILABLE)
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return True
            time.sleep(0.005)  # the signal handler has not run yet
    return False


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones() -> None:
    pipeline = parse_pipeline(SLOW_SPEC)
    images = np.random.default_rng(0).standard_normal((2, 3, 160, 160)).astype(np.float32)
    env = clean_env(FEATMAP_BATCHING="false", FEATMAP_SHUTDOWN_GRACE_S="30")
    with featmap_serve("--port", "0", env=env) as serving:
        port = serving.wait_listening()
        address = f"127.0.0.1:{port}"
        with FeatureClient(address, timeout=60, retries=0) as client:
            client.wait_ready()
            client.extract(images, SLOW_SPEC)  # compiled and warm before the race starts

            def one() -> dict[str, np.ndarray] | FeatmapRpcError:
                try:
                    return client.extract(images, SLOW_SPEC)
                except FeatmapRpcError as exc:
                    return exc

            with ThreadPoolExecutor(REQUESTS) as pool:
                futures = [pool.submit(one) for _ in range(REQUESTS)]
                wait(futures, timeout=60, return_when=FIRST_COMPLETED)
                assert not all(f.done() for f in futures), "too fast to test: all done already"
                serving.process.send_signal(signal.SIGTERM)
                assert health_goes_down(address)
                results = [f.result(timeout=60) for f in futures]
            assert serving.process.wait(timeout=30) == 0, serving.stderr()
    completed = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, FeatmapRpcError)]
    assert completed, "SIGTERM came before any request was accepted"
    for error in refused:
        assert error.code == grpc.StatusCode.UNAVAILABLE, error  # never CANCELLED or INTERNAL
    for outputs in completed[:1]:
        assert_matches_reference(outputs, pipeline, images)
    for outputs in completed[1:]:  # the same images: bit-identical to the checked one
        for name, array in outputs.items():
            np.testing.assert_array_equal(array, completed[0][name])
    log = serving.stderr()
    assert "received SIGTERM" in log and "stopped" in log


# Many layers of modest cost: onnxruntime checks RunOptions.terminate between nodes, so a
# terminated run ends within one layer (well under a second), while a whole call takes ~10 s.
LONG_SPEC: dict[str, Any] = {
    "input": {"channels": 16},
    "layers": [
        *(
            {
                "op": "conv2d",
                "filters": 32,
                "kernel_size": 3,
                "padding": "same",
                "weights": {"init": "glorot_normal", "seed": seed},
            }
            for seed in range(60)
        ),
        {"op": "global_avg_pool2d", "name": "features"},
    ],
}
GRACE_S = 1.0


def test_calls_longer_than_the_grace_are_stopped_answered_and_counted() -> None:
    images = np.random.default_rng(0).standard_normal((8, 16, 256, 256)).astype(np.float32)
    env = clean_env(
        FEATMAP_BATCHING="false",
        FEATMAP_SHUTDOWN_GRACE_S=str(GRACE_S),
        FEATMAP_INTRA_OP_THREADS="1",
    )
    with featmap_serve("--port", "0", env=env) as serving:
        address = f"127.0.0.1:{serving.wait_listening()}"
        with FeatureClient(address, timeout=120, retries=0) as client:
            client.wait_ready()
            client.extract(images[:1, :, :8, :8], LONG_SPEC)  # compiled before the race

            def one() -> dict[str, np.ndarray] | FeatmapRpcError:
                try:
                    return client.extract(images, LONG_SPEC)
                except FeatmapRpcError as exc:
                    return exc

            with ThreadPoolExecutor(2) as pool:
                started = time.monotonic()
                futures = [pool.submit(one) for _ in range(2)]
                time.sleep(1.0)  # both are inside onnxruntime now
                assert not any(f.done() for f in futures), "the calls are too fast to test"
                signalled = time.monotonic()
                serving.process.send_signal(signal.SIGTERM)
                results = [f.result(timeout=60) for f in futures]
                answered = time.monotonic() - signalled
            code = serving.process.wait(timeout=30)
            exited = time.monotonic() - signalled
    assert code == 0, serving.stderr()
    for result in results:
        assert isinstance(result, FeatmapRpcError), "a call outlasting the grace completed"
        assert result.code == grpc.StatusCode.UNAVAILABLE, result
    assert answered < GRACE_S + 2, f"callers waited {answered:.1f} s after SIGTERM"
    assert exited < GRACE_S + 2, f"the process exited {exited:.1f} s after SIGTERM"
    assert time.monotonic() - started < 30
    log = serving.stderr()
    # Logged and counted as what the callers got, never as OK.
    assert log.count("Extract UNAVAILABLE") == 2, log
    assert "Extract OK" not in log.split("received SIGTERM")[1]
    assert "stopped 2 onnxruntime runs" in log


def test_health_says_not_serving_while_draining_never_cancelled() -> None:
    # Every handler thread busy with a slow Extract, a grace shorter than the load: health
    # checks sent meanwhile queue behind them, and must be answered NOT_SERVING (or refused
    # UNAVAILABLE once the server is gone), never cancelled when the server stops.
    from featmap.service.server import FeatmapServer
    from tests.test_hardening import settings

    images = np.random.default_rng(0).standard_normal((2, 3, 160, 160)).astype(np.float32)
    server = FeatmapServer(
        settings(grpc_workers=2, batching=False, shutdown_grace_s=0.3, max_queued_requests=64)
    ).start()
    with FeatureClient(server.address, timeout=60, retries=0) as client:
        client.extract(images, SLOW_SPEC)  # compiled and warm
    codes: list[Any] = []

    def check() -> None:
        with grpc.insecure_channel(server.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=20
                )
                codes.append(reply.status)
            except grpc.RpcError as exc:
                codes.append(exc.code())  # type: ignore[attr-defined]
                if exc.code() == grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                    print("cancelled:", exc.details())  # type: ignore[attr-defined]

    def extract() -> None:
        # UNAVAILABLE once the server drains: that is the point.
        with (
            FeatureClient(server.address, timeout=60, retries=0) as client,
            contextlib.suppress(FeatmapRpcError),
        ):
            client.extract(images, SLOW_SPEC)

    with ThreadPoolExecutor(32) as pool:
        loads = [pool.submit(extract) for _ in range(12)]
        time.sleep(0.3)  # both handler threads are computing
        stopping = pool.submit(server.stop)
        checks = []
        for _ in range(48):  # through the grace and the stop
            checks.append(pool.submit(check))
            time.sleep(0.01)
        wait([*loads, stopping, *checks], timeout=60)
    allowed = {health_pb2.HealthCheckResponse.NOT_SERVING, grpc.StatusCode.UNAVAILABLE}
    assert len(codes) == 48 and set(codes) <= allowed, codes
