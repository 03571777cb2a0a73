"""Fuzzing the wire: random bytes and random JSON never make the server fail or fall over."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featmap.client.client import extract_methods, request_for
from featmap.service.server import SERVICE_NAME, FeatmapServer
from featmap.service.settings import ServerSettings
from featmap.v1 import featmap_pb2 as pb

METHODS = pb.DESCRIPTOR.services_by_name["FeatureExtractor"].methods
# The codes that mean "the server failed", rather than "the request was wrong".
SERVER_FAILURES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Spec-shaped JSON: the right keys with random values get past the first schema checks.
SPEC_LIKE = st.fixed_dictionaries(
    {"input": st.dictionaries(st.sampled_from(["channels", "layout", "dtype", "scale"]), JSON)},
    optional={
        "layers": st.lists(
            st.dictionaries(
                st.sampled_from(["op", "filters", "kernel_size", "pool_size", "padding", "stride"]),
                JSON | st.sampled_from(["conv2d", "relu", "max_pool2d", "flatten", "same"]),
            ),
            max_size=3,
        ),
        "outputs": JSON,
    },
)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[tuple[FeatmapServer, grpc.Channel]]:
    """A server of its own (the fuzz must not touch the shared one) and a channel to it."""
    limits = ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=4)
    with FeatmapServer(limits) as server, grpc.insecure_channel(server.address) as channel:
        yield server, channel
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def answer_code(call: Any) -> grpc.StatusCode:
    """The status of a call: OK, or the error's code."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


@FUZZ
@given(method=st.sampled_from([m.name for m in METHODS]), raw=st.binary(max_size=256))
def test_random_bytes_to_every_method(
    fuzzed: tuple[FeatmapServer, grpc.Channel], method: str, raw: bytes
) -> None:
    _, channel = fuzzed
    path = f"/{SERVICE_NAME}/{method}"
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    if method == "ExtractStream":
        stream = channel.stream_stream(path, **identity)
        code = answer_code(lambda: list(stream(iter([raw, raw]), timeout=10)))
    else:
        unary = channel.unary_unary(path, **identity)
        code = answer_code(lambda: unary(raw, timeout=10))
    assert code not in SERVER_FAILURES, (method, raw)


@FUZZ
@given(spec=JSON | SPEC_LIKE)
def test_random_json_as_spec(fuzzed: tuple[FeatmapServer, grpc.Channel], spec: Any) -> None:
    _, channel = fuzzed
    extract, _ = extract_methods(channel)
    request = request_for(np.zeros((1, 3, 8, 8), np.float32), None, "float32")
    request.message.spec_json = json.dumps(spec)
    code = answer_code(lambda: extract(request, timeout=10))
    assert code not in SERVER_FAILURES, spec


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=64))
def test_random_text_as_spec(fuzzed: tuple[FeatmapServer, grpc.Channel], text: str) -> None:
    _, channel = fuzzed
    extract, _ = extract_methods(channel)
    request = request_for(np.zeros((1, 1, 4, 4), np.float32), None, "float32")
    request.message.spec_json = text
    code = answer_code(lambda: extract(request, timeout=10))
    assert code not in SERVER_FAILURES, text
