"""Request planning and message building for both clients: no I/O here.

FeatureClient and AsyncFeatureClient differ only in how they wait; what they send, how they
split a batch and how they read a reply is written once, here, on top of the contract.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard

import grpc
import numpy as np

from ..contract.errors import FeatmapError
from ..contract.metadata import FIELD_KEY
from ..contract.precision import QuantizationReport, report_from_message
from ..contract.tensors import (
    OUTPUT_DTYPES,
    OutputDType,
    image_size,
    output_itemsize,
    reply_bytes,
    reply_message_bytes,
    sendable,
)
from ..contract.wire import (
    EncodedBatch,
    FramedTensor,
    parse_extract_response,
    registration_message,
    serialize_extract_request,
)
from ..v1 import featmap_pb2 as pb

# The spec's models (pydantic) load when a spec is parsed, not with the client: importing
# FeatureClient stays light (tests/test_client_import.py), and the client works where pydantic
# is not installed at all (tests/test_client_only.py).
if TYPE_CHECKING:
    from ..contract.spec import Pipeline

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# Room left in a message for everything but the image bytes (spec text aside).
ENVELOPE_BYTES = 4096
# What one encoded image's field adds to its bytes in a request: a key, a length.
ENCODED_FIELD_BYTES = 11
SpecLike: TypeAlias = "Pipeline | Mapping[str, Any] | str"
# What a request carries: an array of images, or encoded image files for the server to decode.
Batch: TypeAlias = np.ndarray | EncodedBatch
EXTRACT_METHOD = "/featmap.v1.FeatureExtractor/Extract"
EXTRACT_STREAM_METHOD = "/featmap.v1.FeatureExtractor/ExtractStream"


class FeatmapRpcError(FeatmapError):
    """A call failed; `code` is the gRPC status, `field` the request field the server blamed."""

    def __init__(self, code: grpc.StatusCode, details: str, field: str | None) -> None:
        super().__init__(field or "", details, detail=f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field = field  # type: ignore[assignment]  # None: the server blamed no field

    @property
    def status_code(self) -> grpc.StatusCode:
        """The status the server answered with."""
        return self.code

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> FeatmapRpcError:
        """Wrap a grpc.RpcError, picking the blamed field out of the trailing metadata."""
        call: Any = error
        trailers = dict(call.trailing_metadata() or ())
        return cls(call.code(), call.details() or "", trailers.get(FIELD_KEY))


@dataclass(frozen=True)
class ServerInfo:
    """What GetServerInfo reports."""

    version: str
    onnxruntime_version: str
    available_providers: list[str]
    active_providers: list[str]
    limits: dict[str, Any]
    onnx_opset: int
    intra_op_threads: int
    grpc_workers: int
    # Whether the server offers this client shared memory (its Unix socket, --shared-memory).
    shared_memory: bool = False


@dataclass(frozen=True)
class PipelineInfo:
    """A registered pipeline as GetPipeline/ListPipelines describe it.

    `int8`: for an int8 pipeline, the error measured at registration (None for float32, and
    for one listed but not `loaded`).
    """

    pipeline_id: str
    spec: dict[str, Any]
    outputs: dict[str, list[int | str]]
    weight_names: list[str]
    batching: dict[str, Any]
    onnx_model: bytes
    names: list[str]
    precision: str = "float32"
    int8: QuantizationReport | None = None
    # Whether the server held it compiled: ListPipelines describes stored pipelines without
    # compiling them (their int8 report comes once they are used).
    loaded: bool = True


def spec_json(spec: SpecLike) -> str:
    """The JSON text of a spec given as a model, a mapping, or JSON text already."""
    if _is_pipeline_model(spec):
        return spec.model_dump_json()
    if isinstance(spec, str):
        return spec
    return json.dumps(spec)


def _is_pipeline_model(spec: object) -> TypeGuard[Pipeline]:
    """Whether `spec` is a contract.spec.Pipeline, without loading pydantic to find out.

    A Pipeline exists only once its module is loaded: until then nothing is one.
    """
    module = sys.modules.get("featmap.contract.spec")
    return module is not None and isinstance(spec, module.Pipeline)


def is_pipeline_id(pipeline: SpecLike) -> bool:
    """A str that is not JSON text is a registered pipeline's id."""
    return isinstance(pipeline, str) and not pipeline.lstrip().startswith("{")


@functools.cache
def _spec_parser() -> Callable[[Any], Pipeline] | None:
    """contract.spec's parse_pipeline, imported when a spec is first parsed; None where the
    spec's models cannot load (an install without pydantic: `pip install featmap`)."""
    try:
        from ..contract.spec import parse_pipeline
    except ImportError:
        return None
    return parse_pipeline


def parses_specs() -> bool:
    """Whether specs can be parsed here (pydantic is installed)."""
    return _spec_parser() is not None


def local_spec(spec: SpecLike) -> Pipeline | None:
    """The spec parsed here, for sizing chunks. None if it is invalid (the server names the
    field) or cannot be parsed here (no pydantic: chunks are sized by the request alone)."""
    parse = _spec_parser()
    if parse is None:
        return None
    try:
        return parse(dict(spec) if isinstance(spec, Mapping) else spec)
    except FeatmapError:
        return None


@dataclass(frozen=True)
class OutgoingExtract:
    """An ExtractRequest still in two parts: serialized by wire.serialize_extract_request."""

    message: pb.ExtractRequest
    images: np.ndarray | None

    def serialize(self) -> bytes:
        """The request's wire bytes, pixels copied once."""
        return serialize_extract_request(self.message, self.images)


def request_for(
    images: Batch | None, pipeline: SpecLike | None, output_dtype: OutputDType
) -> OutgoingExtract:
    """An Extract request; pipeline None leaves it unset (later messages of a stream).

    An array is checked here as the server would (sendable dtypes; float64 becomes float32), so
    a bad array fails before anything is sent, with InvalidTensor naming `images.dtype`; an
    EncodedBatch goes as `encoded`, for the server to decode.
    """
    output_itemsize(output_dtype)  # ValueError for anything but float32/float16
    message = pb.ExtractRequest(output_dtype=OUTPUT_DTYPES[output_dtype])  # type: ignore[arg-type]
    if pipeline is not None and is_pipeline_id(pipeline):
        message.pipeline_id = pipeline  # type: ignore[assignment]
    elif pipeline is not None:
        message.spec_json = spec_json(pipeline)
    if isinstance(images, EncodedBatch):
        message.encoded.CopyFrom(images.message())
        return OutgoingExtract(message, None)
    return OutgoingExtract(message, None if images is None else sendable(images))


def outputs_of(
    response: tuple[pb.ExtractResponse, dict[str, FramedTensor]],
) -> dict[str, np.ndarray]:
    """The response's arrays: read-only views of its bytes, no copy."""
    _, outputs = response
    return {name: tensor.array(f"outputs.{name}") for name, tensor in outputs.items()}


def extract_methods(channel: Any) -> tuple[Any, Any]:
    """Extract and ExtractStream on a blocking or grpc.aio channel, framed by the contract's
    wire module rather than by protobuf."""
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
    pipeline: Pipeline | None, images: Batch, output_dtype: OutputDType
) -> int:
    """Bytes of outputs one image gives (0 when the spec or the images' size is unknown here,
    or the spec does not fit it)."""
    if pipeline is None:
        return 0
    from ..contract.ops import layer_costs

    try:
        if isinstance(images, EncodedBatch):
            if images.size is None:
                return 0  # the size is in the images' headers, read by the server
            height, width = images.size
        elif images.ndim != 4:
            return 0
        else:
            _, height, width = image_size(pipeline.input.layout, images.shape)
        shapes = {layer.name: layer.shape for layer in layer_costs(pipeline, height, width)}
    except FeatmapError:
        return 0  # the server will say what is wrong, naming the field
    return reply_bytes((shapes[name] for name in pipeline.output_names), 1, output_dtype)


def images_per_message(
    images: np.ndarray,
    pipeline: SpecLike,
    max_message_bytes: int,
    reply_per_image: int = 0,
    outputs: int = 0,
) -> int:
    """How many images fit in one request and in its reply (at least 1); the reply's framing
    for `outputs` outputs is the server's estimate (contract.tensors.reply_message_bytes)."""
    text = len(pipeline) if isinstance(pipeline, str) else len(spec_json(pipeline))
    per_image = max(1, math.prod(images.shape[1:]) * images.dtype.itemsize)
    room = max_message_bytes - text - ENVELOPE_BYTES
    reply_room = max_message_bytes - reply_message_bytes(0, outputs)
    return max(1, min(room // per_image, reply_room // max(1, reply_per_image)))


def encoded_parts(
    batch: EncodedBatch,
    pipeline: SpecLike,
    max_message_bytes: int,
    reply_per_image: int = 0,
    outputs: int = 0,
) -> list[EncodedBatch]:
    """Consecutive parts of an encoded batch, each request within max_message_bytes by its
    images' bytes (an image larger than that goes alone: the server names it), and each reply
    within it too (images_per_message's rule, when the size is known)."""
    text = len(pipeline) if isinstance(pipeline, str) else len(spec_json(pipeline))
    room = max_message_bytes - text - ENVELOPE_BYTES
    reply_room = max_message_bytes - reply_message_bytes(0, outputs)
    most = max(1, reply_room // max(1, reply_per_image))
    parts: list[EncodedBatch] = []
    start, used = 0, 0
    for index, image in enumerate(batch.images):
        # Each image's field: its bytes, a key and a length of at most ten bytes.
        size = len(image) + ENCODED_FIELD_BYTES
        if index > start and (used + size > room or index - start >= most):
            parts.append(batch.part(start, index))
            start, used = index, 0
        used += size
    parts.append(batch.part(start, len(batch.images)))
    return parts


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
    spec: SpecLike,
    weights: Mapping[str, np.ndarray] | None,
    batching: Mapping[str, Any] | None,
    name: str | None = None,
    replace: bool = False,
    calibration: np.ndarray | None = None,
) -> pb.RegisterPipelineRequest:
    """A RegisterPipelineRequest of a spec in any form the client takes (registration_message)."""
    return registration_message(spec_json(spec), weights, batching, name, replace, calibration)


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
        names=list(info.names),
        precision=info.precision or "float32",  # servers before int8 leave it empty
        int8=report_from_message(info.int8) if info.HasField("int8") else None,
        loaded=info.loaded,
    )


def server_info(info: pb.GetServerInfoResponse) -> ServerInfo:
    """A GetServerInfoResponse as a dataclass."""
    return ServerInfo(
        version=info.version,
        onnxruntime_version=info.onnxruntime_version,
        available_providers=list(info.available_providers),
        active_providers=list(info.active_providers),
        # Numbers and flags; encoded_formats a list of names.
        limits={
            field.name: list(value) if isinstance(value, Iterable) else value
            for field, value in info.limits.ListFields()
        },
        onnx_opset=info.onnx_opset,
        intra_op_threads=info.intra_op_threads,
        grpc_workers=info.grpc_workers,
        shared_memory=info.shared_memory,
    )


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message limits for a channel; replies are bounded by the server's own limit."""
    return [
        ("grpc.max_receive_message_length", 2 * max_message_bytes),
        ("grpc.max_send_message_length", 2 * max_message_bytes),
    ]
