"""Soak test: N client threads mix good and bad requests against one server for T seconds.

Loopback only. Starts `featmap serve --port 0` (or uses --server), reports requests done,
errors by code, p50/p99 latency and the server's RSS at start and end, and exits 1 on any
status code a request of its kind should never get (or if the server dies).

    python scripts/soak.py --clients 32 --seconds 60
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from featmap.client import FeatureClient
from featmap.client.client import FeatmapRpcError

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
README_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {
            "op": "conv2d",
            "name": "conv1",
            "filters": 8,
            "kernel_size": 3,
            "padding": "same",
            "weights": {"init": "he_normal", "seed": 0},
        },
        {"op": "relu"},
        {"op": "max_pool2d", "pool_size": 2},
        {"op": "global_avg_pool2d", "name": "features"},
    ],
    "outputs": ["conv1", "features"],
}
HUGE_KERNEL = {"input": {"channels": 3}, "layers": [{"op": "max_pool2d", "pool_size": 99}]}
OK = grpc.StatusCode.OK


@dataclass
class Tally:
    """What all client threads saw, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[float] = field(default_factory=list)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(
        self, kind: str, code: grpc.StatusCode, expected: set[grpc.StatusCode], s: float
    ) -> None:
        """Record one request of `kind` that ended with `code` after `s` seconds."""
        with self.lock:
            self.latencies.append(s)
            self.codes[code.name] += 1
            if code not in expected:
                self.unexpected[f"{kind}: {code.name}"] += 1


def rss_kib(pid: int) -> int:
    """A process's resident set size in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server() -> tuple[subprocess.Popen[str], str]:
    """`featmap serve --port 0` on loopback and its address, stderr drained by a thread."""
    featmap = Path(sys.executable).parent / "featmap"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATMAP_")}
    process = subprocess.Popen(
        [str(featmap), "serve", "--host", "127.0.0.1", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if match := LISTENING.search(line):
            # Keep reading, or the server blocks on a full pipe once it logs every request.
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, f"127.0.0.1:{match.group(1)}"
    raise RuntimeError(f"featmap serve exited with {process.wait()} before listening")


def requests_for(
    client: FeatureClient, pipeline_id: str, rng: np.random.Generator
) -> list[tuple[str, Callable[[], Any], set[grpc.StatusCode]]]:
    """(kind, call, codes it may end with): good and bad requests, in the mix they are sent."""
    images = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    nan_images = images.copy()
    nan_images[0, 0, 0, 0] = np.nan
    busy = {grpc.StatusCode.RESOURCE_EXHAUSTED}  # only once the client's retries ran out
    return [
        ("inline", lambda: client.extract(images, README_SPEC), {OK} | busy),
        ("registered", lambda: client.extract(images, pipeline_id), {OK} | busy),
        ("stream", lambda: list(client.extract_stream([images] * 3, README_SPEC)), {OK} | busy),
        ("info", client.server_info, {OK}),
        (
            "nan",
            lambda: client.extract(nan_images, README_SPEC),
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        ("unknown id", lambda: client.extract(images, "0" * 32), {grpc.StatusCode.NOT_FOUND}),
        (
            "huge kernel",
            lambda: client.extract(images, HUGE_KERNEL),
            {grpc.StatusCode.RESOURCE_EXHAUSTED},
        ),
        ("bad json", lambda: client.extract(images, "{"), {grpc.StatusCode.INVALID_ARGUMENT}),
    ]


def client_loop(address: str, pipeline_id: str, until: float, seed: int, tally: Tally) -> None:
    """One client thread: cycle through the mix until the time is up."""
    rng = np.random.default_rng(seed)
    with FeatureClient(address, timeout=30) as client:
        mix = requests_for(client, pipeline_id, rng)
        index = seed
        while time.monotonic() < until:
            kind, call, expected = mix[index % len(mix)]
            index += 1
            started = time.monotonic()
            try:
                call()
                code = OK
            except FeatmapRpcError as exc:
                code = exc.code
            tally.add(kind, code, expected, time.monotonic() - started)


def run_clients(address: str, pipeline_id: str, clients: int, seconds: float, tally: Tally) -> None:
    """`clients` threads running client_loop for `seconds`."""
    until = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client_loop, args=(address, pipeline_id, until, i, tally))
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile in milliseconds (0 for no values)."""
    return float(np.percentile(values, q) * 1000) if values else 0.0


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when every request ended with a code its kind allows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--server", help="host:port of a running server (default: start one)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of the same load before RSS is first read (default: 10%% of --seconds)",
    )
    args = parser.parse_args(argv)
    warmup = args.seconds / 10 if args.warmup is None else args.warmup

    process, address = (None, args.server) if args.server else start_server()
    try:
        with FeatureClient(address, timeout=30) as client:
            client.wait_ready(timeout=30)
            pipeline_id = client.register(README_SPEC)
            client.extract(np.zeros((1, 3, 32, 32), np.float32), README_SPEC)  # warm
        # The same load first, unmeasured: allocator arenas, sessions and gRPC buffers reach
        # their working size, so that start-to-end RSS shows growth, not start-up.
        warm = Tally()
        run_clients(address, pipeline_id, args.clients, warmup, warm)
        rss_start = rss_kib(process.pid) if process else None
        tally = Tally()
        tally.unexpected.update(warm.unexpected)
        started = time.monotonic()
        run_clients(address, pipeline_id, args.clients, args.seconds, tally)
        elapsed = time.monotonic() - started
        rss_end = rss_kib(process.pid) if process else None
        alive = process is None or process.poll() is None
        exit_code = None
        if process is not None and alive:
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(timeout=60)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
    done = len(tally.latencies)
    report = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": done,
        "requests_per_s": round(done / elapsed, 1),
        "codes": dict(tally.codes.most_common()),
        "unexpected": dict(tally.unexpected),
        "p50_ms": round(percentile(tally.latencies, 50), 2),
        "p99_ms": round(percentile(tally.latencies, 99), 2),
        "warmup_seconds": round(warmup, 1),
        "server_rss_kib_start": rss_start,
        "server_rss_kib_end": rss_end,
        "server_rss_growth": round(rss_end / rss_start - 1, 3) if rss_start and rss_end else None,
        "server_exit_code": exit_code,
    }
    print(json.dumps(report, indent=2))
    healthy = alive and exit_code in (None, 0)
    return 0 if healthy and not tally.unexpected and done else 1


if __name__ == "__main__":
    sys.exit(main())
