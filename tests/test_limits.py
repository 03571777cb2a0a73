"""One admission path: the same checks, with the same answers, at every entry point."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featmap.client import FeatmapRpcError, FeatureClient
from featmap.contract.errors import FeatmapError, InvalidTensor, LimitExceeded
from featmap.contract.limits import (
    MIB,
    RUN_ACTIVATION_BYTES_PER_THREAD,
    RequestLimits,
    admit_batch,
    images_per_run,
    run_activation_bytes,
)
from featmap.contract.ops import batch_cost, layer_costs
from featmap.contract.spec import parse_pipeline
from featmap.contract.tensors import dtype_name
from featmap.jobs.ray import FeatureExtractor
from featmap.jobs.runners import EmbeddedRunner
from featmap.jobs.summary import format_summary
from featmap.oip import grpc_predict_v2_pb2 as oip
from featmap.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from tests.conftest import README_SPEC

DEEP_SPEC: dict[str, Any] = {"input": {"channels": 1}, "layers": [{"op": "relu"}] * 200}
# Two `init` conv layers: 3*1024*7*7 + 1024*1024*9*9 = 85,085,184 weights (340 MB as float32)
# in a spec of a few hundred bytes; over the default max_parameters (64 Mi).
HEAVY_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {"op": "conv2d", "filters": 1024, "kernel_size": 7, "weights": {"init": "he_normal"}},
        {"op": "conv2d", "filters": 1024, "kernel_size": 9, "weights": {"init": "he_normal"}},
    ],
}
PIPELINE_CASES = {
    "layers": (DEEP_SPEC, "200 layers exceed max_layers=128"),
    "parameters": (HEAVY_SPEC, "85085184 weights exceed max_parameters=67108864"),
}


def refusal(call: Callable[[], Any]) -> tuple[str, str, str]:
    """(status, field, message) of whatever the entry point raised."""
    try:
        call()
    except FeatmapRpcError as exc:
        return exc.code.name, exc.field or "", exc.details
    except FeatmapError as exc:
        return exc.status_code.name, exc.field, str(exc)
    except grpc.RpcError as exc:  # a raw stub
        trailers = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
        return exc.code().name, trailers.get("featmap-field", ""), exc.details()  # type: ignore[attr-defined]
    raise AssertionError("not refused")


@pytest.mark.parametrize("case", sorted(PIPELINE_CASES))
def test_an_oversized_pipeline_is_refused_alike_everywhere_before_compiling(
    case: str, server: FeatmapServer, client: FeatureClient
) -> None:
    spec, message = PIPELINE_CASES[case]
    images = np.zeros((1, spec["input"]["channels"], 16, 16), np.float32)
    misses = server.service.cache.stats.misses
    started = time.monotonic()
    answers = {
        "RegisterPipeline": refusal(lambda: client.register(spec)),
        "Extract": refusal(lambda: client.extract(images, spec)),
        "ExtractStream": refusal(lambda: list(client.extract_stream([images], spec))),
        "embedded": refusal(lambda: EmbeddedRunner(parse_pipeline(spec))),
        "Ray": refusal(lambda: FeatureExtractor(spec)),
    }
    assert time.monotonic() - started < 5  # nothing was allocated, compiled or warmed
    assert server.service.cache.stats.misses == misses
    for where, (status, field, text) in answers.items():
        assert (status, field) == ("RESOURCE_EXHAUSTED", "layers"), where
        assert message in text, (where, text)


@pytest.fixture(scope="module")
def readme_model(client: FeatureClient) -> str:
    return client.register(README_SPEC)


def test_a_bad_batch_is_refused_alike_everywhere(
    server: FeatmapServer, client: FeatureClient, readme_model: str
) -> None:
    images = np.ones((2, 3, 16, 16), np.float32)
    images[1, 2, 3, 4] = np.nan
    request = oip.ModelInferRequest(model_name=readme_model)
    request.inputs.add(name="images", datatype="FP32", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    embedded = EmbeddedRunner(parse_pipeline(README_SPEC))
    with grpc.insecure_channel(server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        answers = {
            "Extract": refusal(lambda: client.extract(images, readme_model)),
            "Extract inline": refusal(lambda: client.extract(images, README_SPEC)),
            "ExtractStream": refusal(lambda: list(client.extract_stream([images], README_SPEC))),
            "ModelInfer": refusal(lambda: stub.ModelInfer(request, timeout=30)),
            "embedded": refusal(lambda: list(embedded.run([images]))),
            "Ray": refusal(lambda: FeatureExtractor(README_SPEC)({"image": images})),
        }  # fmt: skip
    for where, (status, field, text) in answers.items():
        assert (status, field) == ("INVALID_ARGUMENT", "images.data"), (where, text)
        assert "nan at index [1, 2, 3, 4]" in text, (where, text)


@pytest.fixture(scope="module")
def small_server() -> Iterator[FeatmapServer]:
    settings = ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1, max_message_bytes=MIB)
    with FeatmapServer(settings) as running:
        yield running


def test_a_float16_reply_is_sized_at_two_bytes_a_value(small_server: FeatmapServer) -> None:
    # uint8 600x600: a 360 kB request whose reply is 1.44 MB as float32, 720 kB as float16.
    spec = {"input": {"channels": 1, "dtype": "uint8"}, "layers": [{"op": "relu"}]}
    images = np.random.default_rng(0).integers(0, 256, (1, 1, 600, 600), dtype=np.uint8)
    with FeatureClient(small_server.address, timeout=30, max_message_bytes=MIB) as client:
        half = client.extract(images, spec, output_dtype="float16")["relu_0"]
        assert half.dtype == np.float16
        np.testing.assert_array_equal(half, images.astype(np.float16))
        with pytest.raises(FeatmapRpcError) as refused:
            client.extract(images, spec)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # 1,440,000 bytes of data and at most REPLY_ENVELOPE + REPLY_BYTES_PER_OUTPUT of framing.
    assert "the reply would be 1440768 bytes" in refused.value.details


BIASED_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {
            "op": "conv2d",
            "filters": 8,
            "kernel_size": 3,
            "stride": 2,
            "weights": {"init": "he_uniform"},
            "bias": {"init": "zeros"},
        },
        {"op": "relu"},
        {"op": "avg_pool2d", "pool_size": 2},
        {"op": "global_max_pool2d"},
    ],
}


def test_the_summary_predicts_the_flops_limit() -> None:
    pipeline = parse_pipeline(BIASED_SPEC)
    text = format_summary(pipeline, (33, 33))
    match = re.search(r"Total FLOPs per image: ([\d,]+)", text)
    assert match is not None
    per_image = int(match.group(1).replace(",", ""))
    # conv: 16x16 outputs x 8 filters = 2048; 2 * 2048 * 27 + 2048 bias adds = 112,640; relu
    # 2048; pool 8x8x8 windows of 4 = 2048; global max 512
    assert (
        per_image
        == 112_640 + 2048 + 2048 + 512
        == sum(c.flops for c in layer_costs(pipeline, 33, 33))
    )
    images = np.zeros((3, 3, 33, 33), np.float32)
    assert (
        admit_batch(pipeline, images, RequestLimits(max_flops=3 * per_image)).cost.flops
        == 3 * per_image
    )
    with pytest.raises(LimitExceeded, match=f"{3 * per_image} FLOPs"):
        admit_batch(pipeline, images, RequestLimits(max_flops=3 * per_image - 1))


def test_rank_and_dtype_errors_name_the_field() -> None:
    pipeline = parse_pipeline(README_SPEC)
    with pytest.raises(InvalidTensor, match="rank 3") as caught:
        admit_batch(pipeline, np.zeros((3, 8, 8), np.float32), RequestLimits())
    assert caught.value.field == "images.shape"
    with pytest.raises(InvalidTensor, match=r"uint8 does not match input\.dtype=float32") as caught:
        admit_batch(pipeline, np.zeros((1, 3, 8, 8), np.uint8), RequestLimits())
    assert caught.value.field == "images.dtype"


@pytest.mark.parametrize(
    "dtype",
    sorted({np.dtype(code).str for code in np.typecodes["All"]} | {">f4", ">u2", "<f2", "U7"}),
)
def test_dtype_name_is_numpys_name_for_every_dtype(dtype: str) -> None:
    assert dtype_name(np.dtype(dtype)) == np.dtype(dtype).name


@given(
    threads=st.integers(min_value=0, max_value=64),
    size=st.integers(min_value=8, max_value=160),
    filters=st.integers(min_value=1, max_value=256),
)
@settings(max_examples=60, deadline=None)
def test_a_run_holds_as_many_images_as_its_threads_share_of_activations_allows(
    threads: int, size: int, filters: int
) -> None:
    pipeline = parse_pipeline(
        {
            "input": {"channels": 3},
            "layers": [
                {
                    "op": "conv2d",
                    "filters": filters,
                    "kernel_size": 3,
                    "padding": "same",
                    "weights": {"init": "he_normal"},
                },
                {"op": "relu"},
            ],
        }
    )
    per_image = batch_cost(pipeline, 1, size, size, 4).memory_bytes
    bound = run_activation_bytes(threads)
    assert bound == RUN_ACTIVATION_BYTES_PER_THREAD * max(1, threads or os.cpu_count() or 1)
    images = images_per_run(pipeline, size, size, 4, threads)
    # As many as fit (at least one, which may not), and never fewer with more threads.
    assert images == 1 or images * per_image <= bound
    assert (images + 1) * per_image > bound
    assert images_per_run(pipeline, size, size, 4, max(1, threads) * 2) >= images
