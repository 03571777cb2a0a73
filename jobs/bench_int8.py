"""int8 rows for `featmap bench`: the standard pipeline quantized, against float32.

In this process (onnxruntime on the session the server's cache builds for int8), through a
`featmap serve` child (unary and stream), and as a `featmap extract` job over JPEG files; each
timed in alternating rounds against its float32 counterpart (jobs/bench_base.py: compare), with what
the CPU offers for int8 in the first row's note.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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

# Streams of this many batches, as the float32 stream row.
CHUNKS_PER_STREAM = 8


def write_jpegs(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """`count` size x size RGB JPEGs: smooth colour fields with noise, like photographs."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for index in range(count):
        colours = rng.random((3, 3), dtype=np.float32)
        field = colours[0] * ramp[:, None, None] + colours[1] * ramp[None, :, None]
        noise = rng.normal(0, 0.08, (size, size, 3)).astype(np.float32)
        pixels = np.clip((field / 2 + colours[2] / 2 + noise) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"image{index:05d}.jpg", quality=90)


def extract_job(
    folder: Path, output: Path, threads: int, batch: int, precision: str
) -> Callable[[], None]:
    """One `featmap extract` run over `folder` in a fresh process (embedded, the default
    calibration for int8), as a callable."""
    spec = output.with_suffix(".json")
    spec.write_text(parse_pipeline(standard_spec()).model_dump_json())
    command = [sys.executable, "-m", "featmap.jobs.cli", "extract", "--pipeline", str(spec)]
    command += ["--input", str(folder), "--output", str(output), "--quiet"]
    command += ["--threads", str(threads), "--batch-size", str(batch), "--precision", precision]

    def run() -> None:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

    return run


def run_int8_bench(
    *,
    threads: int,
    batch: int = 32,
    size: int = 224,
    seconds: float = 5.0,
    job_images: int = 512,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Rows for the standard pipeline in int8, each with its ratio to float32: in-process (vs
    in-process float32), unary and stream through a server (vs in-process float32), and a
    `featmap extract` job of `job_images` JPEGs (vs the same job in float32)."""
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

    log(f"int8: featmap extract on {job_images} JPEGs, int8 against float32...")
    with tempfile.TemporaryDirectory(prefix="featmap-bench-int8-job-") as scratch:
        folder = Path(scratch) / "images"
        folder.mkdir()
        write_jpegs(folder, job_images, size)
        int8_job = extract_job(folder, Path(scratch) / "int8.npz", threads, batch, "int8")
        float_job = extract_job(folder, Path(scratch) / "float32.npz", threads, batch, "float32")
        # A job is seconds long: one per side and round, after one to warm the file cache.
        job = compare(job_images, int8_job, float_job, 0, rounds=2)
        rows.append(
            Row(
                "featmap extract int8 (embedded job)",
                *job,
                f"{job_images} JPEGs {size}x{size}, decode and startup included",
                "the float32 job",
            )
        )
    return rows
