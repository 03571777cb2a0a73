"""The committed gRPC stubs match featmap.proto (regenerate: python scripts/gen_proto.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUBS = ["featmap_pb2.py", "featmap_pb2.pyi", "featmap_pb2_grpc.py"]
OIP_STUBS = ["grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"]


def test_stubs_are_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    gen_proto = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = gen_proto
    spec.loader.exec_module(gen_proto)
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
