"""Server reflection under v1 and v1alpha, and health for every service the port serves."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from featmap.service.oip import OIP_SERVICE_NAME
from featmap.service.reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME
from featmap.service.server import SERVICE_NAME, FeatmapServer
from featmap.service.settings import ServerSettings


@pytest.fixture(scope="module")
def reflecting() -> Iterator[FeatmapServer]:
    settings = ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1, reflection=True)
    with FeatmapServer(settings) as running:
        yield running


def ask(address: str, service: str, request: reflection_pb2.ServerReflectionRequest) -> object:
    """One reflection exchange on `service` (v1 and v1alpha share the wire format)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (response,) = list(call(iter([request]), timeout=10))
    return response


@pytest.mark.parametrize("service", [V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME])
def test_reflection_lists_and_describes_every_service(
    reflecting: FeatmapServer, service: str
) -> None:
    listing = ask(
        reflecting.address, service, reflection_pb2.ServerReflectionRequest(list_services="")
    )
    names = {s.name for s in listing.list_services_response.service}  # type: ignore[attr-defined]
    assert {SERVICE_NAME, OIP_SERVICE_NAME, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME} <= names
    for name in (SERVICE_NAME, OIP_SERVICE_NAME, V1_SERVICE_NAME):
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
        response = ask(reflecting.address, service, request)
        files = response.file_descriptor_response.file_descriptor_proto  # type: ignore[attr-defined]
        assert files, (service, name)
        described = descriptor_pb2.FileDescriptorProto.FromString(files[0])
        assert name.rsplit(".", 1)[1] in {s.name for s in described.service}


def test_health_knows_every_service(server: FeatmapServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING, service
