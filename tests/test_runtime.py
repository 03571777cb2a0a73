"""Providers, the session cache (LRU, single flight, failures not cached), and the extractor."""

from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from featmap.contract.errors import (
    ExecutionFailed,
    InvalidSpec,
    InvalidTensor,
    LimitExceeded,
    NonFiniteResult,
)
from featmap.contract.limits import RequestLimits, images_per_run
from featmap.contract.spec import (
    Pipeline,
    parse_pipeline,
)
from featmap.service.extractor import Extractor, Target
from featmap.service.runtime import CPU, CUDA, SessionCache, resolve_providers
from tests.conftest import README_SPEC, assert_matches_reference

LIMITS = RequestLimits(
    max_images_per_request=8,
    max_pixels_per_image=64 * 64,
    max_layers=4,
    max_parameters=10_000,
    max_message_bytes=1 << 20,
)


def relu_pipeline(channels: int = 3, **input_fields: Any) -> Pipeline:
    return parse_pipeline(
        {"input": {"channels": channels, **input_fields}, "layers": [{"op": "relu"}]}
    )


def test_default_providers_end_in_cpu() -> None:
    providers = resolve_providers(None)
    assert providers[-1] == CPU
    assert (CUDA in providers) == (CUDA in ort.get_available_providers())


def test_unknown_provider_is_a_startup_error() -> None:
    with pytest.raises(ValueError, match="NopeExecutionProvider"):
        resolve_providers(["NopeExecutionProvider"])


def test_cache_hits_misses_and_lru_eviction() -> None:
    cache = SessionCache(capacity=2, providers=[CPU])
    a, b, c = (relu_pipeline(channels) for channels in (1, 2, 3))
    first = cache.get(a)
    assert cache.get(a) is first
    cache.get(b)
    cache.get(a)  # a is now most recent: b goes first
    cache.get(c)
    assert len(cache) == 2
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (2, 3, 1)
    assert cache.get(a) is first
    assert cache.get(b) is not None and cache.stats.misses == 4


def test_concurrent_misses_build_once() -> None:
    cache = SessionCache(capacity=4, providers=[CPU])
    pipeline = relu_pipeline()
    results: list[object] = []
    barrier = threading.Barrier(6)

    def get() -> None:
        barrier.wait()
        results.append(cache.get(pipeline))

    threads = [threading.Thread(target=get) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in results}) == 1
    assert cache.stats.misses == 1


def test_failed_build_is_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = SessionCache(capacity=4, providers=[CPU])
    pipeline = relu_pipeline()
    real_session = ort.InferenceSession
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> ort.InferenceSession:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated onnxruntime failure")
        return real_session(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", flaky)
    with pytest.raises(ExecutionFailed, match="simulated onnxruntime failure"):
        cache.get(pipeline)
    assert len(cache) == 0
    assert cache.get(pipeline).session is not None


def extract(pipeline: Pipeline, images: np.ndarray) -> dict[str, np.ndarray]:
    """The one run path, as the embedded runner takes it: admit the pipeline, then the batch."""
    extractor = Extractor(SessionCache(capacity=4, providers=[CPU], intra_op_threads=1), LIMITS)
    return extractor.extract(Target(extractor.admit(pipeline), None, None), images).outputs


def test_extract_matches_reference(readme_pipeline: Pipeline) -> None:
    images = np.random.default_rng(0).standard_normal((2, 3, 20, 24)).astype(np.float32)
    outputs = extract(readme_pipeline, images)
    assert_matches_reference(outputs, readme_pipeline, images)


@pytest.mark.parametrize(
    ("pipeline", "images", "error", "field", "message"),
    [
        (relu_pipeline(), np.zeros((3, 8, 8), np.float32), InvalidTensor, "images.shape", "rank 3"),
        (relu_pipeline(), np.zeros((1, 3, 8, 8), np.uint8), InvalidTensor, "images.dtype", "uint8"),
        (
            relu_pipeline(),
            np.zeros((0, 3, 8, 8), np.float32),
            InvalidTensor,
            "images.shape",
            "empty",
        ),
        (
            relu_pipeline(),
            np.zeros((1, 4, 8, 8), np.float32),
            InvalidTensor,
            "images.shape",
            "4 ch",
        ),
        (
            relu_pipeline(layout="NHWC"),
            np.zeros((1, 3, 8, 8), np.float32),
            InvalidTensor,
            "images.shape",
            "axis 3 (NHWC)",
        ),
        (
            relu_pipeline(),
            np.zeros((1, 3, 0, 8), np.float32),
            InvalidTensor,
            "images.shape",
            "empty",
        ),
        (
            relu_pipeline(),
            np.zeros((9, 3, 8, 8), np.float32),
            LimitExceeded,
            "images.shape",
            "9 im",
        ),
        (
            relu_pipeline(),
            np.zeros((1, 3, 65, 64), np.float32),
            LimitExceeded,
            "images.shape",
            "4160",
        ),
        (
            relu_pipeline(),
            np.full((1, 3, 2, 2), np.nan, np.float32),
            InvalidTensor,
            "images.data",
            "nan at index [0, 0, 0, 0]",
        ),
        (
            relu_pipeline(dtype="float16"),
            np.array([1, np.inf], np.float16).reshape(1, 1, 1, 2).repeat(3, axis=1),
            InvalidTensor,
            "images.data",
            "inf at index [0, 0, 0, 1]",
        ),
        (
            parse_pipeline(
                {
                    "input": {"channels": 1},
                    "layers": [
                        {
                            "op": "conv2d",
                            "filters": 1,
                            "kernel_size": 5,
                            "weights": {"init": "zeros"},
                        }
                    ],
                }
            ),
            np.zeros((1, 1, 4, 4), np.float32),
            InvalidSpec,
            "layers[0].kernel_size",
            "exceeds",
        ),
        (
            parse_pipeline({"input": {"channels": 1}, "layers": [{"op": "relu"}] * 5}),
            np.zeros((1, 1, 4, 4), np.float32),
            LimitExceeded,
            "layers",
            "max_layers=4",
        ),
    ],
)
def test_bad_images_are_named(
    pipeline: Pipeline, images: np.ndarray, error: type[Exception], field: str, message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)) as caught:
        extract(pipeline, images)
    assert getattr(caught.value, "field", None) == field


def test_overflow_is_not_passed_off_as_a_result() -> None:
    pipeline = parse_pipeline(
        {
            "input": {"channels": 1},
            "layers": [
                {
                    "op": "conv2d",
                    "name": "huge",
                    "filters": 1,
                    "kernel_size": 1,
                    "weights": {"values": [[[[3e38]]]]},
                }
            ],
        }
    )
    with pytest.raises(NonFiniteResult) as caught:
        extract(pipeline, np.full((1, 1, 2, 2), 10.0, np.float32))
    assert caught.value.field == "outputs.huge"


def test_a_batch_past_the_run_activation_bound_runs_in_pieces_with_the_same_results() -> None:
    pipeline = parse_pipeline(
        {
            "input": {"channels": 3},
            "layers": [
                {
                    "op": "conv2d",
                    "filters": 64,
                    "kernel_size": 3,
                    "padding": "same",
                    "weights": {"init": "he_normal", "seed": 0},
                },
                {"op": "relu"},
                {"op": "max_pool2d", "pool_size": 4, "name": "pooled"},
                {"op": "global_avg_pool2d", "name": "features"},
            ],
            "outputs": ["pooled", "features"],
        }
    )
    # Two threads, whatever the machine's cores: what a run may hold depends on them.
    compiled = SessionCache(capacity=1, providers=[CPU], intra_op_threads=2).get(pipeline)
    per_run = images_per_run(pipeline, 64, 64, 4, compiled.threads)  # 2 MiB an image
    images = np.random.default_rng(3).random((per_run * 2 + 1, 3, 64, 64), dtype=np.float32)
    assert per_run > 1  # three runs: two full, one of a single image
    assert compiled.on_cpu
    outputs = compiled.run(images)
    assert {name: a.shape[0] for name, a in outputs.items()} == {
        "pooled": len(images),
        "features": len(images),
    }
    assert_matches_reference(outputs, pipeline, images)


def test_outputs_are_written_into_the_callers_rows_and_nowhere_else() -> None:
    pipeline = parse_pipeline(README_SPEC)  # conv1 and features
    compiled = SessionCache(capacity=1, providers=[CPU]).get(pipeline)
    images = np.random.default_rng(5).standard_normal((3, 3, 10, 10)).astype(np.float32)
    # Rows 2..4 of blocks of 7: what lies around them must stay as it was.
    blocks = {
        "conv1": np.full((7, 8, 10, 10), np.nan, np.float32),
        "features": np.full((7, 8, 1, 1), np.nan, np.float32),
    }
    rows = {name: block[2:5] for name, block in blocks.items()}
    outputs = compiled.run(images, into=rows)
    assert all(outputs[name] is rows[name] for name in rows)
    assert_matches_reference(outputs, pipeline, images)
    own = compiled.run(images)
    for name, block in blocks.items():
        np.testing.assert_array_equal(block[2:5], own[name])  # the same bytes as its own arrays
        assert np.isnan(block[:2]).all() and np.isnan(block[5:]).all()


def test_rows_onnxruntime_cannot_write_through_are_refused_before_it_runs() -> None:
    pipeline = parse_pipeline(README_SPEC)  # conv1 and features
    compiled = SessionCache(capacity=1, providers=[CPU]).get(pipeline)
    images = np.random.default_rng(6).standard_normal((2, 3, 8, 8)).astype(np.float32)
    features = np.zeros((2, 8, 1, 1), np.float32)
    read_only = np.zeros((2, 8, 8, 8), np.float32)
    read_only.flags.writeable = False
    refused = {
        "float64": np.zeros((2, 8, 8, 8), np.float64),
        "strided": np.zeros((2, 16, 8, 8), np.float32)[:, ::2],
        "read-only": read_only,
        "rows": np.zeros((3, 8, 8, 8), np.float32),
    }
    for why, conv in refused.items():
        with pytest.raises(ValueError, match=r"outputs\.conv1: into needs"):
            compiled.run(images, into={"conv1": conv, "features": features})
        assert not features.any(), why  # nothing ran
    with pytest.raises(ValueError, match=r"outputs\.features: .* got nothing"):
        compiled.run(images, into={"conv1": np.zeros((2, 8, 8, 8), np.float32)})
    # The right rows of the wrong shape: onnxruntime checks the shape before it writes.
    wrong = {"conv1": np.zeros((2, 8, 8, 9), np.float32), "features": features}
    with pytest.raises(ExecutionFailed, match="onnxruntime failed"):
        compiled.run(images, into=wrong)
    assert_matches_reference(compiled.run(images), pipeline, images)  # and it runs on


def test_a_batch_in_pieces_is_written_into_the_callers_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = parse_pipeline(README_SPEC)  # conv1 and features
    compiled = SessionCache(capacity=1, providers=[CPU]).get(pipeline)
    monkeypatch.setattr("featmap.service.runtime.images_per_run", lambda *args: 2)
    images = np.random.default_rng(7).standard_normal((5, 3, 6, 6)).astype(np.float32)
    rows = {
        "conv1": np.empty((5, 8, 6, 6), np.float32),
        "features": np.empty((5, 8, 1, 1), np.float32),
    }
    outputs = compiled.run(images, into=rows)
    assert all(outputs[name] is rows[name] for name in rows)
    assert_matches_reference(outputs, pipeline, images)
    assert_matches_reference(compiled.run(images), pipeline, images)  # pieces, arrays its own
    strided = np.random.default_rng(8).standard_normal((6, 3, 6, 6)).astype(np.float32)[::2]
    assert not strided.flags.c_contiguous  # bound as a contiguous copy kept for the run
    rows = {name: array[:3] for name, array in rows.items()}
    assert_matches_reference(compiled.run(strided, into=rows), pipeline, strided)
