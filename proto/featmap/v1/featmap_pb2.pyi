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

class ExtractRequest(_message.Message):
    __slots__ = ("spec_json", "images")
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    images: Tensor
    def __init__(self, spec_json: _Optional[str] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExtractResponse(_message.Message):
    __slots__ = ("outputs", "pipeline_id")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, Tensor]
    pipeline_id: str
    def __init__(self, outputs: _Optional[_Mapping[str, Tensor]] = ..., pipeline_id: _Optional[str] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_images_per_request", "max_pixels_per_image", "max_layers", "session_cache_size", "max_parameters")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_LAYERS_FIELD_NUMBER: _ClassVar[int]
    SESSION_CACHE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_images_per_request: int
    max_pixels_per_image: int
    max_layers: int
    session_cache_size: int
    max_parameters: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_pixels_per_image: _Optional[int] = ..., max_layers: _Optional[int] = ..., session_cache_size: _Optional[int] = ..., max_parameters: _Optional[int] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "onnxruntime_version", "available_providers", "active_providers", "limits", "onnx_opset")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ONNX_OPSET_FIELD_NUMBER: _ClassVar[int]
    version: str
    onnxruntime_version: str
    available_providers: _containers.RepeatedScalarFieldContainer[str]
    active_providers: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    onnx_opset: int
    def __init__(self, version: _Optional[str] = ..., onnxruntime_version: _Optional[str] = ..., available_providers: _Optional[_Iterable[str]] = ..., active_providers: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., onnx_opset: _Optional[int] = ...) -> None: ...
