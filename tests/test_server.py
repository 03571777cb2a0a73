"""End to end through a real gRPC server on 127.0.0.1:0: results against the NumPy reference,
pipeline ids, server info and health, a battery of bad requests, limits, and concurrency."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from featmap.client import FeatmapRpcError, FeatureClient
from featmap.contract import __version__
from featmap.contract.limits import MIB
from featmap.contract.spec import (
    Pipeline,
    parse_pipeline,
)
from featmap.service.graph import OPSET
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc
from tests.conftest import README_SPEC, assert_matches_reference

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
RELU: dict[str, Any] = {"op": "relu"}


def conv(**fields: Any) -> dict[str, Any]:
    """A 4-filter 3x3 he_normal conv2d layer; `fields` override, a None value drops a field."""
    layer = {"op": "conv2d", "filters": 4, "kernel_size": 3, "weights": {"init": "he_normal"}}
    return {key: value for key, value in {**layer, **fields}.items() if value is not None}


def make_spec(
    *layers: dict[str, Any], outputs: list[str] | None = None, **input_fields: Any
) -> dict[str, Any]:
    """A spec with a 3-channel input (plus `input_fields`) and the given layers."""
    spec: dict[str, Any] = {"input": {"channels": 3, **input_fields}, "layers": list(layers)}
    if outputs is not None:
        spec["outputs"] = outputs
    return spec


def normal(*shape: int, seed: int = 0) -> np.ndarray:
    """float32 N(0, 1) images."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def wire(dtype: int, shape: list[int], nbytes: int) -> pb.Tensor:
    """A hand-built wire tensor (zeros), for tensors the client would never produce."""
    return pb.Tensor(dtype=dtype, shape=shape, data=bytes(nbytes))  # type: ignore[arg-type]


def reordered(value: Any) -> Any:
    """The same JSON value with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {key: reordered(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(item) for item in value]
    return value


@pytest.fixture(scope="module")
def stub(server: FeatmapServer) -> Iterator[pb_grpc.FeatureExtractorStub]:
    """The raw generated stub on its own channel to the session's server."""
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.FeatureExtractorStub(channel)


def pipeline_id(stub: pb_grpc.FeatureExtractorStub, spec_json: str, images: np.ndarray) -> str:
    """The pipeline_id of the raw response to one Extract call."""
    request = pb.ExtractRequest(
        spec_json=spec_json,
        images=pb.Tensor(dtype=pb.FLOAT32, shape=images.shape, data=images.tobytes()),
    )
    response = stub.Extract(request, timeout=30)
    assert response.pipeline_id
    return response.pipeline_id


def rpc_error(
    stub: pb_grpc.FeatureExtractorStub, spec: dict[str, Any] | str, images: pb.Tensor | None
) -> FeatmapRpcError:
    """The error of a raw Extract call that must fail, as the client would report it."""
    spec_json = spec if isinstance(spec, str) else json.dumps(spec)
    with pytest.raises(grpc.RpcError) as failure:
        stub.Extract(pb.ExtractRequest(spec_json=spec_json, images=images), timeout=30)
    return FeatmapRpcError.from_rpc_error(failure.value)


# --------------------------------------------------------------------------- the README example


def test_readme_example(client: FeatureClient, readme_pipeline: Pipeline) -> None:
    images = normal(4, 3, 64, 64)
    outputs = client.extract(images, README_SPEC)
    assert outputs["conv1"].shape == (4, 8, 64, 64)  # 'same' padding keeps 64x64
    assert outputs["features"].shape == (4, 8, 1, 1)  # global average pool over 32x32
    assert_matches_reference(outputs, readme_pipeline, images)


def test_pipeline_id_is_stable_for_equal_specs(stub: pb_grpc.FeatureExtractorStub) -> None:
    images = normal(1, 3, 8, 8)
    first_layer = README_SPEC["layers"][0]
    spelled_out = {
        **README_SPEC,
        "input": {"channels": 3, "layout": "NCHW", "dtype": "float32"},
        "layers": [
            {**first_layer, "kernel_size": [3, 3], "stride": 1, "dilation": [1, 1], "groups": 1},
            *README_SPEC["layers"][1:],
        ],
    }
    texts = [
        json.dumps(README_SPEC),
        json.dumps(README_SPEC, indent=2),
        json.dumps(reordered(README_SPEC)),
        json.dumps(spelled_out),
        json.dumps(reordered(spelled_out), indent=1),
    ]
    ids = {pipeline_id(stub, text, images) for text in texts}
    ids.add(pipeline_id(stub, texts[0], normal(3, 3, 20, 12, seed=1)))  # other images
    assert ids == {parse_pipeline(README_SPEC).pipeline_id}


def test_pipeline_id_differs_for_different_specs(stub: pb_grpc.FeatureExtractorStub) -> None:
    images = normal(1, 3, 8, 8)
    conv1, *rest = README_SPEC["layers"]
    variants = [
        README_SPEC,
        {**README_SPEC, "layers": [{**conv1, "weights": {"init": "he_normal", "seed": 1}}, *rest]},
        {**README_SPEC, "layers": [{**conv1, "filters": 16}, *rest]},
        {**README_SPEC, "layers": [{**conv1, "padding": "valid"}, *rest]},
        {**README_SPEC, "layers": [{**conv1, "kernel_size": [3, 1]}, *rest]},
        {**README_SPEC, "outputs": ["features"]},
        {**README_SPEC, "input": {"channels": 3, "scale": 0.5}},
    ]
    ids = [pipeline_id(stub, json.dumps(variant), images) for variant in variants]
    assert len(set(ids)) == len(variants), ids


def test_pipeline_id_ignores_number_spelling_in_values(stub: pb_grpc.FeatureExtractorStub) -> None:
    layer = {"op": "conv2d", "filters": 1, "kernel_size": 1}
    ints = make_spec({**layer, "weights": {"values": [[[[1]], [[0]], [[-1]]]]}})
    floats = make_spec({**layer, "weights": {"values": [[[[1.0]], [[0.0]], [[-1.0]]]]}})
    assert parse_pipeline(ints) == parse_pipeline(floats)  # pydantic: the same spec
    images = normal(1, 3, 4, 4)
    assert pipeline_id(stub, json.dumps(ints), images) == pipeline_id(
        stub, json.dumps(floats), images
    )


# --------------------------------------------------------------------------- taps and inputs

TAPPED_LAYERS = (
    conv(padding=1),
    RELU,
    {"op": "max_pool2d", "pool_size": 2, "name": "pooled"},
    conv(filters=6, kernel_size=[3, 1], stride=2, weights={"init": "glorot_uniform", "seed": 7}),
    {"op": "global_max_pool2d"},
)


def test_several_taps_with_automatic_names(client: FeatureClient) -> None:
    names = ["conv2d_0", "relu_1", "pooled", "conv2d_3", "global_max_pool2d_4"]
    spec = make_spec(*TAPPED_LAYERS, outputs=names)
    images = normal(3, 3, 20, 18)
    outputs = client.extract(images, spec)
    assert sorted(outputs) == sorted(names)
    assert outputs["pooled"].shape == (3, 4, 10, 9)
    assert_matches_reference(outputs, parse_pipeline(spec), images)


def test_default_output_is_the_last_layer(client: FeatureClient) -> None:
    spec = make_spec(*TAPPED_LAYERS)
    images = normal(2, 3, 16, 16)
    outputs = client.extract(images, spec)
    assert list(outputs) == ["global_max_pool2d_4"]
    assert_matches_reference(outputs, parse_pipeline(spec), images)


def test_nhwc_input(client: FeatureClient) -> None:
    spec = make_spec(
        conv(padding="same", stride=2), {"op": "leaky_relu", "alpha": 0.2}, layout="NHWC"
    )
    images = normal(2, 12, 10, 3)  # (N, H, W, C)
    outputs = client.extract(images, spec)
    assert outputs["leaky_relu_1"].shape == (2, 4, 6, 5)  # results are NCHW
    assert_matches_reference(outputs, parse_pipeline(spec), images)


def test_uint8_input_with_scale_mean_std(client: FeatureClient) -> None:
    spec = make_spec(
        conv(padding="same", bias={"init": "he_uniform", "seed": 2}),
        RELU,
        {"op": "avg_pool2d", "pool_size": 3, "stride": 2, "padding": 1},
        dtype="uint8",
        scale=1 / 255,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    )
    images = np.random.default_rng(3).integers(0, 256, (2, 3, 15, 17), dtype=np.uint8)
    outputs = client.extract(images, spec)
    assert_matches_reference(outputs, parse_pipeline(spec), images)


def test_float16_input(client: FeatureClient) -> None:
    spec = make_spec(conv(), {"op": "global_avg_pool2d"}, dtype="float16", scale=0.5)
    images = normal(2, 3, 9, 9).astype(np.float16)
    outputs = client.extract(images, spec)
    assert outputs["global_avg_pool2d_1"].dtype == np.float32
    assert_matches_reference(outputs, parse_pipeline(spec), images)


def test_flatten_output_is_2d(client: FeatureClient) -> None:
    spec = make_spec(conv(), {"op": "max_pool2d", "pool_size": 2}, {"op": "flatten"}, RELU)
    images = normal(2, 3, 10, 10)
    outputs = client.extract(images, spec)
    assert outputs["relu_3"].shape == (2, 4 * 4 * 4)  # 10 -> 8 (conv) -> 4 (pool)
    assert_matches_reference(outputs, parse_pipeline(spec), images)


def test_spec_as_dict_json_text_or_model(client: FeatureClient, readme_pipeline: Pipeline) -> None:
    images = normal(2, 3, 12, 12)
    as_dict = client.extract(images, README_SPEC)
    as_text = client.extract(images, json.dumps(README_SPEC))
    as_model = client.extract(images, readme_pipeline)
    assert_matches_reference(as_dict, readme_pipeline, images)
    for other in (as_text, as_model):
        assert sorted(other) == sorted(as_dict)
        for name, array in as_dict.items():
            np.testing.assert_array_equal(other[name], array)


def test_float64_images_are_sent_as_float32(
    client: FeatureClient, readme_pipeline: Pipeline
) -> None:
    images = np.random.default_rng(4).standard_normal((2, 3, 12, 12))  # NumPy's float64
    outputs = client.extract(images, README_SPEC)
    assert_matches_reference(outputs, readme_pipeline, images.astype(np.float32))
    as_float32 = client.extract(images.astype(np.float32), README_SPEC)
    for name, array in as_float32.items():
        np.testing.assert_array_equal(outputs[name], array)


# --------------------------------------------------------------------------- info and health


def test_server_info(client: FeatureClient, server: FeatmapServer) -> None:
    info = client.server_info()
    assert info.version == __version__ == version("featmap")
    assert info.onnxruntime_version == ort.__version__
    assert info.active_providers[-1] == "CPUExecutionProvider"
    assert set(info.active_providers) <= set(info.available_providers)
    assert info.onnx_opset == OPSET
    settings = server.settings
    assert info.limits == {
        "max_message_bytes": settings.max_message_bytes,
        "max_images_per_request": settings.max_images_per_request,
        "max_pixels_per_image": settings.max_pixels_per_image,
        "max_layers": settings.max_layers,
        "max_parameters": settings.max_parameters,
        "max_registered_pipelines": settings.max_registered_pipelines,
        "session_cache_size": settings.session_cache_size,
        "max_kernel_size": settings.max_kernel_size,
        "max_flops": settings.max_flops,
        "max_activation_bytes": settings.max_activation_bytes,
        # allow_non_finite_input and shared_memory are False, proto3's default: not listed
        "max_queued_requests": 4 * settings.grpc_workers,
        "max_streams": settings.grpc_workers // 2,
        "stream_idle_timeout_s": settings.stream_idle_timeout_s,
        "max_spec_bytes": settings.max_spec_bytes,
        "spec_cache_bytes": settings.spec_cache_bytes,
        "session_cache_bytes": settings.session_cache_bytes,
        "registry_bytes": settings.registry_bytes,
        "max_calibration_images": settings.max_calibration_images,
        "max_names_per_pipeline": settings.max_names_per_pipeline,
        "max_encoded_image_bytes": settings.max_encoded_image_bytes,
        "encoded_formats": ["JPEG", "PNG", "WEBP"],
    }


def test_health_check(server: FeatmapServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "featmap.v1.FeatureExtractor"):
            request = health_pb2.HealthCheckRequest(service=service)
            response = health.Check(request, timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as failure:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- bad requests

IMAGES = normal(2, 3, 16, 16)
NAN_IMAGES = IMAGES.copy()
NAN_IMAGES[1, 2, 3, 4] = np.nan
INF_IMAGES = IMAGES.copy()
INF_IMAGES[0, 0, 0, 1] = -np.inf
OVERFLOWING = make_spec(
    {"op": "conv2d", "name": "small", "filters": 1, "kernel_size": 1, "weights": {"preset": "box"}},
    {
        "op": "conv2d",
        "name": "big",
        "filters": 1,
        "kernel_size": 1,
        "weights": {"values": [[[[3e38]]]]},
    },
    outputs=["small", "big"],
)  # box over 3 channels of ones gives 3; 3 * 3e38 overflows float32


@dataclass(frozen=True)
class BadRequest:
    """A request that must fail with `code`, blaming `field`; the message must contain `says`."""

    spec: dict[str, Any] | str
    images: np.ndarray | pb.Tensor
    code: grpc.StatusCode
    field: str
    says: str


def bad(
    name: str,
    field: str,
    says: str,
    spec: dict[str, Any] | str,
    images: np.ndarray | pb.Tensor = IMAGES,
    code: grpc.StatusCode = INVALID,
) -> Any:
    """One parametrized bad-request case, with `name` as its test id."""
    return pytest.param(BadRequest(spec, images, code, field, says), id=name)


INF_WEIGHT_SPEC = (
    '{"input": {"channels": 3}, "layers": [{"op": "conv2d", "filters": 1, "kernel_size": 1,'
    ' "weights": {"values": [[[[1e999]], [[0]], [[0]]]]}}]}'
)  # 1e999 is valid JSON that parses to inf
MAX_POOL = {"op": "max_pool2d", "pool_size": 2}

BAD_REQUESTS = [
    # the spec: JSON and schema
    bad("malformed-json", "spec_json", "not valid JSON", '{"input": {'),
    bad("unknown-op", "layers[1].op", "unknown op 'conv3d'", make_spec(RELU, {"op": "conv3d"})),
    bad("missing-op", "layers[0].op", "missing", make_spec({"kernel_size": 3})),
    bad("unknown-field", "layers[1].kernal_size", "unknown", make_spec(RELU, conv(kernal_size=3))),
    bad("unknown-top-field", "output", "unknown", {**make_spec(RELU), "output": ["relu_0"]}),
    bad("missing-filters", "layers[0].filters", "required", make_spec(conv(filters=None))),
    bad("missing-channels", "input.channels", "required", {"input": {}, "layers": [RELU]}),
    bad(
        "two-weight-sources",
        "layers[0].weights",
        "exactly one of",
        make_spec(conv(weights={"init": "he_normal", "preset": "box"})),
    ),
    # the spec: numbers and cross-field checks
    bad("kernel-size-0", "layers[1].kernel_size", ">= 1", make_spec(RELU, conv(kernel_size=0))),
    bad("kernel-size-3x0", "layers[0].kernel_size", ">= 1", make_spec(conv(kernel_size=[3, 0]))),
    bad("conv-stride-0", "layers[0].stride", ">= 1", make_spec(conv(stride=0))),
    bad(
        "pool-stride-0",
        "layers[1].stride",
        ">= 1",
        make_spec(RELU, {**MAX_POOL, "stride": [0, 1]}),
    ),
    bad("groups-vs-channels", "layers[0].groups", "3 input channels", make_spec(conv(groups=2))),
    bad(
        "groups-vs-filters",
        "layers[0].groups",
        "filters=6",
        {"input": {"channels": 4}, "layers": [conv(filters=6, groups=4)]},
        normal(1, 4, 8, 8),
    ),
    bad(
        "values-shape",
        "layers[0].weights.values",
        "(1, 3, 1, 1)",
        make_spec(conv(filters=1, kernel_size=1, weights={"values": [[[[1.0]]]]})),
    ),
    bad("values-inf", "layers[0].weights.values", "non-finite", INF_WEIGHT_SPEC),
    bad("bias-shape", "layers[0].bias.values", "(4,)", make_spec(conv(bias={"values": [1, 2]}))),
    bad(
        "duplicate-names",
        "layers[2].name",
        "layers[0]",
        make_spec({**RELU, "name": "a"}, conv(name="b"), {**RELU, "name": "a"}),
    ),
    bad(
        "outputs-missing-layer",
        "outputs[1]",
        "'relu_2' is not a layer name",
        make_spec(RELU, RELU, outputs=["relu_1", "relu_2"]),
    ),
    bad(
        "spatial-after-flatten",
        "layers[2].op",
        "follows a flatten",
        make_spec(RELU, {"op": "flatten"}, {"op": "global_avg_pool2d"}),
    ),
    bad("mean-length", "input.mean", "channels=3", make_spec(RELU, mean=[0.5, 0.5])),
    # the spec for these images (16x16)
    bad("kernel-vs-image", "layers[1].kernel_size", "16x16", make_spec(RELU, conv(kernel_size=17))),
    bad(
        "kernel-vs-padded",
        "layers[0].kernel_size",
        "(18, 18)",
        make_spec(conv(kernel_size=19, padding=1)),
    ),
    bad(
        "kernel-vs-pooled",
        "layers[1].kernel_size",
        "(8, 8)",
        make_spec(MAX_POOL, conv(kernel_size=[1, 9])),
    ),
    bad(
        "dilated-kernel-vs-image",
        "layers[0].kernel_size",
        "(17, 17)",
        make_spec(conv(dilation=8)),
    ),
    bad(
        "pool-vs-image",
        "layers[0].pool_size",
        "16x16",
        make_spec({"op": "avg_pool2d", "pool_size": [2, 17]}),
    ),
    bad(
        "pool-padding",
        "layers[0].padding",
        "smaller than pool_size",
        make_spec({**MAX_POOL, "padding": 2}),
    ),
    # the images tensor
    bad(
        "byte-length",
        "images.data",
        "needs 384",
        make_spec(RELU),
        wire(pb.FLOAT32, [2, 3, 4, 4], 2 * 3 * 4 * 4 * 4 - 1),
    ),
    bad(
        "byte-length-uint8",
        "images.data",
        "needs 96",
        make_spec(RELU, dtype="uint8"),
        wire(pb.UINT8, [2, 3, 4, 4], 2 * 3 * 4 * 4 * 4),
    ),
    bad("channels", "images.shape", "input.channels=3", make_spec(RELU), normal(2, 4, 8, 8)),
    bad("channels-nhwc", "images.shape", "axis 3", make_spec(RELU, layout="NHWC"), IMAGES),
    bad("rank-3", "images.shape", "rank 3", make_spec(RELU), normal(3, 16, 16)),
    bad("rank-5", "images.shape", "rank 5", make_spec(RELU), normal(1, 2, 3, 16, 16)),
    bad("zero-batch", "images.shape", "empty", make_spec(RELU), normal(0, 3, 16, 16)),
    bad("zero-height", "images.shape", "empty", make_spec(RELU), normal(2, 3, 0, 16)),
    bad(
        "negative-dim",
        "images.shape",
        "negative",
        make_spec(RELU),
        wire(pb.FLOAT32, [1, 3, -4, -4], 0),
    ),
    bad("dtype-99", "images.dtype", "99", make_spec(RELU), wire(99, [1, 3, 2, 2], 12)),
    bad(
        "dtype-unspecified",
        "images.dtype",
        "DTYPE_UNSPECIFIED",
        make_spec(RELU),
        wire(pb.DTYPE_UNSPECIFIED, [1, 3, 2, 2], 12),
    ),
    bad("dtype-vs-spec", "images.dtype", "input.dtype=uint8", make_spec(RELU, dtype="uint8")),
    bad("float16-vs-float32", "images.dtype", "float16", make_spec(RELU), IMAGES.astype("f2")),
    bad("nan", "images.data", "nan at index [1, 2, 3, 4]", make_spec(RELU), NAN_IMAGES),
    bad("inf", "images.data", "inf at index [0, 0, 0, 1]", make_spec(RELU), INF_IMAGES),
    bad(
        "nan-float16",
        "images.data",
        "nan at index [1, 2, 3, 4]",
        make_spec(RELU, dtype="float16"),
        NAN_IMAGES.astype(np.float16),
    ),
    # limits and results
    bad(
        "too-many-images",
        "images.shape",
        "65 images exceed max_images_per_request=64",
        make_spec(RELU),
        np.zeros((65, 3, 2, 2), np.float32),
        EXHAUSTED,
    ),
    bad("overflow", "outputs.big", "overflow", OVERFLOWING, np.ones((1, 3, 2, 2), np.float32)),
]


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request(
    case: BadRequest, client: FeatureClient, stub: pb_grpc.FeatureExtractorStub
) -> None:
    if isinstance(case.images, pb.Tensor):
        error = rpc_error(stub, case.spec, case.images)
    else:
        with pytest.raises(FeatmapRpcError) as failure:
            client.extract(case.images, case.spec)
        error = failure.value
    assert error.code == case.code, error
    # A pair may be blamed as a whole or on one axis: kernel_size or kernel_size[1].
    assert error.field == case.field or str(error.field).startswith(f"{case.field}["), error
    assert error.details.startswith(f"{error.field}: "), error
    assert case.says.lower() in error.details.lower(), error


def test_kernel_too_large_only_for_small_images(client: FeatureClient) -> None:
    spec = make_spec(RELU, conv(kernel_size=17))
    with pytest.raises(FeatmapRpcError, match="exceeds"):
        client.extract(normal(1, 3, 16, 40), spec)
    images = normal(1, 3, 17, 40)
    assert_matches_reference(client.extract(images, spec), parse_pipeline(spec), images)


def test_server_is_fine_after_bad_requests(
    client: FeatureClient, readme_pipeline: Pipeline
) -> None:
    images = normal(2, 3, 24, 24, seed=5)
    assert_matches_reference(client.extract(images, README_SPEC), readme_pipeline, images)


# --------------------------------------------------------------------------- hostile values


def test_negative_seed_is_invalid_argument(stub: pb_grpc.FeatureExtractorStub) -> None:
    spec = make_spec(conv(weights={"init": "he_normal", "seed": -1}))
    error = rpc_error(stub, spec, wire(pb.FLOAT32, [1, 3, 4, 4], 192))
    assert error.code == INVALID, error
    assert error.field == "layers[0].weights.seed", error


def test_empty_batch_with_huge_dims_is_invalid_argument(
    stub: pb_grpc.FeatureExtractorStub,
) -> None:
    error = rpc_error(stub, make_spec(RELU), wire(pb.FLOAT32, [0, 3, 1 << 62, 1 << 62], 0))
    assert error.code == INVALID, error
    assert error.field == "images.shape", error


def test_huge_filters_are_rejected_by_name(stub: pb_grpc.FeatureExtractorStub) -> None:
    spec = make_spec(conv(filters=1 << 62, kernel_size=1, weights={"init": "zeros"}))
    error = rpc_error(stub, spec, wire(pb.FLOAT32, [1, 3, 4, 4], 192))
    assert error.code in (INVALID, EXHAUSTED), error
    assert error.field == "layers[0].filters", error


# --------------------------------------------------------------------------- message size limits


@pytest.fixture(scope="module")
def small_server() -> Iterator[FeatmapServer]:
    """A second server with small limits: 1 MiB messages, 32x32 pixels, 4 layers."""
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        intra_op_threads=1,
        grpc_workers=2,
        session_cache_size=2,
        max_message_bytes=MIB,
        max_images_per_request=8,
        max_pixels_per_image=32 * 32,
        max_layers=4,
    )
    with FeatmapServer(settings) as running:
        yield running


@pytest.fixture(scope="module")
def small_client(small_server: FeatmapServer) -> Iterator[FeatureClient]:
    """A client of the small server (its own limit stays at 64 MiB)."""
    with FeatureClient(small_server.address, timeout=30) as connected:
        connected.wait_ready()
        yield connected


def test_small_server_reports_its_limits(
    small_client: FeatureClient, small_server: FeatmapServer
) -> None:
    limits = small_client.server_info().limits
    assert limits["max_message_bytes"] == MIB == small_server.settings.max_message_bytes
    assert limits["max_pixels_per_image"] == 32 * 32
    assert limits["max_layers"] == 4
    assert limits["max_images_per_request"] == 8
    assert limits["session_cache_size"] == 2


def test_request_over_max_message_bytes(
    small_client: FeatureClient, readme_pipeline: Pipeline
) -> None:
    images = normal(1, 3, 300, 300)  # 1.08 MB of float32: over 1 MiB before any pixel limit
    with pytest.raises(FeatmapRpcError) as failure:
        small_client.extract(images, README_SPEC)
    # Up to twice the limit the servicer itself answers, saying how to stream instead.
    assert (failure.value.code, failure.value.field) == (EXHAUSTED, "images"), failure.value
    assert f"over max_message_bytes={MIB}" in failure.value.details
    assert "ExtractStream" in failure.value.details
    small = normal(1, 3, 32, 32)  # the same server still answers a request under the limit
    assert_matches_reference(small_client.extract(small, README_SPEC), readme_pipeline, small)


def test_response_over_max_message_bytes(small_client: FeatureClient) -> None:
    spec = make_spec(conv(filters=300, kernel_size=1, weights={"init": "zeros"}))
    with pytest.raises(FeatmapRpcError) as failure:
        small_client.extract(normal(1, 3, 30, 30), spec)  # 300 x 30 x 30 float32 = 1.08 MB
    # Known from the shapes before any work is done, and blamed on the outputs.
    assert (failure.value.code, failure.value.field) == (EXHAUSTED, "outputs"), failure.value
    # 1,080,000 bytes of data and at most 512 + 256 of framing (contract.tensors).
    assert "reply would be 1080768 bytes" in failure.value.details
    assert f"max_message_bytes={MIB}" in failure.value.details


def test_pixel_and_layer_limits(small_client: FeatureClient) -> None:
    with pytest.raises(FeatmapRpcError) as failure:
        small_client.extract(normal(1, 3, 33, 32), make_spec(RELU))
    assert (failure.value.code, failure.value.field) == (EXHAUSTED, "images.shape")
    assert "max_pixels_per_image=1024" in failure.value.details
    with pytest.raises(FeatmapRpcError) as failure:
        small_client.extract(normal(1, 3, 8, 8), make_spec(*[RELU] * 5))
    assert failure.value.code == EXHAUSTED
    assert str(failure.value.field).endswith("layers"), failure.value
    assert "max_layers=4" in failure.value.details


# --------------------------------------------------------------------------- concurrency


def test_concurrent_requests(client: FeatureClient) -> None:
    # Eight threads, six specs: threads 6 and 7 share a spec with 0 and 1 (one session build).
    jobs = [
        (
            make_spec(
                conv(filters=2 + i % 6, kernel_size=1 + 2 * (i % 3), padding="same",
                     weights={"init": "he_normal", "seed": i % 6}),
                {"op": "max_pool2d", "pool_size": 2},
                outputs=["conv2d_0", "max_pool2d_1"],
            ),
            normal(1 + i % 3, 3, 10 + i, 12, seed=10 + i),
        )
        for i in range(8)
    ]  # fmt: skip
    start = threading.Barrier(len(jobs))

    def run(job: tuple[dict[str, Any], np.ndarray]) -> list[dict[str, np.ndarray]]:
        spec, images = job
        start.wait(timeout=30)
        return [client.extract(images, spec) for _ in range(3)]

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (spec, images), outputs in zip(jobs, results, strict=True):
        for output in outputs:
            assert_matches_reference(output, parse_pipeline(spec), images)
