"""FeatureClient: numpy in, numpy out, over featmap's gRPC API."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from featmap.service.spec import Pipeline
from featmap.service.wire import decode_tensor, encode_tensor
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
SpecLike = Pipeline | dict[str, Any] | str


class FeatmapRpcError(Exception):
    """A call failed; `code` is the gRPC status, `field` the request field the server blamed."""

    def __init__(self, code: grpc.StatusCode, details: str, field: str | None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field = field

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> FeatmapRpcError:
        """Wrap a grpc.RpcError, picking the blamed field out of the trailing metadata."""
        call: Any = error
        trailers = dict(call.trailing_metadata() or ())
        return cls(call.code(), call.details() or "", trailers.get("featmap-field"))


@dataclass(frozen=True)
class ServerInfo:
    """What GetServerInfo reports."""

    version: str
    onnxruntime_version: str
    available_providers: list[str]
    active_providers: list[str]
    limits: dict[str, int]
    onnx_opset: int


def spec_json(spec: SpecLike) -> str:
    """The JSON text of a spec given as a model, a dict, or JSON text already."""
    if isinstance(spec, Pipeline):
        return spec.model_dump_json()
    if isinstance(spec, str):
        return spec
    return json.dumps(spec)


def sendable(images: np.ndarray) -> np.ndarray:
    """float64 arrays (NumPy's default) become float32; other dtypes are sent as they are."""
    images = np.asarray(images)
    return images.astype(np.float32) if images.dtype == np.float64 else images


class FeatureClient:
    """A blocking client. Use as a context manager, or call close().

    Args:
        address: "host:port" (or any gRPC target).
        timeout: default deadline in seconds for each call (None: no deadline).
        max_message_bytes: largest message sent or received; match the server's setting.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._stub = pb_grpc.FeatureExtractorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def extract(
        self, images: np.ndarray, spec: SpecLike, *, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run `spec` on a batch; one float32 array per requested output, keyed by layer name.

        The arrays are read-only views of the response bytes (no copy); `.copy()` to modify.
        """
        request = pb.ExtractRequest(
            spec_json=spec_json(spec), images=encode_tensor(sendable(images))
        )
        try:
            response = self._stub.Extract(request, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise FeatmapRpcError.from_rpc_error(exc) from None
        return {
            name: decode_tensor(tensor, f"outputs.{name}")
            for name, tensor in response.outputs.items()
        }

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """Version, onnxruntime version, execution providers and limits of the server."""
        try:
            info = self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=self._timeout(timeout)
            )
        except grpc.RpcError as exc:
            raise FeatmapRpcError.from_rpc_error(exc) from None
        return ServerInfo(
            version=info.version,
            onnxruntime_version=info.onnxruntime_version,
            available_providers=list(info.available_providers),
            active_providers=list(info.active_providers),
            limits={field.name: value for field, value in info.limits.ListFields()},
            onnx_opset=info.onnx_opset,
        )

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server's health service says SERVING (TimeoutError after `timeout`)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
            status = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
            raise TimeoutError(f"featmap server at {self.address} not ready: {exc}") from None
        if status.status != health_pb2.HealthCheckResponse.SERVING:
            raise TimeoutError(f"featmap server at {self.address} is not serving")

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
