"""Wire tensors: round trips, byte order, malformed tensors named by field, OIP framing."""

from __future__ import annotations

import numpy as np
import pytest

from featmap.contract.errors import InvalidTensor
from featmap.contract.wire import (
    MAX_DIMENSION,
    FramedInferResponse,
    check_shape,
    decode_tensor,
    encode_tensor,
    parse_infer_request,
    serialize_infer_response,
)
from featmap.oip import grpc_predict_v2_pb2 as oip
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


@pytest.mark.parametrize(
    ("shape", "says"),
    [
        ([2**31 - 1, 2**31 - 1, 0, 2**31 - 1], "is empty"),  # NumPy: "array is too big"
        ([0], "is empty"),
        ([MAX_DIMENSION] * 8, "more than int64 counts"),  # 2^248 elements, in Python ints
        ([MAX_DIMENSION + 1], "over 2147483647"),
        ([3, -1], "negative"),
        ([1] * 9, "rank 9"),
    ],
)
def test_one_shape_rule(shape: list[int], says: str) -> None:
    with pytest.raises(InvalidTensor, match=says) as error:
        check_shape(tuple(shape), "weights['w']", 4)
    assert error.value.field == "weights['w'].shape"
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=shape)
    with pytest.raises(InvalidTensor, match=says):
        decode_tensor(tensor, "weights['w']")


def test_shape_bytes() -> None:
    assert check_shape((2, 3, 4, 5), "images", 2) == 240
    assert check_shape((), "images", 4) == 4  # a scalar: one value


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


# --------------------------------------------------------------------------- OIP framing


def stock_infer_request() -> oip.ModelInferRequest:
    """A ModelInferRequest as the generated stubs (and so stock clients) build it."""
    request = oip.ModelInferRequest(model_name="m", model_version="1", id="req-7")
    request.parameters["priority"].int64_param = 3
    first = request.inputs.add(name="images", datatype="FP32", shape=[2, 3, 4, 5])
    first.parameters["binary_data_size"].int64_param = 480
    request.inputs.add(name="extra", datatype="UINT8", shape=[3])
    request.outputs.add(name="features")
    images = np.arange(2 * 3 * 4 * 5, dtype="<f4").reshape(2, 3, 4, 5)
    request.raw_input_contents.extend([images.tobytes(), b"\x01\x02\x03"])
    return request


def test_infer_request_from_stock_stubs_parses_without_copies() -> None:
    sent = stock_infer_request()
    raw = sent.SerializeToString()
    framed = parse_infer_request(raw)
    assert framed.size == len(raw)
    assert [bytes(c) for c in framed.raw_input_contents] == list(sent.raw_input_contents)
    # Views of the received message, not copies of it.
    assert all(c.obj is raw for c in framed.raw_input_contents)
    expected = oip.ModelInferRequest()
    expected.CopyFrom(sent)
    del expected.raw_input_contents[:]
    assert framed.message == expected


def test_infer_request_fields_in_any_order() -> None:
    # Protobuf allows any field order: contents first, then the rest, parse the same.
    sent = stock_infer_request()
    contents = oip.ModelInferRequest(raw_input_contents=sent.raw_input_contents)
    rest = oip.ModelInferRequest()
    rest.CopyFrom(sent)
    del rest.raw_input_contents[:]
    framed = parse_infer_request(contents.SerializeToString() + rest.SerializeToString())
    assert framed.message == rest
    assert [bytes(c) for c in framed.raw_input_contents] == list(sent.raw_input_contents)


def test_infer_response_reads_back_with_stock_stubs() -> None:
    message = oip.ModelInferResponse(model_name="m", model_version="1", id="req-7")
    message.parameters["sequence_end"].bool_param = True
    arrays = [np.arange(6, dtype="<f4").reshape(2, 3, 1, 1), np.zeros((2, 0), dtype="<f4")]
    for name, array in zip(("features", "empty"), arrays, strict=True):
        message.outputs.add(name=name, datatype="FP32", shape=array.shape)
    raw = serialize_infer_response(FramedInferResponse(message, arrays))
    received = oip.ModelInferResponse.FromString(raw)
    assert list(received.raw_output_contents) == [array.tobytes() for array in arrays]
    del received.raw_output_contents[:]
    assert received == message
    # The same bytes as protobuf writes for the whole message.
    whole = oip.ModelInferResponse()
    whole.CopyFrom(message)
    whole.raw_output_contents.extend(array.tobytes() for array in arrays)
    assert raw == whole.SerializeToString()


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x3a\x10ab"], ids=["garbage", "cut-short"])
def test_malformed_infer_request(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_infer_request(raw)
