"""Pipelines registered once (spec + weight tensors), compiled and warmed, kept by id."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..contract.errors import AlreadyExists, InvalidSpec, LimitExceeded, NotFound
from ..contract.limits import DEFAULT_LIMITS, session_memory
from ..contract.ops import (
    layer_costs,
    symbolic_shapes,
)
from ..contract.spec import Pipeline, WeightTensors, content_id
from ..contract.tensors import batch_shape
from .batching import BatchingPolicy
from .budget import UNBOUNDED, MemoryBudget
from .runtime import CompiledPipeline, SessionCache
from .security import DEFAULT_TENANT
from .weights import check_tensors

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
    """Registered pipelines by tenant and id; registering the same thing again is a no-op.

    Names are aliases within a tenant: a name addresses exactly one pipeline (`resolve` turns a
    name or an id into the id), a pipeline may have several, and a name moves to another
    pipeline only when the registration says `replace`.

    Each tenant sees only its own entries: another tenant's id reads as unknown. Tenants that
    register the same content share one compiled session (each entry keeps its own batching),
    and deleting one tenant's entry leaves the others'. Bounded by a count of entries
    (`max_pipelines`) and by bytes (`budget_bytes`, the `registry_bytes` setting) over all
    tenants: a build reserves its estimated peak first, and each distinct session is charged
    its steady estimate once, however many tenants share it.
    """

    def __init__(
        self,
        cache: SessionCache,
        max_pipelines: int,
        budget_bytes: int = UNBOUNDED,
        max_names: int = DEFAULT_LIMITS.max_names_per_pipeline,
    ) -> None:
        self.cache = cache
        self.max_pipelines = max_pipelines
        self.max_names = max_names
        self.budget = MemoryBudget("registry_bytes", budget_bytes)
        self._pipelines: dict[tuple[str, str], RegisteredPipeline] = {}
        self._compiling: set[tuple[str, str]] = set()  # entries holding a slot while building
        self._names: dict[tuple[str, str], str] = {}  # (tenant, name) -> pipeline id
        self._lock = threading.Lock()

    def register(
        self,
        pipeline: Pipeline,
        tensors: WeightTensors,
        batching: BatchingPolicy | None,
        tenant: str = DEFAULT_TENANT,
        name: str | None = None,
        replace: bool = False,
        calibration: np.ndarray | None = None,
        still_wanted: Callable[[], None] | None = None,
    ) -> RegisteredPipeline:
        """Check the weights, compile and warm the session, and keep it under its content id
        (and `name`, if given: see the class docstring for what `replace` does).

        `calibration`: an int8 pipeline's calibration images, already admitted
        (Extractor.admit_calibration); they are part of the content id.
        """
        weights = check_tensors(pipeline, tensors)
        pipeline_id = content_id(pipeline, weights, calibration)
        key = (tenant, pipeline_id)
        memory = session_memory(pipeline, None if calibration is None else calibration.shape)
        with self._lock:
            if name is not None:
                self._check_name_locked(tenant, name, pipeline_id, replace)
            known = self._pipelines.get(key)
            if known is not None and known.batching == batching:
                if name is not None:
                    self._names[(tenant, name)] = pipeline_id
                return known
            shared = known or self._shared_locked(pipeline_id)
            taken = len(self._pipelines) + len(self._compiling - {key})
            if known is None and taken >= self.max_pipelines:
                raise LimitExceeded(
                    "pipeline",
                    f"{len(self._pipelines)} pipelines are registered, the most "
                    f"max_registered_pipelines={self.max_pipelines} allows: delete some first",
                )
            reserved = 0 if shared else memory.peak
            if reserved:
                self.budget.reserve(reserved, "layers", "registering this pipeline")
            self._compiling.add(key)
        try:
            compiled = (
                shared.compiled
                if shared
                else self.cache.compile(pipeline, weights, calibration, still_wanted=still_wanted)
            )
            warm_up(compiled)
        except BaseException:
            with self._lock:
                self._compiling.discard(key)
                self.budget.cancel(reserved)
            raise
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
            self._compiling.discard(key)
            meanwhile = self._shared_locked(pipeline_id) if reserved else None
            if meanwhile is not None:
                # Another tenant registered the same content meanwhile: share its session,
                # so that the budget's one charge stays true.
                self.budget.cancel(reserved)
                registered = dataclasses.replace(registered, compiled=meanwhile.compiled)
            elif reserved:
                self.budget.keep(reserved, memory.steady)
            self._pipelines[key] = registered
            if name is not None:
                # Checked again: another registration may have taken the name meanwhile.
                self._check_name_locked(tenant, name, pipeline_id, replace)
                self._names[(tenant, name)] = pipeline_id
        return registered

    def _check_name_locked(self, tenant: str, name: str, pipeline_id: str, replace: bool) -> None:
        current = self._names.get((tenant, name))
        if current == pipeline_id:
            return  # already its name: nothing changes
        if current is not None and not replace:
            raise AlreadyExists(
                "name",
                f"{name!r} names pipeline {current}, not this one ({pipeline_id}): choose "
                "another name, or register with replace to move the name to this pipeline",
            )
        # Each name is listed in every GetPipeline/ListPipelines reply: bounded per pipeline.
        held = sum(1 for (t, _), i in self._names.items() if t == tenant and i == pipeline_id)
        if held >= self.max_names:
            raise LimitExceeded(
                "name",
                f"pipeline {pipeline_id} has {held} names, the most max_names_per_pipeline="
                f"{self.max_names} allows: register it without a name, or delete it and "
                "register it again under the names you keep",
            )

    def resolve(self, key: str, tenant: str = DEFAULT_TENANT) -> str:
        """The pipeline id `key` (an id or a name) stands for in the tenant."""
        with self._lock:
            return self._names.get((tenant, key), key)

    def names(self, pipeline_id: str, tenant: str = DEFAULT_TENANT) -> list[str]:
        """The tenant's names of a pipeline, sorted."""
        with self._lock:
            return sorted(
                n for (t, n), i in self._names.items() if t == tenant and i == pipeline_id
            )

    def get(
        self, pipeline_id: str, field: str = "pipeline_id", tenant: str = DEFAULT_TENANT
    ) -> RegisteredPipeline:
        """The tenant's registered pipeline by id or name, or NotFound naming `field`."""
        with self._lock:
            pipeline_id = self._names.get((tenant, pipeline_id), pipeline_id)
            registered = self._pipelines.get((tenant, pipeline_id))
        if registered is None:
            raise NotFound(field, f"no pipeline {pipeline_id!r} is registered")
        return registered

    def list(self, tenant: str = DEFAULT_TENANT) -> list[RegisteredPipeline]:
        """The tenant's registered pipelines, by id."""
        with self._lock:
            return [r for (owner, _), r in sorted(self._pipelines.items()) if owner == tenant]

    def delete(self, pipeline_id: str, tenant: str = DEFAULT_TENANT) -> bool:
        """Forget the tenant's pipeline (by id or name) and its names; False if it had none."""
        with self._lock:
            pipeline_id = self._names.get((tenant, pipeline_id), pipeline_id)
            removed = self._pipelines.pop((tenant, pipeline_id), None)
            for alias in [k for k, i in self._names.items() if k[0] == tenant and i == pipeline_id]:
                del self._names[alias]
            if removed is not None and self._shared_locked(pipeline_id) is None:
                self.budget.free(session_memory(removed.compiled.pipeline).steady)
            return removed is not None

    def _shared_locked(self, pipeline_id: str) -> RegisteredPipeline | None:
        """Any tenant's entry for `pipeline_id` (they share its session)."""
        return next((r for (_, i), r in self._pipelines.items() if i == pipeline_id), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pipelines)
