"""Per-call stage timings: the batcher notes queue and compute seconds, the observer reads them.

The extractor notes the images it admitted here too: the metrics count images that passed the
checks, never a number a request's header merely claims.

A thread-local, because a call's handler runs on one gRPC thread from start to end (a stream's
on the thread iterating its responses), and so does the batcher's `run` for that call.
"""

from __future__ import annotations

import threading

_local = threading.local()
IMAGES = "images"  # not a stage: admitted images, summed like one


def begin() -> dict[str, float]:
    """Start collecting stage seconds for the call on this thread; the dict fills as it runs."""
    stages: dict[str, float] = {}
    _local.stages = stages
    return stages


def end() -> None:
    """Stop collecting for this thread."""
    _local.stages = None


def note(stage: str, seconds: float) -> None:
    """Add `seconds` to `stage` of the call on this thread (nothing when none is observed)."""
    stages: dict[str, float] | None = getattr(_local, "stages", None)
    if stages is not None:
        stages[stage] = stages.get(stage, 0.0) + seconds


def note_images(count: int) -> None:
    """Count `count` admitted images for the call on this thread (what the metrics report)."""
    stages: dict[str, float] | None = getattr(_local, "stages", None)
    if stages is not None:
        stages[IMAGES] = stages.get(IMAGES, 0) + count
