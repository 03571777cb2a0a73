"""Retrying calls the server refused for now: busy (RESOURCE_EXHAUSTED, marked) or UNAVAILABLE."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..contract.metadata import RETRYABLE_KEY
from .protocol import Call, Pause, Steps

BASE_DELAY_S = 0.05
MAX_DELAY_S = 2.0


def balancing_options() -> list[tuple[str, Any]]:
    """Channel options that spread calls over every address a target resolves to.

    Retries are the client's own (with_retries), in that one layer: gRPC's retry policy
    would retry inside them (a dead address then took seconds to report), and it keeps only
    256 KiB of a call for resending, so it could not resend image batches anyway. A retry on a
    round-robin channel goes to the next ready replica.
    """
    return [("grpc.lb_policy_name", "round_robin")]


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
    return bool(trailers.get(RETRYABLE_KEY) == "1")


def backoff_delays(retries: int, rng: random.Random | None = None) -> Iterator[float]:
    """`retries` delays: full-jitter exponential backoff, base 50 ms, capped at 2 s."""
    draw = (rng or random).uniform
    for attempt in range(retries):
        yield draw(0, min(MAX_DELAY_S, BASE_DELAY_S * 2**attempt))


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def with_retries(
    method: Callable[..., Any], request: Any, retries: int, timeout: float | None
) -> Steps[Any]:
    """Call method(request, timeout=time left) until it succeeds, fails for good, or retries or
    time run out, pausing with backoff_delays in between (an exchange: see protocol.py)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delays = backoff_delays(retries)
    while True:
        try:
            return (yield Call(method, request, _remaining(deadline)))
        except grpc.RpcError as exc:  # grpc.aio.AioRpcError is one
            delay = next(delays, None) if is_retryable(exc) else None
            left = _remaining(deadline)
            if delay is None or (left is not None and left <= delay):
                raise
        yield Pause(delay)
