"""featmap service: pipeline spec -> ONNX graph -> onnxruntime, served over gRPC."""

from __future__ import annotations

# The public API; the modules behind it are free to move.
from featmap.contract import __version__
from featmap.contract.errors import (
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
    Unavailable,
)
from featmap.contract.limits import RequestLimits
from featmap.contract.ops import layer_costs
from featmap.contract.spec import (
    Pipeline,
    json_schema,
    parse_pipeline,
)
from featmap.service.extractor import Extractor
from featmap.service.graph import compile_pipeline
from featmap.service.reference import reference_outputs, run_reference
from featmap.service.runtime import SessionCache, resolve_providers
from featmap.service.server import FeatmapServer, create_server, serve
from featmap.service.settings import ServerSettings

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
    "Unavailable",
    "__version__",
    "compile_pipeline",
    "create_server",
    "json_schema",
    "layer_costs",
    "parse_pipeline",
    "reference_outputs",
    "resolve_providers",
    "run_reference",
    "serve",
]
