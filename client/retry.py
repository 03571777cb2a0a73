"""Retrying calls the server refused for now: busy (RESOURCE_EXHAUSTED, marked) or UNAVAILABLE."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc

RETRYABLE_METADATA_KEY = "featmap-retryable"  # as featmap.service.admission sets it
BASE_DELAY_S = 0.05
MAX_DELAY_S = 2.0

Result = TypeVar("Result")
# gRPC's own retry policy (the channel's service config). It resends a call that failed with
# UNAVAILABLE before the server answered, picking again, so under round robin the retry goes
# to another replica. Extract has no side effects and RegisterPipeline is content-addressed, so
# a call that met a server going away is safe to resend. gRPC keeps only 256 KiB of a call for
# resending (grpc.per_rpc_retry_buffer_size) and commits larger ones at once: for image batches
# the client's own retries (call_with_retries) are what resends them.
RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "featmap.v1.FeatureExtractor"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def retry_channel_options(round_robin: bool) -> list[tuple[str, Any]]:
    """Channel options for gRPC's retries of UNAVAILABLE, and round robin over the addresses."""
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)),
    ]
    if round_robin:
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


def is_retryable(error: grpc.RpcError) -> bool:
    """True for UNAVAILABLE, and for RESOURCE_EXHAUSTED that the server marked as busy.

    Other RESOURCE_EXHAUSTED (a message or a limit too big) fails again unchanged, as does
    every other code, so those are not retried.
    """
    call: Any = error
    code = call.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    trailers = dict(call.trailing_metadata() or ())
    return bool(trailers.get(RETRYABLE_METADATA_KEY) == "1")


def backoff_delays(retries: int, rng: random.Random | None = None) -> Iterator[float]:
    """`retries` delays: full-jitter exponential backoff, base 50 ms, capped at 2 s."""
    draw = (rng or random).uniform
    for attempt in range(retries):
        yield draw(0, min(MAX_DELAY_S, BASE_DELAY_S * 2**attempt))


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def call_with_retries(
    attempt: Callable[[float | None], Result], retries: int, timeout: float | None
) -> Result:
    """attempt(timeout_left) until it succeeds, fails for good, or retries/time run out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delays = backoff_delays(retries)
    while True:
        try:
            return attempt(_remaining(deadline))
        except grpc.RpcError as exc:
            delay = next(delays, None) if is_retryable(exc) else None
            left = _remaining(deadline)
            if delay is None or (left is not None and left <= delay):
                raise
        time.sleep(delay)


async def call_with_retries_async(
    attempt: Callable[[float | None], Awaitable[Result]], retries: int, timeout: float | None
) -> Result:
    """As call_with_retries, for grpc.aio calls."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delays = backoff_delays(retries)
    while True:
        try:
            return await attempt(_remaining(deadline))
        except grpc.RpcError as exc:  # grpc.aio.AioRpcError is one
            delay = next(delays, None) if is_retryable(exc) else None
            left = _remaining(deadline)
            if delay is None or (left is not None and left <= delay):
                raise
        await asyncio.sleep(delay)
