"""Regenerate the committed gRPC stubs in proto/featmap/{v1,oip} from their .proto files, and
proto/featmap/v1/pipeline.schema.json (the spec's JSON Schema) from featmap.contract.spec."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILE = "featmap/v1/featmap.proto"
# The Open Inference Protocol (KServe v2), package inference; imported as featmap.oip.
OIP_PROTO_FILE = "featmap/oip/grpc_predict_v2.proto"
SCHEMA_FILE = "featmap/v1/pipeline.schema.json"
PYPROJECT = PROTO_ROOT.parent / "pyproject.toml"


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
    for stub in out_dir.glob("featmap/*/*_pb2*.py"):
        stub.write_text(stamp_versions(stub.read_text()), encoding="utf-8")


def lower_bound(package: str) -> str:
    """The version pyproject.toml's dependencies pin `package` at or above."""
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    for requirement in dependencies:
        name, _, version = requirement.partition(">=")
        if name.strip() == package:
            return version.strip()
    raise SystemExit(f"pyproject.toml pins no lower bound for {package}")


def stamp_versions(stub: str) -> str:
    """The stub with the lowest grpcio and protobuf versions featmap supports as its own.

    The generator writes its own version into the stubs, which then refuse older runtimes: a
    patch release of grpcio-tools would change the committed files and raise the oldest grpcio
    and protobuf they run on above what pyproject.toml promises. Stamping the lower bounds keeps
    the stubs a function of the .proto files alone.
    """
    grpc_version = lower_bound("grpcio")
    major, minor, patch = (int(part) for part in lower_bound("protobuf").split("."))
    stub = re.sub(
        r"GRPC_GENERATED_VERSION = '[^']*'", f"GRPC_GENERATED_VERSION = '{grpc_version}'", stub
    )
    stub = re.sub(
        r"# Protobuf Python Version: \S+",
        f"# Protobuf Python Version: {major}.{minor}.{patch}",
        stub,
    )
    return re.sub(
        r"(_runtime_version\.Domain\.PUBLIC,\n\s*)\d+,(\n\s*)\d+,(\n\s*)\d+,",
        rf"\g<1>{major},\g<2>{minor},\g<3>{patch},",
        stub,
    )


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
