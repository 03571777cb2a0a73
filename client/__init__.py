"""featmap client: FeatureClient, AsyncFeatureClient and the `featmap` command line."""

from __future__ import annotations

from featmap.client.client import (
    AsyncFeatureClient,
    FeatmapRpcError,
    FeatureClient,
    PipelineInfo,
    ServerInfo,
)

__all__ = ["AsyncFeatureClient", "FeatmapRpcError", "FeatureClient", "PipelineInfo", "ServerInfo"]
