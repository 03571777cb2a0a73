"""gRPC glue: parse the request, call a plain function, build the response."""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..contract.errors import FeatmapError
from ..contract.wire import (
    FramedExtractRequest,
    FramedExtractResponse,
    parse_extract_request,
    serialize_extract_response,
)
from ..v1 import featmap_pb2 as pb
from ..v1 import featmap_pb2_grpc as pb_grpc
from .admission import (
    GUARDED_METHODS,
    STREAM_METHODS,
    Admission,
    AdmissionExecutor,
    AdmittingHandler,
    Decisions,
)
from .allocator import Trimmer, tune_allocator
from .api import FeatureService
from .calls import (
    map_errors,
    serialize_message,
    still_wanted,
    tolerant,
    unframed,
    when_gone,
)
from .metrics import Metrics
from .observe import RequestObserver
from .oip import OIP_SERVICE_NAME, InferenceServicer, inference_handlers
from .pipeline_dir import register_pipeline_dir
from .security import (
    Caller,
    Tenants,
    TokenAuthInterceptor,
    add_port,
    add_unix_socket,
    caller_of,
    load_tenants,
)
from .settings import ServerSettings
from .streams import ReadAhead, StreamWatchdog

log = logging.getLogger("featmap.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureExtractor"].full_name

# Once drained, how long calls already received but not yet handed a thread get to be answered.
HANDOFF_S = 3.0
# After the grace, how long terminated runs get to unwind before the server stops anyway.
TERMINATE_WAIT_S = 1.0


def check_port_free(host: str, port: int) -> None:
    """OSError saying so, in one line, when another process holds host:port.

    Asked before gRPC binds: gRPC would print its own raw log line first.
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        return  # gRPC says what is wrong with the host
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(
                        f"{host}:{port} is already in use: stop the process that holds it, or "
                        "choose another port (--port; 0 picks a free one)"
                    ) from None
                return


class FeatureExtractorServicer(pb_grpc.FeatureExtractorServicer):
    """featmap.v1.FeatureExtractor over a FeatureService."""

    def __init__(self, service: FeatureService, tenants: Tenants | None = None) -> None:
        self.service = service
        self.tenants = tenants
        self.stream_peak_backlog = 0
        self.watchdog = StreamWatchdog(service.settings.stream_idle_timeout_s)

    def caller(self, context: Any) -> Caller:
        """Who is calling (tenant, local), from the call's metadata and peer."""
        return caller_of(context, self.tenants)

    @map_errors
    def Extract(self, request: FramedExtractRequest, context: Any) -> FramedExtractResponse:
        caller = self.caller(context)
        target = self.service.target(request, caller)
        return self.service.extract(
            request,
            target,
            caller,
            functools.partial(still_wanted, context),
            functools.partial(when_gone, context),
        )

    @map_errors
    def ExtractStream(
        self, requests: Iterator[Any], context: Any
    ) -> Iterator[FramedExtractResponse]:
        settings = self.service.settings
        caller = self.caller(context)
        read_ahead = ReadAhead(
            requests,
            settings.stream_window,
            settings.max_message_bytes,
            settings.stream_idle_timeout_s,
        )
        target = None
        try:
            for sequence, request in enumerate(read_ahead):
                try:
                    target = self.service.target(unframed(request), caller, target)
                    # No when_gone here: gRPC would keep one callback per message until the
                    # stream ends.
                    response = self.service.extract(
                        request, target, caller, functools.partial(still_wanted, context)
                    )
                except FeatmapError as exc:
                    exc.args = (f"stream message {sequence}: {exc}",)
                    raise
                del request  # what was received goes as soon as it is answered
                response.message.sequence = sequence
                self.stream_peak_backlog = max(self.stream_peak_backlog, read_ahead.peak)
                with self.watchdog.sending(context):
                    yield response
                del response
        finally:
            read_ahead.close()

    @map_errors
    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Any) -> Any:
        return self.service.server_info(self.caller(context))

    @map_errors
    def RegisterPipeline(self, request: pb.RegisterPipelineRequest, context: Any) -> Any:
        return self.service.register_pipeline(
            request, self.caller(context), functools.partial(still_wanted, context)
        )

    @map_errors
    def GetPipeline(self, request: pb.GetPipelineRequest, context: Any) -> Any:
        return self.service.get_pipeline(request, self.caller(context))

    @map_errors
    def ListPipelines(self, request: pb.ListPipelinesRequest, context: Any) -> Any:
        return self.service.list_pipelines(request, self.caller(context))

    @map_errors
    def DeletePipeline(self, request: pb.DeletePipelineRequest, context: Any) -> Any:
        return self.service.delete_pipeline(request, self.caller(context))

    @map_errors
    def RegisterSharedMemory(self, request: Any, context: Any) -> Any:
        return self.service.register_shared_memory(request, self.caller(context))

    @map_errors
    def UnregisterSharedMemory(self, request: Any, context: Any) -> Any:
        return self.service.unregister_shared_memory(request, self.caller(context))

    @map_errors
    def RenewSharedMemory(self, request: Any, context: Any) -> Any:
        return self.service.renew_shared_memory(request, self.caller(context))


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
            parse = tolerant(parse_extract_request, input_name)
            serialize = serialize_extract_response
        else:
            parse = tolerant(getattr(pb, method.input_type.name).FromString, input_name)
            serialize = serialize_message
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
        tenants = load_tenants(settings)
        if settings.pipelines_dir is not None:
            # Before the port is bound: no call reaches a server whose pipelines are missing.
            register_pipeline_dir(
                self.service,
                settings.pipelines_dir,
                tenants.names if tenants is not None else frozenset(),
                settings.skip_invalid_pipelines,
            )
        self.servicer = FeatureExtractorServicer(self.service, tenants)
        # Unary calls and streams each have their own gate (admission.py says why).
        decisions = Decisions()
        self.admission = Admission(settings.max_queued_requests or 4 * settings.grpc_workers)
        self.stream_admission = Admission(settings.stream_limit, "max_streams", "streams")
        self.metrics = Metrics(self.service)
        # Outermost first: the observer also counts and logs the calls that auth refuses.
        interceptors: list[grpc.ServerInterceptor] = [
            RequestObserver(self.metrics, SERVICE_NAME, OIP_SERVICE_NAME)
        ]
        if tenants is not None:
            interceptors.append(TokenAuthInterceptor(tenants))
        self.grpc_server = grpc.server(
            AdmissionExecutor(
                decisions,
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
        gates = {method: self.admission for method in GUARDED_METHODS}
        gates.update({method: self.stream_admission for method in STREAM_METHODS})
        self.grpc_server.add_generic_rpc_handlers(
            (AdmittingHandler(method_handlers(self.servicer), decisions, gates, SERVICE_NAME),)
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self.inference_servicer = InferenceServicer(self.service, self.health, tenants)
        self.grpc_server.add_generic_rpc_handlers(
            (
                AdmittingHandler(
                    inference_handlers(self.inference_servicer),
                    decisions,
                    {"ModelInfer": self.admission},
                    OIP_SERVICE_NAME,
                ),
            )
        )
        self.health_services = ("", SERVICE_NAME, OIP_SERVICE_NAME)
        if settings.reflection:
            from .reflection import enable_reflection

            enable_reflection(
                (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME), self.grpc_server
            )
        check_port_free(settings.host, settings.port)
        try:
            self.port = add_port(self.grpc_server, f"{settings.host}:{settings.port}", settings)
        except RuntimeError as exc:  # grpcio raises RuntimeError when the port is taken
            raise OSError(f"could not bind {settings.host}:{settings.port}: {exc}") from None
        if self.port == 0:
            raise OSError(f"could not bind {settings.host}:{settings.port}")
        self.address = f"{settings.host}:{self.port}"
        # The Unix socket: where callers are proven local (and offered shared memory).
        self.unix_address: str | None = None
        if settings.unix_socket is not None:
            self.unix_address = add_unix_socket(self.grpc_server, settings.unix_socket)
        self.metrics_port: int | None = None
        if settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(settings.host, settings.metrics_port)
        self.trimmer: Trimmer | None = None

    def start(self) -> FeatmapServer:
        """Start serving and report SERVING on the health service."""
        self.grpc_server.start()
        self.trimmer = Trimmer(
            lambda: self.metrics.calls,
            lambda: bool(self.admission.in_flight or self.stream_admission.in_flight),
        )
        for service in self.health_services:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s", self.address)
        if self.unix_address is not None:
            log.info("listening on %s", self.unix_address)
        if self.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", self.settings.host, self.metrics_port)
        store = self.service.registry.store
        if store is None:
            log.info("registered pipelines are kept in memory only (pipeline_store=none)")
        else:
            log.info("registered pipelines are kept in %s", store.location)
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
        deadline = time.monotonic() + grace
        gates = (self.admission, self.stream_admission)
        for gate in gates:
            gate.close()
        drained = all(gate.drain(max(0.0, deadline - time.monotonic())) for gate in gates)
        if not drained:
            stopped = self.service.cache.runs.terminate()
            log.warning(
                "shutdown grace of %gs ended with %d calls in flight: stopped %d onnxruntime "
                "runs, answering UNAVAILABLE",
                grace,
                sum(gate.in_flight for gate in gates),
                stopped,
            )
            drained = all(gate.drain(TERMINATE_WAIT_S) for gate in gates)
        # Calls gRPC received but had no thread for yet (health checks behind busy handlers)
        # are answered, NOT_SERVING or UNAVAILABLE, rather than cancelled by the stop.
        self.grpc_server.stop(HANDOFF_S).wait()
        self.servicer.watchdog.close()
        if self.trimmer is not None:
            self.trimmer.close()
        self.service.close()
        self.metrics.close()
        if self.settings.unix_socket is not None:
            self.settings.unix_socket.unlink(missing_ok=True)
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
    tune_allocator()  # this process is the server's: freed request memory goes back (allocator.py)
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
    unwinding = server.admission.in_flight + server.stream_admission.in_flight
    log.warning("stopped; %d calls were still unwinding", unwinding)
    logging.shutdown()
    os._exit(0)
