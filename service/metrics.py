"""Prometheus metrics of one server, in a registry of its own (several servers share a process
in tests), served over HTTP when `metrics_port` is set.

    featmap_requests_total{method,code}           calls of featmap.v1.FeatureExtractor and
                                                   inference.GRPCInferenceService
    featmap_request_seconds{stage}                 queue | compute | total, per call
    featmap_batch_size                             images per dynamic-batcher run
    featmap_images_total                           images admitted (Extract, stream, ModelInfer)
    featmap_bytes_received_total                   request bytes received
    featmap_session_cache_events_total{event}      hit | miss | eviction
    featmap_in_flight_requests                     calls being handled now
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .api import FeatureService

SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceCollector(Collector):
    """Batch sizes and session-cache events, read from the counters the service already keeps."""

    def __init__(self, service: FeatureService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        """The current values, at scrape time."""
        batches = self.service.batcher.stats
        sizes = batches.batch_sizes.items()
        buckets = [
            (floatToGoString(bound), sum(count for size, count in sizes if size <= bound))
            for bound in BATCH_SIZE_BUCKETS
        ]
        buckets.append(("+Inf", batches.batches))
        yield HistogramMetricFamily(
            "featmap_batch_size",
            "Images per run of the dynamic batcher (requests with batching off are not batched).",
            buckets=buckets,
            sum_value=batches.images,
        )
        cache = self.service.cache.stats
        events = CounterMetricFamily(
            "featmap_session_cache_events",
            "Compiled-session cache lookups (hit, miss) and LRU evictions.",
            labels=["event"],
        )
        events.add_metric(["hit"], cache.hits)
        events.add_metric(["miss"], cache.misses)
        events.add_metric(["eviction"], cache.evictions)
        yield events


class Metrics:
    """The metrics of one FeatmapServer; RequestObserver records into them."""

    def __init__(self, service: FeatureService) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "featmap_requests",
            "Calls of featmap.v1.FeatureExtractor by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "featmap_request_seconds",
            "Seconds per call: waiting in the batcher (queue), running (compute), in all (total).",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter(
            "featmap_images",
            "Images admitted in Extract, ExtractStream and ModelInfer requests.",
            registry=self.registry,
        )
        self.bytes_received = Counter(
            "featmap_bytes_received",
            "Bytes of request messages received.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "featmap_in_flight_requests",
            "Calls being handled now.",
            registry=self.registry,
        )
        self.registry.register(ServiceCollector(service))
        # Calls started (not exported): what the allocator's Trimmer watches for activity.
        self.calls_started = itertools.count()
        self.calls = 0
        # Label children looked up once: `labels()` costs a lock and a dict per call.
        self.stage_seconds = {
            stage: self.request_seconds.labels(stage) for stage in ("queue", "compute", "total")
        }
        self._requests_by: dict[tuple[str, str], Any] = {}
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def count_request(self, method: str, code: str) -> None:
        """One finished call of `method` with status `code`."""
        child = self._requests_by.get((method, code))
        if child is None:
            child = self._requests_by[method, code] = self.requests.labels(method, code)
        child.inc()

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on host:port (0 picks a free port); the bound port."""
        # gRPC spells IPv6 hosts "[::]"; the HTTP server wants the bare address.
        address = host.strip("[]")
        self._http, self._thread = start_http_server(port, addr=address, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if serving."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
