"""featmap service: where pipelines compile and run (ONNX, onnxruntime), and the gRPC server.

The names below load on first use (PEP 562): importing one service module (graph, settings)
loads that module and what it imports, never the whole server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..contract import __version__
    from ..contract.errors import (
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
    from ..contract.limits import RequestLimits
    from ..contract.ops import layer_costs
    from ..contract.spec import Pipeline, json_schema, parse_pipeline
    from .extractor import Extractor
    from .graph import compile_pipeline
    from .reference import reference_outputs, run_reference
    from .runtime import SessionCache, resolve_providers
    from .server import FeatmapServer, create_server, serve
    from .settings import ServerSettings

# The public API, by the module each name lives in; the modules behind it are free to move.
_HOMES = {
    "__version__": "featmap.contract",
    **dict.fromkeys(
        [
            "Abandoned",
            "Cancelled",
            "DeadlineExceeded",
            "ExecutionFailed",
            "FeatmapError",
            "InvalidRequest",
            "InvalidSpec",
            "InvalidTensor",
            "LimitExceeded",
            "NonFiniteResult",
            "NotFound",
            "Unavailable",
        ],
        "featmap.contract.errors",
    ),
    "RequestLimits": "featmap.contract.limits",
    "layer_costs": "featmap.contract.ops",
    "Pipeline": "featmap.contract.spec",
    "json_schema": "featmap.contract.spec",
    "parse_pipeline": "featmap.contract.spec",
    "Extractor": "featmap.service.extractor",
    "compile_pipeline": "featmap.service.graph",
    "reference_outputs": "featmap.service.reference",
    "run_reference": "featmap.service.reference",
    "SessionCache": "featmap.service.runtime",
    "resolve_providers": "featmap.service.runtime",
    "FeatmapServer": "featmap.service.server",
    "create_server": "featmap.service.server",
    "serve": "featmap.service.server",
    "ServerSettings": "featmap.service.settings",
}

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


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'featmap.service' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
