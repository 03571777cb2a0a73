"""`featmap bench`: featmap's throughput as ratios against onnxruntime in-process.

Everything runs in one process tree on this machine: a `featmap serve` child process, the
clients in this process, and the in-process baseline (the same ONNX model, the same threads).
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ..client.client import FeatureClient
from ..client.messages import request_for
from ..contract.errors import FeatmapError
from ..contract.spec import (
    parse_pipeline,
)
from ..service.graph import INPUT_NAME
from ..service.reference import reference_outputs
from .bench_base import (
    Row,
    compare,
    in_process_session,
    rate,
    server_process,
    standard_spec,
)
from .bench_job import FLOOR_ROW, SHARED_ARRAY_ROW, SHARED_TRANSFER_ROW, TRANSFER_ROW
from .bench_ray import RayBench

# Rows the goals table reads.
JOB_EMBEDDED = "featmap extract, embedded"
JOB_REMOTE = "featmap extract --server"
ARRAY_EMBEDDED = "array job, embedded, whole process"
ARRAY_REMOTE = "array job --server 127.0.0.1, whole process"
TRITON_ROW = "stock tritonclient"
STREAM_ROW = "featmap stream float32"
CLIENTS_ROW = "x 1 image, batching on"
OVERHEAD_P50 = "overhead p50 (featmap - in-process)"
ECHO_P50 = "gRPC floor p50 (echo server, same request)"
HAND_LOOP = "hand-written loop"
UNARY_ROW = "featmap unary float32"
# The array rows' rounds at least: a round takes seconds, and whole-process runs of a second
# swing by a third on a shared machine (measured here: the ratio 0.57 and 0.94 in two runs of
# three rounds, ten minutes apart).
ARRAY_ROUNDS = 7
OVERHEAD_PER_ECHO = 1.5  # a small request's overhead, in gRPC echo round trips at most
JOB_PEAK_MIB = 400  # the embedded job's peak RSS on 224x224 JPEGs, batches of 32
# Not "featmap extract, embedded": the job goal reads the first row with that in its path.
RAY_ROW = "Ray Data README example, local Ray, whole process"
RAY_BASELINE = "featmap extract beside Ray"
RAY_FLOOR_NAME = "an identity map"
RAY_FLOOR_ROW = f"Ray Data alone ({RAY_FLOOR_NAME} for the actor), whole process"
# "Flat" peak RSS: at most this much more for 20 times the images. The list of input names
# grows with the job (under 1 KB an image); everything else is set by batch and shard sizes.
RSS_FLAT_MIB = 16
TRITONCLIENT_ENV = "FEATMAP_TRITONCLIENT_PYTHON"
DEFAULT_TRITONCLIENT_PYTHON = "/tmp/tc/bin/python"


@dataclass
class Goal:
    """One line of the issue's goals table: a figure of this run against its goal."""

    path: str
    now: str
    goal: str
    met: bool | None  # None: not measured in this run, or no goal here


def int8_goal(row: Row | None) -> Goal:
    """int8 at least 1.7x float32 in this process, where the CPU has int8 dot products; on a
    CPU without them the ratio is what int8 gives there, with no goal to meet."""
    from ..service.int8 import cpu_int8_support, has_int8_dot_products

    label = "int8 / float32, in-process (x)"
    if row is None or not math.isfinite(row.ratio):
        return Goal(label, "not measured", ">= 1.70", None)
    if not has_int8_dot_products(cpu_int8_support()):
        return Goal(label, f"{row.ratio:.2f}", "none (no int8 dot products)", None)
    return Goal(label, f"{row.ratio:.2f}", ">= 1.70", row.ratio >= 1.7)


def ray_goals(measured: RayBench | None) -> list[Goal]:
    """Ray Data on one node: at least 0.6 of featmap extract's speed, at most 3x its memory;
    each followed by what Ray alone allows on this node (no goal: a bound)."""
    speed, memory = "Ray Data / featmap extract, whole process", "Ray Data peak memory / extract's"
    if measured is None or measured.skipped:
        why = "not measured" if measured is None else "could not run"
        return [Goal(speed, why, ">= 0.60", None), Goal(memory, why, "<= 3.00", None)]
    return [
        Goal(speed, f"{measured.ratio:.2f}", ">= 0.60", measured.ratio >= 0.6),
        Goal(
            f"  at most, given Ray alone ({RAY_FLOOR_NAME})",
            f"{measured.bound:.2f}",
            "(bound)",
            None,
        ),
        Goal(memory, f"{measured.memory_ratio:.2f}", "<= 3.00", measured.memory_ratio <= 3.0),
        Goal(
            f"  at least, given Ray alone ({RAY_FLOOR_NAME})",
            f"{measured.floor_memory_ratio:.2f}",
            "(bound)",
            None,
        ),
    ]


RATIO_FOOTNOTE = (
    "ratio: this row's images/s divided by the images/s of its baseline (the row named under\n"
    "'vs') measured in the same round, seconds apart; the median over alternating rounds. It is\n"
    "not images/s divided by the baseline row's images/s, which is the median of all rounds:\n"
    "on a shared machine the baseline drifts between rounds, and only neighbours compare.\n"
    "The job rows' baseline is the ceiling: onnxruntime on the images already decoded; the\n"
    "array job rows', plain onnxruntime on featmap's exported model over the same array: a\n"
    "script run start to exit (whole process), or in this process (steady state)."
)


@dataclass
class Report:
    """All measurements of one run."""

    rows: list[Row] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)
    rss: list[tuple[int, int]] = field(default_factory=list)  # (images, peak RSS bytes)
    job_peak: dict[str, int] = field(default_factory=dict)  # the job's peak RSS by path
    skipped: list[str] = field(default_factory=list)  # rows not measured, and why
    ray: RayBench | None = None  # the Ray Data row's measurements (--ray)

    def row(self, part: str) -> Row | None:
        """The first row whose path has `part` in it."""
        return next((row for row in self.rows if part in row.path), None)

    def goals(self) -> list[Goal]:
        """The issue's goals table, filled in from this run."""

        def ratio(label: str, part: str, goal: float) -> Goal:
            row = self.row(part)
            if row is None or not math.isfinite(row.ratio):
                return Goal(label, "not measured", f">= {goal:.2f}", None)
            return Goal(label, f"{row.ratio:.2f}", f">= {goal:.2f}", row.ratio >= goal)

        def bound(label: str, part: str) -> Goal:
            row = self.row(part)
            now = "not measured" if row is None else f"{row.ratio:.2f}"
            return Goal(label, now, "(bound)", None)

        def ratio_of(label: str, part: str, base: str, goal: float) -> Goal:
            row, baseline = self.row(part), self.row(base)
            if row is None or baseline is None or not math.isfinite(row.ratio / baseline.ratio):
                return Goal(label, "not measured", f"> {goal:.2f}", None)
            value = row.ratio / baseline.ratio  # both against the ceiling of their rounds
            return Goal(label, f"{value:.2f}", f"> {goal:.2f}", value > goal)

        goals = [
            ratio("featmap extract embedded, folder of JPEGs / ceiling", JOB_EMBEDDED, 0.90),
            ratio_of("featmap extract embedded / hand-written loop", JOB_EMBEDDED, HAND_LOOP, 1.0),
        ]
        peak = self.job_peak.get("embedded")
        goals.append(
            Goal(
                "featmap extract embedded peak RSS, batches of 32",
                "not measured" if peak is None else f"{peak / 2**20:.0f} MiB",
                f"< {JOB_PEAK_MIB} MiB",
                None if peak is None else peak < JOB_PEAK_MIB * 2**20,
            )
        )
        goals += [
            ratio("featmap extract --server on 127.0.0.1 / ceiling", JOB_REMOTE, 0.85),
            ratio("array job embedded / plain onnxruntime, whole process", ARRAY_EMBEDDED, 0.80),
            bound("  at most, given its dependencies (no featmap code)", FLOOR_ROW),
            ratio("array job --server / plain onnxruntime, whole process", ARRAY_REMOTE, 0.80),
            bound("  at most, given the transfer (1x1 filters)", TRANSFER_ROW),
            ratio("  on its Unix socket, --shared-memory", SHARED_ARRAY_ROW, 0.80),
            bound("    at most, given the transfer (1x1 filters)", SHARED_TRANSFER_ROW),
            ratio("unary float32 / in-process", UNARY_ROW, 0.85),
            ratio("stream float32 / in-process", STREAM_ROW, 0.95),
            ratio("32 single-image clients / in-process batch", CLIENTS_ROW, 0.85),
            ratio("stock tritonclient -> our OIP endpoint / in-process", TRITON_ROW, 0.75),
            int8_goal(self.row("onnxruntime in-process int8")),
        ]
        overhead, echo = self.latency.get(OVERHEAD_P50), self.latency.get(ECHO_P50)
        goals.append(
            Goal(
                "small request p50 overhead / gRPC echo floor p50",
                "not measured" if overhead is None or not echo else f"{overhead:.2f}/{echo:.2f} ms",
                f"<= {OVERHEAD_PER_ECHO:.1f}x",
                None if overhead is None or not echo else overhead <= OVERHEAD_PER_ECHO * echo,
            )
        )
        goals += ray_goals(self.ray)
        if len(self.rss) == 2:
            (few, low), (many, high) = self.rss
            growth = (high - low) / 2**20
            goals.append(
                Goal(
                    f"featmap extract peak RSS, {few} vs {many} images",
                    f"{low / 2**20:.0f} vs {high / 2**20:.0f} MiB",
                    "flat",
                    growth <= RSS_FLAT_MIB,
                )
            )
        else:
            goals.append(Goal("featmap extract peak RSS", "not measured", "flat", None))
        return goals

    def table(self) -> str:
        """The report as plain-text tables: every row, latency, peak RSS, then the goals."""
        lines = [f"{'path':<58} {'images/s':>9} {'ratio':>6}  {'vs':<30} note"]
        for row in self.rows:
            lines.append(
                f"{row.path:<58} {row.images_per_s:>9.1f} {row.ratio:>6.3f}  "
                f"{row.baseline or '(baseline)':<30} {row.note}"
            )
        lines += ["", RATIO_FOOTNOTE]
        if self.latency:
            lines += ["", "small requests (1x3x64x64), milliseconds:"]
            lines += [f"  {key:<40} {value:>8.3f}" for key, value in self.latency.items()]
        if self.rss:
            lines += [
                "",
                "peak RSS of featmap extract (embedded, 64x64 JPEGs, --checkpoint-after 0):",
            ]
            lines += [f"  {n:>7} images  {rss / 2**20:>8.1f} MiB" for n, rss in self.rss]
        if self.skipped:
            lines += ["", "not measured:"] + [f"  {reason}" for reason in self.skipped]
        lines += ["", f"{'goal':<58} {'now':>16} {'goal':>10}  met"]
        for goal in self.goals():
            met = "-" if goal.met is None else ("yes" if goal.met else "NO")
            lines.append(f"{goal.path:<58} {goal.now:>16} {goal.goal:>10}  {met}")
        return "\n".join(lines)


ECHO_METHOD = "/featmap.bench.Echo/Echo"
# A gRPC Python server in its own process that answers every call with a few bytes and does
# nothing else: the floor under any Python gRPC service's latency on this machine.
ECHO_SERVER = """
import sys, threading
from concurrent import futures
import grpc
handler = grpc.method_handlers_generic_handler(
    "featmap.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda r, c: r[:64])}
)
server = grpc.server(futures.ThreadPoolExecutor(8))
server.add_generic_rpc_handlers((handler,))
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
sys.stdin.read()
"""


@contextmanager
def echo_server() -> Iterator[str]:
    """The echo server as a child process (it stops when its stdin closes); its address."""
    child = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdout is not None and child.stdin is not None
    try:
        yield f"127.0.0.1:{int(child.stdout.readline())}"
    finally:
        child.stdin.close()
        child.stdout.close()
        child.wait(timeout=30)


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
            while True:  # at least one request each, however short `seconds`
                fc.extract(image, pipeline_id)
                counts[index] += 1
                if time.perf_counter() >= stop:
                    break

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


TRITON_SCRIPT = """
import sys, time
import numpy as np
import tritonclient.grpc as tc

url, model, batch, size, seconds = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
batch, size = int(batch), int(size)
client = tc.InferenceServerClient(url)
images = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)

def infer():
    # As a user does for each batch: the data set anew, then the call.
    tensor = tc.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor]).as_numpy("features")

infer()
done, start = 0, time.perf_counter()
while True:
    infer()
    done += batch
    if time.perf_counter() - start >= seconds:
        break
print(done / (time.perf_counter() - start))
"""


def tritonclient_python() -> Path | None:
    """A Python with tritonclient[grpc] (FEATMAP_TRITONCLIENT_PYTHON, else /tmp/tc), if any."""
    python = Path(os.environ.get(TRITONCLIENT_ENV, DEFAULT_TRITONCLIENT_PYTHON))
    if not python.exists():
        return None
    probe = subprocess.run([str(python), "-c", "import tritonclient.grpc"], capture_output=True)
    return python if probe.returncode == 0 else None


def tritonclient_rate(
    python: Path, address: str, model: str, batch: int, size: int, seconds: float
) -> float:
    """images/s of the stock tritonclient.grpc client, in its own venv and process."""
    done = subprocess.run(
        [str(python), "-c", TRITON_SCRIPT, address, model, str(batch), str(size), str(seconds)],
        capture_output=True,
        text=True,
        timeout=120 + 10 * seconds,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"tritonclient failed: {done.stderr.strip()[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def run_bench(
    *,
    threads: int,
    batch: int = 32,
    size: int = 224,
    seconds: float = 5.0,
    clients: int = 32,
    latency_requests: int = 300,
    rounds: int = 3,
    service: bool = True,
    job: bool = True,
    job_folder: Path | None = None,
    job_images: int = 1536,
    array_images: int = 10_000,
    rss_images: tuple[int, int] | None = (1000, 20000),
    int8: bool = True,
    ray: bool = False,
    log: Callable[[str], None] = print,
) -> Report:
    """Measure every path; see the module docstring. `service`, `job`, `int8` and `ray`
    choose sections (int8: the standard pipeline in int8 against float32, jobs/bench_int8.py;
    ray: the README's Ray Data example against `featmap extract`, jobs/bench_ray.py)."""
    report = Report()
    if service:
        service_rows(report, threads, batch, size, seconds, clients, latency_requests, rounds, log)
    if int8:
        from .bench_int8 import run_int8_bench

        try:
            report.rows += run_int8_bench(
                threads=threads,
                batch=batch,
                size=size,
                seconds=seconds,
                job_images=job_images,
                rounds=rounds,
                log=log,
            )
        except FeatmapError as exc:  # e.g. int8 refused for its measured error on this CPU
            report.skipped.append(f"int8 rows: {exc}")
    if job:
        from .bench_job import run_job_bench

        pipeline = parse_pipeline(standard_spec("float32"))
        measured = run_job_bench(
            pipeline,
            threads=threads,
            batch=batch,
            size=size,
            folder=job_folder,
            images=job_images,
            rounds=rounds,
            rss_images=rss_images,
            server=lambda: server_process(threads),
            log=log,
        )
        ceiling = f"onnxruntime in-process, decoded {size}x{size} (ceiling)"
        note = f"batch {batch}, {threads} threads, best of spinning on/off"
        report.rows.append(Row(ceiling, measured.ceiling, 1.0, note))
        for path, images_per_s, ratio, note in measured.rows:
            report.rows.append(Row(path, images_per_s, ratio, note, "ceiling"))
        report.rss = measured.rss
        report.job_peak = measured.peak
        if array_images:
            from .bench_job import run_array_bench

            arrays = run_array_bench(
                threads=threads,
                batch=batch,
                images=array_images,
                rounds=max(rounds, ARRAY_ROUNDS),
                server=lambda socket_path: server_process(threads, socket_path),
                log=log,
            )
            shape = f"{array_images}x1x28x28 uint8 array"
            note = f"batch {batch}, {threads} threads"
            plain = f"plain onnxruntime, whole process, {shape}"
            report.rows.append(Row(plain, arrays.plain, 1.0, f"{note}, features saved as .npy"))
            in_process = f"onnxruntime in-process, {shape}"
            report.rows.append(Row(in_process, arrays.ceiling, 1.0, f"{note}, spinning on/off"))
            for path, images_per_s, ratio, baseline, note in arrays.rows:
                report.rows.append(Row(path, images_per_s, ratio, note, baseline))
    if ray:
        ray_rows(report, threads, batch, size, job_images, rounds, log)
    return report


def ray_rows(
    report: Report,
    threads: int,
    batch: int,
    size: int,
    images: int,
    rounds: int,
    log: Callable[[str], None],
) -> None:
    """The README's Ray Data example and `featmap extract`, whole process, on a local Ray."""
    from .bench_ray import run_ray_bench

    measured = run_ray_bench(
        parse_pipeline(standard_spec("float32")),
        threads=threads,
        batch=batch,
        size=size,
        images=images,
        rounds=rounds,
        log=log,
    )
    report.ray = measured
    if measured.skipped:
        report.skipped.append(f"{RAY_ROW}: {measured.skipped}")
        return
    files = f"{images} {size}x{size} JPEGs"
    note = f"{files}, embedded, whole process; peak memory {measured.extract_peak / 2**20:.0f} MiB"
    report.rows.append(Row(RAY_BASELINE, measured.extract_rate, 1.0, note))
    note = (
        f"{files}; peak memory {measured.ray_peak / 2**20:.0f} MiB in "
        f"{measured.processes} processes; {measured.features}"
    )
    report.rows.append(Row(RAY_ROW, measured.ray_rate, measured.ratio, note, RAY_BASELINE))
    cpu = statistics.median(floor_cpu for *_, floor_cpu in measured.floors)
    floor_rate = statistics.median(images / floor for _, _, floor, _ in measured.floors)
    note = (
        f"{files}, no featmap; peak memory {measured.floor_peak / 2**20:.0f} MiB; "
        f"{cpu:.1f} CPU-s (median); bounds the row above"
    )
    report.rows.append(Row(RAY_FLOOR_ROW, floor_rate, measured.floor_ratio, note, RAY_BASELINE))


def service_rows(
    report: Report,
    threads: int,
    batch: int,
    size: int,
    seconds: float,
    clients: int,
    latency_requests: int,
    rounds: int,
    log: Callable[[str], None],
) -> None:
    """The service's paths against onnxruntime in-process with the server's thread settings."""
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

    float_base, uint8_base = "in-process float32", "in-process uint8"
    base = rate(batch, in_process, seconds)
    report.rows.append(Row(f"onnxruntime {float_base}", base, 1.0, f"batch {batch}"))
    base_u8 = rate(batch, in_process_u8, seconds)
    report.rows.append(Row(f"onnxruntime {uint8_base}", base_u8, 1.0, f"batch {batch}"))

    def add(path: str, measured: tuple[float, float], baseline: str, note: str = "") -> None:
        report.rows.append(Row(path, *measured, note, baseline))

    with (
        tempfile.TemporaryDirectory(prefix="featmap-bench-") as socket_dir,
        server_process(threads, socket_path := os.path.join(socket_dir, "featmap.sock")) as address,
        FeatureClient(address) as fc,
    ):
        fc.wait_ready(30)
        float_id = fc.register(float_pipeline)
        uint8_id = fc.register(uint8_pipeline)

        log("unary, stream, uint8, shared memory...")
        unary = compare(batch, lambda: fc.extract(images, float_id), in_process, seconds, rounds)
        add(UNARY_ROW, unary, float_base)
        chunks_per_job = 8

        def stream_job() -> None:
            for _ in fc.extract_stream((images for _ in range(chunks_per_job)), float_id):
                pass

        stream = compare(
            batch * chunks_per_job, stream_job, in_process, seconds, rounds, baseline_images=batch
        )
        add(STREAM_ROW, stream, float_base, f"{chunks_per_job} chunks a stream")
        uint8 = compare(
            batch, lambda: fc.extract(images_u8, uint8_id), in_process_u8, seconds, rounds
        )
        add("featmap unary uint8", uint8, uint8_base)
        with FeatureClient(f"unix:{socket_path}", shared_memory=True) as shared:
            shm = compare(
                batch, lambda: shared.extract(images, float_id), in_process, seconds, rounds
            )
        add("featmap shared memory float32", shm, float_base)

        python = tritonclient_python()
        if python is None:
            report.skipped.append(
                f"{TRITON_ROW}: no Python with tritonclient[grpc] at ${TRITONCLIENT_ENV} or "
                f"{DEFAULT_TRITONCLIENT_PYTHON} (python3 -m venv /tmp/tc && "
                "/tmp/tc/bin/pip install 'tritonclient[grpc]')"
            )
        else:
            log("stock tritonclient against the OIP endpoint...")
            triton_rates, triton_ratios = [], []
            for _ in range(rounds):
                baseline = rate(batch, in_process, seconds / (2 * rounds))
                measured = tritonclient_rate(
                    python, address, float_id, batch, size, seconds / (2 * rounds)
                )
                triton_rates.append(measured)
                triton_ratios.append(measured / baseline)
            add(
                f"{TRITON_ROW} (OIP ModelInfer)",
                (statistics.median(triton_rates), statistics.median(triton_ratios)),
                float_base,
                "tritonclient.grpc in its own venv",
            )

        log(f"{clients} concurrent single-image clients...")
        one = images[:1]
        for enabled in (True, False):
            pipeline_id = fc.register(
                float_pipeline,
                batching={"enabled": enabled, "max_batch_size": clients, "max_queue_delay_us": 0},
            )
            concurrent, ratios = [], []
            for _ in range(max(2, rounds - 1)):
                baseline = rate(batch, in_process, seconds / 4)
                concurrent.append(concurrent_rate(address, pipeline_id, one, clients, seconds / 4))
                ratios.append(concurrent[-1] / baseline)
            label = "on" if enabled else "off"
            add(
                f"featmap {clients} clients {CLIENTS_ROW.removesuffix(' on')} {label}",
                (statistics.median(concurrent), statistics.median(ratios)),
                f"{float_base} batch {batch}",
            )

        log("small-request latency...")
        small = rng.random((1, 3, 64, 64), dtype=np.float32)
        in_process_ms, service_ms, echo_ms = [], [], []
        with echo_server() as echo_address, grpc.insecure_channel(echo_address) as channel:
            echo = channel.unary_unary(ECHO_METHOD)
            payload = request_for(small, float_id, "float32").serialize()
            for _ in range(20):
                session.run(None, {INPUT_NAME: small})
                fc.extract(small, float_id)
                echo(payload)
            for _ in range(latency_requests):
                start = time.perf_counter()
                session.run(None, {INPUT_NAME: small})
                in_process_ms.append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                fc.extract(small, float_id)
                service_ms.append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                echo(payload)
                echo_ms.append((time.perf_counter() - start) * 1e3)
        report.latency = {
            ECHO_P50: percentile(echo_ms, 50),
            "in-process p50": percentile(in_process_ms, 50),
            "in-process p99": percentile(in_process_ms, 99),
            "featmap p50": percentile(service_ms, 50),
            "featmap p99": percentile(service_ms, 99),
            OVERHEAD_P50: percentile(service_ms, 50) - percentile(in_process_ms, 50),
            "overhead p99 (featmap - in-process)": percentile(service_ms, 99)
            - percentile(in_process_ms, 99),
        }

    log("NumPy reference...")
    few = images[:2]
    numpy_rate = rate(len(few), lambda: reference_outputs(float_pipeline, few), 0, warmup=0)
    report.rows.append(
        Row("NumPy reference (for scale)", numpy_rate, numpy_rate / base, "2 images", float_base)
    )


def default_threads() -> int:
    """One intra-op thread per core (this machine's)."""
    return os.cpu_count() or 1
