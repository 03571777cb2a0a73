"""Triton-style dynamic batching: concurrent runs of one pipeline on one image shape share a run.

Leader/follower ("opportunistic") batching, with no thread of its own. Per key — pipeline id,
image shape without N, dtype and policy — at most `concurrent_batches` batches are gathered or
running at a time (1 by default; the server uses 2, see settings.concurrent_batches):

- a caller that finds fewer leaders than that becomes one and runs at once, after waiting up to
  `max_queue_delay_us` for company when that is above zero;
- callers that arrive while the key is busy queue up and sleep on their own Event;
- a leader that is done wakes the head of the queue to lead the next batch, or drops the key's
  state when the queue is empty.

A batch is the head of the queue plus the requests behind it, in order, while the images fit in
`max_batch_size`; a request larger than that is run as pieces of `max_batch_size` images, one
after another (the last may share a batch), and its outputs concatenated. If the combined run
raises, every request of the batch runs again on its own caller's thread (alongside the key's
next batch), so each caller gets its own result or its own exception.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Protocol

import numpy as np

from ..contract.errors import ExecutionFailed
from ..contract.tensors import Outputs
from . import stages
from .runtime import OnGone, run_pieces

log = logging.getLogger(__name__)


class PipelineRunner(Protocol):
    """What the batcher needs of a CompiledPipeline: its id and its run."""

    @property
    def pipeline_id(self) -> str: ...

    def run(
        self,
        images: np.ndarray,
        on_gone: OnGone | None = None,
        into: Outputs | None = None,
    ) -> Outputs: ...


@dataclass(frozen=True)
class BatchingPolicy:
    """How one pipeline's concurrent requests are batched (the proto's BatchingConfig)."""

    enabled: bool = True
    max_batch_size: int = 32
    max_queue_delay_us: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be at least 1")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us={self.max_queue_delay_us} must not be negative")


@dataclass
class BatchStats:
    """Counters of a DynamicBatcher; requests with batching disabled are not counted."""

    batches: int = 0
    requests: int = 0
    images: int = 0
    # Combined runs that raised and were retried request by request.
    failed_batches: int = 0
    # Images per combined run -> how many runs had that size.
    batch_sizes: Counter[int] = field(default_factory=Counter)


class _Step(Enum):
    """What a woken caller does next; set before its Event."""

    LEAD = "lead"
    DONE = "done"
    RUN_ALONE = "run_alone"


@dataclass(eq=False)
class _Request:
    images: np.ndarray
    arrived: float
    on_gone: OnGone | None = None
    started: float | None = None  # when its batch began running
    wake: threading.Event = field(default_factory=threading.Event)
    step: _Step | None = None
    outputs: dict[str, np.ndarray] | None = None
    counted: bool = False  # a later piece of a request larger than a batch: counted once
    into: Outputs | None = None  # where its outputs go (see CompiledPipeline.run)


@dataclass(eq=False)
class _Queue:
    """One key's waiting requests; `leaders` gathering or running a batch right now."""

    arrival: threading.Condition
    waiting: deque[_Request] = field(default_factory=deque)
    images: int = 0
    leaders: int = 0


_Key = tuple[str, tuple[int, ...], np.dtype, BatchingPolicy]


class DynamicBatcher:
    """Coalesces concurrent `run` calls for the same key into shared onnxruntime runs."""

    def __init__(self, concurrent_batches: int = 1) -> None:
        # More than one batch per key in flight lets the next batch gather, concatenate and
        # start while one runs, instead of leaving the cores idle between batches.
        if concurrent_batches < 1:
            raise ValueError(f"concurrent_batches={concurrent_batches} must be at least 1")
        self.concurrent_batches = concurrent_batches
        self._lock = threading.Lock()
        self._queues: dict[_Key, _Queue] = {}
        self._stats = BatchStats()

    @property
    def stats(self) -> BatchStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return replace(self._stats, batch_sizes=Counter(self._stats.batch_sizes))

    def active_keys(self) -> int:
        """Keys with a batch gathering, running or queued; 0 when the batcher is idle."""
        with self._lock:
            return len(self._queues)

    def queued(self) -> int:
        """Requests waiting to join a batch, over all keys."""
        with self._lock:
            return sum(len(queue.waiting) for queue in self._queues.values())

    def run(
        self,
        compiled: PipelineRunner,
        images: np.ndarray,
        policy: BatchingPolicy,
        on_gone: OnGone | None = None,
        into: Outputs | None = None,
    ) -> dict[str, np.ndarray]:
        """The outputs for `images`, computed in a batch shared with concurrent callers.

        Args:
            compiled: the pipeline's session (a CompiledPipeline).
            images: a batch that already passed the extractor's checks.
            policy: the pipeline's batching; disabled means `compiled.run(images)` unchanged.
            on_gone: stops a run that serves this caller alone once it has gone (a batch
                shared with others runs on for them).
            into: arrays to write the outputs into (see CompiledPipeline.run).

        Returns:
            The pipeline's outputs for exactly these images, in order. With batching enabled
            they are read-only: rows of one array are shared by every caller of a batch.
        """
        if not policy.enabled:
            started = time.monotonic()
            outputs = compiled.run(images, on_gone, into)
            stages.note("compute", time.monotonic() - started)
            return outputs
        size = policy.max_batch_size
        if len(images) <= size:
            return self._run_batched(compiled, images, policy, on_gone, into=into)
        # Larger than a batch: one piece after another, each a batch of its own or, the last,
        # shared with concurrent callers, written into its rows of the request's outputs.
        # onnxruntime runs at the batch size the policy names (past it, activations outgrow
        # the caches: measured on 2 cores, 28x28 images, a run of 128 images takes 1.4x the
        # time per image of a run of 32).
        pieces = itertools.count()

        def run_piece(piece: np.ndarray, rows: Outputs | None) -> Outputs:
            counted = next(pieces) > 0  # the stats count a request once, with its first piece
            return self._run_batched(compiled, piece, policy, on_gone, counted, rows)

        return _read_only(run_pieces(images, size, run_piece, into))

    def _run_batched(
        self,
        compiled: PipelineRunner,
        images: np.ndarray,
        policy: BatchingPolicy,
        on_gone: OnGone | None,
        counted: bool = False,
        into: Outputs | None = None,
    ) -> dict[str, np.ndarray]:
        """run() for at most a batch of images: queued with, or leading, concurrent callers.
        `counted`: a later piece of a larger request, which the stats already count; `into`:
        where its outputs go."""
        key: _Key = (compiled.pipeline_id, images.shape[1:], images.dtype, policy)
        request = _Request(images=images, arrived=time.monotonic(), on_gone=on_gone)
        request.counted = counted
        request.into = into
        # Decided under the lock; after it, the request's Event is the only hand-over.
        with self._lock:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(arrival=threading.Condition(self._lock))
            queue.waiting.append(request)
            queue.images += len(images)
            leads = queue.leaders < self.concurrent_batches
            if leads:
                queue.leaders += 1
                request.step = _Step.LEAD
            else:
                # Only the leader waits on `arrival`, and only while gathering company.
                queue.arrival.notify_all()
        if not leads:
            request.wake.wait()
        if request.step is _Step.LEAD:
            self._lead(key, queue, request, compiled, policy)
        started = request.started or request.arrived
        stages.note("queue", started - request.arrived)
        if request.step is _Step.RUN_ALONE:
            outputs = _read_only(compiled.run(images, on_gone, request.into))
        else:
            assert request.outputs is not None
            outputs = request.outputs
        stages.note("compute", time.monotonic() - started)
        return outputs

    def _lead(
        self,
        key: _Key,
        queue: _Queue,
        leader: _Request,
        compiled: PipelineRunner,
        policy: BatchingPolicy,
    ) -> None:
        """Gather and run one batch headed by `leader`, then hand the queue on."""
        batch: list[_Request] = []
        try:
            with self._lock:
                batch = self._gather(queue, policy, leader)
            started = time.monotonic()
            for request in batch:
                request.started = started
            self._run_batch(compiled, batch)
        finally:
            # Whatever was raised, every follower wakes exactly once and the queue gets a new
            # leader or is dropped, so no caller waits forever and idle keys do not pile up.
            for follower in batch[1:]:
                if follower.step is None:
                    follower.step = _Step.RUN_ALONE
                follower.wake.set()
            with self._lock:
                if not batch:  # interrupted while gathering: the leader is still queued
                    queue.waiting.remove(leader)
                    queue.images -= len(leader.images)
                # The oldest request that is no leader already leads next (another leader,
                # gathering its own batch, must not be handed a second one).
                head = next((r for r in queue.waiting if r.step is not _Step.LEAD), None)
                if head is not None:
                    head.step = _Step.LEAD
                    head.wake.set()
                else:
                    queue.leaders -= 1
                    if not queue.leaders:
                        del self._queues[key]

    def _gather(self, queue: _Queue, policy: BatchingPolicy, leader: _Request) -> list[_Request]:
        """Take `leader`'s batch off the queue: the leader, then the requests behind it that
        are no leader themselves; call with the lock held."""
        # Triton's rule: a batch goes when it is full or its oldest request has waited the
        # delay. A promoted leader has usually waited a whole run already.
        deadline = leader.arrived + policy.max_queue_delay_us / 1e6
        while queue.images < policy.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            queue.arrival.wait(remaining)
        # The leader always goes (run() cut larger requests to max_batch_size). Another
        # leader's request stays: it is gathering a batch of its own (concurrent_batches > 1).
        queue.waiting.remove(leader)
        batch = [leader]
        size = len(leader.images)
        # In order: a request that does not fit waits for the next batch, and so does every
        # request behind it.
        kept: deque[_Request] = deque()
        taking = True
        for request in queue.waiting:
            if request.step is _Step.LEAD:
                kept.append(request)
            elif taking and size + len(request.images) <= policy.max_batch_size:
                batch.append(request)
                size += len(request.images)
            else:
                taking = False
                kept.append(request)
        queue.waiting = kept
        queue.images -= size
        self._stats.batches += 1
        self._stats.requests += sum(not request.counted for request in batch)
        self._stats.images += size
        self._stats.batch_sizes[size] += 1
        return batch

    def _run_batch(self, compiled: PipelineRunner, batch: list[_Request]) -> None:
        """One run for the whole batch, its outputs split back to the requests."""
        counts = [len(request.images) for request in batch]
        try:
            images = (
                batch[0].images
                if len(batch) == 1
                else np.concatenate([request.images for request in batch])
            )
            if len(batch) == 1:
                parts = _split(compiled.run(images, batch[0].on_gone, batch[0].into), counts)
            else:
                parts = _split(compiled.run(images, None), counts)
        except Exception as exc:
            if len(batch) == 1:
                raise  # alone already: the error is this caller's own
            # No traceback: CompiledPipeline.run logged it, and each retry raises its own.
            log.warning(
                "pipeline %s: a batch of %s images failed (%s); running its %d requests alone",
                compiled.pipeline_id,
                counts,
                exc,
                len(batch),
            )
            with self._lock:
                self._stats.failed_batches += 1
            for request in batch:
                request.step = _Step.RUN_ALONE
            return
        for request, part in zip(batch, parts, strict=True):
            if request.into is not None and len(batch) > 1:
                for name, rows in part.items():
                    request.into[name][...] = rows
                part = _read_only(request.into)
            request.outputs = part
            request.step = _Step.DONE


def _read_only(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same arrays, made read-only so every path of the batcher returns alike."""
    for array in outputs.values():
        array.flags.writeable = False
    return outputs


def _split(outputs: dict[str, np.ndarray], counts: list[int]) -> list[dict[str, np.ndarray]]:
    """Each request's rows (axis 0) of a batch's outputs, as read-only views."""
    # Views, not copies: the callers of a batch share one array per output. The base is made
    # read-only first, so its views are too and cannot be made writeable again: no caller can
    # change another's result.
    _read_only(outputs)
    if len(counts) == 1:
        return [outputs]
    total = sum(counts)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ExecutionFailed(
                f"outputs.{name}",
                f"shape {list(array.shape)} has no batch axis of {total} images to split",
            )
    bounds = list(itertools.accumulate(counts, initial=0))
    return [
        {name: array[start:stop] for name, array in outputs.items()}
        for start, stop in itertools.pairwise(bounds)
    ]
