"""End to end through a real gRPC server on 127.0.0.1:0: registered pipelines with tensor
weights, per-pipeline batching, float16 outputs, ExtractStream, the client's auto-streaming of
large batches, bounded stream memory, extract_iter and the asyncio client. Every number is
checked against the NumPy reference."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from featmap.client import AsyncFeatureClient, FeatmapRpcError, FeatureClient
from featmap.contract.limits import MIB
from featmap.contract.spec import (
    Pipeline,
    WeightTensors,
    parse_pipeline,
)
from featmap.service.graph import INPUT_NAME
from featmap.service.reference import reference_outputs
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc
from tests.conftest import README_SPEC, assert_matches_reference

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

# conv1 (3 -> 32, seeded) -> relu -> conv2 (32 -> 64, tensor kernel 64x32x3x3 = 73 KB + bias)
# -> relu "act2" -> "big" (64 -> 64, 16x16 valid: a 64x64x16x16 tensor of 4 MiB)
# -> global average pool "features"
TENSOR_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {
            "op": "conv2d",
            "name": "conv1",
            "filters": 32,
            "kernel_size": 3,
            "padding": "same",
            "weights": {"init": "he_normal", "seed": 1},
        },
        {"op": "relu"},
        {
            "op": "conv2d",
            "name": "conv2",
            "filters": 64,
            "kernel_size": 3,
            "padding": "same",
            "weights": {"tensor": "conv2.w"},
            "bias": {"tensor": "conv2.b"},
        },
        {"op": "relu", "name": "act2"},
        {
            "op": "conv2d",
            "name": "big",
            "filters": 64,
            "kernel_size": 16,
            "weights": {"tensor": "big.w"},
        },
        {"op": "global_avg_pool2d", "name": "features"},
    ],
    "outputs": ["act2", "big", "features"],
}


def he_tensor(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float32 N(0, 2 / fan_in) weights of `shape` (filters, in_channels, kh, kw)."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    values = np.random.default_rng(seed).standard_normal(shape) * np.sqrt(2.0 / fan_in)
    return values.astype(np.float32)


TENSORS: dict[str, np.ndarray] = {
    "conv2.w": he_tensor((64, 32, 3, 3), seed=10),
    "conv2.b": he_tensor((64,), seed=11) * np.float32(0.1),
    "big.w": he_tensor((64, 64, 16, 16), seed=12),
}
# A cheap pipeline whose outputs are smaller than its input, for big batches and streams:
# 3 -> 2 channels (3x3 same), then max pool 2.
SHRINKING_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {
            "op": "conv2d",
            "name": "conv",
            "filters": 2,
            "kernel_size": 3,
            "padding": "same",
            "weights": {"init": "glorot_uniform", "seed": 5},
            "bias": {"init": "he_uniform", "seed": 6},
        },
        {"op": "max_pool2d", "name": "pooled", "pool_size": 2},
    ],
    "outputs": ["conv", "pooled"],
}
RELU_SPEC: dict[str, Any] = {"input": {"channels": 1}, "layers": [{"op": "relu"}]}


def normal(*shape: int, seed: int = 0) -> np.ndarray:
    """float32 N(0, 1) images."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_matches_tensors(
    actual: Mapping[str, np.ndarray],
    pipeline: Pipeline,
    images: np.ndarray,
    tensors: WeightTensors,
    *,
    dtype: type = np.float32,
) -> None:
    """Shape, dtype, values against the reference run with `tensors` (float16: its precision)."""
    expected = reference_outputs(pipeline, images, tensors)
    assert sorted(actual) == sorted(expected)
    rtol, atol = (1e-4, 1e-5) if dtype == np.float32 else (2e-3, 2e-3)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}"
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(
            got.astype(np.float64), want, rtol=rtol, atol=atol * scale, err_msg=name
        )


def tensor_of(array: np.ndarray) -> pb.Tensor:
    """A float32 wire tensor."""
    return pb.Tensor(dtype=pb.FLOAT32, shape=array.shape, data=array.tobytes())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stub(server: FeatmapServer) -> Iterator[pb_grpc.FeatureExtractorStub]:
    """The raw generated stub on its own channel to the session's server."""
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.FeatureExtractorStub(channel)


@pytest.fixture(scope="module")
def tensor_pipeline() -> Pipeline:
    """TENSOR_SPEC validated."""
    return parse_pipeline(TENSOR_SPEC)


@pytest.fixture(scope="module")
def tensor_id(client: FeatureClient) -> str:
    """TENSOR_SPEC registered with TENSORS on the session's server."""
    return client.register(TENSOR_SPEC, TENSORS)


# --------------------------------------------------------------------------- registered pipelines


def test_register_and_extract_with_tensor_weights(
    client: FeatureClient, tensor_id: str, tensor_pipeline: Pipeline
) -> None:
    assert TENSORS["conv2.w"].nbytes == 73_728 and TENSORS["big.w"].nbytes == 4 * MIB
    images = normal(2, 3, 20, 20, seed=1)
    outputs = client.extract(images, tensor_id)
    assert outputs["act2"].shape == (2, 64, 20, 20)
    assert outputs["big"].shape == (2, 64, 5, 5)  # 20 - 16 + 1
    assert outputs["features"].shape == (2, 64, 1, 1)
    assert_matches_tensors(outputs, tensor_pipeline, images, TENSORS)
    # The id is the content hash of spec and tensors: not the spec's own id.
    assert len(tensor_id) == 32 and tensor_id != tensor_pipeline.pipeline_id


def test_registering_twice_gives_the_same_id(client: FeatureClient, tensor_id: str) -> None:
    assert client.register(TENSOR_SPEC, TENSORS) == tensor_id
    # The same spec spelled differently and the same numbers in float64: the same pipeline.
    as_text = json.dumps(TENSOR_SPEC, indent=2)
    as_float64 = {name: array.astype(np.float64) for name, array in TENSORS.items()}
    assert client.register(as_text, as_float64) == tensor_id
    listed = [info.pipeline_id for info in client.list_pipelines()]
    assert listed.count(tensor_id) == 1


def test_other_tensors_give_another_id(client: FeatureClient, tensor_id: str) -> None:
    other = {**TENSORS, "conv2.b": TENSORS["conv2.b"] + np.float32(0.5)}
    other_id = client.register(TENSOR_SPEC, other)
    try:
        assert other_id != tensor_id
    finally:
        assert client.delete_pipeline(other_id)


def test_get_pipeline_raw(
    stub: pb_grpc.FeatureExtractorStub,
    tensor_id: str,
    tensor_pipeline: Pipeline,
    server: FeatmapServer,
) -> None:
    info = stub.GetPipeline(pb.GetPipelineRequest(pipeline_id=tensor_id), timeout=30)
    assert info.pipeline_id == tensor_id
    assert parse_pipeline(info.spec_json) == tensor_pipeline
    assert info.spec_json == tensor_pipeline.canonical_json()
    assert list(info.weight_names) == ["big.w", "conv2.b", "conv2.w"]
    assert info.onnx_model == b""  # only with include_model
    shapes = {
        output.name: [d.size if d.WhichOneof("value") == "size" else d.symbol for d in output.shape]
        for output in info.outputs
    }
    assert shapes == {
        "act2": ["N", 64, "H", "W"],
        "big": ["N", 64, "H-15", "W-15"],
        "features": ["N", 64, 1, 1],
    }
    assert [output.dtype for output in info.outputs] == [pb.FLOAT32] * 3
    # Not registered with a batching override: the server's default is reported.
    settings = server.settings
    assert info.batching == pb.BatchingConfig(
        enabled=settings.batching,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us,
    )


def test_get_pipeline_model_runs_in_onnxruntime(
    client: FeatureClient, tensor_id: str, tensor_pipeline: Pipeline
) -> None:
    info = client.get_pipeline(tensor_id, include_model=True)
    assert len(info.onnx_model) > 4 * MIB  # the 4 MiB tensor is inside
    session = ort.InferenceSession(info.onnx_model, providers=["CPUExecutionProvider"])
    images = normal(1, 3, 17, 19, seed=2)
    names = tensor_pipeline.output_names
    offline = dict(zip(names, session.run(names, {INPUT_NAME: images}), strict=True))
    assert_matches_tensors(offline, tensor_pipeline, images, TENSORS)
    served = client.extract(images, tensor_id)
    for name in names:
        np.testing.assert_allclose(served[name], offline[name], rtol=1e-5, atol=1e-5)


def test_list_pipelines_contains_it(client: FeatureClient, tensor_id: str) -> None:
    listed = {info.pipeline_id: info for info in client.list_pipelines()}
    assert tensor_id in listed
    info = listed[tensor_id]
    assert info.onnx_model == b""  # never in a listing
    assert info.weight_names == ["big.w", "conv2.b", "conv2.w"]
    assert info.outputs["features"] == ["N", 64, 1, 1]
    assert info.spec == json.loads(parse_pipeline(TENSOR_SPEC).canonical_json())


def test_delete_then_extract_is_not_found(client: FeatureClient) -> None:
    spec = {**SHRINKING_SPEC, "outputs": ["pooled"]}
    pipeline_id = client.register(spec)
    images = normal(1, 3, 8, 8)
    assert_matches_reference(client.extract(images, pipeline_id), parse_pipeline(spec), images)
    assert client.delete_pipeline(pipeline_id) is True
    assert client.delete_pipeline(pipeline_id) is False
    assert pipeline_id not in [info.pipeline_id for info in client.list_pipelines()]
    with pytest.raises(FeatmapRpcError) as failure:
        client.extract(images, pipeline_id)
    assert (failure.value.code, failure.value.field) == (NOT_FOUND, "pipeline_id"), failure.value
    assert pipeline_id in failure.value.details
    with pytest.raises(FeatmapRpcError) as missing:
        client.get_pipeline(pipeline_id)
    assert (missing.value.code, missing.value.field) == (NOT_FOUND, "pipeline_id")


def test_register_errors_name_the_field(client: FeatureClient) -> None:
    cases: list[tuple[dict[str, np.ndarray], str, str]] = [
        ({k: v for k, v in TENSORS.items() if k != "big.w"}, "layers[4].weights.tensor", "big.w"),
        ({**TENSORS, "extra": np.zeros(3, np.float32)}, "weights['extra']", "not referenced"),
        ({**TENSORS, "conv2.b": np.zeros(63, np.float32)}, "weights['conv2.b'].shape", "[64]"),
        ({**TENSORS, "conv2.b": np.zeros(64, np.uint8)}, "weights['conv2.b'].dtype", "uint8"),
    ]
    nan = TENSORS["conv2.w"].copy()
    nan[3, 2, 1, 0] = np.nan
    cases.append(({**TENSORS, "conv2.w": nan}, "weights['conv2.w'].data", "NaN"))
    for tensors, field, says in cases:
        with pytest.raises(FeatmapRpcError) as failure:
            client.register(TENSOR_SPEC, tensors)
        assert (failure.value.code, failure.value.field) == (INVALID, field), failure.value
        assert failure.value.details.startswith(f"{field}: ")
        assert says in failure.value.details, failure.value


def test_inline_spec_with_tensor_weights_is_invalid(client: FeatureClient) -> None:
    spec = {
        "input": {"channels": 3},
        "layers": [{"op": "conv2d", "filters": 2, "kernel_size": 3, "weights": {"tensor": "w"}}],
    }
    with pytest.raises(FeatmapRpcError) as failure:
        client.extract(normal(1, 3, 8, 8), spec)
    assert (failure.value.code, failure.value.field) == (INVALID, "layers[0].weights.tensor"), (
        failure.value
    )
    assert "RegisterPipeline" in failure.value.details


# --------------------------------------------------------------------------- batching override


def test_batching_override_is_echoed(client: FeatureClient) -> None:
    spec = {**SHRINKING_SPEC, "outputs": ["conv"]}
    batching = {"enabled": False, "max_batch_size": 4, "max_queue_delay_us": 0}
    pipeline_id = client.register(spec, batching=batching)
    try:
        assert client.get_pipeline(pipeline_id).batching == batching
        listed = {info.pipeline_id: info for info in client.list_pipelines()}
        assert listed[pipeline_id].batching == batching
        images = normal(3, 3, 9, 9, seed=3)
        assert_matches_reference(client.extract(images, pipeline_id), parse_pipeline(spec), images)
        # Registering again with another policy keeps the id and takes the new policy.
        other = {"enabled": True, "max_batch_size": 8, "max_queue_delay_us": 250}
        assert client.register(spec, batching=other) == pipeline_id
        assert client.get_pipeline(pipeline_id).batching == other
    finally:
        client.delete_pipeline(pipeline_id)


@pytest.mark.parametrize(
    ("batching", "field"),
    [
        ({"enabled": True, "max_batch_size": 0, "max_queue_delay_us": 0}, "max_batch_size"),
        ({"enabled": True, "max_batch_size": -3, "max_queue_delay_us": 0}, "max_batch_size"),
        ({"enabled": True, "max_batch_size": 4, "max_queue_delay_us": -1}, "max_queue_delay_us"),
    ],
)
def test_invalid_batching_names_the_field(
    client: FeatureClient, batching: dict[str, Any], field: str
) -> None:
    with pytest.raises(FeatmapRpcError) as failure:
        client.register(SHRINKING_SPEC, batching=batching)
    assert (failure.value.code, failure.value.field) == (INVALID, f"batching.{field}"), (
        failure.value
    )


# --------------------------------------------------------------------------- float16 outputs


def test_float16_outputs(client: FeatureClient, tensor_id: str, tensor_pipeline: Pipeline) -> None:
    images = normal(2, 3, 18, 18, seed=4)
    outputs = client.extract(images, tensor_id, output_dtype="float16")
    assert_matches_tensors(outputs, tensor_pipeline, images, TENSORS, dtype=np.float16)
    inline = client.extract(images, README_SPEC, output_dtype="float16")
    assert_matches_tensors(inline, parse_pipeline(README_SPEC), images, {}, dtype=np.float16)


BEYOND_FLOAT16: dict[str, Any] = {
    "input": {"channels": 1},
    "layers": [
        {"op": "relu", "name": "small"},
        {
            "op": "conv2d",
            "name": "huge",
            "filters": 1,
            "kernel_size": 1,
            "weights": {"values": [[[[1e5]]]]},
        },
    ],
    "outputs": ["small", "huge"],
}


def test_float16_fits_float32_only_values_as_float32(client: FeatureClient) -> None:
    images = np.ones((1, 1, 2, 2), np.float32)
    outputs = client.extract(images, BEYOND_FLOAT16)  # 1e5 is fine in float32
    assert_matches_reference(outputs, parse_pipeline(BEYOND_FLOAT16), images)


def test_float16_overflow_names_the_output(client: FeatureClient) -> None:
    with pytest.raises(FeatmapRpcError) as failure:
        client.extract(np.ones((1, 1, 2, 2), np.float32), BEYOND_FLOAT16, output_dtype="float16")
    assert (failure.value.code, failure.value.field) == (INVALID, "outputs.huge"), failure.value
    assert "65504" in failure.value.details


# --------------------------------------------------------------------------- ExtractStream


def stream_batches() -> list[np.ndarray]:
    """20 chunks of 1 to 5 images, two image sizes."""
    return [normal(1 + i % 5, 3, 12 + 4 * (i % 2), 16, seed=100 + i) for i in range(20)]


@pytest.mark.parametrize("named_by", ["spec", "id"])
def test_extract_stream_in_order(client: FeatureClient, named_by: str) -> None:
    pipeline = parse_pipeline(SHRINKING_SPEC)
    target = SHRINKING_SPEC if named_by == "spec" else client.register(SHRINKING_SPEC)
    batches = stream_batches()
    results = list(client.extract_stream(iter(batches), target))
    assert len(results) == len(batches)
    for batch, outputs in zip(batches, results, strict=True):
        assert outputs["conv"].shape[0] == len(batch)
        assert_matches_reference(outputs, pipeline, batch)


def raw_stream(
    stub: pb_grpc.FeatureExtractorStub, requests: list[pb.ExtractRequest]
) -> list[pb.ExtractResponse]:
    """All responses of one raw ExtractStream call."""
    return list(stub.ExtractStream(iter(requests), timeout=30))


def test_stream_messages_inherit_the_pipeline(stub: pb_grpc.FeatureExtractorStub) -> None:
    first = parse_pipeline(SHRINKING_SPEC)
    second = parse_pipeline(README_SPEC)
    batches = [normal(2, 3, 10, 10, seed=200 + i) for i in range(5)]
    requests = [pb.ExtractRequest(images=tensor_of(batch)) for batch in batches]
    requests[0].spec_json = json.dumps(SHRINKING_SPEC)
    requests[3].spec_json = json.dumps(README_SPEC)  # a later message may switch pipelines
    responses = raw_stream(stub, requests)
    assert [r.sequence for r in responses] == [0, 1, 2, 3, 4]
    expected = [first] * 3 + [second] * 2
    for response, batch, pipeline in zip(responses, batches, expected, strict=True):
        assert response.pipeline_id == pipeline.pipeline_id
        outputs = {
            name: np.frombuffer(t.data, "<f4").reshape(t.shape)
            for name, t in response.outputs.items()
        }
        assert_matches_reference(outputs, pipeline, batch)


def test_stream_without_a_pipeline_is_invalid(stub: pb_grpc.FeatureExtractorStub) -> None:
    requests = [pb.ExtractRequest(images=tensor_of(normal(1, 3, 8, 8)))]
    with pytest.raises(grpc.RpcError) as failure:
        raw_stream(stub, requests)
    error = FeatmapRpcError.from_rpc_error(failure.value)
    assert (error.code, error.field) == (INVALID, "pipeline"), error
    assert "stream message 0" in error.details


def test_bad_chunk_in_the_middle(client: FeatureClient) -> None:
    pipeline = parse_pipeline(SHRINKING_SPEC)
    batches = [normal(2, 3, 8, 8, seed=300 + i) for i in range(6)]
    batches[3] = normal(2, 4, 8, 8)  # four channels for a three-channel input
    received: list[dict[str, np.ndarray]] = []
    with pytest.raises(FeatmapRpcError) as failure:
        for outputs in client.extract_stream(batches, SHRINKING_SPEC):
            received.append(outputs)
    assert (failure.value.code, failure.value.field) == (INVALID, "images.shape"), failure.value
    assert "stream message 3" in failure.value.details
    assert "input.channels=3" in failure.value.details
    # Everything before the bad chunk was answered, in order.
    assert len(received) == 3
    for batch, outputs in zip(batches, received, strict=False):
        assert_matches_reference(outputs, pipeline, batch)
    # The server still serves, streams and unary calls alike.
    good = [normal(1, 3, 8, 8, seed=400 + i) for i in range(3)]
    for batch, outputs in zip(good, client.extract_stream(good, SHRINKING_SPEC), strict=True):
        assert_matches_reference(outputs, pipeline, batch)
    assert_matches_reference(client.extract(good[0], SHRINKING_SPEC), pipeline, good[0])


def test_consumer_stopping_early_leaves_the_server_serving(client: FeatureClient) -> None:
    pipeline = parse_pipeline(SHRINKING_SPEC)
    batches = (normal(1, 3, 8, 8, seed=500 + i) for i in range(1000))
    stream = client.extract_stream(batches, SHRINKING_SPEC)
    for _ in range(3):
        next(stream)
    stream.close()  # cancels the call
    images = normal(2, 3, 8, 8)
    assert_matches_reference(client.extract(images, SHRINKING_SPEC), pipeline, images)


# --------------------------------------------------------------------------- bounded memory

CHUNKS = 150  # of one 1-channel 512x512 float32 image: 1 MiB per request and per reply
RELU_BASES = [normal(1, 1, 512, 512, seed=600 + i) for i in range(3)]


class CountingChunks:
    """CHUNKS chunks cycling over RELU_BASES, counting how many were taken."""

    def __init__(self) -> None:
        self.produced = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(CHUNKS):
            self.produced += 1
            yield RELU_BASES[index % 3]


def fresh_client(server: FeatmapServer) -> FeatureClient:
    """A client on its own TCP connection to `server`.

    gRPC shares connections between channels with equal arguments, and HTTP/2 flow-control
    windows grow with the traffic a connection has carried (BDP probing); an unusual
    max_message_bytes gives this channel arguments of its own, hence a new connection.
    """
    return FeatureClient(server.address, timeout=60, max_message_bytes=8 * MIB + 1)


def test_stream_memory_is_bounded(server: FeatmapServer) -> None:
    # relu: each reply is as large as its request, so a slow consumer holds the server back
    # through HTTP/2 flow control in both directions.
    expected = [np.maximum(base, 0) for base in RELU_BASES]
    assert_matches_reference({"relu_0": expected[0]}, parse_pipeline(RELU_SPEC), RELU_BASES[0])
    chunks = CountingChunks()
    answered = 0
    ahead: list[int] = []
    started = time.monotonic()
    with fresh_client(server) as client:
        for outputs in client.extract_stream(chunks, RELU_SPEC):
            np.testing.assert_array_equal(outputs["relu_0"], expected[answered % 3])
            answered += 1
            ahead.append(chunks.produced - answered)
            time.sleep(0.004)  # a slow consumer: ~0.6 s for the whole stream
    elapsed = time.monotonic() - started
    assert answered == CHUNKS
    # What featmap bounds: the server holds at most stream_window received, unanswered
    # messages (its reader thread then stops reading).
    window = server.settings.stream_window
    assert 1 <= server.servicer.stream_peak_backlog <= window
    # Chunks produced but not yet answered: the client sends at most in_flight (4) ahead of
    # the results it has handed over, whatever HTTP/2's flow-control windows would allow.
    assert max(ahead) <= 4 + 1, max(ahead)
    assert elapsed < 10, elapsed


def test_stream_reads_only_a_few_chunks_ahead(server: FeatmapServer) -> None:
    warm = normal(8, 1, 1024, 1024, seed=650)  # 32 MiB each way, as a big job would send
    chunks = CountingChunks()
    with fresh_client(server) as client:
        for _ in range(3):
            assert client.extract(warm, RELU_SPEC)["relu_0"].shape == warm.shape
        stream = client.extract_stream(chunks, RELU_SPEC)
        first = next(stream)
        np.testing.assert_array_equal(first["relu_0"], np.maximum(RELU_BASES[0], 0))
        time.sleep(0.5)  # the consumer stalls
        produced = chunks.produced
        stream.close()
    # stream_window and the reader's blocked put and the chunk computing on the server, one
    # message in each direction's gRPC operation: a few batches
    few = server.settings.stream_window + 4
    assert produced - 1 <= few, f"{produced} chunks drawn, 1 answered"


# --------------------------------------------------------------------------- extract_iter


def test_extract_iter_in_order(client: FeatureClient) -> None:
    pipeline = parse_pipeline(SHRINKING_SPEC)
    batches = [normal(1 + i % 4, 3, 10, 14, seed=700 + i) for i in range(10)]
    results = list(client.extract_iter(iter(batches), SHRINKING_SPEC, in_flight=3))
    assert len(results) == len(batches)
    for batch, outputs in zip(batches, results, strict=True):
        assert_matches_reference(outputs, pipeline, batch)


def test_extract_iter_error_names_the_field(client: FeatureClient) -> None:
    batches = [normal(1, 3, 10, 10), normal(1, 2, 10, 10), normal(1, 3, 10, 10)]
    results = client.extract_iter(batches, SHRINKING_SPEC, in_flight=3)
    next(results)
    with pytest.raises(FeatmapRpcError) as failure:
        next(results)
    assert (failure.value.code, failure.value.field) == (INVALID, "images.shape")
    results.close()


# --------------------------------------------------------------------------- auto-splitting


@pytest.fixture(scope="module")
def split_server() -> Iterator[FeatmapServer]:
    """A server with 1 MiB messages."""
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        intra_op_threads=1,
        grpc_workers=4,
        max_message_bytes=MIB,
    )
    with FeatmapServer(settings) as running:
        yield running


@pytest.fixture(scope="module")
def split_client(split_server: FeatmapServer) -> Iterator[FeatureClient]:
    """A client that knows the 1 MiB limit and streams anything larger."""
    with FeatureClient(split_server.address, timeout=60, max_message_bytes=MIB) as connected:
        connected.wait_ready()
        yield connected


BIG_BATCH = normal(32, 3, 128, 128, seed=800)  # 6 MiB: 5 images fit in a 1 MiB message


def test_raw_unary_over_the_limit_says_to_stream(split_server: FeatmapServer) -> None:
    images = normal(1, 3, 256, 256)  # 768 KiB + 768 KiB = 1.5 MiB with a second copy below
    request = pb.ExtractRequest(
        spec_json=json.dumps(SHRINKING_SPEC), images=tensor_of(np.concatenate([images, images]))
    )
    assert MIB < request.ByteSize() < 2 * MIB
    with grpc.insecure_channel(split_server.address) as channel:
        stub = pb_grpc.FeatureExtractorStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.Extract(request, timeout=30)
        error = FeatmapRpcError.from_rpc_error(failure.value)
        assert (error.code, error.field) == (EXHAUSTED, "images"), error
        assert "ExtractStream" in error.details
        assert f"max_message_bytes={MIB}" in error.details
        # Past twice the limit gRPC itself refuses it, still RESOURCE_EXHAUSTED.
        whole = pb.ExtractRequest(spec_json=json.dumps(SHRINKING_SPEC), images=tensor_of(BIG_BATCH))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Extract(whole, timeout=30)
        assert refused.value.code() == EXHAUSTED  # type: ignore[attr-defined]


def test_big_batch_is_streamed_by_extract(
    split_client: FeatureClient, split_server: FeatmapServer
) -> None:
    assert split_server.servicer.stream_peak_backlog == 0  # no stream yet on this server
    assert BIG_BATCH.nbytes == 6 * MIB
    outputs = split_client.extract(BIG_BATCH, SHRINKING_SPEC)
    assert outputs["conv"].shape == (32, 2, 128, 128)
    assert outputs["pooled"].shape == (32, 2, 64, 64)
    assert_matches_reference(outputs, parse_pipeline(SHRINKING_SPEC), BIG_BATCH)
    # A unary call of 6 MiB would have been refused: it went as an ExtractStream.
    assert split_server.servicer.stream_peak_backlog >= 1


def test_big_batch_by_pipeline_id(split_client: FeatureClient) -> None:
    pipeline_id = split_client.register(SHRINKING_SPEC)
    outputs = split_client.extract(BIG_BATCH, pipeline_id)
    assert_matches_reference(outputs, parse_pipeline(SHRINKING_SPEC), BIG_BATCH)
    # Each image in order: the last one alone gives the last rows.
    last = split_client.extract(BIG_BATCH[-1:], pipeline_id)
    np.testing.assert_array_equal(outputs["pooled"][-1:], last["pooled"])


UINT8_SPEC: dict[str, Any] = {
    **SHRINKING_SPEC,
    "input": {"channels": 3, "layout": "NHWC", "dtype": "uint8", "scale": 1 / 255},
}
UINT8_BATCH = np.random.default_rng(9).integers(0, 256, (40, 160, 160, 3), dtype=np.uint8)


def test_big_batch_of_uint8_nhwc(split_client: FeatureClient) -> None:
    # Only the pooled output: 2 float32 channels at a quarter of the pixels, 2 bytes a pixel
    # against the 3 bytes a pixel of the uint8 images, so each chunk's reply fits too.
    spec = {**UINT8_SPEC, "outputs": ["pooled"]}
    assert UINT8_BATCH.nbytes > 2.9 * MIB  # 13 images a message
    outputs = split_client.extract(UINT8_BATCH, spec)
    assert outputs["pooled"].shape == (40, 2, 80, 80)
    assert_matches_reference(outputs, parse_pipeline(spec), UINT8_BATCH)


@pytest.mark.parametrize(
    ("spec", "images"),
    [
        pytest.param(README_SPEC, normal(24, 3, 128, 128, seed=801), id="readme-float32"),
        pytest.param(UINT8_SPEC, UINT8_BATCH, id="uint8-to-float32"),
    ],
)
def test_big_batch_with_larger_outputs(
    split_client: FeatureClient, spec: dict[str, Any], images: np.ndarray
) -> None:
    outputs = split_client.extract(images, spec)
    assert_matches_reference(outputs, parse_pipeline(spec), images)


# --------------------------------------------------------------------------- asyncio client


def test_async_extract_and_stream(server: FeatmapServer, split_server: FeatmapServer) -> None:
    pipeline = parse_pipeline(SHRINKING_SPEC)
    batches = [normal(1 + i % 3, 3, 10, 12, seed=900 + i) for i in range(6)]

    async def go() -> None:
        async with AsyncFeatureClient(server.address, timeout=60) as client:
            await client.wait_ready()
            small = batches[0]
            assert_matches_reference(await client.extract(small, SHRINKING_SPEC), pipeline, small)

            async def produce() -> AsyncIterator[np.ndarray]:
                for batch in batches:
                    await asyncio.sleep(0)
                    yield batch

            streamed = [out async for out in client.extract_stream(produce(), SHRINKING_SPEC)]
            assert len(streamed) == len(batches)
            for batch, outputs in zip(batches, streamed, strict=True):
                assert_matches_reference(outputs, pipeline, batch)

            iterated = [
                out async for out in client.extract_iter(batches, SHRINKING_SPEC, in_flight=3)
            ]
            for batch, outputs in zip(batches, iterated, strict=True):
                assert_matches_reference(outputs, pipeline, batch)

        async with AsyncFeatureClient(
            split_server.address, timeout=60, max_message_bytes=MIB
        ) as split:
            await split.wait_ready()
            outputs = await split.extract(BIG_BATCH, SHRINKING_SPEC)
            assert_matches_reference(outputs, pipeline, BIG_BATCH)

    asyncio.run(go())


def test_async_registry_and_info(server: FeatmapServer, tensor_pipeline: Pipeline) -> None:
    images = normal(1, 3, 16, 16, seed=950)

    async def go() -> None:
        async with AsyncFeatureClient(server.address, timeout=60) as client:
            info = await client.server_info()
            assert info.limits["max_message_bytes"] == server.settings.max_message_bytes
            assert info.active_providers[-1] == "CPUExecutionProvider"
            pipeline_id = await client.register(
                TENSOR_SPEC, TENSORS, batching={"enabled": False, "max_batch_size": 2,
                                                "max_queue_delay_us": 10}
            )  # fmt: skip
            assert_matches_tensors(
                await client.extract(images, pipeline_id), tensor_pipeline, images, TENSORS
            )
            described = await client.get_pipeline(pipeline_id, include_model=True)
            assert described.batching == {
                "enabled": False,
                "max_batch_size": 2,
                "max_queue_delay_us": 10,
            }
            assert described.outputs["big"] == ["N", 64, "H-15", "W-15"]
            assert len(described.onnx_model) > 4 * MIB
            assert pipeline_id in [p.pipeline_id for p in await client.list_pipelines()]
            # Registered again with the default batching, for the tests that share this id.
            assert await client.register(TENSOR_SPEC, TENSORS) == pipeline_id

            doomed = await client.register({**SHRINKING_SPEC, "outputs": ["conv"]})
            assert await client.delete_pipeline(doomed) is True
            assert await client.delete_pipeline(doomed) is False
            with pytest.raises(FeatmapRpcError) as failure:
                await client.extract(images, doomed)
            assert (failure.value.code, failure.value.field) == (NOT_FOUND, "pipeline_id")

    asyncio.run(go())


def test_async_errors(server: FeatmapServer) -> None:
    async def go() -> None:
        async with AsyncFeatureClient(server.address, timeout=60) as client:
            with pytest.raises(FeatmapRpcError) as unary:
                await client.extract(normal(1, 2, 8, 8), SHRINKING_SPEC)
            assert (unary.value.code, unary.value.field) == (INVALID, "images.shape")

            with pytest.raises(FeatmapRpcError) as registering:
                await client.register(TENSOR_SPEC, {})
            assert (registering.value.code, registering.value.field) == (
                INVALID,
                "layers[2].weights.tensor",
            )

            async def produce() -> AsyncIterator[np.ndarray]:
                yield normal(1, 3, 8, 8)
                yield normal(1, 3, 8, 8)
                yield normal(1, 3, 2, 2)  # 2x2 is enough: conv 'same', then pool 2 -> 1x1
                yield normal(1, 5, 8, 8)  # five channels for a three-channel input

            received = 0
            with pytest.raises(FeatmapRpcError) as streaming:
                async for _ in client.extract_stream(produce(), SHRINKING_SPEC):
                    received += 1
            assert (streaming.value.code, streaming.value.field) == (INVALID, "images.shape")
            assert "stream message 3" in streaming.value.details
            assert received == 3

            with pytest.raises(FeatmapRpcError) as missing:
                await client.get_pipeline("f" * 32)
            assert (missing.value.code, missing.value.field) == (NOT_FOUND, "pipeline_id")

    asyncio.run(go())
