"""The committed gRPC stubs match featmap.proto (regenerate: python scripts/gen_proto.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUBS = ["featmap_pb2.py", "featmap_pb2.pyi", "featmap_pb2_grpc.py"]
OIP_STUBS = ["grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"]


def load_gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    gen_proto = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = gen_proto
    spec.loader.exec_module(gen_proto)
    return gen_proto


def test_stubs_are_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    gen_proto = load_gen_proto()
    gen_proto.generate(tmp_path)
    for name in STUBS:
        fresh = (tmp_path / "featmap" / "v1" / name).read_text()
        committed = (ROOT / "proto" / "featmap" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run python scripts/gen_proto.py"
    gen_proto.write_schema(tmp_path)
    fresh_schema = (tmp_path / "featmap" / "v1" / "pipeline.schema.json").read_text()
    committed_schema = (ROOT / "proto" / "featmap" / "v1" / "pipeline.schema.json").read_text()
    assert fresh_schema == committed_schema, "pipeline.schema.json is stale: run gen_proto.py"
    for name in OIP_STUBS:
        fresh = (tmp_path / "featmap" / "oip" / name).read_text()
        committed = (ROOT / "proto" / "featmap" / "oip" / name).read_text()
        assert fresh == committed, f"{name} is stale: run python scripts/gen_proto.py"


def test_stubs_carry_the_oldest_versions_pyproject_allows() -> None:
    # Whatever grpcio-tools generated them (a patch release a day), the stubs name the lower
    # bounds of pyproject.toml: they stay fresh, and run on every version pyproject admits.
    gen_proto = load_gen_proto()
    grpc_version, protobuf_version = (
        gen_proto.lower_bound("grpcio"),
        gen_proto.lower_bound("protobuf"),
    )
    major, minor, patch = protobuf_version.split(".")
    newer = (
        "GRPC_GENERATED_VERSION = '9.99.7'\n# Protobuf Python Version: 9.98.3\n"
        "_runtime_version.ValidateProtobufRuntimeVersion(\n    _runtime_version.Domain.PUBLIC,\n"
        "    9,\n    98,\n    3,\n    '',\n"
    )
    assert gen_proto.stamp_versions(newer) == (
        f"GRPC_GENERATED_VERSION = '{grpc_version}'\n# Protobuf Python Version: "
        f"{protobuf_version}\n_runtime_version.ValidateProtobufRuntimeVersion(\n"
        f"    _runtime_version.Domain.PUBLIC,\n    {major},\n    {minor},\n    {patch},\n    '',\n"
    )
    for directory, stub in [("v1", "featmap_pb2_grpc.py"), ("oip", "grpc_predict_v2_pb2_grpc.py")]:
        text = (ROOT / "proto" / "featmap" / directory / stub).read_text()
        assert f"GRPC_GENERATED_VERSION = '{grpc_version}'" in text
    for directory, stub in [("v1", "featmap_pb2.py"), ("oip", "grpc_predict_v2_pb2.py")]:
        text = (ROOT / "proto" / "featmap" / directory / stub).read_text()
        assert f"# Protobuf Python Version: {protobuf_version}\n" in text
