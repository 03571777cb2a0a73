"""featmap client: the client library (FeatureClient, AsyncFeatureClient): contract and gRPC only.

The names below load on first use (PEP 562), so that `featmap --help` and other commands that
need no client pay nothing for gRPC, asyncio or pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import AsyncFeatureClient, FeatureClient
    from .messages import FeatmapRpcError, PipelineInfo, ServerInfo

_HOMES = {
    "AsyncFeatureClient": "featmap.client.client",
    "FeatureClient": "featmap.client.client",
    "FeatmapRpcError": "featmap.client.messages",
    "PipelineInfo": "featmap.client.messages",
    "ServerInfo": "featmap.client.messages",
}
__all__ = ["AsyncFeatureClient", "FeatmapRpcError", "FeatureClient", "PipelineInfo", "ServerInfo"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'featmap.client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
