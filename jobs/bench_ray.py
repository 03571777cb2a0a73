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
SAMPLE_SECONDS = 0.2


@dataclass(frozen=True)
class TreeRun:
    """A child process run to its end: wall time, peak summed PSS of its tree, its stderr."""

    seconds: float
    peak_bytes: int
    processes: int  # in the tree at the peak
    returncode: int
    stderr: str


def _parents() -> dict[int, list[int]]:
    """Every process's children, from /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                text = stat.read()
        except OSError:  # gone since listdir
            continue
        # The command name may hold spaces and parentheses: the fields follow its last ")".
        parent = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(name))
    return children


def tree_pss(root: int) -> tuple[int, int]:
    """(summed PSS bytes, process count) of `root` and its descendants now."""
    children = _parents()
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
    return total, len(tree)


def run_tree(command: Sequence[str], cwd: Path) -> TreeRun:
    """Run `command` in `cwd`, sampling its process tree's PSS until it exits."""
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errors)
        peak = [0, 0]

        def sample() -> None:
            while child.poll() is None:
                total, count = tree_pss(child.pid)
                if total > peak[0]:
                    peak[:] = [total, count]
                time.sleep(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        returncode = child.wait()
        seconds = time.perf_counter() - started
        sampler.join()
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    return TreeRun(seconds, peak[0], peak[1], returncode, stderr)


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

    @property
    def memory_ratio(self) -> float:
        """Ray's peak memory over featmap extract's."""
        return self.ray_peak / self.extract_peak if self.extract_peak else math.nan


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
        extract_peaks, ray_peaks = [], []
        for index in range(rounds):
            log(f"Ray Data round {index + 1} of {rounds}...")
            job = run_tree(extract, work)
            if job.returncode != 0:
                measured.skipped = failure(job, "featmap extract")
                return measured
            for stale in (work / "features").glob("*"):
                stale.unlink()
            ray = run_tree(ray_command, work)
            if ray.returncode != 0:
                measured.skipped = failure(ray, "the Ray example")
                return measured
            measured.rounds.append((job.seconds, ray.seconds))
            extract_peaks.append(job.peak_bytes)
            ray_peaks.append(ray.peak_bytes)
            measured.processes = max(measured.processes, ray.processes)
        measured.features = compare_features(
            extract_features(work / "features.npz"), ray_features(work / "features")
        )
    measured.extract_rate = statistics.median(images / job for job, _ in measured.rounds)
    measured.ray_rate = statistics.median(images / ray for _, ray in measured.rounds)
    measured.ratio = statistics.median(job / ray for job, ray in measured.rounds)
    measured.extract_peak, measured.ray_peak = max(extract_peaks), max(ray_peaks)
    return measured
