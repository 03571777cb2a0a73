"""What every section of `featmap bench` measures with: the standard pipeline, a table row,
alternating timing against a baseline, the in-process session and a `featmap serve` child."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from ..contract.pixels import PIXEL_DTYPE, PIXEL_SCALE
from ..contract.spec import Pipeline
from ..service.graph import compile_pipeline
from ..service.sessions import CPU, build_session


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
    if dtype == PIXEL_DTYPE:
        input_spec["scale"] = PIXEL_SCALE  # the pixel rule's own scale: the same features
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
    """One line of the table: throughput, and its ratio to the baseline it was measured with."""

    path: str
    images_per_s: float
    ratio: float
    note: str = ""
    baseline: str = ""  # the row the ratio divides by; "" for a baseline itself


def in_process_session(pipeline: Pipeline, threads: int) -> ort.InferenceSession:
    """The baseline: the same model in this process, the same thread settings as the server."""
    model = compile_pipeline(pipeline).SerializeToString()
    return build_session(model, [CPU], threads=threads, spinning=False)


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
def server_process(threads: int, socket_path: str | None = None) -> Iterator[str]:
    """A `featmap serve --port 0` child (with shared memory on its Unix socket at
    `socket_path`, if given); yields its TCP address."""
    command = [sys.executable, "-m", "featmap.jobs.cli", "serve", "--port", "0"]
    command += ["--threads", str(threads)]
    if socket_path is not None:
        command += ["--unix-socket", socket_path, "--shared-memory"]
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
