"""FeatureClient and AsyncFeatureClient: numpy in, numpy out, over featmap's gRPC API."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import threading
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from featmap.client.channel import ChannelSecurity, PemSource
from featmap.client.retry import (
    call_with_retries,
    call_with_retries_async,
    is_retryable,
    retry_channel_options,
)
from featmap.client.shared_memory import SharedMemoryPool
from featmap.service.errors import FeatmapError
from featmap.service.spec import Pipeline, infer_shapes, parse_pipeline
from featmap.service.wire import (
    FramedTensor,
    encode_tensor,
    parse_extract_response,
    serialize_extract_request,
    wire_dtype,
)
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# Room left in a message for everything but the image bytes (spec text aside).
ENVELOPE_BYTES = 4096
OutputDType = Literal["float32", "float16"]
SpecLike = Pipeline | Mapping[str, Any] | str
OUTPUT_DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16}
EXTRACT_METHOD = "/featmap.v1.FeatureExtractor/Extract"
EXTRACT_STREAM_METHOD = "/featmap.v1.FeatureExtractor/ExtractStream"


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
    intra_op_threads: int
    grpc_workers: int


@dataclass(frozen=True)
class PipelineInfo:
    """A registered pipeline as GetPipeline/ListPipelines describe it."""

    pipeline_id: str
    spec: dict[str, Any]
    outputs: dict[str, list[int | str]]
    weight_names: list[str]
    batching: dict[str, Any]
    onnx_model: bytes


# --------------------------------------------------------------------------- messages


def spec_json(spec: SpecLike) -> str:
    """The JSON text of a spec given as a model, a mapping, or JSON text already."""
    if isinstance(spec, Pipeline):
        return spec.model_dump_json()
    if isinstance(spec, str):
        return spec
    return json.dumps(spec)


def is_pipeline_id(pipeline: SpecLike) -> bool:
    """A str that is not JSON text is a registered pipeline's id."""
    return isinstance(pipeline, str) and not pipeline.lstrip().startswith("{")


def sendable(images: np.ndarray) -> np.ndarray:
    """float64 arrays (NumPy's default) become float32; other dtypes are sent as they are."""
    images = np.asarray(images)
    return images.astype(np.float32) if images.dtype == np.float64 else images


@dataclass(frozen=True)
class OutgoingExtract:
    """An ExtractRequest still in two parts: serialized by wire.serialize_extract_request."""

    message: pb.ExtractRequest
    images: np.ndarray | None

    def serialize(self) -> bytes:
        """The request's wire bytes, pixels copied once."""
        return serialize_extract_request(self.message, self.images)


def request_for(
    images: np.ndarray | None, pipeline: SpecLike | None, output_dtype: OutputDType
) -> OutgoingExtract:
    """An Extract request; pipeline None leaves it unset (later messages of a stream)."""
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be 'float32' or 'float16', not {output_dtype!r}")
    message = pb.ExtractRequest(output_dtype=OUTPUT_DTYPES[output_dtype])  # type: ignore[arg-type]
    if pipeline is not None and is_pipeline_id(pipeline):
        message.pipeline_id = pipeline  # type: ignore[assignment]
    elif pipeline is not None:
        message.spec_json = spec_json(pipeline)
    return OutgoingExtract(message, images)


def outputs_of(
    response: tuple[pb.ExtractResponse, dict[str, FramedTensor]],
) -> dict[str, np.ndarray]:
    """The response's arrays: read-only views of its bytes, no copy."""
    _, outputs = response
    return {name: tensor.array(f"outputs.{name}") for name, tensor in outputs.items()}


def extract_methods(channel: Any) -> tuple[Any, Any]:
    """Extract and ExtractStream on `channel`, framed by wire.py rather than by protobuf."""
    serialize = OutgoingExtract.serialize
    extract = channel.unary_unary(
        EXTRACT_METHOD, request_serializer=serialize, response_deserializer=parse_extract_response
    )
    stream = channel.stream_stream(
        EXTRACT_STREAM_METHOD,
        request_serializer=serialize,
        response_deserializer=parse_extract_response,
    )
    return extract, stream


def reply_bytes_per_image(
    pipeline: Pipeline | None, images: np.ndarray, output_dtype: OutputDType
) -> int:
    """Bytes of outputs one image gives (0 when the spec is unknown or does not fit it)."""
    if pipeline is None or images.ndim != 4:
        return 0
    h, w = (2, 3) if pipeline.input.layout == "NCHW" else (1, 2)
    try:
        shapes = {s.name: s.shape for s in infer_shapes(pipeline, images.shape[h], images.shape[w])}
    except FeatmapError:
        return 0  # the server will say what is wrong, naming the field
    itemsize = 2 if output_dtype == "float16" else 4
    return sum(math.prod(shapes[name]) * itemsize for name in pipeline.output_names)


def local_spec(spec: SpecLike) -> Pipeline | None:
    """The spec parsed here, for sizing chunks (None if invalid: the server names the field)."""
    try:
        return parse_pipeline(spec if isinstance(spec, Pipeline | str) else dict(spec))
    except FeatmapError:
        return None


def images_per_message(
    images: np.ndarray, pipeline: SpecLike, max_message_bytes: int, reply_per_image: int = 0
) -> int:
    """How many images fit in one request and in its reply (at least 1)."""
    text = len(pipeline) if isinstance(pipeline, str) else len(spec_json(pipeline))
    per_image = max(1, math.prod(images.shape[1:]) * images.dtype.itemsize)
    room = max_message_bytes - text - ENVELOPE_BYTES
    return max(1, min(room // per_image, room // max(1, reply_per_image)))


def chunks(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of at most `size` images (views, no copy)."""
    for start in range(0, len(images), size):
        yield images[start : start + size]


def concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-chunk outputs joined back along the batch axis, in order."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def register_request(
    spec: SpecLike, weights: Mapping[str, np.ndarray] | None, batching: Mapping[str, Any] | None
) -> pb.RegisterPipelineRequest:
    """A RegisterPipelineRequest with weight tensors as raw bytes."""
    request = pb.RegisterPipelineRequest(spec_json=spec_json(spec))
    for name, array in (weights or {}).items():
        request.weights[name].CopyFrom(encode_tensor(sendable(array)))
    if batching is not None:
        request.batching.CopyFrom(pb.BatchingConfig(**batching))
    return request


def pipeline_info(info: pb.PipelineInfo) -> PipelineInfo:
    """A PipelineInfo message as a dataclass."""
    return PipelineInfo(
        pipeline_id=info.pipeline_id,
        spec=json.loads(info.spec_json),
        outputs={
            o.name: [d.size if d.WhichOneof("value") == "size" else d.symbol for d in o.shape]
            for o in info.outputs
        },
        weight_names=list(info.weight_names),
        batching={
            "enabled": info.batching.enabled,
            "max_batch_size": info.batching.max_batch_size,
            "max_queue_delay_us": info.batching.max_queue_delay_us,
        },
        onnx_model=info.onnx_model,
    )


def server_info(info: pb.GetServerInfoResponse) -> ServerInfo:
    """A GetServerInfoResponse as a dataclass."""
    return ServerInfo(
        version=info.version,
        onnxruntime_version=info.onnxruntime_version,
        available_providers=list(info.available_providers),
        active_providers=list(info.active_providers),
        limits={field.name: value for field, value in info.limits.ListFields()},
        onnx_opset=info.onnx_opset,
        intra_op_threads=info.intra_op_threads,
        grpc_workers=info.grpc_workers,
    )


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message limits for a channel; replies are bounded by the server's own limit."""
    return [
        ("grpc.max_receive_message_length", 2 * max_message_bytes),
        ("grpc.max_send_message_length", 2 * max_message_bytes),
    ]


# --------------------------------------------------------------------------- blocking client


class FeatureClient:
    """A blocking client. Use as a context manager, or call close().

    Args:
        address: "host:port" (or any gRPC target).
        timeout: default deadline in seconds for each call (None: no deadline).
        max_message_bytes: largest message to send; larger batches are streamed in chunks.
            Match the server's setting.
        in_flight: requests extract_iter keeps in flight.
        shared_memory: pass images and outputs through POSIX shared memory instead of the
            socket (the server must run on this host, as the same user). Requests of one
            client then run one at a time.
        retries: how often a unary call is retried, with jittered exponential backoff, when
            the server is busy (RESOURCE_EXHAUSTED marked retryable) or UNAVAILABLE.
        load_balancing: spread calls over every address the target resolves to (gRPC's
            round_robin: "dns:///name:port", or "ipv4:10.0.0.1:50051,10.0.0.2:50051"), and
            let gRPC resend a call that met UNAVAILABLE before any answer, to another replica.
            A stream stays on the replica it started on; extract_iter spreads its calls.
        options: extra gRPC channel options.
        tls: use TLS, trusting the system's roots unless `tls_ca` is given (implied by any of
            the tls_* arguments).
        tls_ca: the CA that signed the server's certificate (a PEM path, or PEM bytes).
        tls_cert, tls_key: this client's certificate and key, for servers requiring mutual TLS.
        tls_server_name: the name to check the server's certificate against, when it differs
            from the host in `address`.
        token: sent as `authorization: Bearer <token>` with every call.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        in_flight: int = 4,
        retries: int = 3,
        shared_memory: bool = False,
        load_balancing: bool = False,
        options: Sequence[tuple[str, Any]] = (),
        tls: bool = False,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.in_flight = in_flight
        self.retries = retries
        security = ChannelSecurity(tls, tls_ca, tls_cert, tls_key, tls_server_name, token)
        balancing = retry_channel_options(round_robin=True) if load_balancing else []
        self._channel = security.channel(
            address, [*channel_options(max_message_bytes), *balancing, *options]
        )
        self._stub = pb_grpc.FeatureExtractorStub(self._channel)
        self._extract, self._extract_stream = extract_methods(self._channel)
        self._shared = SharedMemoryTransport(self._stub) if shared_memory else None
        self._specs: dict[str, Pipeline] = {}  # registered pipelines' specs, for chunk sizes
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _spec_of(self, pipeline: SpecLike) -> Pipeline | None:
        """The spec behind a spec or a pipeline id (None when it cannot be had)."""
        if not is_pipeline_id(pipeline):
            return local_spec(pipeline)
        assert isinstance(pipeline, str)
        if pipeline not in self._specs:
            try:
                self._specs[pipeline] = parse_pipeline(self.get_pipeline(pipeline).spec)
            except (FeatmapRpcError, FeatmapError):
                return None
        return self._specs[pipeline]

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return call_with_retries(
                lambda left: method(request, timeout=left), self.retries, self._timeout(timeout)
            )
        except grpc.RpcError as exc:
            raise FeatmapRpcError.from_rpc_error(exc) from None

    def extract(
        self,
        images: np.ndarray,
        pipeline: SpecLike,
        *,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run a pipeline (a spec, or a registered pipeline's id) on a batch of images.

        Returns one array per requested output, keyed by layer name: read-only views of the
        response bytes (`.copy()` to modify). A batch larger than one message is streamed in
        chunks and reassembled in order.
        """
        images = sendable(images)
        if self._shared is not None:
            message = request_for(None, pipeline, output_dtype).message
            try:
                return self._shared.extract(images, message, self._timeout(timeout))
            except grpc.RpcError as exc:
                raise FeatmapRpcError.from_rpc_error(exc) from None
        per_message = images_per_message(images, pipeline, self.max_message_bytes)
        if len(images) <= per_message:
            reply = reply_bytes_per_image(self._spec_of(pipeline), images, output_dtype)
            per_message = images_per_message(images, pipeline, self.max_message_bytes, reply)
        if len(images) <= per_message:
            request = request_for(images, pipeline, output_dtype)
            return outputs_of(self._call(self._extract, request, timeout))
        reply = reply_bytes_per_image(self._spec_of(pipeline), images, output_dtype)
        per_message = images_per_message(images, pipeline, self.max_message_bytes, reply)
        parts = list(
            self.extract_stream(
                chunks(images, per_message), pipeline, output_dtype=output_dtype, timeout=timeout
            )
        )
        return concatenate(parts)

    def extract_stream(
        self,
        batches: Iterable[np.ndarray],
        pipeline: SpecLike,
        *,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """One ExtractStream: yields each batch's outputs in order as the server finishes it.

        At most `in_flight` batches are sent ahead of the results handed to the caller, so
        memory stays a few batches on both sides however long the job is.
        """
        ahead = threading.Semaphore(max(1, self.in_flight))
        finished = threading.Event()

        def requests() -> Iterator[OutgoingExtract]:
            for index, batch in enumerate(batches):
                while not ahead.acquire(timeout=0.1):
                    if finished.is_set():
                        return
                yield request_for(sendable(batch), pipeline if index == 0 else None, output_dtype)

        call = self._extract_stream(requests(), timeout=self._timeout(timeout))
        try:
            for response in call:
                ahead.release()
                yield outputs_of(response)
        except grpc.RpcError as exc:
            raise FeatmapRpcError.from_rpc_error(exc) from None
        finally:
            finished.set()
            call.cancel()  # a consumer that stops early must not leave the stream open

    def extract_iter(
        self,
        batches: Iterable[np.ndarray],
        pipeline: SpecLike,
        *,
        in_flight: int | None = None,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield each batch's outputs in order, keeping `in_flight` unary requests running.

        A request refused for now (busy, or UNAVAILABLE: a replica went away before answering)
        is sent again with the client's retries; gRPC's own retry policy gives up on requests
        over its 256 KiB retry buffer, so it cannot be relied on for image batches.
        """
        pending: collections.deque[tuple[OutgoingExtract, Any]] = collections.deque()
        limit = max(1, in_flight or self.in_flight)

        def result(request: OutgoingExtract, future: Any) -> dict[str, np.ndarray]:
            try:
                return outputs_of(future.result())
            except grpc.RpcError as exc:
                if self.retries < 1 or not is_retryable(exc):
                    raise FeatmapRpcError.from_rpc_error(exc) from None
            # A load-balanced channel sends the retry to another ready replica.
            return outputs_of(self._call(self._extract, request, timeout))

        try:
            for batch in batches:
                request = request_for(sendable(batch), pipeline, output_dtype)
                future = self._extract.future(request, timeout=self._timeout(timeout))
                pending.append((request, future))
                if len(pending) >= limit:
                    yield result(*pending.popleft())
            while pending:
                yield result(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()

    def register(
        self,
        spec: SpecLike,
        weights: Mapping[str, np.ndarray] | None = None,
        *,
        batching: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Register a spec with its weight tensors (referenced as {"tensor": name}); its id.

        `batching` overrides the server's dynamic batching for this pipeline:
        {"enabled": bool, "max_batch_size": int, "max_queue_delay_us": int}.
        """
        request = register_request(spec, weights, batching)
        return str(self._call(self._stub.RegisterPipeline, request, timeout).pipeline_id)

    def get_pipeline(
        self, pipeline_id: str, *, include_model: bool = False, timeout: float | None = None
    ) -> PipelineInfo:
        """A registered pipeline's spec, outputs, weights' names, batching (and ONNX model)."""
        request = pb.GetPipelineRequest(pipeline_id=pipeline_id, include_model=include_model)
        return pipeline_info(self._call(self._stub.GetPipeline, request, timeout))

    def list_pipelines(self, *, timeout: float | None = None) -> list[PipelineInfo]:
        """Every registered pipeline."""
        response = self._call(self._stub.ListPipelines, pb.ListPipelinesRequest(), timeout)
        return [pipeline_info(info) for info in response.pipelines]

    def delete_pipeline(self, pipeline_id: str, *, timeout: float | None = None) -> bool:
        """Forget a registered pipeline; False if the server did not have it."""
        request = pb.DeletePipelineRequest(pipeline_id=pipeline_id)
        return bool(self._call(self._stub.DeletePipeline, request, timeout).deleted)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """Version, onnxruntime version, execution providers, threads and limits."""
        return server_info(self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout))

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server's health service says SERVING (TimeoutError after `timeout`)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
            status = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
            raise TimeoutError(f"featmap server at {self.address} not ready: {exc}") from None
        if status.status != health_pb2.HealthCheckResponse.SERVING:
            raise TimeoutError(f"featmap server at {self.address} is not serving")

    def close(self) -> None:
        """Release shared memory (if used) and close the channel."""
        if self._shared is not None:
            self._shared.close()
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


class SharedMemoryTransport:
    """Extract through the client's shared-memory regions: one copy in, one copy out."""

    def __init__(self, stub: pb_grpc.FeatureExtractorStub) -> None:
        self.stub = stub
        self.pool = SharedMemoryPool()
        self.lease_seconds = 0.0
        self.renewed = 0.0
        self.output_bytes_per_image = 0

    def _register(self, registrations: list[tuple[str, str, int]], timeout: float | None) -> None:
        for region, key, byte_size in registrations:
            request = pb.RegisterSharedMemoryRequest(
                region=region, key=key, byte_size=byte_size, owner=self.pool.owner
            )
            self.lease_seconds = self.stub.RegisterSharedMemory(
                request, timeout=timeout
            ).lease_seconds
            self.renewed = time.monotonic()

    def _renew(self, timeout: float | None) -> None:
        # Renewed on use; a client idle past its lease re-registers on NOT_FOUND instead.
        if self.lease_seconds and time.monotonic() - self.renewed > self.lease_seconds / 3:
            request = pb.RenewSharedMemoryRequest(owner=self.pool.owner)
            self.stub.RenewSharedMemory(request, timeout=timeout)
            self.renewed = time.monotonic()

    def extract(
        self, images: np.ndarray, message: pb.ExtractRequest, timeout: float | None
    ) -> dict[str, np.ndarray]:
        """One Extract with images and outputs in shared memory (outputs come back copied)."""
        with self.pool.lock:
            images_ref, registrations = self.pool.images_ref(images)
            # Sized from the last reply; a region too small makes the server answer inline.
            wanted = max(1 << 16, self.output_bytes_per_image * len(images))
            output_ref, more = self.pool.output_ref(wanted)
            self._register(registrations + more, timeout)
            self._renew(timeout)
            header = pb.Tensor(dtype=wire_dtype(images), shape=images.shape)  # type: ignore[arg-type]
            message.images.CopyFrom(header)
            message.images_region.CopyFrom(images_ref)
            message.output_region.CopyFrom(output_ref)
            try:
                response = self.stub.Extract(message, timeout=timeout)
            except grpc.RpcError as exc:
                call: Any = exc
                if call.code() != grpc.StatusCode.NOT_FOUND or "region" not in (
                    call.details() or ""
                ):
                    raise
                self._register(self.pool.registrations(), timeout)  # the lease ran out: again
                response = self.stub.Extract(message, timeout=timeout)
            outputs = self.pool.read_outputs(response)
        total = sum(array.nbytes for array in outputs.values())
        self.output_bytes_per_image = max(self.output_bytes_per_image, -(-total // len(images)))
        return outputs

    def close(self) -> None:
        """Unregister this client's regions on the server (best effort), then unlink them."""
        try:
            request = pb.UnregisterSharedMemoryRequest(owner=self.pool.owner)
            self.stub.UnregisterSharedMemory(request, timeout=5)
        except grpc.RpcError:
            pass  # the server is gone or will drop the lease by itself
        self.pool.close()


# --------------------------------------------------------------------------- asyncio client


class AsyncFeatureClient:
    """The asyncio twin of FeatureClient (grpc.aio); `async with` it, or `await close()`.

    The load_balancing, tls_* and token arguments are as FeatureClient's.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        in_flight: int = 4,
        retries: int = 3,
        load_balancing: bool = False,
        tls: bool = False,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.in_flight = in_flight
        self.retries = retries
        security = ChannelSecurity(tls, tls_ca, tls_cert, tls_key, tls_server_name, token)
        balancing = retry_channel_options(round_robin=True) if load_balancing else []
        self._channel = security.aio_channel(
            address, [*channel_options(max_message_bytes), *balancing]
        )
        self._stub = pb_grpc.FeatureExtractorStub(self._channel)
        self._extract, self._extract_stream = extract_methods(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._specs: dict[str, Pipeline] = {}

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _spec_of(self, pipeline: SpecLike) -> Pipeline | None:
        """As FeatureClient._spec_of."""
        if not is_pipeline_id(pipeline):
            return local_spec(pipeline)
        assert isinstance(pipeline, str)
        if pipeline not in self._specs:
            try:
                self._specs[pipeline] = parse_pipeline((await self.get_pipeline(pipeline)).spec)
            except (FeatmapRpcError, FeatmapError):
                return None
        return self._specs[pipeline]

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await call_with_retries_async(
                lambda left: method(request, timeout=left), self.retries, self._timeout(timeout)
            )
        except grpc.aio.AioRpcError as exc:
            raise FeatmapRpcError.from_rpc_error(exc) from None

    async def extract(
        self,
        images: np.ndarray,
        pipeline: SpecLike,
        *,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """As FeatureClient.extract."""
        images = sendable(images)
        reply = reply_bytes_per_image(await self._spec_of(pipeline), images, output_dtype)
        per_message = images_per_message(images, pipeline, self.max_message_bytes, reply)
        if len(images) <= per_message:
            request = request_for(images, pipeline, output_dtype)
            return outputs_of(await self._call(self._extract, request, timeout))
        stream = self.extract_stream(
            chunks(images, per_message), pipeline, output_dtype=output_dtype, timeout=timeout
        )
        return concatenate([part async for part in stream])

    async def extract_stream(
        self,
        batches: Iterable[np.ndarray] | AsyncIterable[np.ndarray],
        pipeline: SpecLike,
        *,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """As FeatureClient.extract_stream; `batches` may be an async iterable."""

        async def requests() -> AsyncIterator[OutgoingExtract]:
            index = 0
            if isinstance(batches, AsyncIterable):
                async for batch in batches:
                    yield request_for(
                        sendable(batch), pipeline if index == 0 else None, output_dtype
                    )
                    index += 1
            else:
                for batch in batches:
                    yield request_for(
                        sendable(batch), pipeline if index == 0 else None, output_dtype
                    )
                    index += 1

        call = self._extract_stream(requests(), timeout=self._timeout(timeout))
        try:
            async for response in call:
                yield outputs_of(response)
        except grpc.aio.AioRpcError as exc:
            raise FeatmapRpcError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def extract_iter(
        self,
        batches: Iterable[np.ndarray],
        pipeline: SpecLike,
        *,
        in_flight: int | None = None,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """As FeatureClient.extract_iter: results in order, `in_flight` requests running."""
        limit = max(1, in_flight or self.in_flight)
        pending: collections.deque[asyncio.Task[dict[str, np.ndarray]]] = collections.deque()
        try:
            for batch in batches:
                pending.append(
                    asyncio.ensure_future(
                        self.extract(batch, pipeline, output_dtype=output_dtype, timeout=timeout)
                    )
                )
                if len(pending) >= limit:
                    yield await pending.popleft()
            while pending:
                yield await pending.popleft()
        finally:
            for task in pending:
                task.cancel()

    async def register(
        self,
        spec: SpecLike,
        weights: Mapping[str, np.ndarray] | None = None,
        *,
        batching: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> str:
        """As FeatureClient.register."""
        request = register_request(spec, weights, batching)
        return str((await self._call(self._stub.RegisterPipeline, request, timeout)).pipeline_id)

    async def get_pipeline(
        self, pipeline_id: str, *, include_model: bool = False, timeout: float | None = None
    ) -> PipelineInfo:
        """As FeatureClient.get_pipeline."""
        request = pb.GetPipelineRequest(pipeline_id=pipeline_id, include_model=include_model)
        return pipeline_info(await self._call(self._stub.GetPipeline, request, timeout))

    async def list_pipelines(self, *, timeout: float | None = None) -> list[PipelineInfo]:
        """As FeatureClient.list_pipelines."""
        response = await self._call(self._stub.ListPipelines, pb.ListPipelinesRequest(), timeout)
        return [pipeline_info(info) for info in response.pipelines]

    async def delete_pipeline(self, pipeline_id: str, *, timeout: float | None = None) -> bool:
        """As FeatureClient.delete_pipeline."""
        request = pb.DeletePipelineRequest(pipeline_id=pipeline_id)
        return bool((await self._call(self._stub.DeletePipeline, request, timeout)).deleted)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """As FeatureClient.server_info."""
        request = pb.GetServerInfoRequest()
        return server_info(await self._call(self._stub.GetServerInfo, request, timeout))

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """As FeatureClient.wait_ready."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
            request = health_pb2.HealthCheckRequest(service="")
            status = await self._health.Check(request, timeout=timeout)
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            raise TimeoutError(f"featmap server at {self.address} not ready: {exc}") from None
        if status.status != health_pb2.HealthCheckResponse.SERVING:
            raise TimeoutError(f"featmap server at {self.address} is not serving")

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncFeatureClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
