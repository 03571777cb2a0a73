"""featmap client: FeatureClient and the `featmap` command line."""

from __future__ import annotations

from featmap.client.client import FeatmapRpcError, FeatureClient, ServerInfo

__all__ = ["FeatmapRpcError", "FeatureClient", "ServerInfo"]
