"""The one place each call is observed: its metrics and its request log line."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..contract.errors import shorten
from ..contract.metadata import REQUEST_ID_KEY
from ..contract.wire import (
    FramedExtractRequest,
    FramedExtractResponse,
)
from . import stages
from .logs import FIELDS_ATTRIBUTE
from .metrics import Metrics

log = logging.getLogger("featmap.requests")
MAX_LOGGED_ID_CHARS = 64  # ids are 32 hex digits
# Handlers remembered with their observed wrappers: a few per method (real, refusal).
MAX_OBSERVED_HANDLERS = 256

# Request ids: this process's random prefix and a counter, unique within a server's life and
# cheaper than a uuid4 (a system call for entropy) on every call.
_ID_PREFIX = os.urandom(3).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """A fresh id for a request's log line (and an INTERNAL error's reply): 12+ hex digits."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):06x}"


def pipeline_id_of(message: Any) -> str:
    """The pipeline a request or response is about ("" if none).

    Shortened: a request's id is whatever the caller sent, a megabyte if it liked.
    """
    if isinstance(message, FramedExtractRequest | FramedExtractResponse):
        message = message.message
    pipeline_id = getattr(message, "pipeline_id", "")
    if isinstance(pipeline_id, str) and pipeline_id:
        return shorten(pipeline_id, MAX_LOGGED_ID_CHARS)
    return ""


class _Call:
    """One call being observed, from its handler's start to its end.

    Nothing a request says is counted before the service has checked it: images are those the
    extractor admitted (stages.note_images), so no header can drive a metric wrong.
    """

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.metrics = metrics
        self.method = method
        # Ids only: a stream's messages and replies must go as soon as they are answered.
        self.requested_id = ""
        self.answered_id = ""
        self.started = time.monotonic()
        self.stages = stages.begin()
        metrics.calls = next(metrics.calls_started) + 1
        metrics.in_flight.inc()

    def received(self, request: Any) -> None:
        if not self.requested_id:
            self.requested_id = pipeline_id_of(request)

    def answered(self, response: Any) -> None:
        self.answered_id = pipeline_id_of(response) or self.answered_id

    def finish(self, context: grpc.ServicerContext, code: grpc.StatusCode | None = None) -> None:
        """Record the call's end; the in-flight gauge comes down whatever else fails."""
        try:
            self._record(context, code)
        finally:
            stages.end()
            self.metrics.in_flight.dec()

    def _record(self, context: grpc.ServicerContext, code: grpc.StatusCode | None) -> None:
        seconds = time.monotonic() - self.started
        metrics = self.metrics
        images = int(self.stages.get(stages.IMAGES, 0))
        if images:
            metrics.images.inc(images)
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
            "pipeline_id": self.answered_id or self.requested_id,
            "images": images,
            "status": code.name,
            "duration_ms": round(seconds * 1000, 3),
        }
        log.info(
            "request %s %s %s pipeline=%s images=%d %.1f ms",
            request_id,
            self.method,
            code.name,
            fields["pipeline_id"] or "-",
            images,
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
            code: grpc.StatusCode | None = None
            try:
                call.received(request)
                response = behaviour(request, context)
                call.answered(response)
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[func-returns-value]
                raise
            finally:
                call.finish(context, code)
            return response

        return observed

    def _stream(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def observed(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(self.metrics, method)

            def counted() -> Iterator[Any]:
                for request in requests:
                    call.received(request)
                    yield request
                    del request  # not held while the next one is awaited

            code: grpc.StatusCode | None = None
            try:
                for response in behaviour(counted(), context):
                    call.answered(response)
                    yield response
                    del response  # sent: not held while the next one is computed
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
