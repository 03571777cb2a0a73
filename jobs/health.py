"""`featmap health`: ask a server's standard grpc.health.v1 service, as Docker HEALTHCHECK does."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..client.channel import ChannelSecurity

SERVING_EXIT = 0
NOT_SERVING_EXIT = 1
UNREACHABLE_EXIT = 2


@dataclass(frozen=True)
class HealthResult:
    """The exit status `featmap health` ends with, and the line it prints."""

    exit_code: int
    message: str


def check_health(
    address: str,
    service: str = "",
    timeout: float = 5.0,
    security: ChannelSecurity | None = None,
    wait: float = 0.0,
) -> HealthResult:
    """Health.Check: 0 SERVING, 1 any other answer, 2 when the server cannot be reached.

    With `wait` > 0, asks again (every 0.1 s, a little more each time) until SERVING or until
    `wait` seconds have passed, and reports the last answer: for scripts that start a server
    and must not race it.
    """
    deadline = time.monotonic() + wait
    pause = 0.1
    while True:
        result = _check_once(address, service, timeout, security)
        left = deadline - time.monotonic()
        if result.exit_code == SERVING_EXIT or left <= 0:
            return result
        time.sleep(min(pause, left))
        pause = min(1.0, pause * 1.5)


def _check_once(
    address: str, service: str, timeout: float, security: ChannelSecurity | None
) -> HealthResult:
    with (security or ChannelSecurity()).channel(address, []) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # No wait_for_ready: a refused connection fails at once instead of retrying until
            # the timeout, so a dead container is reported within Docker's check interval.
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            if code == grpc.StatusCode.NOT_FOUND:
                return HealthResult(
                    NOT_SERVING_EXIT, f"{address}: service {service!r} is unknown to the server"
                )
            return HealthResult(
                UNREACHABLE_EXIT, f"{address}: cannot reach the server ({code.name}: {details})"
            )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    label = f"service {service!r}" if service else "server"
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return HealthResult(SERVING_EXIT, f"{address}: {label} SERVING")
    return HealthResult(NOT_SERVING_EXIT, f"{address}: {label} {status}")
