"""`featmap bench --job`: the batch job's images/s against onnxruntime on decoded tensors.

The ceiling is onnxruntime in this process on tensors decoded beforehand, batch after batch,
with onnxruntime's settings but the thread count (the faster of spinning on and off). The job
rows run `featmap extract` as a user does, as child processes, over a folder of JPEG files;
process start, imports and session build are excluded by differencing two job sizes:
(N - n) / (t(N) - t(n)) for the folder's first n and all N images. The hand-written loop is
what a user would write without featmap: decode with Pillow, stack, /255, session.run, one
batch after another.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import yaml
from PIL import Image

from ..contract.limits import images_per_run
from ..contract.ops import layer_costs
from ..contract.spec import Pipeline
from ..contract.tensors import reply_bytes
from ..service.graph import INPUT_NAME, compile_pipeline
from .images import find_files
from .parts import HELD_BYTES

FEATMAP = [sys.executable, "-m", "featmap.jobs.cli"]
JPEG_QUALITY = 90


def natural_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8: smooth colour fields plus grain, so JPEGs compress like photos."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    grain = rng.normal(0.0, 12.0, (size, size, 3))
    return np.clip(np.asarray(smooth, dtype=np.float64) + grain, 0, 255).astype(np.uint8)


def generated_jpegs(count: int, size: int) -> Path:
    """A folder of `count` JPEGs of size x size, made once and kept in the temp folder."""
    folder = Path(tempfile.gettempdir()) / f"featmap-bench-jpegs-{size}-{count}"
    done = folder / ".complete"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for index in range(count):
            image = Image.fromarray(natural_image(rng, size), "RGB")
            image.save(folder / f"{index:06d}.jpg", quality=JPEG_QUALITY)
        done.touch()
    return folder


def first_files(files: Sequence[str], count: int, where: Path) -> Path:
    """A folder of links to the first `count` files (the smaller job of a difference)."""
    where.mkdir(parents=True, exist_ok=True)
    for index, file in enumerate(files[:count]):
        link = where / f"{index:06d}{Path(file).suffix}"
        if not link.exists():
            link.symlink_to(Path(file).resolve())
    return where


@dataclass(frozen=True)
class JobRun:
    """One `featmap extract` child: its wall time and its peak resident memory."""

    seconds: float
    peak_rss_bytes: int


# Runs a command and reports its wall time and peak RSS. A child's ru_maxrss counts the memory
# of the process it was forked from (the exec inherits the high-water mark), so the job is
# started by this small launcher instead of by the bench with its decoded images and sessions.
LAUNCHER = """
import resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
seconds = time.perf_counter() - started
sys.stderr.buffer.write(done.stderr)
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(done.returncode)
"""


def run_job(arguments: list[str]) -> JobRun:
    """Run `featmap extract ARGUMENTS` to its end; JobRun, or RuntimeError with its stderr."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LAUNCHER, *FEATMAP, "extract", *arguments, "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"featmap extract exited {done.returncode}: {done.stderr.strip()}")
    seconds, kilobytes = done.stdout.split()
    return JobRun(float(seconds), int(kilobytes) * 1024)  # Linux reports kilobytes


@dataclass(frozen=True)
class JobFolders:
    """The job's folder and a folder of its first images, for the difference of two sizes."""

    large: Path
    large_count: int
    small: Path
    small_count: int


def job_rate(folders: JobFolders, arguments: Callable[[Path], list[str]]) -> tuple[float, int]:
    """(images/s of the job without its fixed costs, peak RSS of the larger job).

    The smaller job runs before and after the larger one, and the faster of the two counts:
    the first job after other processes freed a lot of memory can spend seconds in page faults
    (here, a VM: the host takes freed pages back; measured 5 s of system time for 850 MB),
    a cost of the machine's recent past that the larger job, run right after, does not pay.
    """
    before = run_job(arguments(folders.small))
    large = run_job(arguments(folders.large))
    after = run_job(arguments(folders.small))
    small_seconds = min(before.seconds, after.seconds)
    images, seconds = folders.large_count - folders.small_count, large.seconds - small_seconds
    # A difference lost in the noise of process start (too few images) measures nothing.
    rate = images / seconds if seconds > 0.05 * large.seconds else math.nan
    return rate, large.peak_rss_bytes


def ceiling_sessions(pipeline: Pipeline, threads: int) -> list[ort.InferenceSession]:
    """onnxruntime as a user builds it, with `threads` intra-op threads: spinning on (its
    default) and off, since which is faster depends on the machine's other load."""
    model = compile_pipeline(pipeline).SerializeToString()
    sessions = []
    for spinning in ("1", "0"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        sessions.append(ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]))
    return sessions


def decode_batch(files: Sequence[str], size: int | None) -> np.ndarray:
    """What a user writes: Pillow decode, (resize), stack, NCHW, / 255 as float32."""
    pixels = []
    for file in files:
        with Image.open(file) as image:
            rgb = image.convert("RGB")
        if size is not None:
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        pixels.append(np.asarray(rgb))
    stacked = np.stack(pixels).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(stacked / np.float32(255), dtype=np.float32)


def batches_of(files: Sequence[str], batch: int) -> Iterator[Sequence[str]]:
    """Consecutive slices of `batch` files."""
    for start in range(0, len(files), batch):
        yield files[start : start + batch]


def ceiling_rate(
    sessions: Sequence[ort.InferenceSession], decoded: list[np.ndarray], images: int
) -> float:
    """images/s of session.run over decoded batches, cycled to `images` images; the best of
    the sessions (each runs half of them)."""
    rates = []
    for session in sessions:
        session.run(None, {INPUT_NAME: decoded[0]})
        done, started = 0, time.perf_counter()
        while done < images // len(sessions):
            batch = decoded[(done // len(decoded[0])) % len(decoded)]
            session.run(None, {INPUT_NAME: batch})
            done += len(batch)
        rates.append(done / (time.perf_counter() - started))
    return max(rates)


def hand_loop_rate(
    session: ort.InferenceSession, files: Sequence[str], batch: int, size: int | None
) -> float:
    """images/s of decoding and running batch after batch, as a user would write it."""
    started = time.perf_counter()
    for chunk in batches_of(files, batch):
        session.run(None, {INPUT_NAME: decode_batch(chunk, size)})
    return len(files) / (time.perf_counter() - started)


@dataclass
class JobBench:
    """The job section's measurements: medians over alternating rounds."""

    ceiling: float
    rows: list[tuple[str, float, float, str]]  # path, images/s, ratio to the ceiling, note
    rss: list[tuple[int, int]]  # (images, peak RSS bytes) of the embedded job on small JPEGs
    peak: dict[str, int]  # "embedded", "remote": the job's peak RSS (bytes) on the folder


def job_folders(folder: Path | None, images: int, size: int, where: Path) -> JobFolders:
    """The job's images (a given folder, or `images` generated JPEGs) and its first quarter."""
    source = folder if folder is not None else generated_jpegs(images, size)
    files = find_files([source])
    if len(files) < 6:
        raise ValueError(f"{source}: {len(files)} image files; the job bench needs 6 or more")
    small = len(files) // 4
    return JobFolders(source, len(files), first_files(files, small, where / "first"), small)


def run_job_bench(
    pipeline: Pipeline,
    *,
    threads: int,
    batch: int,
    size: int,
    folder: Path | None = None,
    images: int = 1536,
    rounds: int = 3,
    rss_images: tuple[int, int] | None = (1000, 20000),
    rss_size: int = 64,
    server: Callable[[], Any],
    log: Callable[[str], None] = print,
) -> JobBench:
    """Ceiling, hand-written loop, `featmap extract` embedded and remote, and peak RSS.

    Each path is measured right after a ceiling measurement, round after round; a path's
    ratio is the median of its ratios to the ceiling of its own round. `server` is a context
    manager factory that yields a `featmap serve` address (bench.server_process).
    """
    with tempfile.TemporaryDirectory(prefix="featmap-bench-job-") as scratch:
        work = Path(scratch)
        spec_path = work / "pipeline.yaml"
        spec_path.write_text(yaml.safe_dump(pipeline.model_dump(mode="json")))
        folders = job_folders(folder, images, size, work)
        # A folder of the user's may hold any sizes: the job resizes them, as the hand loop.
        resize = None if folder is None else size
        files = find_files([folders.large])
        sessions = ceiling_sessions(pipeline, threads)
        decoded = [decode_batch(chunk, resize) for chunk in batches_of(files[: 4 * batch], batch)]
        decoded = [chunk for chunk in decoded if len(chunk) == batch] or decoded

        def arguments(source: Path, *extra: str) -> list[str]:
            common = ["--pipeline", str(spec_path), "--input", str(source)]
            common += ["--output", str(work / "features.npz"), "--batch-size", str(batch)]
            common += ["--resize", f"{resize}x{resize}"] if resize else []
            return [*common, *extra]

        ceilings: list[float] = []
        measured: dict[str, list[tuple[float, float]]] = {"hand": [], "embedded": [], "remote": []}
        peak: dict[str, int] = {}
        with server() as address:
            # The server compiles the pipeline at its first request: not part of any timing.
            run_job(arguments(folders.small, "--server", address))
            for index in range(rounds):
                log(f"job round {index + 1} of {rounds}...")
                for path in measured:
                    ceiling = ceiling_rate(sessions, decoded, folders.large_count // 2)
                    ceilings.append(ceiling)
                    if path == "hand":
                        rate = hand_loop_rate(sessions[0], files, batch, resize)
                    elif path == "embedded":
                        rate, peak[path] = job_rate(
                            folders, lambda source: arguments(source, "--threads", str(threads))
                        )
                    else:
                        rate, peak[path] = job_rate(
                            folders, lambda source: arguments(source, "--server", address)
                        )
                    measured[path].append((rate, rate / ceiling))
        count = folders.large_count
        labels = {
            "hand": f"hand-written loop (Pillow, stack, /255, run), {count} files",
            "embedded": f"featmap extract, embedded, {count} files",
            "remote": f"featmap extract --server 127.0.0.1, {count} files sent encoded",
        }
        rows = []
        for path, values in measured.items():
            note = f"peak RSS {peak[path] / 2**20:.0f} MiB" if path in peak else "in this process"
            # A round whose difference drowned in noise measured nothing: left out.
            kept = [(rate, ratio) for rate, ratio in values if math.isfinite(rate)]
            if len(kept) < len(values):
                note += f"; {len(values) - len(kept)} of {len(values)} rounds lost in noise"
            rate = statistics.median(rate for rate, _ in kept) if kept else math.nan
            ratio = statistics.median(ratio for _, ratio in kept) if kept else math.nan
            rows.append((labels[path], rate, ratio, note))
        rss = []
        if rss_images:
            log(f"peak RSS of the embedded job on {rss_images} {rss_size}x{rss_size} JPEGs...")
            small_jpegs = find_files([generated_jpegs(max(rss_images), rss_size)])
            for count in rss_images:
                source = first_files(small_jpegs, count, work / f"rss-{count}")
                job = run_job(
                    [
                        "--pipeline", str(spec_path), "--input", str(source),
                        "--output", str(work / "rss.npz"), "--threads", str(threads),
                        # Growth with the job's size, not the results a young job holds (at
                        # most parts.HELD_BYTES, whatever the size): every shard saved.
                        "--checkpoint-after", "0",
                    ]
                )  # fmt: skip
                rss.append((count, job.peak_rss_bytes))
    return JobBench(statistics.median(ceilings), rows, rss, peak)


# The array job's pipeline: Fashion-MNIST's shape (1x28x28 uint8) through the example's
# random-features recipe (examples/fashion_mnist): 192 5x5 filters, ReLU, 7x7 average pool,
# flattened to 3,072 features. Seeded weights: the speed is the example's.
ARRAY_SPEC: dict[str, Any] = {
    "input": {"channels": 1, "dtype": "uint8", "scale": 1 / 255},
    "layers": [
        {"op": "conv2d", "filters": 192, "kernel_size": 5, "padding": "same",
         "weights": {"init": "he_normal", "seed": 0}},
        {"op": "relu"},
        {"op": "avg_pool2d", "pool_size": 7},
        {"op": "flatten", "name": "features"},
    ],
}  # fmt: skip


# The same job with the filters cut to 1x1: 4 % of the arithmetic, the same 3,072 features a
# row. Through the server it is what reaching the server costs (the client's start, the replies
# framed, sent, received and written) plus one pass over the same activations, which the real
# job makes too: a --server job cannot be faster than its own 1x1 twin. (Plain onnxruntime on
# the 1x1 model takes about 60 % of its time on the real one: 0.50-0.61 s against 0.83-1.10 s.)
TRANSFER_SPEC: dict[str, Any] = {
    **ARRAY_SPEC,
    "layers": [{**ARRAY_SPEC["layers"][0], "kernel_size": 1}, *ARRAY_SPEC["layers"][1:]],
}
TRANSFER_ROW = "array job --server 127.0.0.1 with 1x1 filters (the transfer)"
# The same server on the same host, reached on its Unix socket with features in /dev/shm.
SHARED_ARRAY_ROW = "array job --server unix: --shared-memory"
SHARED_TRANSFER_ROW = f"{SHARED_ARRAY_ROW} with 1x1 filters (the transfer)"


def generated_array(count: int, where: Path) -> np.ndarray:
    """(count, 1, 28, 28) uint8 images, smooth shapes plus grain (as Fashion-MNIST's are
    smooth), saved as a .npy batch; the array itself is returned too."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (count, 1, 4, 4)).astype(np.float32)
    smooth = coarse.repeat(7, axis=2).repeat(7, axis=3)
    grain = rng.normal(0.0, 12.0, smooth.shape).astype(np.float32)
    images = np.clip(smooth + grain, 0, 255).astype(np.uint8)
    np.save(where, images)
    return images


# Plain onnxruntime as a user runs it over an array, as a whole process: featmap's exported
# model, the array mapped, `batch` rows at a time, the features saved as one .npy.
PLAIN_ONNXRUNTIME = """
import sys
import numpy as np
import onnxruntime as ort
model, images, output, batch, threads = sys.argv[1:]
options = ort.SessionOptions()
options.intra_op_num_threads = int(threads)
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
array = np.load(images, mmap_mode="r")
step = int(batch)
parts = [session.run(None, {name: np.ascontiguousarray(array[i:i + step])})[0]
         for i in range(0, len(array), step)]
np.save(output, np.concatenate(parts))
"""
# What the embedded job cannot beat: the same runs written the way featmap writes them (each
# batch's features straight into rows allocated up front: no arrays of onnxruntime's own, no
# concatenation; each batch in runs of `run` images, as featmap cuts it for the caches:
# contract.limits.images_per_run), plus what every embedded job does before and after any of
# featmap's own code: start its dependencies (pydantic builds its schema machinery on the
# first model; onnx builds the graph; PyYAML reads the spec) and fsync the features it wrote.
# The gap between this and the job is featmap's own code: its modules, spec, graph, checks and
# bookkeeping.
DEPENDENCY_FLOOR = """
import os
import sys
import numpy as np
import onnx, onnxruntime as ort, pydantic, yaml
class First(pydantic.BaseModel):
    value: int = 0
model, images, output, batch, threads, run = sys.argv[1:]
options = ort.SessionOptions()
options.intra_op_num_threads = int(threads)
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
name, out = session.get_inputs()[0].name, session.get_outputs()[0].name
array = np.load(images, mmap_mode="r")
step, each = int(batch), int(run)
first = session.run(None, {name: np.ascontiguousarray(array[:min(step, each)])})[0]
features = np.empty((len(array), *first.shape[1:]), np.float32)
features[:len(first)] = first
for i in range(0, len(array), step):
    piece = np.ascontiguousarray(array[i:i + step])
    for j in range(len(first) if i == 0 else 0, len(piece), each):
        rows = features[i + j:i + j + min(each, len(piece) - j)]
        binding = session.io_binding()
        binding.bind_cpu_input(name, piece[j:j + each])
        binding.bind_output(out, "cpu", 0, np.float32, list(rows.shape), rows.ctypes.data)
        session.run_with_iobinding(binding)
with open(output, "wb") as file:
    np.save(file, features)
    file.flush()
    os.fsync(file.fileno())
"""
FLOOR_ROW = "onnxruntime written in place + featmap's dependencies + fsync (the floor)"


def plain_seconds(
    model: Path,
    images: Path,
    output: Path,
    batch: int,
    threads: int,
    script: str = PLAIN_ONNXRUNTIME,
    *extra: str,
) -> float:
    """Wall time of the plain onnxruntime script (or DEPENDENCY_FLOOR, whose images a run
    come in `extra`), start to exit."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", script, str(model), str(images), str(output),
         str(batch), str(threads), *extra],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - started


@dataclass
class ArrayBench:
    """The array section: plain onnxruntime over the array, and the job rows against it."""

    plain: float  # images/s of the plain onnxruntime script, whole process
    ceiling: float  # images/s of onnxruntime in this process (no start, no output written)
    rows: list[tuple[str, float, float, str, str]]  # path, images/s, ratio, baseline, note


def run_array_bench(
    *,
    threads: int,
    batch: int,
    images: int = 10_000,
    rounds: int = 3,
    server: Callable[[str], Any],
    log: Callable[[str], None] = print,
) -> ArrayBench:
    """`featmap extract` over a (images, 1, 28, 28) uint8 .npy: embedded, --server over TCP,
    and --server on the server's Unix socket with --shared-memory (`server(socket_path)` starts
    one that serves both and yields its TCP address).

    Whole process (the goal): the job's wall time, start to exit, against a plain onnxruntime
    script's (PLAIN_ONNXRUNTIME: featmap's exported model, `batch` rows at a time, features
    saved) over the same array, run right before and right after the job (the mean of the
    two); both write their features to a .npy. Steady state: the job's rate with fixed costs
    differenced out (the array's first quarter as the smaller job), against onnxruntime in
    this process (the faster of spinning on and off), as the folder rows, measured right
    before the jobs of each round.
    """
    from ..contract.spec import parse_pipeline
    from .export_onnx import export_onnx

    pipeline = parse_pipeline(ARRAY_SPEC)
    with tempfile.TemporaryDirectory(prefix="featmap-bench-array-") as scratch:
        work = Path(scratch)
        spec_path = work / "pipeline.yaml"
        spec_path.write_text(yaml.safe_dump(pipeline.model_dump(mode="json")))
        transfer_path = work / "transfer.yaml"
        transfer_path.write_text(yaml.safe_dump(TRANSFER_SPEC))
        model = work / "model.onnx"
        export_onnx(pipeline, model)
        array = generated_array(images, work / "images.npy")
        np.save(work / "first.npy", array[: images // 4])
        folders = JobFolders(work / "images.npy", images, work / "first.npy", images // 4)
        sessions = ceiling_sessions(pipeline, threads)
        batches = [array[start : start + batch] for start in range(0, images, batch)]
        _, _, height, width = array.shape
        run = images_per_run(pipeline, height, width, array.dtype.itemsize, threads)

        def arguments(extra: list[str], spec: Path = spec_path) -> Callable[[Path], list[str]]:
            common = ["--output", str(work / "features.npy"), "--batch-size", str(batch), *extra]
            return lambda source: ["--pipeline", str(spec), "--input", str(source), *common]

        plains: list[float] = []
        ceilings: list[float] = []
        paths = ("embedded", "remote", "shared")
        whole: dict[str, list[tuple[float, float]]] = {path: [] for path in paths}
        steady: dict[str, list[tuple[float, float]]] = {path: [] for path in paths}
        peak: dict[str, int] = {}
        # The --server paths' jobs with 1x1 filters: what each way of reaching the server costs.
        transfer: dict[str, list[tuple[float, float]]] = {"remote": [], "shared": []}
        floor: list[tuple[float, float]] = []  # DEPENDENCY_FLOOR, beside the embedded job
        socket_path = str(work / "featmap.sock")
        with server(socket_path) as address:
            reach = {
                "embedded": ["--threads", str(threads)],
                "remote": ["--server", address],
                "shared": ["--server", f"unix:{socket_path}", "--shared-memory"],
            }
            run_job(arguments(reach["remote"])(folders.small))  # the server compiles it
            transfer_jobs = {path: arguments(reach[path], transfer_path) for path in transfer}
            run_job(transfer_jobs["remote"](folders.small))
            for index in range(rounds):
                log(f"array job round {index + 1} of {rounds}...")
                for path in whole:
                    ceiling = ceiling_rate(sessions, batches, images)
                    ceilings.append(ceiling)
                    job = arguments(reach[path])
                    started = run_job(job(folders.small))
                    # The script right before and right after the job, its baseline their mean:
                    # a second's run on a shared machine swings by a third from one minute to
                    # the next, so only neighbours compare.
                    before = plain_seconds(model, folders.large, work / "p.npy", batch, threads)
                    large = run_job(job(folders.large))
                    if path in transfer:
                        moved = run_job(transfer_jobs[path](folders.large)).seconds
                    else:
                        floored = plain_seconds(
                            model, folders.large, work / "f.npy", batch, threads,
                            DEPENDENCY_FLOOR, str(run),
                        )  # fmt: skip
                    behind = plain_seconds(model, folders.large, work / "p.npy", batch, threads)
                    after = run_job(job(folders.small))
                    plain = images / ((before + behind) / 2)
                    plains.append(plain)
                    if path in transfer:
                        transfer[path].append((images / moved, images / moved / plain))
                    else:
                        floor.append((images / floored, images / floored / plain))
                    peak[path] = large.peak_rss_bytes
                    rate = images / large.seconds
                    whole[path].append((rate, rate / plain))
                    small = min(started.seconds, after.seconds)
                    seconds = large.seconds - small
                    differenced = (images - images // 4) / seconds
                    if seconds <= 0.05 * large.seconds:  # lost in the noise of process start
                        differenced = math.nan
                    steady[path].append((differenced, differenced / ceiling))
        shape = f"{images}x1x28x28 uint8 .npy"
        labels = {
            "embedded": "array job, embedded",
            "remote": "array job --server 127.0.0.1",
            "shared": SHARED_ARRAY_ROW,
        }
        # A job whose features outgrow what it holds streams them into the output as it goes
        # (parts.HELD_BYTES, StreamedRows); the floor, as the plain script, writes at the end.
        shapes = {cost.name: cost.shape for cost in layer_costs(pipeline, height, width)}
        features = reply_bytes((shapes[name] for name in pipeline.output_names), images)
        floor_note = "no featmap code: bounds the embedded row"
        if features > HELD_BYTES:
            floor_note = "no featmap code; no bound at this size: the job streams its rows"
        rows = []
        for measured, kind, baseline in (
            (whole, "whole process", "plain onnxruntime"),
            (steady, "steady", "onnxruntime in-process"),
        ):
            for path, values in measured.items():
                note = f"peak RSS {peak[path] / 2**20:.0f} MiB"
                kept = [(rate, ratio) for rate, ratio in values if math.isfinite(rate)]
                if len(kept) < len(values):
                    note += f"; {len(values) - len(kept)} of {len(values)} rounds lost in noise"
                rate = statistics.median(rate for rate, _ in kept) if kept else math.nan
                ratio = statistics.median(ratio for _, ratio in kept) if kept else math.nan
                rows.append((f"{labels[path]}, {kind}, {shape}", rate, ratio, baseline, note))
        for label, values, note in (
            (FLOOR_ROW, floor, floor_note),
            *(
                (label, transfer[path], f"4% of the arithmetic, the same features: bounds {row}")
                for path, label, row in (
                    ("remote", TRANSFER_ROW, "the --server row"),
                    ("shared", SHARED_TRANSFER_ROW, "the --shared-memory row"),
                )
            ),
        ):
            rows.append(
                (
                    f"{label}, whole process, {shape}",
                    statistics.median(rate for rate, _ in values),
                    statistics.median(ratio for _, ratio in values),
                    "plain onnxruntime",
                    note,
                )
            )
    return ArrayBench(statistics.median(plains), statistics.median(ceilings), rows)
