"""Wire tensors: round trips, byte order, and malformed tensors named by field."""

from __future__ import annotations

import numpy as np
import pytest

from featmap.contract.errors import InvalidTensor
from featmap.contract.wire import (
    decode_tensor,
    encode_tensor,
)
from featmap.v1 import featmap_pb2 as pb


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
def test_round_trip(dtype: type) -> None:
    array = (np.arange(2 * 3 * 4 * 5) % 200).astype(dtype).reshape(2, 3, 4, 5)
    decoded = decode_tensor(encode_tensor(array), "images")
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    assert not decoded.flags.writeable  # a view of the message bytes, no copy


def test_bytes_are_little_endian_row_major() -> None:
    array = np.array([[1.0, 2.0]], dtype=">f4").T  # big-endian and not C-contiguous
    tensor = encode_tensor(array)
    assert list(tensor.shape) == [2, 1]
    assert tensor.data == np.array([1.0, 2.0], dtype="<f4").tobytes()


def test_unsendable_dtype() -> None:
    with pytest.raises(InvalidTensor, match="float64 is not sendable"):
        encode_tensor(np.zeros(3))


@pytest.mark.parametrize(
    ("tensor", "field", "message"),
    [
        (
            pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0"),
            "x.dtype",
            "DTYPE_UNSPECIFIED",
        ),
        (pb.Tensor(dtype=99, shape=[1], data=b"\0"), "x.dtype", "99"),  # type: ignore[arg-type]
        (pb.Tensor(dtype=pb.UINT8, shape=[2, -1], data=b""), "x.shape", "negative"),
        (pb.Tensor(dtype=pb.FLOAT32, shape=[2, 2], data=b"\0" * 15), "x.data", "needs 16"),
        (pb.Tensor(dtype=pb.FLOAT16, shape=[3], data=b"\0" * 8), "x.data", "needs 6"),
    ],
)
def test_malformed(tensor: pb.Tensor, field: str, message: str) -> None:
    with pytest.raises(InvalidTensor, match=message) as caught:
        decode_tensor(tensor, "x")
    assert caught.value.field == field


def test_huge_dims_do_not_allocate() -> None:
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 40, 1 << 40], data=b"")
    with pytest.raises(InvalidTensor, match="dimension over"):
        decode_tensor(tensor, "images")
