"""Dynamic batching on real onnxruntime sessions: coalescing, keys, limits, delay, failures."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from featmap.contract.errors import ExecutionFailed
from featmap.contract.spec import parse_pipeline
from featmap.service.batching import BatchingPolicy, BatchStats, DynamicBatcher, PipelineRunner
from featmap.service.runtime import CPU, CompiledPipeline, OnGone, SessionCache
from tests.conftest import README_SPEC, assert_matches_reference

# Generous: a deadlock fails the test after this long instead of hanging the run.
TIMEOUT_S = 30.0
# Long enough that a batch which must fill never goes for its deadline instead.
FOREVER_US = 60_000_000

OTHER_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {
            "op": "conv2d",
            "name": "conv",
            "filters": 4,
            "kernel_size": 3,
            "weights": {"init": "he_normal", "seed": 1},
        },
        {"op": "relu"},
    ],
}


class RecordingPipeline:
    """A CompiledPipeline that records its runs; it can hold its first run and fail on NaN."""

    def __init__(self, compiled: CompiledPipeline, *, hold_first: bool = False) -> None:
        self.compiled = compiled
        self.pipeline = compiled.pipeline
        self.runs: list[np.ndarray] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self._hold = hold_first
        self._lock = threading.Lock()

    @property
    def pipeline_id(self) -> str:
        return self.compiled.pipeline_id

    @property
    def sizes(self) -> list[int]:
        with self._lock:
            return [len(images) for images in self.runs]

    def run(
        self,
        images: np.ndarray,
        on_gone: OnGone | None = None,
        into: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        with self._lock:
            self.runs.append(images)
            hold, self._hold = self._hold, False
        if hold:
            # Later callers queue behind this run until the test has lined them up.
            self.entered.set()
            assert self.release.wait(TIMEOUT_S)
        if np.isnan(images).any():
            raise ExecutionFailed("images", f"poisoned batch of {len(images)}")
        return self.compiled.run(images, on_gone, into)


@pytest.fixture(scope="module")
def cache() -> SessionCache:
    return SessionCache(capacity=4, providers=[CPU], intra_op_threads=1)


@pytest.fixture(scope="module")
def readme(cache: SessionCache) -> CompiledPipeline:
    return cache.get(parse_pipeline(README_SPEC))


@pytest.fixture(scope="module")
def other(cache: SessionCache) -> CompiledPipeline:
    return cache.get(parse_pipeline(OTHER_SPEC))


@pytest.fixture
def batcher() -> Iterator[DynamicBatcher]:
    """A fresh batcher that must be idle, with no per-key state left, after each test."""
    running = DynamicBatcher()
    yield running
    assert running.active_keys() == 0
    assert running.queued() == 0


def random_images(n: int, height: int = 8, width: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, height, width)).astype(np.float32)


class Caller(threading.Thread):
    """One gRPC handler thread: runs `call` (after an optional barrier) and keeps its outcome."""

    def __init__(
        self, call: Callable[[], dict[str, np.ndarray]], barrier: threading.Barrier | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.barrier = barrier
        self.result: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        if self.barrier is not None:
            self.barrier.wait(TIMEOUT_S)
        try:
            self.result = self.call()
        except BaseException as exc:
            self.error = exc

    def outcome(self) -> dict[str, np.ndarray]:
        """The result once the thread is done; re-raises its error."""
        self.join(TIMEOUT_S)
        assert not self.is_alive(), "caller still waiting: a lost wakeup or a deadlock"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def start(
    batcher: DynamicBatcher,
    compiled: PipelineRunner,
    images: np.ndarray,
    policy: BatchingPolicy,
    barrier: threading.Barrier | None = None,
) -> Caller:
    caller = Caller(lambda: batcher.run(compiled, images, policy), barrier)
    caller.start()
    return caller


def wait_for_queue(batcher: DynamicBatcher, requests: int) -> None:
    """Poll until `requests` callers are queued, to line them up in a known order."""
    deadline = time.monotonic() + TIMEOUT_S
    while batcher.queued() != requests:
        assert time.monotonic() < deadline, f"{batcher.queued()} queued, not {requests}"
        time.sleep(0.001)


def start_in_order(
    batcher: DynamicBatcher,
    recording: RecordingPipeline,
    batches: list[np.ndarray],
    policy: BatchingPolicy,
) -> list[Caller]:
    """First caller holds the key's run; the rest queue behind it in this order."""
    callers = [start(batcher, recording, batches[0], policy)]
    assert recording.entered.wait(TIMEOUT_S)
    for queued, images in enumerate(batches[1:], start=1):
        callers.append(start(batcher, recording, images, policy))
        wait_for_queue(batcher, queued)
    recording.release.set()
    return callers


def test_policy_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_batch_size=0"):
        BatchingPolicy(max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_delay_us=-1"):
        BatchingPolicy(max_queue_delay_us=-1)


def test_disabled_policy_runs_the_request_directly(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme)
    images = random_images(3)
    outputs = batcher.run(recording, images, BatchingPolicy(enabled=False, max_batch_size=1))
    assert len(recording.runs) == 1 and recording.runs[0] is images
    assert_matches_reference(outputs, readme.pipeline, images)
    assert batcher.stats == BatchStats()


def test_lone_request_runs_at_once_and_read_only(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme)
    images = random_images(2)
    outputs = batcher.run(recording, images, BatchingPolicy())
    assert len(recording.runs) == 1 and recording.runs[0] is images  # no copy for one request
    assert_matches_reference(outputs, readme.pipeline, images)
    assert all(not array.flags.writeable for array in outputs.values())
    stats = batcher.stats
    assert (stats.batches, stats.requests, stats.images) == (1, 1, 2)
    assert stats.batch_sizes == Counter({2: 1})


def test_a_request_larger_than_a_batch_runs_in_batches_and_counts_once(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme)
    images = random_images(7)
    outputs = batcher.run(recording, images, BatchingPolicy(max_batch_size=3))
    assert [len(run) for run in recording.runs] == [3, 3, 1]
    assert_matches_reference(outputs, readme.pipeline, images)
    stats = batcher.stats
    assert (stats.batches, stats.requests, stats.images) == (3, 1, 7)
    assert stats.batch_sizes == Counter({3: 2, 1: 1})


def test_queued_requests_coalesce_in_batches_of_at_most_max(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme, hold_first=True)
    policy = BatchingPolicy(max_batch_size=8)
    singles = [random_images(1, seed=seed) for seed in range(32)]
    callers = start_in_order(batcher, recording, singles, policy)
    outputs = [caller.outcome() for caller in callers]
    for result, images in zip(outputs, singles, strict=True):
        assert_matches_reference(result, readme.pipeline, images)
    # The first ran alone; the 31 queued behind it went 8 at a time, in arrival order.
    assert recording.sizes == [1, 8, 8, 8, 7]
    np.testing.assert_array_equal(recording.runs[1], np.concatenate(singles[1:9]))
    stats = batcher.stats
    assert (stats.batches, stats.requests, stats.images, stats.failed_batches) == (5, 32, 32, 0)
    assert stats.batch_sizes == Counter({8: 3, 7: 1, 1: 1})


def test_results_of_one_batch_cannot_change_each_other(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme)
    policy = BatchingPolicy(max_batch_size=2, max_queue_delay_us=FOREVER_US)
    barrier = threading.Barrier(2)
    batches = [random_images(1, seed=seed) for seed in range(2)]
    first, second = (start(batcher, recording, images, policy, barrier) for images in batches)
    a, b = first.outcome(), second.outcome()
    assert recording.sizes == [2]
    for name in a:
        with pytest.raises(ValueError, match="read-only"):
            a[name][...] = 0
        with pytest.raises(ValueError):
            a[name].flags.writeable = True
    assert_matches_reference(b, readme.pipeline, batches[1])


def test_many_concurrent_callers_get_their_own_rows(
    batcher: DynamicBatcher, readme: CompiledPipeline, other: CompiledPipeline
) -> None:
    # Two pipelines x two image sizes, 1 to 3 images each, all released at once.
    recordings = [RecordingPipeline(readme), RecordingPipeline(other)]
    policy = BatchingPolicy(max_batch_size=4)
    barrier = threading.Barrier(32)
    requests = [
        (recordings[i % 2], random_images(1 + i % 3, 8 + 2 * (i // 2 % 2), 8, seed=i))
        for i in range(32)
    ]
    callers = [start(batcher, pipe, images, policy, barrier) for pipe, images in requests]
    for caller, (pipe, images) in zip(callers, requests, strict=True):
        assert_matches_reference(caller.outcome(), pipe.pipeline, images)
    stats = batcher.stats
    assert stats.failed_batches == 0
    assert (stats.requests, stats.images) == (32, sum(len(i) for _, i in requests))
    assert max(stats.batch_sizes) <= 4
    assert sum(len(r.runs) for r in recordings) == stats.batches


def test_different_keys_never_share_a_batch(
    batcher: DynamicBatcher, readme: CompiledPipeline, other: CompiledPipeline
) -> None:
    # Each key gets exactly three one-image requests and waits until its batch of three is full:
    # a batch that mixed keys would fill with the wrong images (or fail to concatenate).
    recordings = {"readme": RecordingPipeline(readme), "other": RecordingPipeline(other)}
    policy = BatchingPolicy(max_batch_size=3, max_queue_delay_us=FOREVER_US)
    keys = [("readme", 8), ("readme", 10), ("other", 8)]
    requests = [
        (name, random_images(1, size, size, seed=10 * k + i))
        for k, (name, size) in enumerate(keys)
        for i in range(3)
    ]
    barrier = threading.Barrier(len(requests))
    callers = [
        start(batcher, recordings[name], images, policy, barrier) for name, images in requests
    ]
    for caller, (name, images) in zip(callers, requests, strict=True):
        assert_matches_reference(caller.outcome(), recordings[name].pipeline, images)
    assert sorted(r.shape for r in recordings["readme"].runs) == [(3, 3, 8, 8), (3, 3, 10, 10)]
    assert [r.shape for r in recordings["other"].runs] == [(3, 3, 8, 8)]
    assert batcher.stats.batch_sizes == Counter({3: 3})
    assert batcher.stats.failed_batches == 0


def test_request_larger_than_max_batch_size_runs_in_pieces_of_it(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme, hold_first=True)
    batches = [random_images(1, seed=0), random_images(5, seed=1), random_images(1, seed=2)]
    callers = start_in_order(batcher, recording, batches, BatchingPolicy(max_batch_size=2))
    for caller, images in zip(callers, batches, strict=True):
        outputs = caller.outcome()
        assert all(not array.flags.writeable for array in outputs.values())
        assert_matches_reference(outputs, readme.pipeline, images)
    # The 5 go as 2 + 2 + 1 (the 1 may share a batch with the third caller's image).
    assert max(recording.sizes) == 2
    assert sum(recording.sizes) == 7
    assert len(recording.sizes) in (4, 5)


def test_a_large_request_alone_runs_as_full_batches(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme)
    images = random_images(7, seed=3)
    outputs = batcher.run(recording, images, BatchingPolicy(max_batch_size=3))
    assert recording.sizes == [3, 3, 1]
    assert_matches_reference(outputs, readme.pipeline, images)


def test_queue_delay_lets_close_requests_share_a_batch(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme)
    delay_s = 1.0  # generous: the second caller only has to arrive within it
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay_us=int(delay_s * 1e6))
    barrier = threading.Barrier(2)
    batches = [random_images(1, seed=seed) for seed in range(2)]
    began = time.monotonic()
    callers = [start(batcher, recording, images, policy, barrier) for images in batches]
    for caller, images in zip(callers, batches, strict=True):
        assert_matches_reference(caller.outcome(), readme.pipeline, images)
    # Not full, so the batch went when its first request had waited the whole delay.
    assert time.monotonic() - began >= delay_s
    assert recording.sizes == [2]


def test_full_batch_does_not_wait_out_the_delay(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme)
    policy = BatchingPolicy(max_batch_size=2, max_queue_delay_us=FOREVER_US)
    barrier = threading.Barrier(2)
    batches = [random_images(1, seed=seed) for seed in range(2)]
    began = time.monotonic()
    callers = [start(batcher, recording, images, policy, barrier) for images in batches]
    for caller, images in zip(callers, batches, strict=True):
        assert_matches_reference(caller.outcome(), readme.pipeline, images)
    assert time.monotonic() - began < FOREVER_US / 1e6
    assert recording.sizes == [2]


def test_next_leader_waits_out_its_own_delay_too(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    # Triton's rule for every batch, not just the first: it goes when full or when its oldest
    # request has waited the delay. Here the third caller, queued behind a running batch, leads
    # the next batch and waits for the fourth.
    recording = RecordingPipeline(readme, hold_first=True)
    policy = BatchingPolicy(max_batch_size=2, max_queue_delay_us=FOREVER_US)
    batches = [random_images(1, seed=seed) for seed in range(4)]
    barrier = threading.Barrier(2)
    callers = [start(batcher, recording, images, policy, barrier) for images in batches[:2]]
    assert recording.entered.wait(TIMEOUT_S)
    callers.append(start(batcher, recording, batches[2], policy))
    wait_for_queue(batcher, 1)
    recording.release.set()
    # Once the first batch's callers are back, the third caller leads (the hand-over comes
    # before the old leader returns); whenever the fourth arrives, it joins that batch.
    for caller, images in zip(callers[:2], batches[:2], strict=True):
        assert_matches_reference(caller.outcome(), readme.pipeline, images)
    callers.append(start(batcher, recording, batches[3], policy))
    for caller, images in zip(callers[2:], batches[2:], strict=True):
        assert_matches_reference(caller.outcome(), readme.pipeline, images)
    assert recording.sizes == [2, 2]


def test_failing_request_fails_alone(batcher: DynamicBatcher, readme: CompiledPipeline) -> None:
    recording = RecordingPipeline(readme)
    policy = BatchingPolicy(max_batch_size=4, max_queue_delay_us=FOREVER_US)
    batches = [random_images(1, seed=seed) for seed in range(4)]
    batches[2][0, 0, 0, 0] = np.nan  # the wrapper fails any run that contains it
    barrier = threading.Barrier(4)
    callers = [start(batcher, recording, images, policy, barrier) for images in batches]
    for index, (caller, images) in enumerate(zip(callers, batches, strict=True)):
        if index == 2:
            with pytest.raises(ExecutionFailed, match="poisoned batch of 1"):
                caller.outcome()
        else:
            assert_matches_reference(caller.outcome(), readme.pipeline, images)
    # One combined run, then each request again on its own.
    assert recording.sizes == [4, 1, 1, 1, 1]
    assert batcher.stats.failed_batches == 1


def test_lone_failing_request_is_not_retried(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme)
    poisoned = random_images(2)
    poisoned[1, 2, 3, 4] = np.nan
    with pytest.raises(ExecutionFailed, match="poisoned batch of 2"):
        batcher.run(recording, poisoned, BatchingPolicy())
    assert recording.sizes == [2]
    assert batcher.stats.failed_batches == 0
    # The key is free again.
    images = random_images(1)
    assert_matches_reference(
        batcher.run(recording, images, BatchingPolicy()), readme.pipeline, images
    )


@pytest.mark.parametrize("callers", [2, 6])
def test_two_leaders_gathering_at_once_each_run_their_own_request(
    readme: CompiledPipeline, callers: int
) -> None:
    # Both first callers lead (concurrent_batches=2) and both wait the delay for company: one
    # must never take the other's request into its batch (the other then had nothing to run).
    batcher = DynamicBatcher(concurrent_batches=2)
    recording = RecordingPipeline(readme)
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay_us=100_000)
    images = [random_images(1, seed=index) for index in range(callers)]
    results: list[dict[str, np.ndarray] | BaseException | None] = [None] * callers
    barrier = threading.Barrier(callers)

    def call(index: int) -> None:
        barrier.wait()
        try:
            results[index] = batcher.run(recording, images[index], policy)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=call, args=(index,)) for index in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for outcome, batch in zip(results, images, strict=True):
        assert isinstance(outcome, dict), outcome
        assert_matches_reference(outcome, readme.pipeline, batch)
    assert sum(recording.sizes) == callers
    assert batcher.active_keys() == 0


def test_a_request_in_pieces_is_written_into_one_array_per_output(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme)
    images = random_images(7)
    into = {
        "conv1": np.empty((7, 8, 8, 8), np.float32),
        "features": np.empty((7, 8, 1, 1), np.float32),
    }
    outputs = batcher.run(recording, images, BatchingPolicy(max_batch_size=3), into=into)
    assert [len(run) for run in recording.runs] == [3, 3, 1]
    assert all(outputs[name] is into[name] for name in into)
    assert all(not array.flags.writeable for array in outputs.values())
    assert_matches_reference(outputs, readme.pipeline, images)
    # Without rows of its own, the pieces go into arrays the batcher makes: the same numbers.
    joined = batcher.run(recording, images, BatchingPolicy(max_batch_size=3))
    for name, array in into.items():
        np.testing.assert_array_equal(joined[name], array)


def test_a_request_sharing_a_batch_gets_its_rows_into_its_own_arrays(
    batcher: DynamicBatcher, readme: CompiledPipeline
) -> None:
    recording = RecordingPipeline(readme, hold_first=True)
    policy = BatchingPolicy(max_batch_size=8)
    first, shared, other = random_images(1, seed=1), random_images(2, seed=2), random_images(3)
    into = {
        "conv1": np.full((2, 8, 8, 8), np.nan, np.float32),
        "features": np.full((2, 8, 1, 1), np.nan, np.float32),
    }
    holder = start(batcher, recording, first, policy)
    assert recording.entered.wait(TIMEOUT_S)
    with_rows = Caller(lambda: batcher.run(recording, shared, policy, into=into))
    with_rows.start()
    wait_for_queue(batcher, 1)
    without = start(batcher, recording, other, policy)
    wait_for_queue(batcher, 2)
    recording.release.set()
    holder.outcome()
    outputs = with_rows.outcome()
    assert recording.sizes == [1, 5]  # the two queued requests ran as one batch
    assert all(outputs[name] is into[name] for name in into)
    assert_matches_reference(outputs, readme.pipeline, shared)
    assert_matches_reference(without.outcome(), readme.pipeline, other)
