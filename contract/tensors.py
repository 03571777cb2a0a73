"""Arrays at featmap's edges: which dtypes travel, how layouts name their axes, reply sizes.

One place for rules that the client (before it sends) and the server (when it receives) both
apply, so that the two cannot disagree about them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from ..v1 import featmap_pb2 as pb
from .errors import InvalidTensor

# Wire dtype codes and the NumPy dtypes they carry (little-endian on the wire).
WIRE_DTYPES: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.UINT8: np.dtype("u1"),
}
DTYPE_NAMES: dict[int, str] = {pb.FLOAT32: "float32", pb.FLOAT16: "float16", pb.UINT8: "uint8"}
WIRE_CODES: dict[str, int] = {name: code for code, name in DTYPE_NAMES.items()}

# NumPy works dtype.name out in Python on every access (about 2 us, 30 times .char); the
# numeric dtypes' names, looked up instead, on every batch's path.
_NUMERIC_NAMES: dict[np.dtype, str] = {
    dtype: dtype.name for dtype in map(np.dtype, ("?", *np.typecodes["AllInteger"], *"efdg"))
}


def dtype_name(dtype: np.dtype) -> str:
    """`dtype.name` ("float32", "uint8", ...)."""
    name = _NUMERIC_NAMES.get(dtype)
    return dtype.name if name is None else name


OutputDType = Literal["float32", "float16"]
OUTPUT_DTYPES: dict[str, int] = {"float32": pb.FLOAT32, "float16": pb.FLOAT16}
Layout = Literal["NCHW", "NHWC"]


def sendable(array: object, field: str = "images") -> np.ndarray:
    """An array as it may travel: float32, float16 or uint8 (float64 becomes float32).

    Integer, bool, complex and object arrays are refused with InvalidTensor naming the dtype:
    casting them silently would guess at the caller's scale (0..255 or 0..1?).
    """
    array = np.asarray(array)
    if array.dtype == np.float64:
        return array.astype(np.float32)
    if array.dtype.name not in WIRE_CODES:
        hint = " (cast pixels with .astype(np.uint8) or .astype(np.float32))"
        raise InvalidTensor(
            f"{field}.dtype",
            f"{array.dtype.name} arrays are not accepted; send float32, float16 or uint8"
            + (hint if array.dtype.kind in "iub" else ""),
        )
    return array


def wire_dtype(array: np.ndarray, field: str = "images") -> int:
    """The wire dtype code of an array; InvalidTensor for dtypes the wire does not carry."""
    code = WIRE_CODES.get(array.dtype.name)
    if code is None:
        raise InvalidTensor(
            f"{field}.dtype", f"{array.dtype.name} is not sendable; use float32, float16 or uint8"
        )
    return code


def image_axes(layout: Layout) -> tuple[int, int, int]:
    """(channel, height, width) axes of a batch (N first) in `layout`."""
    return (1, 2, 3) if layout == "NCHW" else (3, 1, 2)


def image_size(layout: Layout, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of a batch shape (N first) in `layout`."""
    channel, height, width = image_axes(layout)
    return shape[channel], shape[height], shape[width]


def single_image_size(layout: Layout, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of one image's shape (no batch axis) in `layout`."""
    return image_size(layout, (1, *shape))


def batch_shape(layout: Layout, n: Any, channels: Any, height: Any, width: Any) -> tuple[Any, ...]:
    """A batch's shape in `layout`; the sizes may be numbers or symbols ("N", -1)."""
    return (n, channels, height, width) if layout == "NCHW" else (n, height, width, channels)


def from_hwc(pixels: np.ndarray, layout: Layout) -> np.ndarray:
    """One (H, W, C) image in `layout`'s order: (C, H, W) for NCHW (a view), as is for NHWC."""
    return pixels.transpose(2, 0, 1) if layout == "NCHW" else pixels


def output_itemsize(output_dtype: str) -> int:
    """Bytes per value of a reply in `output_dtype` (float32 or float16)."""
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be 'float32' or 'float16', not {output_dtype!r}")
    return int(np.dtype(output_dtype).itemsize)


def reply_bytes(
    output_shapes: Iterable[tuple[int, ...]], batch: int, output_dtype: str = "float32"
) -> int:
    """Bytes of the output tensors for `batch` images, each output's per-image shape given."""
    itemsize = output_itemsize(output_dtype)
    return sum(batch * math.prod(shape) * itemsize for shape in output_shapes)


# What a reply holds beyond its outputs' data, at most: protobuf tags and lengths, the pipeline
# id or OIP model name and request id (at most 256 bytes), and per output its name (layer names
# are at most 128 characters), dtype and shape (4 dims).
REPLY_ENVELOPE_BYTES = 512
REPLY_BYTES_PER_OUTPUT = 256


def reply_message_bytes(data_bytes: int, outputs: int) -> int:
    """The most a reply message of `outputs` outputs holding `data_bytes` of data can take."""
    return data_bytes + REPLY_ENVELOPE_BYTES + REPLY_BYTES_PER_OUTPUT * outputs


# A run's outputs by name (layer name -> (N, ...) array).
Outputs = dict[str, np.ndarray]


def all_finite(array: np.ndarray) -> bool:
    """True when no NaN/Inf; two SIMD reductions instead of a boolean temporary."""
    if array.size == 0 or array.dtype.kind != "f":
        return True
    return bool(np.isfinite(array.min()) and np.isfinite(array.max()))


def first_non_finite(array: np.ndarray) -> str:
    """The first NaN/Inf of an array and where it is, for an error message."""
    index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
    return f"{array[index]} at index {list(index)}"
