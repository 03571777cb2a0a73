"""`featmap bench` runs end to end (tiny sizes; the figures themselves are not asserted)."""

from __future__ import annotations

import math

from featmap.client.bench import run_bench, standard_spec
from featmap.contract.ops import layer_costs
from featmap.contract.spec import parse_pipeline


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
        threads=1, batch=2, size=32, seconds=0.05, clients=2, latency_requests=5, log=lines.append
    )
    paths = [row.path for row in report.rows]
    assert paths == [
        "onnxruntime in-process float32",
        "onnxruntime in-process uint8",
        "featmap unary float32",
        "featmap stream float32",
        "featmap unary uint8",
        "featmap shared memory float32",
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
