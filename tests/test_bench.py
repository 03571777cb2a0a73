"""`featmap bench` runs end to end (tiny sizes; the figures themselves are not asserted)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from featmap.contract.ops import layer_costs
from featmap.contract.spec import parse_pipeline
from featmap.jobs.bench import (
    Row,
    int8_goal,
    ray_goals,
    run_bench,
    standard_spec,
    tritonclient_python,
)
from featmap.jobs.bench_ray import (
    RAY_EXAMPLE,
    RAY_START,
    RayBench,
    compare_features,
    failure,
    floor_program,
    run_tree,
)
from featmap.jobs.ray import IMAGE_EXTENSIONS
from featmap.service.int8 import CPU_OVERRIDE_VARIABLE


def test_standard_pipeline_is_the_issues() -> None:
    pipeline = parse_pipeline(standard_spec())
    shapes = layer_costs(pipeline, 224, 224)
    # 224 -> conv same 224 -> pool 112 -> conv 112 -> pool 56 -> conv stride 2 -> 28 -> global
    assert [s.shape for s in shapes if s.op == "conv2d"] == [
        (32, 224, 224),
        (64, 112, 112),
        (128, 28, 28),
    ]
    assert shapes[-1].shape == (128, 1, 1)
    assert parse_pipeline(standard_spec("uint8")).input.dtype == "uint8"


def test_bench_reports_every_path() -> None:
    lines: list[str] = []
    report = run_bench(
        threads=1, batch=2, size=32, seconds=0.05, clients=2, latency_requests=5, job=False,
        int8=False, log=lines.append,
    )  # fmt: skip
    paths = [row.path for row in report.rows]
    triton = ["stock tritonclient (OIP ModelInfer)"] if tritonclient_python() else []
    assert paths == [
        "onnxruntime in-process float32",
        "onnxruntime in-process uint8",
        "featmap unary float32",
        "featmap stream float32",
        "featmap unary uint8",
        "featmap shared memory float32",
        *triton,
        "featmap 2 clients x 1 image, batching on",
        "featmap 2 clients x 1 image, batching off",
        "NumPy reference (for scale)",
    ]
    assert all(row.images_per_s > 0 and math.isfinite(row.ratio) for row in report.rows)
    assert {"featmap p50", "in-process p50", "overhead p50 (featmap - in-process)"} <= set(
        report.latency
    )
    table = report.table()
    assert "featmap stream float32" in table and "ratio" in table
    # The ratio column says what it divides by.
    assert "same round" in table and "vs" in table.splitlines()[0]


def test_bench_job_section(tmp_path: Path) -> None:
    report = run_bench(
        threads=1, batch=2, size=32, seconds=0.05, rounds=1, service=False, job_images=12,
        array_images=64, rss_images=(6, 12), int8=False, log=lambda line: None,
    )  # fmt: skip
    paths = [row.path for row in report.rows]
    assert paths == [
        "onnxruntime in-process, decoded 32x32 (ceiling)",
        "hand-written loop (Pillow, stack, /255, run), 12 files",
        "featmap extract, embedded, 12 files",
        "featmap extract --server 127.0.0.1, 12 files sent encoded",
        "plain onnxruntime, whole process, 64x1x28x28 uint8 array",
        "onnxruntime in-process, 64x1x28x28 uint8 array",
        "array job, embedded, whole process, 64x1x28x28 uint8 .npy",
        "array job --server 127.0.0.1, whole process, 64x1x28x28 uint8 .npy",
        "array job --server unix: --shared-memory, whole process, 64x1x28x28 uint8 .npy",
        "array job, embedded, steady, 64x1x28x28 uint8 .npy",
        "array job --server 127.0.0.1, steady, 64x1x28x28 uint8 .npy",
        "array job --server unix: --shared-memory, steady, 64x1x28x28 uint8 .npy",
        "onnxruntime written in place + featmap's dependencies + fsync (the floor), whole "
        "process, 64x1x28x28 uint8 .npy",
        "array job --server 127.0.0.1 with 1x1 filters (the transfer), whole process, "
        "64x1x28x28 uint8 .npy",
        "array job --server unix: --shared-memory with 1x1 filters (the transfer), whole "
        "process, 64x1x28x28 uint8 .npy",
    ]
    # Whole-process rows divide by the plain onnxruntime script, steady ones by onnxruntime in
    # this process; the goals read the whole-process rows.
    assert [row.baseline for row in report.rows[-9:]] == [
        "plain onnxruntime", "plain onnxruntime", "plain onnxruntime",
        "onnxruntime in-process", "onnxruntime in-process", "onnxruntime in-process",
        "plain onnxruntime", "plain onnxruntime", "plain onnxruntime",
    ]  # fmt: skip
    assert [count for count, _ in report.rss] == [6, 12]
    assert all(rss > 0 for _, rss in report.rss)
    goals = {goal.path: goal for goal in report.goals()}
    assert goals["featmap extract peak RSS, 6 vs 12 images"].met is not None
    assert goals["stream float32 / in-process"].now == "not measured"
    whole = goals["array job embedded / plain onnxruntime, whole process"]
    assert whole.goal == ">= 0.80" and whole.met is not None
    floor = goals["  at most, given its dependencies (no featmap code)"]
    assert floor.now == f"{report.rows[-3].ratio:.2f}" and floor.met is None
    transfer = goals["  at most, given the transfer (1x1 filters)"]
    assert transfer.now == f"{report.rows[-2].ratio:.2f}" and transfer.met is None
    shared = goals["  on its Unix socket, --shared-memory"]
    assert shared.now == f"{report.rows[-7].ratio:.2f}" and shared.met is not None
    shared_transfer = goals["    at most, given the transfer (1x1 filters)"]
    assert shared_transfer.now == f"{report.rows[-1].ratio:.2f}" and shared_transfer.met is None


@pytest.mark.parametrize(("cpu", "met"), [("avx512_vnni", True), ("none", None)])
def test_the_int8_goal_holds_where_int8_has_dot_products(
    cpu: str, met: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CPU_OVERRIDE_VARIABLE, cpu)
    goal = int8_goal(Row("onnxruntime in-process int8", 900.0, 2.1, "", "in-process float32"))
    assert (goal.now, goal.met) == ("2.10", met)
    assert int8_goal(None).met is None


# A child that starts a grandchild holding 64 MiB of touched memory for a second.
GRANDCHILD = """
import subprocess, sys
hold = "import time; block = bytearray(64 * 2**20); time.sleep(1.5)"
subprocess.run([sys.executable, "-c", hold], check=True)
"""


def test_tree_memory_counts_the_descendants(tmp_path: Path) -> None:
    run = run_tree([sys.executable, "-c", GRANDCHILD], tmp_path)
    assert run.returncode == 0
    # The grandchild's 64 MiB are counted in its parent's tree (and two interpreters more).
    assert run.peak_bytes >= 64 * 2**20
    assert run.processes == 2
    assert run.seconds >= 1.5


def test_a_failed_ray_example_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    run = run_tree([sys.executable, "-c", "import featmap_no_such_module"], tmp_path)
    reason = failure(run, "the Ray example")
    assert reason == (
        "the Ray example exited 1: ModuleNotFoundError: No module named 'featmap_no_such_module'"
    )
    # The goals table then says the row could not run, rather than a ratio.
    goals = ray_goals(RayBench(12, skipped=reason))
    assert [(goal.now, goal.met) for goal in goals] == [("could not run", None)] * 2
    assert [goal.now for goal in ray_goals(None)] == ["not measured"] * 2


def test_ray_goals_read_speed_and_memory_ratios() -> None:
    measured = RayBench(12, ratio=0.7, ray_peak=900 * 2**20, extract_peak=250 * 2**20)
    # Two rounds of (extract s, extract CPU-s, Ray alone s, Ray alone CPU-s) on 2 cores.
    measured.floors = [(8.0, 14.0, 10.0, 12.0), (6.0, 12.0, 12.0, 14.0)]
    measured.floor_peak, measured.cores = 1000 * 2**20, 2
    speed, speed_bound, memory, memory_bound = ray_goals(measured)
    assert (speed.now, speed.goal, speed.met) == ("0.70", ">= 0.60", True)
    assert (memory.now, memory.goal, memory.met) == ("3.60", "<= 3.00", False)
    # Round 1: 8 / max(10, (12 + 14) / 2) = 8 / 13; round 2: 6 / max(12, 13) = 6 / 13.
    assert speed_bound.now == f"{(8 / 13 + 6 / 13) / 2:.2f}"
    assert measured.floor_ratio == pytest.approx((8 / 10 + 6 / 12) / 2)
    assert (memory_bound.now, memory_bound.met) == ("4.00", None)  # 1000 / 250


def test_tree_cpu_counts_the_descendants(tmp_path: Path) -> None:
    spin = "import time; end = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"
    run = run_tree([sys.executable, "-c", child], tmp_path)
    assert run.returncode == 0
    assert run.cpu_seconds >= 0.4  # the grandchild's spin, counted through its parent


def test_ray_alone_is_the_example_without_featmap() -> None:
    program = floor_program(cores=4, batch=16)
    compile(RAY_START.format(cores=4) + program, "floor", "exec")
    assert "featmap" not in program
    # Sized as the example sizes itself: an actor a node, all CPUs but one, the same batch.
    assert "ActorPoolStrategy(size=1)" in program and "num_cpus=3.0" in program
    assert "batch_size=16" in program and repr(IMAGE_EXTENSIONS) in program
    for step in (
        "read_binary_files(",
        "include_paths=True",
        'select_columns(["path", "features"])',
    ):
        assert step in program and step in RAY_EXAMPLE


def test_features_are_compared_by_path() -> None:
    want = {"a.jpg": np.ones((4, 1, 1), np.float32), "b.jpg": np.zeros((4, 1, 1), np.float32)}
    got = {"b.jpg": np.zeros(4, np.float32), "a.jpg": np.ones(4, np.float32)}  # Parquet's rows
    assert compare_features(want, got) == "features equal by path (max |difference| 0.0e+00)"
    assert compare_features(want, {**got, "a.jpg": np.full(4, 1.1, np.float32)}) == (
        "features differ for a.jpg"
    )
    assert compare_features(want, {"a.jpg": got["a.jpg"]}) == "paths differ: 1 missing, 0 extra"
