"""The public API is what the packages' __init__ re-export; pin it."""

from __future__ import annotations

import featmap.client
import featmap.service


def test_service_exports() -> None:
    for name in featmap.service.__all__:
        assert hasattr(featmap.service, name), name
    assert {
        "Pipeline",
        "parse_pipeline",
        "compile_pipeline",
        "run_reference",
        "create_server",
    } <= set(featmap.service.__all__)


def test_client_exports() -> None:
    assert featmap.client.__all__ == [
        "AsyncFeatureClient",
        "FeatmapRpcError",
        "FeatureClient",
        "PipelineInfo",
        "ServerInfo",
    ]
    for name in featmap.client.__all__:
        assert getattr(featmap.client, name).__module__.startswith("featmap.client")


def test_version_is_the_distribution_version() -> None:
    from importlib.metadata import version

    assert featmap.service.__version__ == version("featmap")
