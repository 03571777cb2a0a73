"""`featmap bench`: featmap's throughput as ratios against onnxruntime in-process.

Everything runs in one process tree on this machine: a `featmap serve` child process, the
clients in this process, and the in-process baseline (the same ONNX model, the same threads).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from featmap.client.client import FeatureClient
from featmap.contract.spec import (
    Pipeline,
    parse_pipeline,
)
from featmap.service.graph import INPUT_NAME, compile_pipeline
from featmap.service.reference import reference_outputs


def standard_spec(dtype: str = "float32") -> dict[str, Any]:
    """The issue's standard pipeline: three conv blocks and a global average pool."""

    def conv(filters: int, stride: int, seed: int) -> dict[str, Any]:
        return {
            "op": "conv2d",
            "filters": filters,
            "kernel_size": 3,
            "stride": stride,
            "padding": "same",
            "weights": {"init": "he_normal", "seed": seed},
            "bias": {"init": "zeros"},
        }

    input_spec: dict[str, Any] = {"channels": 3, "dtype": dtype}
    if dtype == "uint8":
        input_spec["scale"] = 1 / 255
    return {
        "input": input_spec,
        "layers": [
            conv(32, 1, 1),
            {"op": "relu"},
            {"op": "max_pool2d", "pool_size": 2},
            conv(64, 1, 2),
            {"op": "relu"},
            {"op": "max_pool2d", "pool_size": 2},
            conv(128, 2, 3),
            {"op": "relu"},
            {"op": "global_avg_pool2d", "name": "features"},
        ],
    }


@dataclass
class Row:
    """One line of the table: throughput, and its ratio to the in-process baseline."""

    path: str
    images_per_s: float
    ratio: float
    note: str = ""


@dataclass
class Report:
    """All measurements of one run."""

    rows: list[Row] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """The report as a plain-text table."""
        lines = [f"{'path':<44} {'images/s':>10} {'ratio':>7}  note"]
        for row in self.rows:
            lines.append(f"{row.path:<44} {row.images_per_s:>10.1f} {row.ratio:>7.3f}  {row.note}")
        if self.latency:
            lines.append("")
            lines.append("small requests (1x3x64x64), milliseconds:")
            for key, value in self.latency.items():
                lines.append(f"  {key:<40} {value:>8.3f}")
        return "\n".join(lines)


def in_process_session(pipeline: Pipeline, threads: int) -> ort.InferenceSession:
    """The baseline: the same model in this process, the same thread settings as the server."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        compile_pipeline(pipeline).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def rate(images: int, run: Callable[[], Any], seconds: float, warmup: int = 1) -> float:
    """images/s of `run` (which processes `images` images), repeated for about `seconds`."""
    for _ in range(warmup):
        run()
    done, start = 0, time.perf_counter()
    while True:
        run()
        done += images
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def compare(
    images: int,
    path: Callable[[], Any],
    baseline: Callable[[], Any],
    seconds: float,
    rounds: int = 3,
    *,
    baseline_images: int | None = None,
) -> tuple[float, float]:
    """(images/s of `path`, its ratio to `baseline`), medians over alternating rounds.

    Alternating cancels what drifts on a shared machine (other load, clock boost) between a
    baseline measured once at the start and a path measured minutes later.
    """
    rates, ratios = [], []
    for _ in range(rounds):
        base = rate(baseline_images or images, baseline, seconds / (2 * rounds))
        measured = rate(images, path, seconds / (2 * rounds))
        rates.append(measured)
        ratios.append(measured / base)
    return statistics.median(rates), statistics.median(ratios)


@contextmanager
def server_process(threads: int, socket_path: str) -> Iterator[str]:
    """A `featmap serve --port 0` child, with shared memory on its Unix socket at
    `socket_path`; yields its TCP address."""
    command = [sys.executable, "-m", "featmap.client.cli", "serve", "--port", "0"]
    command += ["--threads", str(threads), "--unix-socket", socket_path, "--shared-memory"]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None
    log = child.stderr
    drain = threading.Thread(target=log.read, daemon=True)
    try:
        address = None
        for line in log:
            match = re.search(r"listening on (\S+)", line)
            if match:
                address = match.group(1)
                break
        if address is None:
            raise RuntimeError(f"featmap serve exited with {child.wait()}")
        drain.start()  # keep reading so the child never blocks on a full pipe
        yield address
    finally:
        child.terminate()
        child.wait(timeout=30)
        if drain.is_alive():
            drain.join(timeout=5)
        log.close()


def concurrent_rate(
    address: str, pipeline_id: str, image: np.ndarray, clients: int, seconds: float
) -> float:
    """images/s with `clients` threads, each its own channel, sending one image at a time."""
    stop = time.perf_counter() + seconds
    counts = [0] * clients
    barrier = threading.Barrier(clients + 1)

    def client_loop(index: int) -> None:
        with FeatureClient(address) as fc:
            fc.extract(image, pipeline_id)  # connect and warm up
            barrier.wait()
            while time.perf_counter() < stop:
                fc.extract(image, pipeline_id)
                counts[index] += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    stop = start + seconds
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of samples, in the samples' unit."""
    return float(np.percentile(np.asarray(samples), q))


def run_bench(
    *,
    threads: int,
    batch: int = 32,
    size: int = 224,
    seconds: float = 5.0,
    clients: int = 32,
    latency_requests: int = 300,
    log: Callable[[str], None] = print,
) -> Report:
    """Measure every path; see the module docstring."""
    report = Report()
    rng = np.random.default_rng(0)
    float_pipeline = parse_pipeline(standard_spec("float32"))
    uint8_pipeline = parse_pipeline(standard_spec("uint8"))
    images = rng.random((batch, 3, size, size), dtype=np.float32)
    images_u8 = rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)

    log(f"in-process baseline ({threads} intra-op threads)...")
    session = in_process_session(float_pipeline, threads)
    session_u8 = in_process_session(uint8_pipeline, threads)

    def in_process() -> Any:
        return session.run(None, {INPUT_NAME: images})

    def in_process_u8() -> Any:
        return session_u8.run(None, {INPUT_NAME: images_u8})

    base = rate(batch, in_process, seconds)
    report.rows.append(Row("onnxruntime in-process float32", base, 1.0, f"batch {batch}"))
    base_u8 = rate(batch, in_process_u8, seconds)
    report.rows.append(Row("onnxruntime in-process uint8", base_u8, 1.0, f"batch {batch}"))

    with (
        tempfile.TemporaryDirectory(prefix="featmap-bench-") as socket_dir,
        server_process(threads, socket_path := os.path.join(socket_dir, "featmap.sock")) as address,
        FeatureClient(address) as fc,
    ):
        fc.wait_ready(30)
        float_id = fc.register(float_pipeline)
        uint8_id = fc.register(uint8_pipeline)

        log("unary, stream, uint8, shared memory...")
        report.rows.append(
            Row(
                "featmap unary float32",
                *compare(batch, lambda: fc.extract(images, float_id), in_process, seconds),
            )
        )
        chunks_per_job = 8

        def stream_job() -> None:
            for _ in fc.extract_stream((images for _ in range(chunks_per_job)), float_id):
                pass

        stream = compare(
            batch * chunks_per_job, stream_job, in_process, seconds, baseline_images=batch
        )
        report.rows.append(
            Row("featmap stream float32", *stream, f"{chunks_per_job} chunks a stream")
        )
        uint8 = compare(batch, lambda: fc.extract(images_u8, uint8_id), in_process_u8, seconds)
        report.rows.append(Row("featmap unary uint8", *uint8, "vs in-process uint8"))
        with FeatureClient(f"unix:{socket_path}", shared_memory=True) as shared:
            shm = compare(batch, lambda: shared.extract(images, float_id), in_process, seconds)
        report.rows.append(Row("featmap shared memory float32", *shm))

        log(f"{clients} concurrent single-image clients...")
        one = images[:1]
        for enabled in (True, False):
            pipeline_id = fc.register(
                float_pipeline,
                batching={"enabled": enabled, "max_batch_size": clients, "max_queue_delay_us": 0},
            )
            concurrent, ratios = [], []
            for _ in range(2):
                baseline = rate(batch, in_process, seconds / 4)
                concurrent.append(concurrent_rate(address, pipeline_id, one, clients, seconds / 4))
                ratios.append(concurrent[-1] / baseline)
            label = "on" if enabled else "off"
            report.rows.append(
                Row(
                    f"featmap {clients} clients x 1 image, batching {label}",
                    statistics.median(concurrent),
                    statistics.median(ratios),
                    f"vs in-process batch {batch}",
                )
            )

        log("small-request latency...")
        small = rng.random((1, 3, 64, 64), dtype=np.float32)
        small_session = session
        in_process_ms, service_ms = [], []
        for _ in range(20):
            small_session.run(None, {INPUT_NAME: small})
            fc.extract(small, float_id)
        for _ in range(latency_requests):
            start = time.perf_counter()
            small_session.run(None, {INPUT_NAME: small})
            in_process_ms.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            fc.extract(small, float_id)
            service_ms.append((time.perf_counter() - start) * 1e3)
        report.latency = {
            "in-process p50": percentile(in_process_ms, 50),
            "in-process p99": percentile(in_process_ms, 99),
            "featmap p50": percentile(service_ms, 50),
            "featmap p99": percentile(service_ms, 99),
            "overhead p50 (featmap - in-process)": percentile(service_ms, 50)
            - percentile(in_process_ms, 50),
            "overhead p99 (featmap - in-process)": percentile(service_ms, 99)
            - percentile(in_process_ms, 99),
        }

    log("NumPy reference...")
    few = images[:2]
    numpy_rate = rate(len(few), lambda: reference_outputs(float_pipeline, few), 0, warmup=0)
    report.rows.append(
        Row("NumPy reference (for scale)", numpy_rate, numpy_rate / base, "2 images")
    )
    return report


def default_threads() -> int:
    """One intra-op thread per core (this machine's)."""
    return os.cpu_count() or 1
