"""`featmap bench --ray`: the README's Ray Data example against `featmap extract`, one node.

Both run as child processes over the same folder of JPEGs, whole process (start, imports, Ray's
start and shutdown included: the user pays them), alternating round by round. Memory is the
peak, sampled every SAMPLE_SECONDS, of the sum of the proportional set size (PSS,
/proc/PID/smaps_rollup) over the child and all its descendants: for Ray the driver, the GCS,
the raylet, its agents and workers, and the object store's shared memory (mapped by the raylet
and the workers, and counted once across them by PSS); for `featmap extract` its one process.
The features of the two are compared by path.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import yaml

from ..contract.spec import Pipeline
from .bench_job import FEATMAP, generated_jpegs

# The README's Ray Data example, as written there (tests/test_ray.py checks that they are one
# text). It runs in a folder holding pipeline.yaml and photos/; RAY_START comes before it.
RAY_EXAMPLE = """\
import ray
from featmap.jobs.ray import IMAGE_EXTENSIONS, FeatureExtractor, actor_pool
from featmap.service.specfiles import load_pipeline_file

pipeline = load_pipeline_file("pipeline.yaml")
pool = actor_pool(ray.nodes())  # an actor per node, a thread per CPU: see the sizing rule
ds = ray.data.read_binary_files("photos/", include_paths=True, file_extensions=IMAGE_EXTENSIONS)
ds = ds.map_batches(
    FeatureExtractor,
    fn_constructor_args=(pipeline,),          # a Pipeline, a spec dict, or a spec file path
    fn_constructor_kwargs={"encoded_column": "bytes", "threads": pool.threads},
    compute=ray.data.ActorPoolStrategy(size=pool.actors),
    num_cpus=pool.cpus_per_actor,
    batch_size=32,
    batch_format="numpy",
)
ds.select_columns(["path", "features"]).write_parquet("features/")
"""
# A local Ray of `cores` CPUs, as the brief of the row has it; no dashboard (a web server the
# job does not use).
RAY_START = "import ray\nray.init(num_cpus={cores}, include_dashboard=False)\n"
# Ray's own cost: the example with featmap's actor replaced by one that gives each row a zero,
# the same read, sizing and write, and no featmap code imported. No extractor running inside
# Ray on this node can take less time or memory than this (RayBench.bound).
RAY_FLOOR = """\
import numpy as np


class Nothing:
    def __call__(self, batch):
        return {{"path": batch["path"], "features": np.zeros((len(batch["path"]), 1), np.float32)}}


ds = ray.data.read_binary_files("photos/", include_paths=True, file_extensions={extensions!r})
ds = ds.map_batches(
    Nothing,
    compute=ray.data.ActorPoolStrategy(size={actors}),
    num_cpus={cpus_per_actor!r},
    batch_size={batch},
    batch_format="numpy",
)
ds.select_columns(["path", "features"]).write_parquet("floor/")
"""
SAMPLE_SECONDS = 0.2


@dataclass(frozen=True)
class TreeRun:
    """A child process run to its end: wall time, peak summed PSS of its tree, its stderr."""

    seconds: float
    cpu_seconds: float  # user + system of the whole tree, at least (see run_tree)
    peak_bytes: int
    processes: int  # in the tree at the peak
    returncode: int
    stderr: str


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class TreeSample:
    """A process tree now: summed PSS, its processes, and each one's CPU-seconds so far."""

    pss_bytes: int
    cpu_seconds: dict[int, float]  # pid -> user + system of that process alone


def _processes() -> dict[int, tuple[int, float]]:
    """Every process's (parent, CPU-seconds of its own), from /proc/PID/stat."""
    processes: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                text = stat.read()
        except OSError:  # gone since listdir
            continue
        # The command name may hold spaces and parentheses: the fields follow its last ")",
        # from the third (state): the parent is the fourth, utime and stime the 14th and 15th.
        fields = text[text.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])
        processes[int(name)] = (int(fields[1]), ticks / CLOCK_TICKS)
    return processes


def sample_tree(root: int) -> TreeSample:
    """`root` and its descendants now."""
    processes = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    tree, total = [root], 0
    for pid in tree:  # grows as it goes: a breadth-first walk
        tree.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024  # kB
                        break
        except OSError:  # exited since the walk
            continue
    return TreeSample(total, {pid: processes[pid][1] for pid in tree if pid in processes})


def run_tree(command: Sequence[str], cwd: Path) -> TreeRun:
    """Run `command` in `cwd`, sampling its process tree until it exits.

    CPU-seconds are a lower bound: the larger of what the tree's waited-for descendants
    report (getrusage) and the sum of each process's last sample (a process orphaned before
    it ends, as Ray's workers are at shutdown, is reaped by init and reports to no one).
    """
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errors)
        peak = [0, 0]
        sampled: dict[int, float] = {}

        def sample() -> None:
            while child.returncode is None:
                now = sample_tree(child.pid)
                if now.pss_bytes > peak[0]:
                    peak[:] = [now.pss_bytes, len(now.cpu_seconds)]
                for pid, cpu in now.cpu_seconds.items():
                    sampled[pid] = max(cpu, sampled.get(pid, 0.0))
                time.sleep(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        returncode = child.wait()
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        sampler.join()
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    waited = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return TreeRun(
        seconds, max(waited, sum(sampled.values())), peak[0], peak[1], returncode, stderr
    )


def failure(run: TreeRun, what: str) -> str:
    """Why a child failed, in one line: its last error line, never its traceback."""
    lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line.split(":")[0] or "Exception" in line]
    reason = (named or lines or ["no output"])[-1]
    return f"{what} exited {run.returncode}: {reason[:300]}"


def extract_features(output: Path) -> dict[str, np.ndarray]:
    """`featmap extract`'s .npz: file name -> features."""
    with np.load(output, allow_pickle=False) as archive:
        paths = [Path(str(path)).name for path in archive["paths"]]
        return dict(zip(paths, archive["features"], strict=True))


def ray_features(folder: Path) -> dict[str, np.ndarray]:
    """The example's Parquet files: file name -> features."""
    import pyarrow.parquet as pq

    table = pq.read_table(folder, columns=["path", "features"]).to_pydict()
    return {
        Path(path).name: np.asarray(features, dtype=np.float32)
        for path, features in zip(table["path"], table["features"], strict=True)
    }


def compare_features(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> str:
    """'equal by path' with the largest difference, or what differs."""
    if sorted(want) != sorted(got):
        missing, extra = len(set(want) - set(got)), len(set(got) - set(want))
        return f"paths differ: {missing} missing, {extra} extra"
    largest = 0.0
    for name, features in want.items():
        other = got[name].reshape(features.shape)
        if not np.allclose(other, features, rtol=1e-5, atol=1e-6):
            return f"features differ for {name}"
        largest = max(largest, float(np.max(np.abs(other - features), initial=0.0)))
    return f"features equal by path (max |difference| {largest:.1e})"


@dataclass
class RayBench:
    """The Ray row: whole-process rates, Ray's ratio to `featmap extract`, peak memory."""

    images: int
    ray_rate: float = math.nan  # images/s, whole process, median of rounds
    extract_rate: float = math.nan
    ratio: float = math.nan  # Ray's rate / featmap extract's, same round; median
    ray_peak: int = 0  # bytes, the largest of the rounds
    extract_peak: int = 0
    processes: int = 0
    features: str = ""
    skipped: str = ""  # why the row was not measured; "" when it was
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (extract s, Ray s)
    # Ray alone (RAY_FLOOR) in the same rounds: (extract s, extract CPU-s, floor s, floor CPU-s)
    floors: list[tuple[float, float, float, float]] = field(default_factory=list)
    floor_peak: int = 0  # bytes, the largest of the rounds
    cores: int = 1

    @property
    def memory_ratio(self) -> float:
        """Ray's peak memory over featmap extract's."""
        return self.ray_peak / self.extract_peak if self.extract_peak else math.nan

    @property
    def floor_memory_ratio(self) -> float:
        """Ray alone's peak memory over featmap extract's: what the example's cannot go below."""
        return self.floor_peak / self.extract_peak if self.extract_peak else math.nan

    @property
    def floor_ratio(self) -> float:
        """featmap extract's time over Ray alone's, median of rounds: the example's ratio
        cannot pass it, however little its extractor took."""
        ratios = [extract / floor for extract, _, floor, _ in self.floors]
        return statistics.median(ratios) if ratios else math.nan

    @property
    def bound(self) -> float:
        """The example's best ratio on this node, median of rounds: Ray alone's time, or its
        CPU-seconds plus extract's spread over every core, whichever is longer. Running
        featmap's work inside Ray cannot take less CPU than extract took for it (decoding and
        onnxruntime are the same), nor end before Ray's own work is done."""
        ratios = [
            extract / max(floor, (floor_cpu + extract_cpu) / self.cores)
            for extract, extract_cpu, floor, floor_cpu in self.floors
        ]
        return statistics.median(ratios) if ratios else math.nan


def run_ray_bench(
    pipeline: Pipeline,
    *,
    threads: int,
    batch: int,
    size: int,
    images: int = 1536,
    rounds: int = 3,
    cores: int | None = None,
    log: Callable[[str], None] = print,
) -> RayBench:
    """The README's Ray example and `featmap extract` over `images` generated JPEGs."""
    measured = RayBench(images)
    if find_spec("ray") is None:
        measured.skipped = "ray is not installed (pip install 'featmap[ray]')"
        return measured
    cores = cores or os.cpu_count() or 1
    source = generated_jpegs(images, size)
    with tempfile.TemporaryDirectory(prefix="featmap-bench-ray-") as scratch:
        work = Path(scratch)
        (work / "pipeline.yaml").write_text(yaml.safe_dump(pipeline.model_dump(mode="json")))
        (work / "photos").symlink_to(source)
        extract = [*FEATMAP, "extract", "--pipeline", "pipeline.yaml", "--input", "photos"]
        extract += ["--output", "features.npz", "--batch-size", str(batch)]
        extract += ["--threads", str(threads), "--quiet"]
        program = RAY_START.format(cores=cores) + RAY_EXAMPLE
        ray_command = [sys.executable, "-c", program]
        floor_command = [
            sys.executable,
            "-c",
            RAY_START.format(cores=cores) + floor_program(cores, batch),
        ]
        extract_peaks, ray_peaks, floor_peaks = [], [], []
        measured.cores = cores
        for index in range(rounds):
            log(f"Ray Data round {index + 1} of {rounds}...")
            job = run_tree(extract, work)
            if job.returncode != 0:
                measured.skipped = failure(job, "featmap extract")
                return measured
            for stale in [*(work / "features").glob("*"), *(work / "floor").glob("*")]:
                stale.unlink()
            ray = run_tree(ray_command, work)
            if ray.returncode != 0:
                measured.skipped = failure(ray, "the Ray example")
                return measured
            floor = run_tree(floor_command, work)
            if floor.returncode != 0:
                measured.skipped = failure(floor, "Ray alone (an identity map)")
                return measured
            measured.rounds.append((job.seconds, ray.seconds))
            measured.floors.append((job.seconds, job.cpu_seconds, floor.seconds, floor.cpu_seconds))
            extract_peaks.append(job.peak_bytes)
            ray_peaks.append(ray.peak_bytes)
            floor_peaks.append(floor.peak_bytes)
            measured.processes = max(measured.processes, ray.processes)
        measured.features = compare_features(
            extract_features(work / "features.npz"), ray_features(work / "features")
        )
    measured.extract_rate = statistics.median(images / job for job, _ in measured.rounds)
    measured.ray_rate = statistics.median(images / ray for _, ray in measured.rounds)
    measured.ratio = statistics.median(job / ray for job, ray in measured.rounds)
    measured.extract_peak, measured.ray_peak = max(extract_peaks), max(ray_peaks)
    measured.floor_peak = max(floor_peaks)
    return measured


def floor_program(cores: int, batch: int) -> str:
    """RAY_FLOOR sized as the example sizes itself on one node of `cores` CPUs."""
    from .ray import IMAGE_EXTENSIONS, actor_pool

    pool = actor_pool([{"Resources": {"CPU": cores}}])
    return RAY_FLOOR.format(
        extensions=IMAGE_EXTENSIONS,
        actors=pool.actors,
        cpus_per_actor=pool.cpus_per_actor,
        batch=batch,
    )
