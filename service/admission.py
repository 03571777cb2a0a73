"""Backpressure: bounds on calls admitted at once, refused at once beyond them.

Two gates, so that neither kind of call can starve the other: unary Extract (and OIP
ModelInfer) calls count against `max_queued_requests`, ExtractStream calls against `max_streams`.
A stream holds a handler thread for its whole life, so `max_streams` stays below the number of
handler threads: however many streams sit idle, threads are left for unary calls.

A call counts from the moment gRPC looks up its handler (on gRPC's polling thread, before the
call waits for a handler thread) until its handler is done. Counting inside the handler alone
could never see more calls than handler threads, and calls beyond them would pile up unseen in
the thread pool's queue. gRPC submits the call to the thread pool right after the lookup, on the
same thread, so `AdmissionExecutor.submit` picks up the lookup's decision from a thread-local:
an admitted call's task releases its slot when it ends, whether or not the handler ever ran (a
call cancelled while queued still runs gRPC's task, which then skips the handler). A refused
call is answered on a small side pool, so that the refusal does not queue behind the work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from ..contract.metadata import RETRYABLE_KEY

GUARDED_METHODS = ("Extract",)
STREAM_METHODS = ("ExtractStream",)

_REFUSED = "refused"


class Decisions:
    """What the last handler lookup on this thread decided, for the submit that follows it."""

    def __init__(self) -> None:
        self._local = threading.local()

    def decide(self, decision: Admission | str | None) -> None:
        """Record this lookup's decision: the gate that admitted it, _REFUSED, or None."""
        previous = getattr(self._local, "value", None)
        if isinstance(previous, Admission):
            previous.leave()  # a lookup whose task was never submitted: do not leak its slot
        self._local.value = decision

    def take(self) -> Admission | str | None:
        """This thread's pending decision, cleared."""
        value: Admission | str | None = getattr(self._local, "value", None)
        self._local.value = None
        return value


class Admission:
    """A counting gate: `try_enter` takes a slot if one is free; `leave` gives it back."""

    def __init__(
        self, limit: int, setting: str = "max_queued_requests", what: str = "requests"
    ) -> None:
        self.limit = limit
        self.setting = setting
        self.what = what
        self.in_flight = 0
        self.refused = 0
        self.closing = False
        self._lock = threading.Condition()

    def try_enter(self) -> bool:
        """Take a slot; False (and counted as refused) when all are taken or we are closing."""
        with self._lock:
            if self.closing or self.in_flight >= self.limit:
                self.refused += 1
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        """Give a slot back."""
        with self._lock:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._lock.notify_all()

    def close(self) -> None:
        """Admit nothing more: new calls are refused with UNAVAILABLE from now on."""
        with self._lock:
            self.closing = True

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for admitted calls to finish; True if they all did."""
        with self._lock:
            return self._lock.wait_for(lambda: self.in_flight == 0, timeout=timeout)


def _refuse(admission: Admission, context: grpc.ServicerContext) -> None:
    if admission.closing:
        # UNAVAILABLE is what gRPC itself answers once the server has stopped: retry elsewhere.
        context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down; retry with backoff")
    context.set_trailing_metadata(((RETRYABLE_KEY, "1"),))
    context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"server busy: {admission.limit} {admission.what} in flight ({admission.setting}); "
        "retry with backoff",
    )


def _refusal_handler(admission: Admission, streaming: bool) -> grpc.RpcMethodHandler:
    # Requests are not even parsed: the bytes are dropped as they are.
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        _refuse(admission, context)
        raise AssertionError("context.abort returns only by raising")

    def stream(requests: Any, context: grpc.ServicerContext) -> Any:
        _refuse(admission, context)
        yield b""  # unreachable; makes this a generator as a stream handler must be

    if streaming:
        return grpc.stream_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


class AdmittingHandler(grpc.GenericRpcHandler):
    """Wraps a service's handlers: the guarded methods go through their gate.

    `gates` maps method names (e.g. "Extract") to the Admission that counts them; `gate` is
    the one every method's shutdown refusal follows.
    """

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        decisions: Decisions,
        gates: dict[str, Admission],
        service_name: str,
    ) -> None:
        self.inner = inner
        self.decisions = decisions
        self.gates = {f"/{service_name}/{method}": gate for method, gate in gates.items()}
        self.any_gate = next(iter(gates.values()))
        # One refusal handler of each kind per gate, reused: the observer remembers handlers by
        # identity, and building one per refused call would cost as much as the refusal.
        self.refusals = {
            (id(gate), streaming): _refusal_handler(gate, streaming)
            for gate in {*gates.values()}
            for streaming in (False, True)
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        """The handler for a call: the real one if admitted, else one that refuses at once."""
        handler = self.inner.service(handler_call_details)
        if handler is None:
            return handler
        gate = self.gates.get(handler_call_details.method)  # type: ignore[attr-defined]
        if gate is None:
            if self.any_gate.closing:
                self.decisions.decide(_REFUSED)
                return self.refusals[(id(self.any_gate), handler.request_streaming)]
            return handler
        if gate.try_enter():
            self.decisions.decide(gate)
            return handler
        self.decisions.decide(_REFUSED)
        return self.refusals[(id(gate), handler.request_streaming)]


class AdmissionExecutor(futures.ThreadPoolExecutor):
    """gRPC's handler pool: releases admitted calls' slots, runs refusals on a side pool."""

    def __init__(self, decisions: Decisions, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self.decisions = decisions
        self.refusals = futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix=f"{thread_name_prefix}-refusal"
        )

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        """Run `fn` as the preceding handler lookup decided."""
        decision = self.decisions.take()
        if decision == _REFUSED:
            return self.refusals.submit(fn, *args, **kwargs)
        if not isinstance(decision, Admission):
            return super().submit(fn, *args, **kwargs)
        gate = decision

        def admitted() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                gate.leave()

        try:
            return super().submit(admitted)
        except BaseException:
            gate.leave()  # never queued (the pool is shut down)
            raise

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut down both pools."""
        self.refusals.shutdown(wait=wait, cancel_futures=cancel_futures)
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
