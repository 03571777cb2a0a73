"""Execution providers: CUDA when there is one, a clear error for a missing one, CPU fallback.

The CUDA test runs only where onnxruntime offers CUDAExecutionProvider (onnxruntime-gpu and a
GPU); the others run everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from featmap.client import FeatureClient
from featmap.contract.spec import Pipeline
from featmap.service.runtime import CPU, CUDA, SessionCache
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from tests.conftest import assert_matches_reference
from tests.test_cli import run_featmap

HAS_CUDA = CUDA in ort.get_available_providers()


@pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime has no CUDAExecutionProvider here")
def test_cuda_server_reports_cuda_and_matches_the_reference(
    readme_pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ServerSettings(host="127.0.0.1", port=0, providers=[CUDA, CPU], grpc_workers=4)
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 40)).astype(np.float32)
    with (
        caplog.at_level(logging.WARNING, logger="featmap"),
        FeatmapServer(settings) as server,
        FeatureClient(server.address, timeout=60) as client,
    ):
        client.wait_ready()
        info = client.server_info()
        assert CUDA in info.available_providers
        assert info.active_providers == [CUDA, CPU]
        outputs = client.extract(images, readme_pipeline)
        placed = server.service.cache.get(readme_pipeline).providers
    assert placed[0] == CUDA, f"the session runs on {placed}"
    assert "unavailable for this session" not in caplog.text
    assert_matches_reference(outputs, readme_pipeline, images)


def test_serve_with_a_missing_provider_exits_2_naming_it() -> None:
    result = run_featmap("serve", "--port", "0", "--providers", "NopeExecutionProvider")
    assert result.returncode == 2
    assert "NopeExecutionProvider" in result.stderr
    assert "not available" in result.stderr
    assert CPU in result.stderr, "the error lists what this build has"


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here: asking for it is no error")
def test_serve_asking_for_cuda_without_it_exits_2() -> None:
    result = run_featmap("serve", "--port", "0", "--providers", f"{CUDA},{CPU}")
    assert result.returncode == 2
    assert CUDA in result.stderr


def test_first_provider_not_placed_falls_back_to_cpu_with_a_warning(
    readme_pipeline: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As when CUDA cannot take a session (no device, out of memory): it runs on CPU, logged."""
    real_session = ort.InferenceSession
    asked: list[list[str]] = []

    def cpu_only(model: bytes, options: Any, providers: list[str]) -> ort.InferenceSession:
        asked.append(list(providers))
        return real_session(model, options, providers=[CPU])  # get_providers() == [CPU]

    monkeypatch.setattr(ort, "InferenceSession", cpu_only)
    cache = SessionCache(capacity=2, providers=[CUDA, CPU], intra_op_threads=1)
    with caplog.at_level(logging.WARNING, logger="featmap.service.runtime"):
        compiled = cache.get(readme_pipeline)
    assert asked == [[CUDA, CPU]]
    assert compiled.providers == [CPU]
    [record] = [r for r in caplog.records if r.name == "featmap.service.runtime"]
    assert record.levelno == logging.WARNING
    assert CUDA in record.getMessage() and "running on ['CPUExecutionProvider']" in (
        record.getMessage()
    )
    assert compiled.pipeline_id in record.getMessage()
    images = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert_matches_reference(compiled.run(images), readme_pipeline, images)
