"""Prometheus metrics scraped over HTTP, and the request log lines in text and JSON."""

from __future__ import annotations

import json
import logging
import signal
import sys
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from featmap.client import FeatmapRpcError, FeatureClient
from featmap.service.logs import JsonFormatter
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from tests.conftest import README_SPEC
from tests.test_cli import featmap_serve

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def metered() -> Iterator[FeatmapServer]:
    """A server of its own, so that only these tests move its counters."""
    settings = ServerSettings(
        host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=4, metrics_port=0
    )
    with FeatmapServer(settings) as running:
        yield running


def scrape(server: FeatmapServer) -> Samples:
    """Every sample of the server's /metrics endpoint, by name and labels."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much one sample grew between two scrapes."""
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_port_is_bound(metered: FeatmapServer) -> None:
    assert metered.metrics_port is not None and metered.metrics_port > 0


def test_counters_move_by_the_calls_made(metered: FeatmapServer) -> None:
    images = np.random.default_rng(1).standard_normal((2, 3, 10, 10)).astype(np.float32)
    # A spec never seen by this server: one cache miss, then hits.
    spec = {**README_SPEC, "layers": [*README_SPEC["layers"][:-1], {"op": "relu", "name": "x"}]}
    spec["outputs"] = ["conv1", "x"]
    before = scrape(metered)
    with FeatureClient(metered.address, timeout=30) as client:
        for _ in range(3):
            client.extract(images, spec)
        with pytest.raises(FeatmapRpcError) as bad:
            client.extract(images, {"input": {"channels": 3}, "layers": [{"op": "nope"}]})
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        list(client.extract_stream([images, images[:1]], spec))
        client.server_info()
    after = scrape(metered)

    requests = "featmap_requests_total"
    assert moved(before, after, requests, method="Extract", code="OK") == 3
    assert moved(before, after, requests, method="Extract", code="INVALID_ARGUMENT") == 1
    assert moved(before, after, requests, method="ExtractStream", code="OK") == 1
    assert moved(before, after, requests, method="GetServerInfo", code="OK") == 1
    # Admitted: 3 good Extract of 2 images, and a stream of 2 + 1 (the bad spec's images were
    # never admitted, so they do not count).
    assert moved(before, after, "featmap_images_total") == 3 * 2 + 3
    assert moved(before, after, "featmap_bytes_received_total") > 4 * images.nbytes
    assert moved(before, after, "featmap_request_seconds_count", stage="total") == 6
    # Queue and compute are timed for the calls that ran the pipeline (a stream once).
    assert moved(before, after, "featmap_request_seconds_count", stage="queue") == 4
    assert moved(before, after, "featmap_request_seconds_count", stage="compute") == 4
    assert moved(before, after, "featmap_batch_size_count") == 5  # runs: 3 + the stream's 2
    assert moved(before, after, "featmap_batch_size_sum") == 3 * 2 + 2 + 1
    assert moved(before, after, "featmap_batch_size_bucket", le="1.0") == 1
    assert moved(before, after, "featmap_session_cache_events_total", event="miss") == 1
    assert moved(before, after, "featmap_session_cache_events_total", event="hit") == 4
    assert value(after, "featmap_in_flight_requests") == 0


def test_servers_keep_separate_registries(metered: FeatmapServer) -> None:
    settings = ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1, metrics_port=0)
    with FeatmapServer(settings) as other:
        assert other.metrics_port != metered.metrics_port
        with FeatureClient(other.address, timeout=30) as client:
            client.server_info()
        labels = {"method": "GetServerInfo", "code": "OK"}
        assert value(scrape(other), "featmap_requests_total", **labels) == 1


def test_metrics_off_by_default() -> None:
    settings = ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1)
    assert settings.metrics_port is None
    with FeatmapServer(settings) as server:
        assert server.metrics_port is None


def test_request_log_line(metered: FeatmapServer, caplog: pytest.LogCaptureFixture) -> None:
    images = np.zeros((3, 3, 8, 8), np.float32)
    with (
        caplog.at_level(logging.INFO, "featmap.requests"),
        FeatureClient(metered.address, timeout=30) as client,
    ):
        client.extract(images, README_SPEC)
    [record] = [r for r in caplog.records if r.name == "featmap.requests"]
    fields = record.featmap_fields  # type: ignore[attr-defined]
    assert fields["method"] == "Extract"
    assert fields["status"] == "OK"
    assert fields["images"] == 3
    assert len(fields["pipeline_id"]) > 8
    assert fields["duration_ms"] > 0
    assert f"request {fields['request_id']} Extract OK" in record.getMessage()


def test_json_formatter_keeps_exceptions_on_one_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord(
            "featmap.x", logging.ERROR, __file__, 1, "failed %s", ("it",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed it"
    assert entry["level"] == "ERROR" and entry["logger"] == "featmap.x"
    assert "RuntimeError: boom" in entry["exception"]


def test_serve_logs_json_lines() -> None:
    with featmap_serve("--port", "0", "--log-format", "json", "--metrics-port", "0") as serving:
        port = serving.wait_listening()
        with FeatureClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.wait_ready()
            client.extract(np.ones((2, 3, 8, 8), np.float32), README_SPEC)
        serving.process.send_signal(signal.SIGTERM)
        assert serving.process.wait(timeout=10) == 0
        lines = serving.stderr().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    assert any(entry["message"].startswith("metrics on http://") for entry in entries)
    [request] = [entry for entry in entries if entry.get("method") == "Extract"]
    assert request["logger"] == "featmap.requests"
    assert request["level"] == "INFO"
    assert request["status"] == "OK"
    assert request["images"] == 2
    assert request["pipeline_id"]
    assert isinstance(request["duration_ms"], float)
    assert request["request_id"]
