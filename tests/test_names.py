"""Registered pipelines under names people choose: usable wherever the id is, unique per tenant,
moved only on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from featmap.client import FeatmapRpcError, FeatureClient
from featmap.contract.errors import InvalidSpec
from featmap.contract.spec import check_pipeline_name, parse_pipeline
from featmap.oip import grpc_predict_v2_pb2 as oip
from featmap.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_extract import featmap, spec_file

OTHER_SPEC: dict[str, Any] = {**README_SPEC, "outputs": ["features"]}


@pytest.fixture()
def fresh() -> Iterator[FeatureClient]:
    """A client of a server of its own: names do not leak between tests."""
    settings = ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=8)
    with FeatmapServer(settings) as server, FeatureClient(server.address, timeout=60) as client:
        yield client


def test_names_that_differ_only_in_case_are_one_name(tmp_path: Path) -> None:
    # A case-insensitive filesystem keeps "Edges" and "edges" in one store file: the second
    # name would silently take the first one's pipeline. So they are one name, respelled only
    # with replace.
    store = tmp_path / "store"
    settings = ServerSettings(
        host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=8, pipeline_store=str(store)
    )
    with FeatmapServer(settings) as server, FeatureClient(server.address, timeout=60) as client:
        first = client.register(README_SPEC, name="Edges")
        with pytest.raises(FeatmapRpcError) as taken:
            client.register(OTHER_SPEC, name="edges")
        assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS and taken.value.field == "name"
        assert "'Edges'" in taken.value.details and first in taken.value.details
        assert client.get_pipeline("Edges").pipeline_id == first
        with pytest.raises(FeatmapRpcError):  # the same pipeline is no exception
            client.register(README_SPEC, name="EDGES")
        second = client.register(OTHER_SPEC, name="edges", replace=True)
        assert client.get_pipeline("edges").pipeline_id == second
        with pytest.raises(FeatmapRpcError) as gone:
            client.get_pipeline("Edges")
        assert gone.value.code == grpc.StatusCode.NOT_FOUND
        assert client.get_pipeline(first).names == []
    names = sorted(p.name for p in store.rglob("names/*"))
    assert names == ["edges"]


@pytest.mark.parametrize(
    "name", ["", "1abc", "a" * 65, "has space", "slash/name", "0123456789abcdef0123456789abcdef"]
)
def test_names_that_cannot_be(name: str) -> None:
    with pytest.raises(InvalidSpec):
        check_pipeline_name(name)


def test_a_name_works_wherever_the_id_does(fresh: FeatureClient) -> None:
    pipeline = parse_pipeline(README_SPEC)
    pipeline_id = fresh.register(README_SPEC, name="resnet-features")
    images = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    assert_matches_reference(fresh.extract(images, "resnet-features"), pipeline, images)
    (streamed,) = fresh.extract_stream([images], "resnet-features")
    assert_matches_reference(streamed, pipeline, images)
    info = fresh.get_pipeline("resnet-features")
    assert (info.pipeline_id, info.names) == (pipeline_id, ["resnet-features"])
    assert [p.names for p in fresh.list_pipelines()] == [["resnet-features"]]
    # The stock OIP client's way: the model named as a person named it.
    with grpc.insecure_channel(fresh.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="resnet-features"))
        assert metadata.name == "resnet-features"
        assert stub.ModelReady(oip.ModelReadyRequest(name="resnet-features")).ready
        request = oip.ModelInferRequest(model_name="resnet-features")
        request.inputs.add(name="images", datatype="FP32", shape=images.shape)
        request.raw_input_contents.append(images.tobytes())
        reply = stub.ModelInfer(request, timeout=30)
        assert reply.model_name == "resnet-features"
    assert fresh.delete_pipeline("resnet-features")
    with pytest.raises(FeatmapRpcError) as gone:
        fresh.get_pipeline(pipeline_id)
    assert gone.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(FeatmapRpcError):
        fresh.extract(images, "resnet-features")


def test_a_taken_name_moves_only_on_purpose(fresh: FeatureClient) -> None:
    first = fresh.register(README_SPEC, name="features")
    assert fresh.register(README_SPEC, name="features") == first  # the same again: a no-op
    with pytest.raises(FeatmapRpcError) as taken:
        fresh.register(OTHER_SPEC, name="features")
    assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert taken.value.field == "name" and first in taken.value.details
    assert fresh.get_pipeline("features").pipeline_id == first
    second = fresh.register(OTHER_SPEC, name="features", replace=True)
    assert second != first
    assert fresh.get_pipeline("features").pipeline_id == second
    assert fresh.get_pipeline(first).names == []  # still registered, by its id alone
    # One pipeline, two names.
    fresh.register(OTHER_SPEC, name="features-v2")
    assert fresh.get_pipeline(second).names == ["features", "features-v2"]


def test_extract_registers_under_a_name(
    server: FeatmapServer, client: FeatureClient, photos: Path, tmp_path: Path
) -> None:
    spec = spec_file(tmp_path, OTHER_SPEC)
    result = featmap(
        "extract", "--pipeline", spec, "--input", photos / "rgb0.png", "--output",
        tmp_path / "out.npz", "--server", server.address, "--name", "job-features",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = client.get_pipeline("job-features")
    assert info.pipeline_id == parse_pipeline(OTHER_SPEC).pipeline_id
    assert "job-features" in info.names
    embedded = featmap("extract", "--pipeline", spec, "--input", photos / "rgb0.png",
                       "--output", tmp_path / "x.npz", "--name", "x")  # fmt: skip
    assert embedded.returncode == 2 and "--server" in embedded.stderr
