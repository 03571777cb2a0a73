"""The Open Inference Protocol (KServe v2 / Triton gRPC, `inference.GRPCInferenceService`).

A model is a registered pipeline, named by its pipeline id: one input "images" in the
pipeline's layout and dtype, the pipeline's outputs as FP32. ModelInfer runs through the same
checks, batcher and error table as featmap.v1's Extract.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2

from ..contract import __version__
from ..contract.errors import (
    MAX_FIELD_CHARS,
    InvalidRequest,
    InvalidTensor,
    LimitExceeded,
    NotFound,
    listing,
    shorten,
)
from ..contract.limits import DeferredBatch, check_request_bytes
from ..contract.spec import InputSpec
from ..contract.tensors import batch_shape
from ..contract.wire import (
    MAX_RANK,
    FramedInferRequest,
    FramedInferResponse,
    check_shape,
    parse_infer_request,
    serialize_infer_response,
    wire_array,
)
from ..oip import grpc_predict_v2_pb2 as oip
from ..oip import grpc_predict_v2_pb2_grpc as oip_grpc
from .api import FeatureService
from .calls import (
    map_errors,
    serialize_message,
    still_wanted,
    tolerant,
    when_gone,
)
from .registry import RegisteredPipeline
from .runtime import OnGone
from .security import Caller, Tenants, caller_of

OIP_SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "featmap"
INPUT_NAME = "images"
# Encoded image files instead of pixels: BYTES, shape [N] (or [N, 1]), each element a file's
# bytes; in raw_input_contents as KServe's binary-data convention has it (a 4-byte
# little-endian length before each element), or in contents.bytes_contents.
ENCODED_INPUT_NAME = "images_encoded"
# What the request may say of decoding encoded images: a resize (int64) and JPEG draft (bool).
ENCODED_PARAMETERS = ("height", "width", "draft")
BYTES_LENGTH = 4
# The request id a ModelInfer reply echoes: Triton's clients send UUIDs or counters.
MAX_INFER_ID_BYTES = 256
MODEL_VERSION = "1"  # a pipeline id names its content, so each model has this one version
PLATFORM = "onnxruntime_onnx"
# Pipeline input dtypes as OIP datatype strings, and those strings' wire dtypes.
DATATYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}
NUMPY_DTYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "UINT8": np.dtype("u1"),
}


def _dims(shape: list[int | str]) -> list[int]:
    """Symbolic dims (N, H, ceil(H/2), ...) as OIP's -1."""
    return [d if isinstance(d, int) else -1 for d in shape]


def input_metadata(registered: RegisteredPipeline) -> oip.ModelMetadataResponse.TensorMetadata:
    """The one input: "images", [-1, C, -1, -1] (NCHW) or [-1, -1, -1, C] (NHWC)."""
    spec = registered.compiled.pipeline.input
    shape = list(batch_shape(spec.layout, -1, spec.channels, -1, -1))
    return oip.ModelMetadataResponse.TensorMetadata(
        name=INPUT_NAME, datatype=DATATYPES[spec.dtype], shape=shape
    )


def output_metadata(registered: RegisteredPipeline) -> list[Any]:
    """The pipeline's outputs, FP32, with -1 for every size that depends on the image."""
    return [
        oip.ModelMetadataResponse.TensorMetadata(
            name=name, datatype="FP32", shape=_dims(registered.output_shapes[name])
        )
        for name in registered.compiled.pipeline.output_names
    ]


def _contents_array(tensor: Any, datatype: str, count: int) -> np.ndarray:
    """The typed `contents` of an input tensor (FP32 or UINT8; FP16 travels raw only)."""
    field = "inputs[0].contents"
    if datatype == "FP32":
        values: Any = tensor.contents.fp32_contents
        name = "fp32_contents"
    elif datatype == "UINT8":
        values, name = tensor.contents.uint_contents, "uint_contents"
    else:
        raise InvalidTensor(field, f"{datatype} data must be sent in raw_input_contents")
    if len(values) != count:
        raise InvalidTensor(
            f"{field}.{name}",
            f"has {len(values)} values; shape {list(tensor.shape)} needs {count}",
        )
    if datatype == "UINT8":
        wide = np.asarray(values, dtype=np.uint32)
        if count and int(wide.max()) > 255:
            raise InvalidTensor(f"{field}.{name}", f"has {int(wide.max())}, over UINT8's 255")
        return wide.astype(np.uint8)
    return np.asarray(values, dtype=np.float32)


def check_no_parameters(request: oip.ModelInferRequest, allowed: tuple[str, ...] = ()) -> None:
    """InvalidRequest naming the first parameter sent but the request-level ones `allowed`
    (the decoding of encoded images): featmap takes no others.

    Ignoring one silently would answer a different question than the one asked (e.g.
    `shared_memory_region`, which Triton reads the input from, would be left unread).
    """
    where: list[tuple[str, Any]] = [("parameters", request.parameters)]
    where += [(f"inputs[{i}].parameters", t.parameters) for i, t in enumerate(request.inputs)]
    where += [(f"outputs[{i}].parameters", t.parameters) for i, t in enumerate(request.outputs)]
    for field, parameters in where:
        for name in parameters:
            if field == "parameters" and name in allowed:
                continue
            raise InvalidRequest(
                f"{field}[{shorten(repr(name), MAX_FIELD_CHARS // 2)}]",
                "featmap takes no OIP parameters but height, width and draft with "
                f"{ENCODED_INPUT_NAME!r} (no shared memory, sequences, priorities or "
                "classification): leave it out",
            )


def decode_options(request: oip.ModelInferRequest) -> tuple[tuple[int, int] | None, bool]:
    """(the resize, draft) the request's parameters ask of encoded images."""
    values: dict[str, Any] = {}
    for name in ENCODED_PARAMETERS:
        if name not in request.parameters:
            continue
        parameter = request.parameters[name]
        kind = "bool_param" if name == "draft" else "int64_param"
        if parameter.WhichOneof("parameter_choice") != kind:
            raise InvalidRequest(f"parameters[{name!r}]", f"must be a {kind}")
        values[name] = getattr(parameter, kind)
    height, width = values.get("height", 0), values.get("width", 0)
    return ((height, width) if height or width else None), bool(values.get("draft", False))


def bytes_elements(raw: memoryview, count: int, field: str) -> list[bytes]:
    """The elements of a raw BYTES tensor: each a 4-byte little-endian length, then the bytes;
    exactly `count` of them (InvalidTensor naming `field` otherwise)."""
    elements: list[bytes] = []
    position = 0
    while position < len(raw):
        if len(elements) == count:
            raise InvalidTensor(field, f"holds more than the {count} elements its shape says")
        if position + BYTES_LENGTH > len(raw):
            raise InvalidTensor(field, f"ends inside element {len(elements)}'s 4-byte length")
        length = int.from_bytes(raw[position : position + BYTES_LENGTH], "little")
        position += BYTES_LENGTH
        if position + length > len(raw):
            raise InvalidTensor(
                field,
                f"element {len(elements)} says {length} bytes; {len(raw) - position} remain",
            )
        elements.append(bytes(raw[position : position + length]))
        position += length
    if len(elements) != count:
        raise InvalidTensor(field, f"holds {len(elements)} elements; its shape says {count}")
    return elements


def check_infer_id(request_id: str) -> None:
    """InvalidRequest naming `id` when it is over MAX_INFER_ID_BYTES: the reply echoes it."""
    # Every character is at least a byte: a long id is refused without encoding it.
    size = len(request_id) if len(request_id) > MAX_INFER_ID_BYTES else len(request_id.encode())
    if size > MAX_INFER_ID_BYTES:
        raise InvalidRequest(
            "id", f"is at least {size} bytes; at most {MAX_INFER_ID_BYTES} (the reply echoes it)"
        )


def requested_outputs(request: oip.ModelInferRequest, output_names: list[str]) -> list[str]:
    """The outputs a ModelInfer asks for, in its order (default: all the model's), each once.

    An output named twice is refused, not answered twice: the reply is sized from these names
    before anything runs, and a name repeated 5,000 times would multiply it 5,000 times.
    """
    if not request.outputs:
        return list(output_names)
    known = set(output_names)
    first: dict[str, int] = {}
    for index, output in enumerate(request.outputs):
        name = output.name
        if name not in known:
            raise InvalidRequest(
                f"outputs[{index}].name",
                f"{shorten(repr(name), MAX_FIELD_CHARS)} is not an output of the model; it has "
                f"{listing(output_names)}",
            )
        if name in first:
            raise InvalidRequest(
                f"outputs[{index}].name",
                f"{name!r} repeats outputs[{first[name]}].name: ask for each output once",
            )
        first[name] = index
    return list(first)


class InferenceService:
    """The OIP calls as plain functions over a FeatureService's registry, extractor and batcher."""

    def __init__(self, service: FeatureService, ready: Callable[[], bool]) -> None:
        self.service = service
        self.ready = ready

    def model(
        self, name: str, version: str, caller: Caller, field: str = "name"
    ) -> RegisteredPipeline:
        """The caller's tenant's registered pipeline that a model name (its id, or a name it was
        registered under) and version name address."""
        registered = self.service.registry.get(name, field, caller.tenant)
        if version not in ("", MODEL_VERSION):
            raise NotFound(
                field.replace("name", "version"),
                f"model {name!r} has only version {MODEL_VERSION!r}; got {version!r}",
            )
        return registered

    def server_metadata(self) -> oip.ServerMetadataResponse:
        """Name, version, and no protocol extensions."""
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    def model_ready(self, request: oip.ModelReadyRequest, caller: Caller) -> oip.ModelReadyResponse:
        """Ready when registered (a registered pipeline is compiled and warm) and serving."""
        try:
            self.model(request.name, request.version, caller)
        except NotFound:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=self.ready())

    def model_metadata(
        self, request: oip.ModelMetadataRequest, caller: Caller
    ) -> oip.ModelMetadataResponse:
        """The model's input and outputs (NOT_FOUND for an unknown name)."""
        registered = self.model(request.name, request.version, caller)
        return oip.ModelMetadataResponse(
            name=request.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[input_metadata(registered)],
            outputs=output_metadata(registered),
        )

    def encoded(self, framed: FramedInferRequest, spec: InputSpec) -> DeferredBatch:
        """The request's "images_encoded" input, checked and ready to decode once admitted."""
        request, raw_contents = framed.message, framed.raw_input_contents
        tensor = request.inputs[0]
        if tensor.datatype != "BYTES":
            raise InvalidTensor(
                "inputs[0].datatype", f"{tensor.datatype or '(empty)'} is not BYTES"
            )
        shape = list(tensor.shape)
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
            raise InvalidTensor(
                "inputs[0].shape", f"is {shape[:MAX_RANK]}; encoded images are [N] or [N, 1]"
            )
        limits = self.service.limits
        count = shape[0]
        if count > limits.max_images_per_request:
            raise LimitExceeded(
                "inputs[0].shape",
                f"{count} images exceed max_images_per_request={limits.max_images_per_request}",
            )
        if raw_contents:
            if len(raw_contents) != 1:
                raise InvalidRequest(
                    "raw_input_contents",
                    f"has {len(raw_contents)} entries; one per input (1) is needed",
                )
            images = bytes_elements(raw_contents[0], count, "raw_input_contents[0]")
        else:
            images = list(tensor.contents.bytes_contents)
            if len(images) != count:
                raise InvalidTensor(
                    "inputs[0].contents.bytes_contents",
                    f"has {len(images)} elements; its shape says {count}",
                )
        resize, draft = decode_options(request)
        return self.service.decoder.batch(
            images, resize, draft, spec, limits, field=ENCODED_INPUT_NAME
        )

    def images(self, framed: FramedInferRequest, registered: RegisteredPipeline) -> np.ndarray:
        """The request's one input as an array (a view of the received bytes when raw), its
        name, datatype, shape and bytes checked."""
        request, raw_contents = framed.message, framed.raw_input_contents
        tensor = request.inputs[0]
        wanted = DATATYPES[registered.compiled.pipeline.input.dtype]
        if tensor.datatype != wanted:
            raise InvalidTensor(
                "inputs[0].datatype",
                f"{tensor.datatype or '(empty)'} does not match the model's input, {wanted}",
            )
        shape, dtype = tuple(tensor.shape), NUMPY_DTYPES[wanted]
        if not raw_contents:
            count = check_shape(shape, "inputs[0]", dtype.itemsize) // dtype.itemsize
            values = _contents_array(tensor, wanted, count)
            return wire_array(values.data, dtype, shape, "inputs[0]", "inputs[0].contents", wanted)
        if len(raw_contents) != 1:
            raise InvalidRequest(
                "raw_input_contents",
                f"has {len(raw_contents)} entries; one per input (1) is needed",
            )
        if tensor.HasField("contents"):
            raise InvalidRequest(
                "inputs[0].contents", "must not be set when raw_input_contents is used"
            )
        # A view of the received message.
        return wire_array(
            raw_contents[0], dtype, shape, "inputs[0]", "raw_input_contents[0]", wanted
        )

    def model_infer(
        self,
        framed: FramedInferRequest,
        caller: Caller,
        before_run: Callable[[], None] | None = None,
        on_gone: OnGone | None = None,
    ) -> FramedInferResponse:
        """Run the input through the model; the requested outputs (default all), raw FP32."""
        request = framed.message
        check_infer_id(request.id)
        registered = self.model(request.model_name, request.model_version, caller, "model_name")
        pipeline = registered.compiled.pipeline
        check_request_bytes(framed.size, self.service.limits, "raw_input_contents")
        if len(request.inputs) != 1:
            raise InvalidRequest(
                "inputs",
                f"has {len(request.inputs)} tensors; the model takes one, {INPUT_NAME!r} "
                f"or {ENCODED_INPUT_NAME!r}",
            )
        encoded = request.inputs[0].name == ENCODED_INPUT_NAME
        check_no_parameters(request, ENCODED_PARAMETERS if encoded else ())
        names = requested_outputs(request, pipeline.output_names)
        target = self.service.registered_target(registered)
        images: np.ndarray | DeferredBatch
        if encoded:
            target = self.service.decoder.pixel_target(target)
            images = self.encoded(framed, target.pipeline.input)
        elif request.inputs[0].name != INPUT_NAME:
            name = request.inputs[0].name
            raise InvalidTensor(
                "inputs[0].name",
                f"{shorten(repr(name), MAX_FIELD_CHARS)} is not {INPUT_NAME!r} or "
                f"{ENCODED_INPUT_NAME!r}",
            )
        else:
            images = self.images(framed, registered)
        outputs = self.service.extractor.extract(
            target,
            images,
            output_names=names,
            before_run=before_run,
            on_gone=on_gone,
            field=ENCODED_INPUT_NAME if encoded else "images",
        ).outputs
        response = oip.ModelInferResponse(
            model_name=request.model_name, model_version=MODEL_VERSION, id=request.id
        )
        contents = []
        for name in names:
            array = np.ascontiguousarray(outputs[name], dtype="<f4")
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            contents.append(array)
        return FramedInferResponse(response, contents)


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over an InferenceService."""

    def __init__(
        self,
        service: FeatureService,
        health_servicer: health.HealthServicer,
        tenants: Tenants | None = None,
    ) -> None:
        self.health = health_servicer
        self.tenants = tenants
        self.inference = InferenceService(service, self._serving)

    def _serving(self) -> bool:
        # "" is the whole server: SERVING from start until graceful shutdown begins.
        check = self.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        return bool(check.status == health_pb2.HealthCheckResponse.SERVING)

    @map_errors
    def ServerLive(self, request: oip.ServerLiveRequest, context: Any) -> Any:
        return oip.ServerLiveResponse(live=True)

    @map_errors
    def ServerReady(self, request: oip.ServerReadyRequest, context: Any) -> Any:
        return oip.ServerReadyResponse(ready=self._serving())

    @map_errors
    def ServerMetadata(self, request: oip.ServerMetadataRequest, context: Any) -> Any:
        return self.inference.server_metadata()

    @map_errors
    def ModelReady(self, request: oip.ModelReadyRequest, context: Any) -> Any:
        return self.inference.model_ready(request, caller_of(context, self.tenants))

    @map_errors
    def ModelMetadata(self, request: oip.ModelMetadataRequest, context: Any) -> Any:
        return self.inference.model_metadata(request, caller_of(context, self.tenants))

    @map_errors
    def ModelInfer(self, request: FramedInferRequest, context: Any) -> Any:
        caller = caller_of(context, self.tenants)
        return self.inference.model_infer(
            request,
            caller,
            functools.partial(still_wanted, context),
            functools.partial(when_gone, context),
        )


def inference_handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """GRPCInferenceService's handlers; bad request bytes get INVALID_ARGUMENT, not INTERNAL."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        parse: Callable[[bytes], Any] = getattr(oip, method.input_type.name).FromString
        serialize: Callable[[Any], bytes] = serialize_message
        if method.name == "ModelInfer":  # tensors framed without copies, as Extract's
            parse, serialize = parse_infer_request, serialize_infer_response
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name), tolerant(parse, method.input_type.full_name), serialize
        )
    return grpc.method_handlers_generic_handler(OIP_SERVICE_NAME, handlers)
