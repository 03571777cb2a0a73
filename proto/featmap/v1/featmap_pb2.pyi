from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    UINT8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
UINT8: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("region", "offset", "byte_size", "owner")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    owner: str
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class ExtractRequest(_message.Message):
    __slots__ = ("spec_json", "pipeline_id", "images", "output_dtype", "images_region", "output_region", "encoded")
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_REGION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REGION_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    pipeline_id: str
    images: Tensor
    output_dtype: DType
    images_region: SharedMemoryRef
    output_region: SharedMemoryRef
    encoded: EncodedImages
    def __init__(self, spec_json: _Optional[str] = ..., pipeline_id: _Optional[str] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., images_region: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., output_region: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., encoded: _Optional[_Union[EncodedImages, _Mapping]] = ...) -> None: ...

class EncodedImages(_message.Message):
    __slots__ = ("images", "height", "width", "draft")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    height: int
    width: int
    draft: bool
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., draft: _Optional[bool] = ...) -> None: ...

class ExtractResponse(_message.Message):
    __slots__ = ("outputs", "pipeline_id", "output_regions", "sequence")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class OutputRegionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SharedMemoryRef
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REGIONS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, Tensor]
    pipeline_id: str
    output_regions: _containers.MessageMap[str, SharedMemoryRef]
    sequence: int
    def __init__(self, outputs: _Optional[_Mapping[str, Tensor]] = ..., pipeline_id: _Optional[str] = ..., output_regions: _Optional[_Mapping[str, SharedMemoryRef]] = ..., sequence: _Optional[int] = ...) -> None: ...

class BatchingConfig(_message.Message):
    __slots__ = ("enabled", "max_batch_size", "max_queue_delay_us")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    max_batch_size: int
    max_queue_delay_us: int
    def __init__(self, enabled: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_us: _Optional[int] = ...) -> None: ...

class Dim(_message.Message):
    __slots__ = ("size", "symbol")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    size: int
    symbol: str
    def __init__(self, size: _Optional[int] = ..., symbol: _Optional[str] = ...) -> None: ...

class OutputInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedCompositeFieldContainer[Dim]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[_Union[Dim, _Mapping]]] = ...) -> None: ...

class RegisterPipelineRequest(_message.Message):
    __slots__ = ("spec_json", "weights", "batching", "name", "replace", "calibration")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    weights: _containers.MessageMap[str, Tensor]
    batching: BatchingConfig
    name: str
    replace: bool
    calibration: Tensor
    def __init__(self, spec_json: _Optional[str] = ..., weights: _Optional[_Mapping[str, Tensor]] = ..., batching: _Optional[_Union[BatchingConfig, _Mapping]] = ..., name: _Optional[str] = ..., replace: _Optional[bool] = ..., calibration: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OutputError(_message.Message):
    __slots__ = ("output", "cosine", "max_error", "max_abs_error")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    output: str
    cosine: float
    max_error: float
    max_abs_error: float
    def __init__(self, output: _Optional[str] = ..., cosine: _Optional[float] = ..., max_error: _Optional[float] = ..., max_abs_error: _Optional[float] = ...) -> None: ...

class Int8Report(_message.Message):
    __slots__ = ("errors", "calibration_images", "synthetic_images", "cpu", "max_error_allowed", "weight_bits")
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_IMAGES_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BITS_FIELD_NUMBER: _ClassVar[int]
    errors: _containers.RepeatedCompositeFieldContainer[OutputError]
    calibration_images: int
    synthetic_images: int
    cpu: str
    max_error_allowed: float
    weight_bits: int
    def __init__(self, errors: _Optional[_Iterable[_Union[OutputError, _Mapping]]] = ..., calibration_images: _Optional[int] = ..., synthetic_images: _Optional[int] = ..., cpu: _Optional[str] = ..., max_error_allowed: _Optional[float] = ..., weight_bits: _Optional[int] = ...) -> None: ...

class RegisterPipelineResponse(_message.Message):
    __slots__ = ("pipeline_id", "outputs", "name", "int8")
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INT8_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    outputs: _containers.RepeatedCompositeFieldContainer[OutputInfo]
    name: str
    int8: Int8Report
    def __init__(self, pipeline_id: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[OutputInfo, _Mapping]]] = ..., name: _Optional[str] = ..., int8: _Optional[_Union[Int8Report, _Mapping]] = ...) -> None: ...

class GetPipelineRequest(_message.Message):
    __slots__ = ("pipeline_id", "include_model")
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_MODEL_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    include_model: bool
    def __init__(self, pipeline_id: _Optional[str] = ..., include_model: _Optional[bool] = ...) -> None: ...

class PipelineInfo(_message.Message):
    __slots__ = ("pipeline_id", "spec_json", "outputs", "weight_names", "batching", "onnx_model", "names", "precision", "int8", "loaded")
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_NAMES_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    ONNX_MODEL_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    INT8_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    spec_json: str
    outputs: _containers.RepeatedCompositeFieldContainer[OutputInfo]
    weight_names: _containers.RepeatedScalarFieldContainer[str]
    batching: BatchingConfig
    onnx_model: bytes
    names: _containers.RepeatedScalarFieldContainer[str]
    precision: str
    int8: Int8Report
    loaded: bool
    def __init__(self, pipeline_id: _Optional[str] = ..., spec_json: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[OutputInfo, _Mapping]]] = ..., weight_names: _Optional[_Iterable[str]] = ..., batching: _Optional[_Union[BatchingConfig, _Mapping]] = ..., onnx_model: _Optional[bytes] = ..., names: _Optional[_Iterable[str]] = ..., precision: _Optional[str] = ..., int8: _Optional[_Union[Int8Report, _Mapping]] = ..., loaded: _Optional[bool] = ...) -> None: ...

class ListPipelinesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPipelinesResponse(_message.Message):
    __slots__ = ("pipelines", "next_page_token")
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pipelines: _containers.RepeatedCompositeFieldContainer[PipelineInfo]
    next_page_token: str
    def __init__(self, pipelines: _Optional[_Iterable[_Union[PipelineInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeletePipelineRequest(_message.Message):
    __slots__ = ("pipeline_id",)
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    pipeline_id: str
    def __init__(self, pipeline_id: _Optional[str] = ...) -> None: ...

class DeletePipelineResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("region", "key", "byte_size", "owner")
    REGION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    region: str
    key: str
    byte_size: int
    owner: str
    def __init__(self, region: _Optional[str] = ..., key: _Optional[str] = ..., byte_size: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class RegisterSharedMemoryResponse(_message.Message):
    __slots__ = ("lease_seconds",)
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: float
    def __init__(self, lease_seconds: _Optional[float] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("region", "owner")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    region: str
    owner: str
    def __init__(self, region: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ("unregistered",)
    UNREGISTERED_FIELD_NUMBER: _ClassVar[int]
    unregistered: int
    def __init__(self, unregistered: _Optional[int] = ...) -> None: ...

class RenewSharedMemoryRequest(_message.Message):
    __slots__ = ("owner",)
    OWNER_FIELD_NUMBER: _ClassVar[int]
    owner: str
    def __init__(self, owner: _Optional[str] = ...) -> None: ...

class RenewSharedMemoryResponse(_message.Message):
    __slots__ = ("regions", "lease_seconds")
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    regions: int
    lease_seconds: float
    def __init__(self, regions: _Optional[int] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_images_per_request", "max_pixels_per_image", "max_layers", "session_cache_size", "max_parameters", "max_registered_pipelines", "max_kernel_size", "max_flops", "max_activation_bytes", "allow_non_finite_input", "max_queued_requests", "max_streams", "stream_idle_timeout_s", "max_spec_bytes", "spec_cache_bytes", "session_cache_bytes", "registry_bytes", "shared_memory", "max_calibration_images", "max_names_per_pipeline", "max_encoded_image_bytes", "encoded_formats")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_LAYERS_FIELD_NUMBER: _ClassVar[int]
    SESSION_CACHE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MAX_REGISTERED_PIPELINES_FIELD_NUMBER: _ClassVar[int]
    MAX_KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_FLOPS_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOW_NON_FINITE_INPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_SPEC_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPEC_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSION_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    MAX_CALIBRATION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_NAMES_PER_PIPELINE_FIELD_NUMBER: _ClassVar[int]
    MAX_ENCODED_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FORMATS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_images_per_request: int
    max_pixels_per_image: int
    max_layers: int
    session_cache_size: int
    max_parameters: int
    max_registered_pipelines: int
    max_kernel_size: int
    max_flops: int
    max_activation_bytes: int
    allow_non_finite_input: bool
    max_queued_requests: int
    max_streams: int
    stream_idle_timeout_s: float
    max_spec_bytes: int
    spec_cache_bytes: int
    session_cache_bytes: int
    registry_bytes: int
    shared_memory: bool
    max_calibration_images: int
    max_names_per_pipeline: int
    max_encoded_image_bytes: int
    encoded_formats: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_pixels_per_image: _Optional[int] = ..., max_layers: _Optional[int] = ..., session_cache_size: _Optional[int] = ..., max_parameters: _Optional[int] = ..., max_registered_pipelines: _Optional[int] = ..., max_kernel_size: _Optional[int] = ..., max_flops: _Optional[int] = ..., max_activation_bytes: _Optional[int] = ..., allow_non_finite_input: _Optional[bool] = ..., max_queued_requests: _Optional[int] = ..., max_streams: _Optional[int] = ..., stream_idle_timeout_s: _Optional[float] = ..., max_spec_bytes: _Optional[int] = ..., spec_cache_bytes: _Optional[int] = ..., session_cache_bytes: _Optional[int] = ..., registry_bytes: _Optional[int] = ..., shared_memory: _Optional[bool] = ..., max_calibration_images: _Optional[int] = ..., max_names_per_pipeline: _Optional[int] = ..., max_encoded_image_bytes: _Optional[int] = ..., encoded_formats: _Optional[_Iterable[str]] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "onnxruntime_version", "available_providers", "active_providers", "limits", "onnx_opset", "intra_op_threads", "grpc_workers", "default_batching", "spec_schema_json", "shared_memory")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ONNX_OPSET_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    GRPC_WORKERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BATCHING_FIELD_NUMBER: _ClassVar[int]
    SPEC_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    version: str
    onnxruntime_version: str
    available_providers: _containers.RepeatedScalarFieldContainer[str]
    active_providers: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    onnx_opset: int
    intra_op_threads: int
    grpc_workers: int
    default_batching: BatchingConfig
    spec_schema_json: str
    shared_memory: bool
    def __init__(self, version: _Optional[str] = ..., onnxruntime_version: _Optional[str] = ..., available_providers: _Optional[_Iterable[str]] = ..., active_providers: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., onnx_opset: _Optional[int] = ..., intra_op_threads: _Optional[int] = ..., grpc_workers: _Optional[int] = ..., default_batching: _Optional[_Union[BatchingConfig, _Mapping]] = ..., spec_schema_json: _Optional[str] = ..., shared_memory: _Optional[bool] = ...) -> None: ...
