"""Pipelines registered once (spec + weight tensors), compiled and warmed, kept by id."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from featmap.contract.errors import InvalidSpec, LimitExceeded, NotFound
from featmap.contract.ops import (
    layer_costs,
    symbolic_shapes,
)
from featmap.contract.spec import Pipeline, WeightTensors, content_id
from featmap.contract.tensors import batch_shape
from featmap.service.batching import BatchingPolicy
from featmap.service.runtime import CompiledPipeline, SessionCache
from featmap.service.weights import check_tensors

MAX_WARMUP_SIZE = 4096


@dataclass(frozen=True)
class RegisteredPipeline:
    """A registered pipeline: its compiled session, weights' names, batching and outputs."""

    compiled: CompiledPipeline
    weight_names: tuple[str, ...]
    batching: BatchingPolicy | None  # None: the server's default
    output_shapes: dict[str, list[int | str]]

    @property
    def pipeline_id(self) -> str:
        """The content id: spec and weight tensors."""
        return self.compiled.pipeline_id


def smallest_image(pipeline: Pipeline) -> tuple[int, int]:
    """The smallest square image every layer gives a non-empty output for."""
    low, high = 1, MAX_WARMUP_SIZE
    if not _fits(pipeline, high):
        raise InvalidSpec("layers", f"no image up to {high}x{high} gives every layer an output")
    while low < high:  # output sizes grow with the input: bisect
        middle = (low + high) // 2
        low, high = (low, middle) if _fits(pipeline, middle) else (middle + 1, high)
    return low, low


def _fits(pipeline: Pipeline, size: int) -> bool:
    try:
        layer_costs(pipeline, size, size)
    except InvalidSpec:
        return False
    return True


def warm_up(compiled: CompiledPipeline) -> None:
    """Run once on the smallest valid image so the first real request pays no start-up."""
    pipeline = compiled.pipeline
    height, width = smallest_image(pipeline)
    shape = batch_shape(pipeline.input.layout, 1, pipeline.input.channels, height, width)
    compiled.run(np.zeros(shape, dtype=pipeline.input.dtype))


class PipelineRegistry:
    """Registered pipelines by id; registering the same spec and weights again is a no-op."""

    def __init__(self, cache: SessionCache, max_pipelines: int) -> None:
        self.cache = cache
        self.max_pipelines = max_pipelines
        self._pipelines: dict[str, RegisteredPipeline] = {}
        self._compiling: set[str] = set()  # ids holding a slot while their session builds
        self._lock = threading.Lock()

    def register(
        self, pipeline: Pipeline, tensors: WeightTensors, batching: BatchingPolicy | None
    ) -> RegisteredPipeline:
        """Check the weights, compile and warm the session, and keep it under its content id."""
        weights = check_tensors(pipeline, tensors)
        pipeline_id = content_id(pipeline, weights)
        with self._lock:
            known = self._pipelines.get(pipeline_id)
            if known is not None and known.batching == batching:
                return known
            taken = len(self._pipelines) + len(self._compiling - {pipeline_id})
            if known is None and taken >= self.max_pipelines:
                raise LimitExceeded(
                    "pipeline",
                    f"{len(self._pipelines)} pipelines are registered, the most "
                    f"max_registered_pipelines={self.max_pipelines} allows: delete some first",
                )
            self._compiling.add(pipeline_id)
        try:
            compiled = known.compiled if known else self.cache.compile(pipeline, weights)
            warm_up(compiled)
        finally:
            with self._lock:
                self._compiling.discard(pipeline_id)
        registered = RegisteredPipeline(
            compiled=compiled,
            weight_names=tuple(sorted(weights)),
            batching=batching,
            output_shapes={
                name: shape
                for name, shape in symbolic_shapes(pipeline).items()
                if name in pipeline.output_names
            },
        )
        with self._lock:
            self._pipelines[pipeline_id] = registered
        return registered

    def get(self, pipeline_id: str, field: str = "pipeline_id") -> RegisteredPipeline:
        """The registered pipeline, or NotFound naming `field`."""
        with self._lock:
            registered = self._pipelines.get(pipeline_id)
        if registered is None:
            raise NotFound(field, f"no pipeline {pipeline_id!r} is registered")
        return registered

    def list(self) -> list[RegisteredPipeline]:
        """All registered pipelines, by id."""
        with self._lock:
            return [self._pipelines[key] for key in sorted(self._pipelines)]

    def delete(self, pipeline_id: str) -> bool:
        """Forget a pipeline; False if it was not registered."""
        with self._lock:
            return self._pipelines.pop(pipeline_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._pipelines)
