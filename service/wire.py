"""ndarray <-> featmap.v1.Tensor: raw little-endian row-major bytes, decoded without copies."""

from __future__ import annotations

import math

import numpy as np

from featmap.service.errors import InvalidTensor
from featmap.v1 import featmap_pb2 as pb

WIRE_DTYPES: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.UINT8: np.dtype("u1"),
}
DTYPE_NAMES = {pb.FLOAT32: "float32", pb.FLOAT16: "float16", pb.UINT8: "uint8"}
WIRE_CODES = {name: code for code, name in DTYPE_NAMES.items()}
# No real image or batch comes near; larger values are garbage (and overflow NumPy's shapes).
MAX_DIMENSION = 2**31 - 1


def decode_tensor(tensor: pb.Tensor, field: str) -> np.ndarray:
    """A read-only ndarray view of a wire tensor; InvalidTensor names `field` if malformed."""
    dtype = WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        name = pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else tensor.dtype
        raise InvalidTensor(f"{field}.dtype", f"{name} is not one of FLOAT32, FLOAT16, UINT8")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidTensor(f"{field}.shape", f"has a negative dimension: {list(shape)}")
    if any(d > MAX_DIMENSION for d in shape):
        raise InvalidTensor(f"{field}.shape", f"{list(shape)} has a dimension over {MAX_DIMENSION}")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(tensor.data):
        raise InvalidTensor(
            f"{field}.data",
            f"has {len(tensor.data)} bytes; shape {list(shape)} x {dtype.itemsize} bytes "
            f"({DTYPE_NAMES[tensor.dtype]}) needs {expected}",
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def wire_dtype(array: np.ndarray) -> int:
    """The wire dtype code of an array; ValueError for dtypes the wire does not carry."""
    code = WIRE_CODES.get(array.dtype.name)
    if code is None:
        raise ValueError(f"dtype {array.dtype} is not sendable; use float32, float16 or uint8")
    return code


def encode_tensor(array: np.ndarray) -> pb.Tensor:
    """A wire tensor holding `array` (any memory order or byte order) as little-endian C order."""
    code = wire_dtype(array)
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[code])
    return pb.Tensor(dtype=code, shape=data.shape, data=data.tobytes())  # type: ignore[arg-type]
