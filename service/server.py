"""gRPC glue: parse the request, call a plain function, build the response."""

from __future__ import annotations

import functools
import logging
import signal
import threading
import uuid
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from featmap.service import __version__
from featmap.service.errors import FeatmapError, InvalidTensor, status_for
from featmap.service.extractor import Extractor, RequestLimits
from featmap.service.graph import OPSET
from featmap.service.runtime import SessionCache, available_providers, resolve_providers
from featmap.service.settings import ServerSettings
from featmap.service.spec import parse_pipeline
from featmap.service.wire import decode_tensor, encode_tensor
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc

log = logging.getLogger("featmap.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureExtractor"].full_name
FIELD_METADATA_KEY = "featmap-field"
REQUEST_ID_METADATA_KEY = "featmap-request-id"

Response = TypeVar("Response")


def map_errors(
    method: Callable[[Any, Any, grpc.ServicerContext], Response],
) -> Callable[[Any, Any, grpc.ServicerContext], Response]:
    """Turn service exceptions into gRPC statuses, the one place that does so.

    FeatmapError -> its status from errors.STATUS_CODES, the message and the field in trailing
    metadata; anything else -> INTERNAL with a request id that is also in the server log.
    """

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Response:
        try:
            return method(self, request, context)
        except FeatmapError as exc:
            context.set_trailing_metadata(((FIELD_METADATA_KEY, exc.field),))
            context.abort(status_for(exc), str(exc))
        except Exception:
            request_id = uuid.uuid4().hex[:12]
            log.exception("request %s: unexpected error in %s", request_id, method.__name__)
            context.set_trailing_metadata(((REQUEST_ID_METADATA_KEY, request_id),))
            context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
        raise AssertionError("context.abort returns only by raising")

    return wrapper


class FeatureExtractorServicer(pb_grpc.FeatureExtractorServicer):
    """featmap.v1.FeatureExtractor over an Extractor."""

    def __init__(self, extractor: Extractor, settings: ServerSettings) -> None:
        self.extractor = extractor
        self.settings = settings

    @map_errors
    def Extract(
        self, request: pb.ExtractRequest, context: grpc.ServicerContext
    ) -> pb.ExtractResponse:
        pipeline = parse_pipeline(request.spec_json)
        if not request.HasField("images"):
            raise InvalidTensor("images", "is missing")
        outputs = self.extractor.extract(pipeline, decode_tensor(request.images, "images"))
        return pb.ExtractResponse(
            outputs={name: encode_tensor(array) for name, array in outputs.items()},
            pipeline_id=pipeline.pipeline_id,
        )

    @map_errors
    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return server_info(self.settings, self.extractor.cache)


def server_info(settings: ServerSettings, cache: SessionCache) -> pb.GetServerInfoResponse:
    """What this server runs on and the limits it enforces."""
    return pb.GetServerInfoResponse(
        version=__version__,
        onnxruntime_version=ort.__version__,
        available_providers=available_providers(),
        active_providers=cache.providers,
        limits=pb.Limits(
            max_message_bytes=settings.max_message_bytes,
            max_images_per_request=settings.max_images_per_request,
            max_pixels_per_image=settings.max_pixels_per_image,
            max_layers=settings.max_layers,
            max_parameters=settings.max_parameters,
            session_cache_size=settings.session_cache_size,
        ),
        onnx_opset=OPSET,
    )


class FeatmapServer:
    """A started gRPC server with its health service; `port` is the bound port."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        providers = resolve_providers(settings.providers)
        cache = SessionCache(settings.session_cache_size, providers, settings.intra_op_threads)
        limits = RequestLimits(
            max_images_per_request=settings.max_images_per_request,
            max_pixels_per_image=settings.max_pixels_per_image,
            max_layers=settings.max_layers,
            max_parameters=settings.max_parameters,
            max_message_bytes=settings.max_message_bytes,
        )
        self.extractor = Extractor(cache, limits)
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.grpc_workers, thread_name_prefix="featmap-grpc"
            ),
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_FeatureExtractorServicer_to_server(
            FeatureExtractorServicer(self.extractor, settings), self.grpc_server
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        if settings.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
            )
        try:
            self.port = self.grpc_server.add_insecure_port(f"{settings.host}:{settings.port}")
        except RuntimeError as exc:  # grpcio raises RuntimeError when the port is taken
            raise OSError(f"could not bind {settings.host}:{settings.port}: {exc}") from None
        if self.port == 0:
            raise OSError(f"could not bind {settings.host}:{settings.port}")
        self.address = f"{settings.host}:{self.port}"

    def start(self) -> FeatmapServer:
        """Start serving and report SERVING on the health service."""
        self.grpc_server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s", self.address)
        return self

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, then let in-flight calls finish within `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(self.settings.shutdown_grace_s if grace is None else grace).wait()

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
    stopping.wait()
    server.stop()
    log.info("stopped")
