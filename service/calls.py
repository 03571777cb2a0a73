"""What every gRPC handler of the server shares: errors mapped to statuses at the edge, the
still-wanted and when-gone hooks, and tolerant parsing and plain serialization of messages."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from ..contract.errors import (
    Cancelled,
    DeadlineExceeded,
    ExecutionFailed,
    FeatmapError,
    InvalidRequest,
    status_for,
)
from ..contract.metadata import FIELD_KEY, REQUEST_ID_KEY, RETRYABLE_KEY
from .observe import new_request_id

# The server's logger: failed calls are logged as the server's lines.
log = logging.getLogger("featmap.server")

Handler = TypeVar("Handler", bound=Callable[..., Any])


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, ExecutionFailed):
        # The details are in the server log only: the id ties the caller's report to them.
        request_id = new_request_id()
        log.error("request %s: %s failed: %s", request_id, method, exc, exc_info=exc)
        context.set_trailing_metadata(((FIELD_KEY, exc.field), (REQUEST_ID_KEY, request_id)))
        _detach(exc)
        context.abort(status_for(exc), f"{exc} (request id {request_id})")
    if isinstance(exc, FeatmapError):
        trailers = [(FIELD_KEY, exc.field)]
        if exc.retryable:
            trailers.append((RETRYABLE_KEY, "1"))
        context.set_trailing_metadata(tuple(trailers))
        _detach(exc)
        context.abort(status_for(exc), str(exc))
    request_id = new_request_id()
    log.error("request %s: unexpected error in %s", request_id, method, exc_info=exc)
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    _detach(exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")


def _detach(exc: BaseException) -> None:
    """Drop what an answered error still refers to: its frames (and through them the request).

    gRPC keeps the exception context.abort raises until the call's state goes, and that one's
    __context__ is `exc`; exc's traceback reaches the handler's frames, which reach the context:
    a cycle that held every refused request, megabytes of it, until the next garbage collection.
    """
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None


def map_errors(method: Handler) -> Handler:
    """Turn service exceptions into gRPC statuses, the one place that does so.

    FeatmapError -> its status from errors.STATUS_CODES, the message and the field in trailing
    metadata; anything else -> INTERNAL with a request id that is also in the server log.
    Works for unary handlers and for streaming (generator) handlers.
    """
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except Exception as exc:
                _abort(context, exc, method.__name__)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, unframed(request), context)
        except Exception as exc:
            _abort(context, exc, method.__name__)
        raise AssertionError("context.abort returns only by raising")

    return wrapper  # type: ignore[return-value]


def still_wanted(context: grpc.ServicerContext) -> None:
    """Abandoned when nobody waits for this call's result any more: then skip the work."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("request", "the deadline passed before the work started")
    if not context.is_active():
        raise Cancelled("request", "the caller went away before the work started")


def when_gone(context: grpc.ServicerContext, stop: Callable[[], None]) -> None:
    """Call `stop` once the call has ended (the caller went away, or its deadline passed).

    gRPC also runs it when the call ends normally, after the work: stopping a finished run
    does nothing. At once when the call has ended already.
    """
    if not context.add_callback(stop):
        stop()


@dataclass(frozen=True)
class Malformed:
    """A request message that did not parse: the handler answers INVALID_ARGUMENT."""

    message_type: str
    error: str


def unframed(request: Any) -> Any:
    """A parsed request, or InvalidRequest for one that did not parse."""
    if isinstance(request, Malformed):
        raise InvalidRequest(
            "request", f"is not a valid {request.message_type} message: {request.error}"
        )
    return request


def tolerant(parse: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    # gRPC answers a deserializer's exception with a bare INTERNAL; hand it to the handler.
    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as exc:
            return Malformed(message_type, str(exc) or type(exc).__name__)

    return deserialize


def serialize_message(message: Any) -> bytes:
    return bytes(message.SerializeToString())
