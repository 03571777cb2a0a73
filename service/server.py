"""gRPC glue: parse the request, call a plain function, build the response."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from featmap.contract.errors import (
    Cancelled,
    DeadlineExceeded,
    ExecutionFailed,
    FeatmapError,
    InvalidRequest,
    status_for,
)
from featmap.contract.metadata import FIELD_KEY, REQUEST_ID_KEY
from featmap.contract.wire import (
    FramedExtractRequest,
    FramedExtractResponse,
    parse_extract_request,
    serialize_extract_response,
)
from featmap.service.admission import Admission, AdmissionExecutor, AdmittingHandler
from featmap.service.api import FeatureService
from featmap.service.metrics import Metrics
from featmap.service.observe import RequestObserver, new_request_id
from featmap.service.security import TokenAuthInterceptor, add_port, load_tokens
from featmap.service.settings import ServerSettings
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc

log = logging.getLogger("featmap.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureExtractor"].full_name

Handler = TypeVar("Handler", bound=Callable[..., Any])
# After the grace, how long terminated runs get to unwind before the server stops anyway.
TERMINATE_WAIT_S = 1.0


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, ExecutionFailed):
        # The details are in the server log only: the id ties the caller's report to them.
        request_id = new_request_id()
        log.error("request %s: %s failed: %s", request_id, method, exc, exc_info=exc)
        context.set_trailing_metadata(((FIELD_KEY, exc.field), (REQUEST_ID_KEY, request_id)))
        context.abort(status_for(exc), f"{exc} (request id {request_id})")
    if isinstance(exc, FeatmapError):
        context.set_trailing_metadata(((FIELD_KEY, exc.field),))
        context.abort(status_for(exc), str(exc))
    request_id = new_request_id()
    log.error("request %s: unexpected error in %s", request_id, method, exc_info=exc)
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")


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


_END = object()


class _Prefetch:
    """Reads a request stream on its own thread, at most `window` messages ahead.

    The handler computes chunk i while chunk i+1 arrives; the bounded queue is what keeps
    server memory to a few chunks (a full queue stops reading, and HTTP/2 flow control then
    stops the client).
    """

    def __init__(self, requests: Iterator[Any], window: int) -> None:
        self.queue: queue.Queue[object] = queue.Queue(maxsize=window)
        self.peak = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._read, args=(requests,), name="featmap-stream-reader", daemon=True
        )
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._closed.is_set():
            try:
                self.queue.put(item, timeout=0.1)
            except queue.Full:
                continue
            self.peak = max(self.peak, self.queue.qsize())
            return True
        return False

    def _read(self, requests: Iterator[Any]) -> None:
        try:
            for request in requests:
                if not self._put(request):
                    return  # the handler ended (an error): stop reading
        except Exception as exc:  # the client went away or cancelled: end the stream
            self._put(exc)
        self._put(_END)

    def close(self) -> None:
        """Stop the reader thread (the handler is done with this stream)."""
        self._closed.set()

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item  # type: ignore[misc]


class FeatureExtractorServicer(pb_grpc.FeatureExtractorServicer):
    """featmap.v1.FeatureExtractor over a FeatureService."""

    def __init__(self, service: FeatureService) -> None:
        self.service = service
        self.stream_peak_backlog = 0

    @map_errors
    def Extract(self, request: FramedExtractRequest, context: Any) -> FramedExtractResponse:
        target = self.service.target(request)
        return self.service.extract(request, target, functools.partial(still_wanted, context))

    @map_errors
    def ExtractStream(
        self, requests: Iterator[Any], context: Any
    ) -> Iterator[FramedExtractResponse]:
        prefetch = _Prefetch(requests, self.service.settings.stream_window)
        target = None
        try:
            for sequence, request in enumerate(prefetch):
                try:
                    target = self.service.target(unframed(request), target)
                    response = self.service.extract(
                        request, target, functools.partial(still_wanted, context)
                    )
                except FeatmapError as exc:
                    exc.args = (f"stream message {sequence}: {exc}",)
                    raise
                response.message.sequence = sequence
                self.stream_peak_backlog = max(self.stream_peak_backlog, prefetch.peak)
                yield response
        finally:
            prefetch.close()

    @map_errors
    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Any) -> Any:
        return self.service.server_info()

    @map_errors
    def RegisterPipeline(self, request: pb.RegisterPipelineRequest, context: Any) -> Any:
        return self.service.register_pipeline(request)

    @map_errors
    def GetPipeline(self, request: pb.GetPipelineRequest, context: Any) -> Any:
        return self.service.get_pipeline(request)

    @map_errors
    def ListPipelines(self, request: pb.ListPipelinesRequest, context: Any) -> Any:
        return self.service.list_pipelines(request)

    @map_errors
    def DeletePipeline(self, request: pb.DeletePipelineRequest, context: Any) -> Any:
        return self.service.delete_pipeline(request)

    @map_errors
    def RegisterSharedMemory(self, request: Any, context: Any) -> Any:
        return self.service.register_shared_memory(request)

    @map_errors
    def UnregisterSharedMemory(self, request: Any, context: Any) -> Any:
        return self.service.unregister_shared_memory(request)

    @map_errors
    def RenewSharedMemory(self, request: Any, context: Any) -> Any:
        return self.service.renew_shared_memory(request)


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


def _tolerant(parse: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    # gRPC answers a deserializer's exception with a bare INTERNAL; hand it to the handler.
    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as exc:
            return Malformed(message_type, str(exc) or type(exc).__name__)

    return deserialize


def _serialize_message(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def method_handlers(servicer: FeatureExtractorServicer) -> grpc.GenericRpcHandler:
    """FeatureExtractor's handlers: Extract's tensors framed without copies (wire.py), and
    every request parsed tolerantly, so that bad bytes get INVALID_ARGUMENT."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name["FeatureExtractor"].methods:
        behaviour = getattr(servicer, method.name)
        input_name = method.input_type.full_name
        parse: Callable[[bytes], Any]
        serialize: Callable[[Any], bytes]
        if method.input_type.name == "ExtractRequest":
            parse = _tolerant(parse_extract_request, input_name)
            serialize = serialize_extract_response
        else:
            parse = _tolerant(getattr(pb, method.input_type.name).FromString, input_name)
            serialize = _serialize_message
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behaviour, parse, serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(behaviour, parse, serialize)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class FeatmapServer:
    """A started gRPC server with its health service; `port` is the bound port."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.service = FeatureService(settings)
        self.servicer = FeatureExtractorServicer(self.service)
        self.admission = Admission(settings.max_queued_requests or 4 * settings.grpc_workers)
        self.metrics = Metrics(self.service)
        # The Open Inference Protocol on the same port (oip.py imports from this module).
        from featmap.service.oip import OIP_SERVICE_NAME, InferenceServicer, inference_handlers

        # Outermost first: the observer also counts and logs the calls that auth refuses.
        interceptors: list[grpc.ServerInterceptor] = [
            RequestObserver(self.metrics, SERVICE_NAME, OIP_SERVICE_NAME)
        ]
        if tokens := load_tokens(settings):
            interceptors.append(TokenAuthInterceptor(tokens))
        self.grpc_server = grpc.server(
            AdmissionExecutor(
                self.admission,
                max_workers=settings.grpc_workers,
                thread_name_prefix="featmap-grpc",
            ),
            # The transport admits up to twice the limit so that FeatureService can answer a
            # message over it with RESOURCE_EXHAUSTED and how to stream instead, rather than
            # gRPC's bare "larger than max".
            options=[
                ("grpc.max_receive_message_length", 2 * settings.max_message_bytes),
                ("grpc.max_send_message_length", 2 * settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            interceptors=interceptors,
        )
        self.grpc_server.add_generic_rpc_handlers(
            (AdmittingHandler(method_handlers(self.servicer), self.admission, SERVICE_NAME),)
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self.inference_servicer = InferenceServicer(self.service, self.health)
        self.grpc_server.add_generic_rpc_handlers(
            (
                AdmittingHandler(
                    inference_handlers(self.inference_servicer),
                    self.admission,
                    OIP_SERVICE_NAME,
                    guarded_methods=("ModelInfer",),
                ),
            )
        )
        if settings.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                self.grpc_server,
            )
        try:
            self.port = add_port(self.grpc_server, f"{settings.host}:{settings.port}", settings)
        except RuntimeError as exc:  # grpcio raises RuntimeError when the port is taken
            raise OSError(f"could not bind {settings.host}:{settings.port}: {exc}") from None
        if self.port == 0:
            raise OSError(f"could not bind {settings.host}:{settings.port}")
        self.address = f"{settings.host}:{self.port}"
        self.metrics_port: int | None = None
        if settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(settings.host, settings.metrics_port)

    def start(self) -> FeatmapServer:
        """Start serving and report SERVING on the health service."""
        self.grpc_server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s", self.address)
        if self.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", self.settings.host, self.metrics_port)
        return self

    def stop(self, grace: float | None = None) -> bool:
        """NOT_SERVING at once, let in-flight calls finish within `grace` seconds, then stop
        the runs still going; True when every call was answered in time.

        Our handlers refuse new calls with UNAVAILABLE while the admitted ones finish; only then
        does gRPC stop, which would cancel calls it had received but not yet handed over. Runs
        that outlast the grace are terminated: their callers get UNAVAILABLE from our handlers,
        which log and count them as such.
        """
        self.health.enter_graceful_shutdown()
        grace = self.settings.shutdown_grace_s if grace is None else grace
        self.admission.close()
        drained = self.admission.drain(grace)
        if not drained:
            stopped = self.service.cache.runs.terminate()
            log.warning(
                "shutdown grace of %gs ended with %d calls in flight: stopped %d onnxruntime "
                "runs, answering UNAVAILABLE",
                grace,
                self.admission.in_flight,
                stopped,
            )
            drained = self.admission.drain(TERMINATE_WAIT_S)
        self.grpc_server.stop(0).wait()
        self.service.close()
        self.metrics.close()
        return drained

    def __enter__(self) -> FeatmapServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0)


def create_server(settings: ServerSettings) -> tuple[FeatmapServer, int]:
    """A started server and the port it bound (settings.port 0 picks a free one)."""
    server = FeatmapServer(settings).start()
    return server, server.port


def serve(settings: ServerSettings) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully."""
    server, _ = create_server(settings)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Python runs signal handlers on the main thread only, and a signal the kernel delivers to
    # another thread (gRPC's, onnxruntime's) does not wake a main thread blocked in wait():
    # waking up now and then lets the handler run.
    while not stopping.wait(timeout=0.1):
        pass
    if server.stop():
        log.info("stopped")
        return
    # A run inside one long onnxruntime node notices `terminate` only when the node ends; the
    # interpreter would wait for its thread at exit. Every caller has its answer: leave now.
    log.warning("stopped; %d calls were still unwinding", server.admission.in_flight)
    logging.shutdown()
    os._exit(0)
