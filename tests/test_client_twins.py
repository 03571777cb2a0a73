"""FeatureClient and AsyncFeatureClient stand on one base: same options, same methods, and the
async one does everything the blocking one does (shared memory, the stream window)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest

from featmap.client import AsyncFeatureClient, FeatureClient
from featmap.contract.errors import FeatmapError, InvalidTensor
from featmap.contract.spec import Pipeline
from featmap.service.server import FeatmapServer
from tests.conftest import README_SPEC, assert_matches_reference, local
from tests.test_cli import free_port

CONTEXT_METHODS = {"__enter__", "__exit__", "__aenter__", "__aexit__"}


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if (not name.startswith("_") or name == "__init__") and name not in CONTEXT_METHODS
    }


def test_the_twins_have_the_same_methods_and_signatures() -> None:
    blocking, awaited = public_methods(FeatureClient), public_methods(AsyncFeatureClient)
    assert sorted(blocking) == sorted(awaited)
    for name, signature in blocking.items():
        mirror = awaited[name]
        assert list(signature.parameters) == list(mirror.parameters), name
        for parameter, twin in zip(
            signature.parameters.values(), mirror.parameters.values(), strict=True
        ):
            assert (parameter.kind, parameter.default) == (twin.kind, twin.default), (
                name,
                parameter.name,
            )
    for name in blocking:
        if name != "__init__":
            method = getattr(AsyncFeatureClient, name)
            assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), name


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.uint16])
def test_arrays_of_other_dtypes_are_refused_before_sending(dtype: Any) -> None:
    images = np.zeros((1, 3, 8, 8), dtype=dtype)
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens: the error must come first
    with FeatureClient(nobody, timeout=5) as client, pytest.raises(InvalidTensor) as caught:
        client.extract(images, README_SPEC)
    assert caught.value.field == "images.dtype"
    assert np.dtype(dtype).name in str(caught.value)
    with pytest.raises(InvalidTensor, match=np.dtype(dtype).name):
        list(FeatureClient(nobody, timeout=5).extract_iter([images], README_SPEC))

    async def awaited() -> None:
        async with AsyncFeatureClient(nobody, timeout=5) as client:
            await client.extract(images, README_SPEC)

    with pytest.raises(InvalidTensor, match=r"images\.dtype"):
        asyncio.run(awaited())


def test_client_errors_share_the_contract_base(server: FeatmapServer) -> None:
    # Local refusals and server answers can be caught together, each with its status and field.
    with FeatureClient(server.address, timeout=30) as client:
        with pytest.raises(FeatmapError) as remote:
            client.extract(np.zeros((1, 2, 8, 8), np.float32), README_SPEC)
        with pytest.raises(FeatmapError) as local:
            client.extract(np.zeros((1, 3, 8, 8), np.int16), README_SPEC)
    assert remote.value.field == "images.shape" and local.value.field == "images.dtype"
    assert remote.value.status_code.name == local.value.status_code.name == "INVALID_ARGUMENT"


def test_async_client_through_shared_memory(
    shm_server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    images = np.random.default_rng(3).random((3, 3, 20, 24), dtype=np.float32)
    regions = shm_server.service.shared_memory

    async def run() -> tuple[list[dict[str, np.ndarray]], str]:
        address = local(shm_server)
        async with AsyncFeatureClient(address, shared_memory=True, timeout=30) as client:
            results = [await client.extract(images, README_SPEC) for _ in range(2)]
            assert client._shared is not None
            secret = client._shared.all[0].pool.secret
            assert regions.renew("", secret) == 2  # images and outputs
            return results, secret

    results, secret = asyncio.run(run())
    for outputs in results:
        assert_matches_reference(outputs, readme_pipeline, images)
    assert regions.renew("", secret) == 0  # unregistered on close


def test_async_client_registers_a_lost_lease_again(
    shm_server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    # As test_shared_memory's blocking twin: the lease sequence is one exchange for both.
    images = np.random.default_rng(74).random((2, 3, 16, 16), dtype=np.float32)

    async def run() -> dict[str, np.ndarray]:
        async with AsyncFeatureClient(local(shm_server), shared_memory=True) as client:
            await client.extract(images, README_SPEC)
            assert client._shared is not None
            shm_server.service.shared_memory.unregister("", client._shared.all[0].pool.secret)
            return await client.extract(images, README_SPEC)

    assert_matches_reference(asyncio.run(run()), readme_pipeline, images)


def test_async_stream_sends_at_most_in_flight_ahead(server: FeatmapServer) -> None:
    spec = {"input": {"channels": 1}, "layers": [{"op": "relu"}]}
    bases = [np.random.default_rng(i).standard_normal((1, 1, 256, 256)).astype(np.float32)
             for i in range(3)]  # fmt: skip
    produced = 0

    def chunks() -> Iterator[np.ndarray]:
        nonlocal produced
        for index in range(60):
            produced += 1
            yield bases[index % 3]

    async def consume() -> list[int]:
        ahead = []
        async with AsyncFeatureClient(server.address, timeout=60, in_flight=3) as client:
            stream: AsyncIterator[dict[str, np.ndarray]] = client.extract_stream(chunks(), spec)
            answered = 0
            async for outputs in stream:
                np.testing.assert_array_equal(outputs["relu_0"], np.maximum(bases[answered % 3], 0))
                answered += 1
                ahead.append(produced - answered)
                await asyncio.sleep(0.005)  # a slow consumer
        assert answered == 60
        return ahead

    assert max(asyncio.run(consume())) <= 3 + 1


def test_importing_the_client_loads_no_server_code() -> None:
    probe = """
import sys
import featmap.client
from featmap.client import AsyncFeatureClient, FeatureClient, FeatmapRpcError
import featmap.jobs.cli, featmap.jobs.extract, featmap.jobs.health, featmap.jobs.ray
featmap.jobs.cli.build_parser()
heavy = ("onnxruntime", "onnx", "prometheus_client", "featmap.service")
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m.startswith(heavy)))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
