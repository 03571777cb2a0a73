"""Regenerate the committed gRPC stubs in proto/featmap/{v1,oip} from their .proto files, and
proto/featmap/v1/pipeline.schema.json (the spec's JSON Schema) from featmap.contract.spec."""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILE = "featmap/v1/featmap.proto"
# The Open Inference Protocol (KServe v2), package inference; imported as featmap.oip.
OIP_PROTO_FILE = "featmap/oip/grpc_predict_v2.proto"
SCHEMA_FILE = "featmap/v1/pipeline.schema.json"


def generate(out_dir: Path) -> None:
    """Run protoc (grpcio-tools) on both protos, writing the stubs under out_dir."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    for proto_file in (PROTO_FILE, OIP_PROTO_FILE):
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            proto_file,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO_ROOT / proto_file}")


def write_schema(out_dir: Path) -> None:
    """Write pipeline.schema.json under out_dir/featmap/v1."""
    path = out_dir / SCHEMA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    from featmap.contract.spec import json_schema_text

    path.write_text(json_schema_text(), encoding="utf-8")


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT
    generate(out)
    write_schema(out)
