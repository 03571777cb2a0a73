"""Backpressure: a bound on Extract/ExtractStream calls admitted at once, refused at once beyond it.

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

from featmap.contract.metadata import RETRYABLE_KEY

GUARDED_METHODS = ("Extract", "ExtractStream")

_ADMITTED = "admitted"
_REFUSED = "refused"


class Admission:
    """A counting gate: `try_enter` takes a slot if one is free; `leave` gives it back."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.refused = 0
        self.closing = False
        self._lock = threading.Condition()
        # Set by the handler lookup, consumed by the submit that follows it on the same thread.
        self.decision = threading.local()

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

    def decide(self, decision: str | None) -> None:
        """Record this lookup's decision for the submit that follows."""
        if getattr(self.decision, "value", None) == _ADMITTED:
            self.leave()  # a lookup whose task was never submitted: do not leak its slot
        self.decision.value = decision

    def take_decision(self) -> str | None:
        """This thread's pending decision, cleared."""
        value: str | None = getattr(self.decision, "value", None)
        self.decision.value = None
        return value


def _refuse(admission: Admission, context: grpc.ServicerContext) -> None:
    if admission.closing:
        # UNAVAILABLE is what gRPC itself answers once the server has stopped: retry elsewhere.
        context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down; retry with backoff")
    context.set_trailing_metadata(((RETRYABLE_KEY, "1"),))
    context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"server busy: {admission.limit} requests in flight (max_queued_requests); "
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
    """Wraps FeatureExtractor's handlers: Extract/ExtractStream go through the Admission."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        admission: Admission,
        service_name: str,
        guarded_methods: tuple[str, ...] = GUARDED_METHODS,
    ) -> None:
        self.inner = inner
        self.admission = admission
        self.guarded = {f"/{service_name}/{method}" for method in guarded_methods}
        # One refusal handler of each kind, reused: the observer remembers handlers by identity.
        self.refusals = {
            streaming: _refusal_handler(admission, streaming) for streaming in (False, True)
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        """The handler for a call: the real one if admitted, else one that refuses at once."""
        handler = self.inner.service(handler_call_details)
        if handler is None:
            return handler
        if handler_call_details.method not in self.guarded:  # type: ignore[attr-defined]
            if self.admission.closing:
                self.admission.decide(_REFUSED)
                return self.refusals[handler.request_streaming]
            return handler
        if self.admission.try_enter():
            self.admission.decide(_ADMITTED)
            return handler
        self.admission.decide(_REFUSED)
        return self.refusals[handler.request_streaming]


class AdmissionExecutor(futures.ThreadPoolExecutor):
    """gRPC's handler pool: releases admitted calls' slots, runs refusals on a side pool."""

    def __init__(self, admission: Admission, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self.admission = admission
        self.refusals = futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix=f"{thread_name_prefix}-refusal"
        )

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        """Run `fn` as the preceding handler lookup decided."""
        decision = self.admission.take_decision()
        if decision == _REFUSED:
            return self.refusals.submit(fn, *args, **kwargs)
        if decision != _ADMITTED:
            return super().submit(fn, *args, **kwargs)
        admission = self.admission

        def admitted() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                admission.leave()

        try:
            return super().submit(admitted)
        except BaseException:
            admission.leave()  # never queued (the pool is shut down)
            raise

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut down both pools."""
        self.refusals.shutdown(wait=wait, cancel_futures=cancel_futures)
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
