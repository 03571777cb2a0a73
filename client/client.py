"""FeatureClient and AsyncFeatureClient: numpy in, numpy out, over featmap's gRPC API.

Both stand on `_ClientBase`, which holds every option and the request planning, and drive the
same exchanges (protocol.py: retries, the shared-memory lease sequence) through their `_run`;
the two classes only do I/O, blocking or with asyncio. A test compares their public signatures.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
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
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..contract.tensors import OutputDType, sendable
from ..v1 import featmap_pb2 as pb
from ..v1 import featmap_pb2_grpc as pb_grpc
from .channel import ChannelSecurity, PemSource
from .messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Batch,
    EncodedBatch,
    FeatmapRpcError,
    OutgoingExtract,
    PipelineInfo,
    ServerInfo,
    SpecLike,
    channel_options,
    chunks,
    concatenate,
    encoded_parts,
    extract_methods,
    images_per_message,
    is_pipeline_id,
    local_spec,
    outputs_of,
    parses_specs,
    pipeline_info,
    register_request,
    reply_bytes_per_image,
    request_for,
    server_info,
)
from .protocol import Action, Pause, Stepper, Steps
from .retry import balancing_options, is_retryable, with_retries
from .shared_memory import UNIX_TARGET_PREFIX, SharedMemoryTransports

if TYPE_CHECKING:
    from ..contract.spec import Pipeline

Result = TypeVar("Result")

__all__ = ["AsyncFeatureClient", "FeatmapRpcError", "FeatureClient", "PipelineInfo", "ServerInfo"]

SERVING = health_pb2.HealthCheckResponse.SERVING


class _ClientBase:
    """Options and planning shared by FeatureClient and AsyncFeatureClient.

    Args:
        address: "host:port" (or any gRPC target).
        timeout: default deadline in seconds for each call (None: no deadline).
        max_message_bytes: largest message to send; larger batches are streamed in chunks.
            Match the server's setting.
        in_flight: requests extract_iter keeps in flight, and batches extract_stream sends
            ahead of the results handed back.
        retries: how often a unary call is retried, with jittered exponential backoff, when
            the server is busy (RESOURCE_EXHAUSTED marked retryable) or UNAVAILABLE. The
            client's retries are the only ones: gRPC's own retry policy is not used.
        shared_memory: pass images and outputs through POSIX shared memory instead of the
            socket. The server must run on this host, as the same user, with --unix-socket
            and --shared-memory, and `address` must be that socket ("unix:/path"): shared
            memory is offered to callers proven local only. Requests of one client then run
            one at a time.
        load_balancing: spread calls over every address the target resolves to (gRPC's
            round_robin: "dns:///name:port", or "ipv4:10.0.0.1:50051,10.0.0.2:50051"); a
            retried call goes to another replica. A stream stays on the replica it started on.
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
        self.in_flight = max(1, in_flight)
        self.retries = retries
        self.security = ChannelSecurity(tls, tls_ca, tls_cert, tls_key, tls_server_name, token)
        self.channel_options = [
            *channel_options(max_message_bytes),
            *(balancing_options() if load_balancing else []),
            *options,
        ]
        if shared_memory and not address.startswith(UNIX_TARGET_PREFIX):
            raise ValueError(
                f"shared_memory needs the server's Unix socket as the address "
                f"('{UNIX_TARGET_PREFIX}/path/featmap.sock'), not {address!r}: the server "
                "offers shared memory only to callers proven local"
            )
        self._shared = SharedMemoryTransports() if shared_memory else None
        # Registered pipelines' specs, for sizing chunks; fetched once per id.
        self._specs: dict[str, Pipeline] = {}
        channel = self._open_channel()
        self._channel = channel
        self._stub = pb_grpc.FeatureExtractorStub(channel)
        self._extract, self._extract_stream = extract_methods(channel)
        self._health = health_pb2_grpc.HealthStub(channel)

    def _open_channel(self) -> Any:
        """A blocking or grpc.aio channel to self.address, as the subclass does I/O."""
        raise NotImplementedError

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _listing(
        self, method: Any, page_size: int, timeout: float | None
    ) -> Steps[list[PipelineInfo]]:
        """ListPipelines page after page (each page retried as any call, `timeout` each):
        every pipeline, by id."""
        listed: list[PipelineInfo] = []
        request = pb.ListPipelinesRequest(page_size=page_size)
        while True:
            response = yield from with_retries(
                method, request, self.retries, self._timeout(timeout)
            )
            listed += [pipeline_info(info) for info in response.pipelines]
            if not response.next_page_token:
                return listed
            request = pb.ListPipelinesRequest(
                page_size=page_size, page_token=response.next_page_token
            )

    def _known_spec(self, pipeline: SpecLike) -> tuple[Pipeline | None, bool]:
        """(the spec behind `pipeline` if known here, whether it must be fetched by id)."""
        if not is_pipeline_id(pipeline):
            return local_spec(pipeline), False
        assert isinstance(pipeline, str)
        known = self._specs.get(pipeline)
        # Without pydantic a fetched spec could not be parsed: no GetPipeline for nothing.
        return known, known is None and parses_specs()

    def _remember_spec(self, pipeline_id: str, info: PipelineInfo) -> Pipeline | None:
        spec = local_spec(info.spec)
        if spec is not None:
            self._specs[pipeline_id] = spec
        return spec

    def _per_message(
        self, images: np.ndarray, pipeline: SpecLike, spec: Pipeline | None, output_dtype: str
    ) -> int:
        """Images per message so that each request and its reply fit in max_message_bytes."""
        reply = reply_bytes_per_image(spec, images, output_dtype)  # type: ignore[arg-type]
        outputs = 0 if spec is None else len(spec.output_names)
        return images_per_message(images, pipeline, self.max_message_bytes, reply, outputs)

    def _encoded_parts(
        self,
        images: Iterable[bytes | bytearray | memoryview],
        size: tuple[int, int] | None,
        draft: bool,
        pipeline: SpecLike,
        spec: Pipeline | None,
        output_dtype: OutputDType,
    ) -> list[EncodedBatch]:
        """Encoded images in parts that each fit a request and its reply (encoded_parts)."""
        batch = EncodedBatch(tuple(bytes(image) for image in images), size, draft)
        reply = reply_bytes_per_image(spec, batch, output_dtype)
        outputs = 0 if spec is None else len(spec.output_names)
        return encoded_parts(batch, pipeline, self.max_message_bytes, reply, outputs)

    @staticmethod
    def _stream_requests(
        batches: Iterable[Batch], pipeline: SpecLike, output_dtype: OutputDType
    ) -> Iterator[OutgoingExtract]:
        for index, batch in enumerate(batches):
            yield request_for(batch, pipeline if index == 0 else None, output_dtype)


# --------------------------------------------------------------------------- blocking client


class FeatureClient(_ClientBase):
    """A blocking client: use it as a context manager, or call close(). Options: _ClientBase."""

    def _open_channel(self) -> grpc.Channel:
        # Requests through shared memory take turns on the transports (one request each).
        self._shared_turns = threading.Condition()
        return self.security.channel(self.address, self.channel_options)

    def _run(self, steps: Steps[Result]) -> Result:
        """Make the calls and pauses of an exchange (protocol.py), blocking."""
        run = Stepper(steps)
        while run.action is not None:
            with run.failures():
                run.reply(self._perform(run.action))
        return run.result

    @staticmethod
    def _perform(action: Action) -> Any:
        if isinstance(action, Pause):
            return time.sleep(action.seconds)
        return action.method(action.request, timeout=action.timeout)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        return self._run(with_retries(method, request, self.retries, self._timeout(timeout)))

    def images_per_message(
        self, images: np.ndarray, pipeline: SpecLike, output_dtype: OutputDType = "float32"
    ) -> int:
        """How many images like these fit in one request and its reply (what extract() sends
        at most per message; a larger batch goes as a stream of chunks)."""
        return self._per_message(images, pipeline, self._spec_of(pipeline), output_dtype)

    def _spec_of(self, pipeline: SpecLike) -> Pipeline | None:
        spec, fetch = self._known_spec(pipeline)
        if fetch:
            assert isinstance(pipeline, str)
            try:
                return self._remember_spec(pipeline, self.get_pipeline(pipeline))
            except FeatmapRpcError:
                return None
        return spec

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
        chunks and reassembled in order. Arrays must be float32, float16 or uint8 (float64 is
        sent as float32); others raise featmap.contract.errors.InvalidTensor before sending.
        """
        images = sendable(images)
        if self._shared is not None:
            return self._extract_shared(images, pipeline, output_dtype, timeout)
        per_message = self._per_message(images, pipeline, self._spec_of(pipeline), output_dtype)
        if len(images) <= per_message:
            request = request_for(images, pipeline, output_dtype)
            return outputs_of(self._call(self._extract, request, timeout))

        def streamed(batch: np.ndarray, timeout: float | None) -> dict[str, np.ndarray]:
            parts = self._stream(chunks(batch, per_message), pipeline, output_dtype, timeout)
            return concatenate(list(parts))

        # The batch is ours to send again: a stream refused as busy (max_streams) is retried.
        return self._call(streamed, images, timeout)

    def extract_encoded(
        self,
        images: Iterable[bytes | bytearray | memoryview],
        pipeline: SpecLike,
        *,
        size: tuple[int, int] | None = None,
        draft: bool = False,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run a pipeline on encoded image files (JPEG, PNG or WebP bytes) the server decodes.

        The server decodes them as `featmap extract` does: the pipeline's channels, resized to
        `size` (H, W) if given (else all must have one size), a JPEG at a smaller scale first
        with `draft`, uint8 pixels through the pipeline's pixel variant. Images beyond one
        message (by their bytes) are streamed in parts and the outputs joined in order.
        Returns the outputs as extract does.
        """
        parts = self._encoded_parts(
            images, size, draft, pipeline, self._spec_of(pipeline), output_dtype
        )
        if len(parts) == 1:
            request = request_for(parts[0], pipeline, output_dtype)
            return outputs_of(self._call(self._extract, request, timeout))

        def streamed(batches: list[EncodedBatch], timeout: float | None) -> dict[str, np.ndarray]:
            return concatenate(list(self._stream(batches, pipeline, output_dtype, timeout)))

        return self._call(streamed, parts, timeout)

    def _extract_shared(
        self,
        images: np.ndarray,
        pipeline: SpecLike,
        output_dtype: OutputDType,
        timeout: float | None,
        most: int = 1,
    ) -> dict[str, np.ndarray]:
        """extract() through a transport of its own (of at most `most`, waiting for one; on
        another when the server holds no more regions for a new one: see refused)."""
        shared = self._shared
        assert shared is not None
        message = request_for(None, pipeline, output_dtype).message
        while True:
            with self._shared_turns:
                while (transport := shared.take(most)) is None:
                    self._shared_turns.wait()
            retired = False
            try:
                with transport.pool.lock:
                    steps = transport.extract(
                        self._stub, images, message, self._timeout(timeout), self.retries
                    )
                    return self._run(steps)
            except FeatmapRpcError as exc:
                with self._shared_turns:
                    retired = shared.refused(transport, exc)
                if not retired:
                    raise
            finally:
                if not retired:
                    with self._shared_turns:
                        shared.give(transport)
                        self._shared_turns.notify_all()  # one may take it, one make another
            with contextlib.suppress(grpc.RpcError):  # the region it may have registered
                self._stub.UnregisterSharedMemory(transport.unregistration(), timeout=5)
            transport.close()

    def extract_stream(
        self,
        batches: Iterable[Batch],
        pipeline: SpecLike,
        *,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """One ExtractStream: yields each batch's outputs in order as the server finishes it.

        At most `in_flight` batches are sent ahead of the results handed to the caller, so
        memory stays a few batches on both sides however long the job is.
        """
        try:
            yield from self._stream(batches, pipeline, output_dtype, timeout)
        except grpc.RpcError as exc:
            raise FeatmapRpcError.from_rpc_error(exc) from None

    def _stream(
        self,
        batches: Iterable[Batch],
        pipeline: SpecLike,
        output_dtype: OutputDType,
        timeout: float | None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """extract_stream, with gRPC's errors as they come (for retries)."""
        ahead = threading.Semaphore(self.in_flight)
        finished = threading.Event()

        def requests() -> Iterator[OutgoingExtract]:
            for request in self._stream_requests(batches, pipeline, output_dtype):
                while not ahead.acquire(timeout=0.1):
                    if finished.is_set():
                        return
                yield request

        call = self._extract_stream(requests(), timeout=self._timeout(timeout))
        try:
            for response in call:
                ahead.release()
                yield outputs_of(response)
        finally:
            finished.set()
            call.cancel()  # a consumer that stops early must not leave the stream open

    def extract_iter(
        self,
        batches: Iterable[Batch],
        pipeline: SpecLike,
        *,
        in_flight: int | None = None,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield each batch's outputs in order, keeping `in_flight` unary requests running.

        A request refused for now (busy, or UNAVAILABLE: a replica went away before answering)
        is sent again with the client's retries. With shared memory, each request in flight
        has segments of its own (and a thread that waits for its reply).
        """
        pending: collections.deque[tuple[OutgoingExtract, Any]] = collections.deque()
        limit = max(1, in_flight or self.in_flight)
        if self._shared is not None:
            yield from self._extract_iter_shared(batches, pipeline, limit, output_dtype, timeout)
            return

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
                request = request_for(batch, pipeline, output_dtype)
                future = self._extract.future(request, timeout=self._timeout(timeout))
                pending.append((request, future))
                if len(pending) >= limit:
                    yield result(*pending.popleft())
            while pending:
                yield result(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()

    def _extract_iter_shared(
        self,
        batches: Iterable[Batch],
        pipeline: SpecLike,
        limit: int,
        output_dtype: OutputDType,
        timeout: float | None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """extract_iter through shared memory: `limit` requests at a time, on threads."""

        def extract(batch: Batch) -> dict[str, np.ndarray]:
            if isinstance(batch, EncodedBatch):  # files' bytes go inline, as extract_iter's do
                request = request_for(batch, pipeline, output_dtype)
                return outputs_of(self._call(self._extract, request, timeout))
            images = sendable(batch)
            return self._extract_shared(images, pipeline, output_dtype, timeout, limit)

        pending: collections.deque[Future[dict[str, np.ndarray]]] = collections.deque()
        with ThreadPoolExecutor(limit, thread_name_prefix="featmap-shared-memory") as threads:
            try:
                for batch in batches:
                    pending.append(threads.submit(extract, batch))
                    if len(pending) >= limit:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def register(
        self,
        spec: SpecLike,
        weights: Mapping[str, np.ndarray] | None = None,
        *,
        name: str | None = None,
        replace: bool = False,
        batching: Mapping[str, Any] | None = None,
        calibration: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> str:
        """Register a spec with its weight tensors (referenced as {"tensor": name}); its id.

        `name` also registers it under a name of yours, usable wherever the id is (extract,
        get_pipeline, delete_pipeline, OIP model names); a name that names another pipeline is
        an error (ALREADY_EXISTS) unless `replace`, which moves it here. `batching` overrides
        the server's dynamic batching for this pipeline:
        {"enabled": bool, "max_batch_size": int, "max_queue_delay_us": int}. `calibration`:
        for an int8 spec, images like the ones you will send (N, ...) in the pipeline's input
        dtype and layout; the int8 ranges cover them and the error is measured on them
        (get_pipeline(...).int8 says what it measured). An int8 pipeline whose error exceeds
        the spec's max_error is refused (INVALID_ARGUMENT, field max_error).
        """
        request = register_request(spec, weights, batching, name, replace, calibration)
        return str(self._call(self._stub.RegisterPipeline, request, timeout).pipeline_id)

    def get_pipeline(
        self, pipeline_id: str, *, include_model: bool = False, timeout: float | None = None
    ) -> PipelineInfo:
        """A registered pipeline's spec, outputs, weights' names, batching (and ONNX model)."""
        request = pb.GetPipelineRequest(pipeline_id=pipeline_id, include_model=include_model)
        return pipeline_info(self._call(self._stub.GetPipeline, request, timeout))

    def list_pipelines(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> list[PipelineInfo]:
        """Every registered pipeline, by id, asked for `page_size` at a time (0: the server's
        page, 100); `timeout` is each page's."""
        return self._run(self._listing(self._stub.ListPipelines, page_size, timeout))

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
        if status.status != SERVING:
            raise TimeoutError(f"featmap server at {self.address} is not serving")

    def close(self) -> None:
        """Release shared memory (if used) and close the channel."""
        if self._shared is not None:
            for transport in self._shared.all:
                # Best effort: a server that is gone drops the lease by itself.
                with contextlib.suppress(grpc.RpcError):
                    self._stub.UnregisterSharedMemory(transport.unregistration(), timeout=5)
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


# --------------------------------------------------------------------------- asyncio client


class AsyncFeatureClient(_ClientBase):
    """The asyncio twin of FeatureClient (grpc.aio): the same options and methods, awaited.

    `async with` it, or `await close()`.
    """

    def _open_channel(self) -> grpc.aio.Channel:
        # Requests through shared memory take turns on the transports (one request each).
        self._shared_turns = asyncio.Condition()
        return self.security.aio_channel(self.address, self.channel_options)

    async def _run(self, steps: Steps[Result]) -> Result:
        """Make the calls and pauses of an exchange (protocol.py), awaiting each."""
        run = Stepper(steps)
        while run.action is not None:
            with run.failures():
                run.reply(await self._perform(run.action))
        return run.result

    @staticmethod
    async def _perform(action: Action) -> Any:
        if isinstance(action, Pause):
            return await asyncio.sleep(action.seconds)
        return await action.method(action.request, timeout=action.timeout)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        return await self._run(with_retries(method, request, self.retries, self._timeout(timeout)))

    async def images_per_message(
        self, images: np.ndarray, pipeline: SpecLike, output_dtype: OutputDType = "float32"
    ) -> int:
        """As FeatureClient.images_per_message."""
        return self._per_message(images, pipeline, await self._spec_of(pipeline), output_dtype)

    async def _spec_of(self, pipeline: SpecLike) -> Pipeline | None:
        spec, fetch = self._known_spec(pipeline)
        if fetch:
            assert isinstance(pipeline, str)
            try:
                return self._remember_spec(pipeline, await self.get_pipeline(pipeline))
            except FeatmapRpcError:
                return None
        return spec

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
        if self._shared is not None:
            return await self._extract_shared(images, pipeline, output_dtype, timeout)
        spec = await self._spec_of(pipeline)
        per_message = self._per_message(images, pipeline, spec, output_dtype)
        if len(images) <= per_message:
            request = request_for(images, pipeline, output_dtype)
            return outputs_of(await self._call(self._extract, request, timeout))

        async def streamed(batch: np.ndarray, timeout: float | None) -> dict[str, np.ndarray]:
            parts = self._stream(chunks(batch, per_message), pipeline, output_dtype, timeout)
            return concatenate([part async for part in parts])

        # The batch is ours to send again: a stream refused as busy (max_streams) is retried.
        return await self._call(streamed, images, timeout)

    async def extract_encoded(
        self,
        images: Iterable[bytes | bytearray | memoryview],
        pipeline: SpecLike,
        *,
        size: tuple[int, int] | None = None,
        draft: bool = False,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """As FeatureClient.extract_encoded."""
        spec = await self._spec_of(pipeline)
        parts = self._encoded_parts(images, size, draft, pipeline, spec, output_dtype)
        if len(parts) == 1:
            request = request_for(parts[0], pipeline, output_dtype)
            return outputs_of(await self._call(self._extract, request, timeout))

        async def streamed(
            batches: list[EncodedBatch], timeout: float | None
        ) -> dict[str, np.ndarray]:
            parts = self._stream(batches, pipeline, output_dtype, timeout)
            return concatenate([part async for part in parts])

        return await self._call(streamed, parts, timeout)

    async def _extract_batch(
        self,
        batch: Batch,
        pipeline: SpecLike,
        output_dtype: OutputDType,
        timeout: float | None,
        most: int = 1,
    ) -> dict[str, np.ndarray]:
        """One batch of extract_iter's; through shared memory, on one of `most` transports."""
        if isinstance(batch, EncodedBatch):
            return await self.extract_encoded(
                batch.images,
                pipeline,
                size=batch.size,
                draft=batch.draft,
                output_dtype=output_dtype,
                timeout=timeout,
            )
        if self._shared is not None:
            images = sendable(batch)
            return await self._extract_shared(images, pipeline, output_dtype, timeout, most)
        return await self.extract(batch, pipeline, output_dtype=output_dtype, timeout=timeout)

    async def _extract_shared(
        self,
        images: np.ndarray,
        pipeline: SpecLike,
        output_dtype: OutputDType,
        timeout: float | None,
        most: int = 1,
    ) -> dict[str, np.ndarray]:
        """As FeatureClient._extract_shared."""
        shared = self._shared
        assert shared is not None
        message = request_for(None, pipeline, output_dtype).message
        while True:
            async with self._shared_turns:
                while (transport := shared.take(most)) is None:
                    await self._shared_turns.wait()
            retired = False
            try:
                # No lock: on one event loop, the transport is this task's until it is given back.
                steps = transport.extract(
                    self._stub, images, message, self._timeout(timeout), self.retries
                )
                return await self._run(steps)
            except FeatmapRpcError as exc:
                retired = shared.refused(transport, exc)
                if not retired:
                    raise
            finally:
                if not retired:
                    async with self._shared_turns:
                        shared.give(transport)
                        self._shared_turns.notify_all()  # one may take it, one make another
            with contextlib.suppress(grpc.RpcError):  # the region it may have registered
                await self._stub.UnregisterSharedMemory(transport.unregistration(), timeout=5)
            transport.close()

    async def extract_stream(
        self,
        batches: Iterable[Batch] | AsyncIterable[Batch],
        pipeline: SpecLike,
        *,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """As FeatureClient.extract_stream (`in_flight` batches ahead); `batches` may be an
        async iterable."""
        try:
            async for outputs in self._stream(batches, pipeline, output_dtype, timeout):
                yield outputs
        except grpc.RpcError as exc:
            raise FeatmapRpcError.from_rpc_error(exc) from None

    async def _stream(
        self,
        batches: Iterable[Batch] | AsyncIterable[Batch],
        pipeline: SpecLike,
        output_dtype: OutputDType,
        timeout: float | None,
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """extract_stream, with gRPC's errors as they come (for retries)."""
        ahead = asyncio.Semaphore(self.in_flight)

        async def each_batch() -> AsyncIterator[Batch]:
            if isinstance(batches, AsyncIterable):
                async for batch in batches:
                    yield batch
            else:
                for batch in batches:
                    yield batch

        async def requests() -> AsyncIterator[OutgoingExtract]:
            index = 0
            async for batch in each_batch():
                await ahead.acquire()
                yield request_for(batch, pipeline if index == 0 else None, output_dtype)
                index += 1

        call = self._extract_stream(requests(), timeout=self._timeout(timeout))
        try:
            async for response in call:
                ahead.release()
                yield outputs_of(response)
        finally:
            call.cancel()

    async def extract_iter(
        self,
        batches: Iterable[Batch],
        pipeline: SpecLike,
        *,
        in_flight: int | None = None,
        output_dtype: OutputDType = "float32",
        timeout: float | None = None,
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """As FeatureClient.extract_iter: results in order, `in_flight` requests running
        (through shared memory: each with segments of its own)."""
        limit = max(1, in_flight or self.in_flight)
        pending: collections.deque[asyncio.Task[dict[str, np.ndarray]]] = collections.deque()
        try:
            for batch in batches:
                pending.append(
                    asyncio.ensure_future(
                        self._extract_batch(batch, pipeline, output_dtype, timeout, limit)
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
        name: str | None = None,
        replace: bool = False,
        batching: Mapping[str, Any] | None = None,
        calibration: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> str:
        """As FeatureClient.register."""
        request = register_request(spec, weights, batching, name, replace, calibration)
        return str((await self._call(self._stub.RegisterPipeline, request, timeout)).pipeline_id)

    async def get_pipeline(
        self, pipeline_id: str, *, include_model: bool = False, timeout: float | None = None
    ) -> PipelineInfo:
        """As FeatureClient.get_pipeline."""
        request = pb.GetPipelineRequest(pipeline_id=pipeline_id, include_model=include_model)
        return pipeline_info(await self._call(self._stub.GetPipeline, request, timeout))

    async def list_pipelines(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> list[PipelineInfo]:
        """As FeatureClient.list_pipelines."""
        return await self._run(self._listing(self._stub.ListPipelines, page_size, timeout))

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
        if status.status != SERVING:
            raise TimeoutError(f"featmap server at {self.address} is not serving")

    async def close(self) -> None:
        """As FeatureClient.close."""
        if self._shared is not None:
            # Best effort: a server that is gone drops the lease by itself.
            for transport in self._shared.all:
                with contextlib.suppress(grpc.RpcError):
                    request = transport.unregistration()
                    await self._stub.UnregisterSharedMemory(request, timeout=5)
            self._shared.close()
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
