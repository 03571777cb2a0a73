"""int8 rows for `featmap bench`: the standard pipeline quantized, against float32.

In this process (onnxruntime on the session the server's cache builds for int8), through a
`featmap serve` child (unary and stream), and as a `featmap extract` job over JPEG files; each
timed in alternating rounds against its float32 counterpart (jobs/bench_base.py: compare), with what
the CPU offers for int8 in the first row's note.
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..client.client import FeatureClient
from ..contract.spec import parse_pipeline
from ..service.graph import INPUT_NAME
from ..service.int8 import cpu_int8_support, has_int8_dot_products, weight_bits_for
from ..service.runtime import CPU, SessionCache
from .bench_base import (
    Row,
    compare,
    in_process_session,
    server_process,
    standard_spec,
)
from .bench_job import generated_jpegs, run_job

# Streams of this many batches, as the float32 stream row.
CHUNKS_PER_STREAM = 8


def job_rows(
    threads: int, batch: int, size: int, images: int, log: Callable[[str], None], rounds: int = 3
) -> list[Row]:
    """`featmap extract --precision int8` over `images` JPEGs (the job bench's), first run (an
    empty cache: calibration and quantization paid) and repeat run (the cache warm), each
    against the float32 job: wall-time ratios, process start included, medians over
    alternating rounds."""
    log(f"int8: featmap extract on {images} JPEGs {size}x{size}, int8 against float32...")
    folder = generated_jpegs(images, size)
    with tempfile.TemporaryDirectory(prefix="featmap-bench-int8-job-") as scratch:
        where = Path(scratch)
        spec = where / "spec.json"
        spec.write_text(parse_pipeline(standard_spec()).model_dump_json())
        fresh = itertools.count()

        def job(precision: str, cache: Callable[[], list[str]] = list) -> Callable[[], float]:
            arguments = ["--pipeline", str(spec), "--input", str(folder), "--threads", str(threads)]
            arguments += ["--batch-size", str(batch), "--precision", precision]
            arguments += ["--output", str(where / f"{precision}.npz")]
            return lambda: run_job([*arguments, *cache()]).seconds

        jobs = {
            "float32": job("float32"),
            # A first run: an empty cache folder each time.
            "first": job("int8", lambda: ["--cache-dir", str(where / f"empty-{next(fresh)}")]),
            "cached": job("int8", lambda: ["--cache-dir", str(where / "warm")]),
        }
        for each in jobs.values():  # the file cache, and the warm int8 cache
            each()
        seconds: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(rounds):
            for name, each in jobs.items():
                seconds[name].append(each())
    float_s = statistics.median(seconds["float32"])
    note = f"{images} JPEGs {size}x{size}, whole process; CPU int8: {cpu_int8_support()}"
    return [
        Row(
            f"featmap extract int8 (embedded job, {label})",
            images / statistics.median(seconds[name]),
            statistics.median(
                base / each for base, each in zip(seconds["float32"], seconds[name], strict=True)
            ),
            f"{note}; median {statistics.median(seconds[name]):.1f} s vs {float_s:.1f} s",
            "the float32 job",
        )
        for name, label in (("first", "first run"), ("cached", "repeat, cache warm"))
    ]


def run_int8_bench(
    *,
    threads: int,
    batch: int = 32,
    size: int = 224,
    seconds: float = 5.0,
    job_images: int = 1536,
    rounds: int = 3,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Rows for the standard pipeline in int8, each with its ratio to float32: in-process (vs
    in-process float32), unary and stream through a server (vs in-process float32), and a
    `featmap extract` job of `job_images` JPEGs, first run and repeat (vs the same job in
    float32)."""
    cpu = cpu_int8_support()
    log(f"int8: CPU int8 dot products: {cpu}; quantizing the standard pipeline...")
    float_pipeline = parse_pipeline(standard_spec())
    int8_pipeline = float_pipeline.with_precision("int8")
    images = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    float_session = in_process_session(float_pipeline, threads)
    # The session the server's cache builds for int8 (CPU provider, the same thread options).
    int8_session = SessionCache(1, [CPU], threads).compile(int8_pipeline).session

    def in_process_float32() -> Any:
        return float_session.run(None, {INPUT_NAME: images})

    def in_process_int8() -> Any:
        return int8_session.run(None, {INPUT_NAME: images})

    bits = weight_bits_for(cpu)
    without = (
        f", {bits}-bit weights"
        if has_int8_dot_products(cpu)
        else f", {bits}-bit weights (no int8 dot products here: the ratio says what int8 gives)"
    )
    rows = [
        Row(
            "onnxruntime in-process int8",
            *compare(batch, in_process_int8, in_process_float32, seconds),
            f"CPU int8: {cpu}{without}",
            "in-process float32",
        )
    ]

    log("int8: unary and stream through featmap serve...")
    with (
        tempfile.TemporaryDirectory(prefix="featmap-bench-int8-") as scratch,
        server_process(threads, os.path.join(scratch, "featmap.sock")) as address,
        FeatureClient(address) as fc,
    ):
        fc.wait_ready(30)
        int8_id = fc.register(int8_pipeline)
        unary = compare(batch, lambda: fc.extract(images, int8_id), in_process_float32, seconds)
        rows.append(Row("featmap unary int8", *unary, "", "in-process float32"))

        def stream_job() -> None:
            for _ in fc.extract_stream((images for _ in range(CHUNKS_PER_STREAM)), int8_id):
                pass

        stream = compare(
            batch * CHUNKS_PER_STREAM,
            stream_job,
            in_process_float32,
            seconds,
            baseline_images=batch,
        )
        rows.append(
            Row(
                "featmap stream int8",
                *stream,
                f"{CHUNKS_PER_STREAM} chunks a stream",
                "in-process float32",
            )
        )

    rows += job_rows(threads, batch, size, job_images, log, rounds)
    return rows
