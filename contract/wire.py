"""ndarray <-> wire bytes without copies: featmap.v1's Extract, and the OIP's ModelInfer.

Tensors travel as raw little-endian row-major bytes; the messages carrying them are framed
here so that those bytes are copied once on each side (see "zero-copy framing" below).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

import numpy as np

from ..oip import grpc_predict_v2_pb2 as oip
from ..v1 import featmap_pb2 as pb
from .errors import InvalidTensor
from .tensors import DTYPE_NAMES, WIRE_DTYPES, wire_dtype

Buffer: TypeAlias = bytes | memoryview
# No real image or batch comes near; larger values are garbage (and overflow NumPy's shapes).
MAX_DIMENSION = 2**31 - 1
# Images and weights are rank 4; NumPy stops at 64 dimensions, with an error of its own.
MAX_RANK = 8
# What int64 (NumPy's sizes, protobuf's lengths and offsets) can count: a shape whose bytes
# exceed it describes no tensor anyone can send.
MAX_TENSOR_BYTES = 2**63 - 1


def decode_tensor(tensor: pb.Tensor, field: str) -> np.ndarray:
    """A read-only ndarray view of a wire tensor; InvalidTensor names `field` if malformed."""
    return tensor_view(tensor.dtype, tuple(tensor.shape), tensor.data, field)


def check_dtype(code: int, field: str) -> np.dtype:
    """The NumPy dtype of a wire dtype code; InvalidTensor on `field`.dtype otherwise."""
    dtype = WIRE_DTYPES.get(code)
    if dtype is None:
        name = pb.DType.Name(code) if code in pb.DType.values() else code
        raise InvalidTensor(f"{field}.dtype", f"{name} is not one of FLOAT32, FLOAT16, UINT8")
    return dtype


def check_shape(shape: tuple[int, ...], field: str, itemsize: int = 1) -> int:
    """The bytes a tensor of `shape` holds (`itemsize` bytes a value), once the shape passes the
    one rule for shapes from the wire; InvalidTensor on `field`.shape otherwise.

    Every path that turns a shape a caller sent into an array (Extract, ExtractStream, shared
    memory, OIP ModelInfer, RegisterPipeline's weights and calibration) asks here first: rank
    at most MAX_RANK; every dimension from 1 to MAX_DIMENSION (a tensor of no elements is no
    image and no weight); and the bytes, counted in Python ints (no overflow), within
    MAX_TENSOR_BYTES. NumPy then never sees a shape it cannot hold.
    """
    if len(shape) > MAX_RANK:
        raise InvalidTensor(f"{field}.shape", f"has rank {len(shape)}; at most {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise InvalidTensor(f"{field}.shape", f"has a negative dimension: {list(shape)}")
    if any(d > MAX_DIMENSION for d in shape):
        raise InvalidTensor(f"{field}.shape", f"{list(shape)} has a dimension over {MAX_DIMENSION}")
    if any(d == 0 for d in shape):
        raise InvalidTensor(
            f"{field}.shape",
            f"{list(shape)} is empty: every dimension must be at least 1 "
            "(a tensor of no elements is no image and no weight)",
        )
    size = math.prod(shape) * itemsize
    if size > MAX_TENSOR_BYTES:
        raise InvalidTensor(
            f"{field}.shape",
            f"{list(shape)} x {itemsize} bytes is {size} bytes, more than int64 counts",
        )
    return size


def tensor_view(code: int, shape: tuple[int, ...], data: Buffer, field: str) -> np.ndarray:
    """A read-only ndarray over `data` after checking dtype code, shape and byte length."""
    dtype = check_dtype(code, field)
    return wire_array(data, dtype, shape, field, f"{field}.data", DTYPE_NAMES[code])


def wire_array(
    data: Buffer,
    dtype: np.dtype,
    shape: tuple[int, ...],
    field: str,
    data_field: str,
    dtype_name: str,
) -> np.ndarray:
    """A read-only ndarray of `shape` over `data` (no copy): the one place bytes a caller sent
    become an array. The shape is checked (check_shape, naming `field`.shape) and its bytes
    must be exactly `data`'s (InvalidTensor naming `data_field`), before NumPy sees either."""
    expected = check_shape(shape, field, dtype.itemsize)
    size = memoryview(data).nbytes
    if expected != size:
        raise InvalidTensor(
            data_field,
            f"has {size} bytes; shape {list(shape)} x {dtype.itemsize} bytes "
            f"({dtype_name}) needs {expected}",
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class EncodedBatch:
    """Encoded image files (their bytes) and how the server is to decode them: what an
    ExtractRequest's `encoded` carries. `size` (H, W) resizes every image; `draft` lets a JPEG
    decode at a smaller scale first (featmap.contract.images says the rule)."""

    images: tuple[bytes, ...]
    size: tuple[int, int] | None = None
    draft: bool = False

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        """The images' bytes together."""
        return sum(len(image) for image in self.images)

    def part(self, start: int, stop: int) -> EncodedBatch:
        """Images start..stop-1, decoded the same way."""
        return EncodedBatch(self.images[start:stop], self.size, self.draft)

    def message(self) -> pb.EncodedImages:
        """The EncodedImages message."""
        height, width = self.size or (0, 0)
        return pb.EncodedImages(images=self.images, height=height, width=width, draft=self.draft)


def encode_tensor(array: np.ndarray) -> pb.Tensor:
    """A wire tensor holding `array` (any memory order or byte order) as little-endian C order."""
    code = wire_dtype(array)
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[code])
    return pb.Tensor(dtype=code, shape=data.shape, data=data.tobytes())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- zero-copy framing
#
# Protobuf's Python runtime copies a bytes field several times on the way in and out (into the
# message, into the serialized string, out again through the field getter). For batches of tens
# of MB those copies cost about as much as the convolutions, so Extract requests and responses
# are framed here in plain protobuf wire format (any protobuf peer writes and reads the same
# bytes): the small fields go through protobuf, and each tensor's `data` is written straight
# from NumPy memory and read back as a view of the received message.

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _ONE_BYTE_VARINTS[value]  # keys, dtypes and most dimensions
    value &= (1 << 64) - 1  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE_VARINTS = [bytes((value,)) for value in range(0x80)]


def _read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    if position < len(buffer) and buffer[position] < 0x80:
        return buffer[position], position + 1
    result = shift = 0
    while True:
        if position >= len(buffer) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


class _Field(NamedTuple):
    # A tuple, not a dataclass: a message's fields are walked on every request.
    number: int
    wire_type: int
    start: int  # where the field's key starts
    value: int  # a varint's value; where a length-delimited payload starts
    end: int  # one past the field


def _fields(buffer: memoryview) -> Iterator[_Field]:
    position = 0
    while position < len(buffer):
        start = position
        key, position = _read_varint(buffer, position)
        number, wire_type = key >> 3, key & 7
        value = position
        if wire_type == _VARINT:
            value, position = _read_varint(buffer, position)
        elif wire_type == _LEN:
            length, value = _read_varint(buffer, position)
            position = value + length
        elif wire_type in (_I64, _I32):
            position += 8 if wire_type == _I64 else 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} at byte {start}")
        if position > len(buffer) or number == 0:
            raise ValueError(f"malformed field at byte {start}")
        yield _Field(number, wire_type, start, value, position)


def _key(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _frame_size(frames: list[Buffer]) -> int:
    return sum(memoryview(frame).nbytes for frame in frames)


def tensor_frames(array: np.ndarray) -> list[Buffer]:
    """A Tensor message as frames: its header, then the array's own memory (no copy).

    The header is what protobuf writes for Tensor(dtype, shape) -- the dtype varint, the
    packed shape -- encoded here, which costs a fraction of building the message.
    """
    code = wire_dtype(array)
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[code])
    header = _key(1, _VARINT) + _varint(code) if code else b""
    if data.shape:
        packed = b"".join(_varint(dimension) for dimension in data.shape)
        header += _key(2, _LEN) + _varint(len(packed)) + packed
    return [header, _key(3, _LEN) + _varint(data.nbytes), data.reshape(-1).view(np.uint8).data]


def _embedded(number: int, frames: list[Buffer]) -> list[Buffer]:
    return [_key(number, _LEN) + _varint(_frame_size(frames)), *frames]


@dataclass(frozen=True)
class FramedTensor:
    """A Tensor parsed without copying its data: dtype code, shape, and a view of the bytes."""

    dtype: int
    shape: tuple[int, ...]
    data: memoryview

    def array(self, field: str) -> np.ndarray:
        """The checked, read-only ndarray (a view of the received message)."""
        return tensor_view(self.dtype, self.shape, self.data, field)

    @property
    def header(self) -> pb.Tensor:
        """dtype and shape as a Tensor message without data."""
        return pb.Tensor(dtype=self.dtype, shape=self.shape)  # type: ignore[arg-type]


def _parse_tensor(buffer: memoryview, payloads: list[memoryview]) -> FramedTensor:
    # Several occurrences of one embedded message merge, as protobuf merges them.
    dtype, shape, data = 0, [], buffer[:0]
    for payload in payloads:
        for field in _fields(payload):
            if field.number == 1 and field.wire_type == _VARINT:
                dtype = field.value
            elif field.number == 2 and field.wire_type == _VARINT:
                shape.append(_signed(field.value))
            elif field.number == 2 and field.wire_type == _LEN:
                packed, position = payload[field.value : field.end], 0
                while position < len(packed):
                    item, position = _read_varint(packed, position)
                    shape.append(_signed(item))
            elif field.number == 3 and field.wire_type == _LEN:
                data = payload[field.value : field.end]
    return FramedTensor(dtype=dtype, shape=tuple(shape), data=data)


def _split(raw: Buffer, tensor_field: int) -> tuple[bytes, list[memoryview]]:
    """(the message without `tensor_field`, that field's payloads)."""
    buffer = memoryview(raw).cast("B")
    rest: list[memoryview] = []
    payloads: list[memoryview] = []
    for field in _fields(buffer):
        if field.number == tensor_field and field.wire_type == _LEN:
            payloads.append(buffer[field.value : field.end])
        else:
            rest.append(buffer[field.start : field.end])
    return b"".join(rest), payloads


@dataclass(frozen=True)
class FramedExtractRequest:
    """An ExtractRequest whose image bytes stay where they arrived."""

    message: pb.ExtractRequest  # every field but `images`
    images: FramedTensor | None
    size: int  # bytes on the wire


def serialize_extract_request(request: pb.ExtractRequest, images: np.ndarray | None) -> bytes:
    """`request` plus `images` as its images tensor, copying the pixels once."""
    frames: list[Buffer] = [request.SerializeToString()]
    if images is not None:
        frames += _embedded(2, tensor_frames(images))
    return b"".join(frames)


def parse_extract_request(raw: bytes) -> FramedExtractRequest:
    """Parse what serialize_extract_request (or any protobuf peer) wrote, without copying pixels."""
    rest, payloads = _split(raw, 2)
    buffer = memoryview(raw).cast("B")
    images = _parse_tensor(buffer, payloads) if payloads else None
    return FramedExtractRequest(pb.ExtractRequest.FromString(rest), images, len(raw))


@dataclass(frozen=True)
class FramedExtractResponse:
    """An ExtractResponse whose output arrays are serialized straight from NumPy memory."""

    message: pb.ExtractResponse  # every field but `outputs`
    outputs: dict[str, np.ndarray]


def serialize_extract_response(response: FramedExtractResponse) -> bytes:
    """The response in protobuf wire format; outputs as map entries {1: name, 2: Tensor}."""
    frames: list[Buffer] = [response.message.SerializeToString()]
    for name, array in response.outputs.items():
        key = name.encode()
        entry = [_key(1, _LEN) + _varint(len(key)) + key, *_embedded(2, tensor_frames(array))]
        frames += _embedded(1, entry)
    return b"".join(frames)


def parse_extract_response(raw: bytes) -> tuple[pb.ExtractResponse, dict[str, FramedTensor]]:
    """(every field but outputs, outputs as framed tensors viewing `raw`)."""
    rest, entries = _split(raw, 1)
    buffer = memoryview(raw).cast("B")
    outputs: dict[str, FramedTensor] = {}
    for entry in entries:
        name, payloads = "", []
        for field in _fields(entry):
            if field.number == 1 and field.wire_type == _LEN:
                name = bytes(entry[field.value : field.end]).decode()
            elif field.number == 2 and field.wire_type == _LEN:
                payloads.append(entry[field.value : field.end])
        outputs[name] = _parse_tensor(buffer, payloads)
    return pb.ExtractResponse.FromString(rest), outputs


# --------------------------------------------------------------------------- OIP ModelInfer
#
# The Open Inference Protocol carries tensors as `repeated bytes raw_input_contents` (request)
# and `raw_output_contents` (response): the same framing, one length-delimited field each.

RAW_INPUT_CONTENTS = oip.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
RAW_OUTPUT_CONTENTS = oip.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number


@dataclass(frozen=True)
class FramedInferRequest:
    """A ModelInferRequest whose raw_input_contents stay where they arrived."""

    message: oip.ModelInferRequest  # every field but raw_input_contents
    raw_input_contents: list[memoryview]
    size: int  # bytes on the wire


def parse_infer_request(raw: bytes) -> FramedInferRequest:
    """Parse a ModelInferRequest from any protobuf peer without copying its raw contents."""
    rest, contents = _split(raw, RAW_INPUT_CONTENTS)
    return FramedInferRequest(oip.ModelInferRequest.FromString(rest), contents, len(raw))


@dataclass(frozen=True)
class FramedInferResponse:
    """A ModelInferResponse whose raw_output_contents are serialized from NumPy memory."""

    message: oip.ModelInferResponse  # every field but raw_output_contents
    raw_output_contents: list[np.ndarray]


def serialize_infer_response(response: FramedInferResponse) -> bytes:
    """The response in protobuf wire format, each array's bytes copied once."""
    frames: list[Buffer] = [response.message.SerializeToString()]
    for array in response.raw_output_contents:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        frames += [_key(RAW_OUTPUT_CONTENTS, _LEN) + _varint(data.nbytes), data.data]
    return b"".join(frames)
