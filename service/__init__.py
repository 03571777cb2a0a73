"""featmap service: pipeline spec -> ONNX graph -> onnxruntime, served over gRPC."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featmap")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# The public API; the modules behind it are free to move. (Imports after __version__: the graph
# builder stamps it into every model.)
from featmap.service.errors import (
    Abandoned,
    Cancelled,
    DeadlineExceeded,
    ExecutionFailed,
    FeatmapError,
    InvalidRequest,
    InvalidSpec,
    InvalidTensor,
    LimitExceeded,
    NonFiniteResult,
    NotFound,
)
from featmap.service.extractor import Extractor, RequestLimits
from featmap.service.graph import compile_pipeline
from featmap.service.reference import reference_outputs, run_reference
from featmap.service.runtime import SessionCache, resolve_providers
from featmap.service.server import FeatmapServer, create_server, serve
from featmap.service.settings import ServerSettings
from featmap.service.spec import Pipeline, infer_shapes, json_schema, parse_pipeline

__all__ = [
    "Abandoned",
    "Cancelled",
    "DeadlineExceeded",
    "ExecutionFailed",
    "Extractor",
    "FeatmapError",
    "FeatmapServer",
    "InvalidRequest",
    "InvalidSpec",
    "InvalidTensor",
    "LimitExceeded",
    "NonFiniteResult",
    "NotFound",
    "Pipeline",
    "RequestLimits",
    "ServerSettings",
    "SessionCache",
    "__version__",
    "compile_pipeline",
    "create_server",
    "infer_shapes",
    "json_schema",
    "parse_pipeline",
    "reference_outputs",
    "resolve_providers",
    "run_reference",
    "serve",
]
