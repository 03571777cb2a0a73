"""`featmap bench` runs end to end (tiny sizes; the figures themselves are not asserted)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from featmap.contract.ops import layer_costs
from featmap.contract.spec import parse_pipeline
from featmap.jobs.bench import Row, int8_goal, run_bench, standard_spec, tritonclient_python
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
        "array job, embedded, steady, 64x1x28x28 uint8 .npy",
        "array job --server 127.0.0.1, steady, 64x1x28x28 uint8 .npy",
    ]
    # Whole-process rows divide by the plain onnxruntime script, steady ones by onnxruntime in
    # this process; the goals read the whole-process rows.
    assert [row.baseline for row in report.rows[-4:]] == [
        "plain onnxruntime", "plain onnxruntime",
        "onnxruntime in-process", "onnxruntime in-process",
    ]  # fmt: skip
    assert [count for count, _ in report.rss] == [6, 12]
    assert all(rss > 0 for _, rss in report.rss)
    goals = {goal.path: goal for goal in report.goals()}
    assert goals["featmap extract peak RSS, 6 vs 12 images"].met is not None
    assert goals["stream float32 / in-process"].now == "not measured"
    whole = goals["array job embedded / plain onnxruntime, whole process"]
    assert whole.goal == ">= 0.80" and whole.met is not None


@pytest.mark.parametrize(("cpu", "met"), [("avx512_vnni", True), ("none", None)])
def test_the_int8_goal_holds_where_int8_has_dot_products(
    cpu: str, met: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CPU_OVERRIDE_VARIABLE, cpu)
    goal = int8_goal(Row("onnxruntime in-process int8", 900.0, 2.1, "", "in-process float32"))
    assert (goal.now, goal.met) == ("2.10", met)
    assert int8_goal(None).met is None
