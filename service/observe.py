"""The one place each call is observed: its metrics and its request log line."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from featmap.contract.metadata import REQUEST_ID_KEY
from featmap.contract.wire import (
    FramedExtractRequest,
    FramedExtractResponse,
)
from featmap.service import stages
from featmap.service.logs import FIELDS_ATTRIBUTE
from featmap.service.metrics import Metrics

log = logging.getLogger("featmap.requests")
# Handlers remembered with their observed wrappers: a few per method (real, refusal).
MAX_OBSERVED_HANDLERS = 256

# Request ids: this process's random prefix and a counter, unique within a server's life and
# cheaper than a uuid4 (a system call for entropy) on every call.
_ID_PREFIX = os.urandom(3).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """A fresh id for a request's log line (and an INTERNAL error's reply): 12+ hex digits."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):06x}"


def images_in(request: Any) -> int:
    """Images in an Extract request (inline or in shared memory); 0 for anything else."""
    if not isinstance(request, FramedExtractRequest):
        return 0
    shape = request.images.shape if request.images is not None else ()
    return int(shape[0]) if shape else 0


def pipeline_id_of(request: Any, response: Any) -> str:
    """The pipeline a call was about, from its response or else its request ("" if none)."""
    for message in (response, request):
        if isinstance(message, FramedExtractRequest | FramedExtractResponse):
            message = message.message
        pipeline_id = getattr(message, "pipeline_id", "")
        if isinstance(pipeline_id, str) and pipeline_id:
            return pipeline_id
    return ""


class _Call:
    """One call being observed, from its handler's start to its end."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.metrics = metrics
        self.method = method
        self.images = 0
        self.request: Any = None
        self.response: Any = None
        self.started = time.monotonic()
        self.stages = stages.begin()
        metrics.in_flight.inc()

    def received(self, request: Any) -> None:
        count = images_in(request)
        self.images += count
        if count:
            self.metrics.images.inc(count)
        if self.request is None:
            self.request = request

    def finish(self, context: grpc.ServicerContext, code: grpc.StatusCode | None = None) -> None:
        stages.end()
        seconds = time.monotonic() - self.started
        metrics = self.metrics
        metrics.in_flight.dec()
        code = code or context.code() or grpc.StatusCode.OK  # type: ignore[func-returns-value]
        metrics.count_request(self.method, code.name)
        metrics.stage_seconds["total"].observe(seconds)
        for stage in ("queue", "compute"):
            if stage in self.stages:
                metrics.stage_seconds[stage].observe(self.stages[stage])
        # An INTERNAL error already logged its request id and sent it to the client: reuse it.
        trailers = dict(context.trailing_metadata() or ())  # type: ignore[func-returns-value]
        request_id = str(trailers.get(REQUEST_ID_KEY) or new_request_id())
        fields = {
            "request_id": request_id,
            "method": self.method,
            "pipeline_id": pipeline_id_of(self.request, self.response),
            "images": self.images,
            "status": code.name,
            "duration_ms": round(seconds * 1000, 3),
        }
        log.info(
            "request %s %s %s pipeline=%s images=%d %.1f ms",
            request_id,
            self.method,
            code.name,
            fields["pipeline_id"] or "-",
            self.images,
            seconds * 1000,
            extra={FIELDS_ATTRIBUTE: fields},
        )


class RequestObserver(grpc.ServerInterceptor):
    """Counts, times and logs every call of some services (health and reflection are left out).

    A method's observed handler is built once and reused: the lookup runs for every call, on
    gRPC's one polling thread.
    """

    def __init__(self, metrics: Metrics, *service_names: str) -> None:
        self.metrics = metrics
        self.prefixes = tuple(f"/{name}/" for name in service_names)
        # id(inner handler) -> (inner handler, observed handler); the inner one is kept so
        # that its id is not reused. Handlers live as long as the server: this stays small.
        self._observed: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _counting(self, deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
        counter = self.metrics.bytes_received

        def counted(raw: bytes) -> Any:
            counter.inc(len(raw))
            return raw if deserialize is None else deserialize(raw)

        return counted

    def _unary(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(self.metrics, method)
            call.received(request)
            try:
                call.response = behaviour(request, context)
            except BaseException:
                call.finish(context, context.code() or grpc.StatusCode.UNKNOWN)  # type: ignore[func-returns-value]
                raise
            call.finish(context)
            return call.response

        return observed

    def _stream(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def observed(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(self.metrics, method)

            def counted() -> Iterator[Any]:
                for request in requests:
                    call.received(request)
                    yield request

            code: grpc.StatusCode | None = None
            try:
                for response in behaviour(counted(), context):
                    call.response = response
                    yield response
            except GeneratorExit:  # the client went away mid-stream
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[func-returns-value]
                raise
            finally:
                call.finish(context, code)

        return observed

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        full_method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not full_method.startswith(self.prefixes):
            return handler
        known = self._observed.get(id(handler))
        if known is not None and known[0] is handler:
            return known[1]
        method = full_method[full_method.index("/", 1) + 1 :]
        changes: dict[str, Any] = {
            "request_deserializer": self._counting(handler.request_deserializer)
        }
        if handler.unary_unary is not None:
            changes["unary_unary"] = self._unary(method, handler.unary_unary)
        elif handler.stream_stream is not None:
            changes["stream_stream"] = self._stream(method, handler.stream_stream)
        observed: grpc.RpcMethodHandler = handler._replace(**changes)  # type: ignore[attr-defined]
        if len(self._observed) < MAX_OBSERVED_HANDLERS:
            self._observed[id(handler)] = (handler, observed)
        return observed
