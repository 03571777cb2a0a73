"""The one run path: admit a batch, compile (cached), run (batched), check and convert results.

Every entry point that runs images — Extract, ExtractStream, OIP ModelInfer, the embedded
runner of `featmap extract` and Ray — goes through `Extractor.extract`; the admission checks
themselves are the contract's (featmap.contract.limits).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..contract.errors import NonFiniteResult
from ..contract.limits import (
    BatchPlan,
    DeferredBatch,
    RequestLimits,
    admit_batch,
    admit_calibration,
    admit_pipeline,
    admit_values,
)
from ..contract.spec import Pipeline
from ..contract.tensors import Outputs, all_finite, first_non_finite
from . import stages
from .batching import BatchingPolicy, DynamicBatcher
from .budget import UNBOUNDED, MemoryBudget
from .runtime import CompiledPipeline, OnGone, SessionCache
from .weights import check_presets


@dataclass(frozen=True)
class Target:
    """What a request runs: an admitted pipeline, its session if built, and how to batch it."""

    pipeline: Pipeline
    compiled: CompiledPipeline | None  # None for an inline spec until its first batch runs
    batching: BatchingPolicy | None  # None: run alone


@dataclass(frozen=True)
class Extraction:
    """A run's outputs, with the plan admit_batch made and the pipeline id it ran."""

    outputs: dict[str, np.ndarray]
    plan: BatchPlan
    pipeline_id: str


class Extractor:
    """Runs admitted pipelines on admitted batches; the one place that does."""

    def __init__(
        self,
        cache: SessionCache,
        limits: RequestLimits,
        batcher: DynamicBatcher | None = None,
        *,
        run_bytes: int = UNBOUNDED,
    ) -> None:
        self.cache = cache
        self.limits = limits
        self.batcher = batcher
        # Every admitted batch's estimated memory, from admission to its last output.
        self.runs = MemoryBudget("run_bytes", run_bytes)
        self._runs_lock = threading.Lock()

    def admit(self, pipeline: Pipeline) -> Pipeline:
        """The pipeline, if it may run here at all (LimitExceeded, InvalidSpec otherwise)."""
        admit_pipeline(pipeline, self.limits)
        check_presets(pipeline)  # a kernel float64 cannot compute is the spec's fault
        return pipeline

    def admit_calibration(self, pipeline: Pipeline, images: np.ndarray) -> np.ndarray:
        """An admitted int8 pipeline's calibration images, if they may calibrate it here."""
        admit_calibration(pipeline, images, self.limits)
        return images

    def extract(
        self,
        target: Target,
        images: np.ndarray | DeferredBatch,
        *,
        output_dtype: str = "float32",
        reply_in_message: bool = True,
        output_names: Sequence[str] | None = None,
        before_run: Callable[[], None] | None = None,
        on_gone: OnGone | None = None,
        field: str = "images",
        into: Outputs | None = None,
    ) -> Extraction:
        """Admit `images`, run them through `target`, and check the results.

        `before_run` is called after every check, right before onnxruntime; the server passes
        one that raises Abandoned when the caller has gone or its deadline has passed, and
        `on_gone`, which stops a run serving this caller alone once it has gone.
        `output_names`: those the reply will carry, each once (default: all), to size it. Outputs
        are float32, or float16 (NonFiniteResult for values float16 cannot hold). With a
        batching policy, concurrent calls share onnxruntime runs; the checks stay per call, so
        one caller's overflow fails that caller alone. Errors about the batch name `field`
        (`images`, or `encoded` for images the server decodes). `into`: float32 arrays the
        outputs are written into (see CompiledPipeline.run).
        """
        plan = admit_batch(
            target.pipeline,
            images,
            self.limits,
            output_dtype=output_dtype,
            reply_in_message=reply_in_message,
            output_names=output_names,
            field=field,
        )
        policy = target.batching if self.batcher is not None else None
        memory = run_memory(target.pipeline, plan, policy)
        if isinstance(images, DeferredBatch):
            memory += images.scratch_bytes  # what reading it costs beside it (decoding)
        with self._runs_lock:
            self.runs.reserve(memory, f"{field}.shape", "running this batch")
        try:
            if isinstance(images, DeferredBatch):
                images = images.read()  # only now: its shape passed every limit
                admit_values(images, self.limits, field)
            stages.note_images(plan.batch)
            compiled = target.compiled or self.cache.get(target.pipeline, still_wanted=before_run)
            if before_run is not None:
                before_run()
            if self.batcher is not None and target.batching is not None:
                outputs = self.batcher.run(compiled, images, target.batching, on_gone, into)
            else:
                outputs = compiled.run(images, on_gone, into)
        finally:
            with self._runs_lock:
                self.runs.cancel(memory)
        for name, array in outputs.items():
            if not all_finite(array):
                if self.limits.allow_non_finite_input and not all_finite(images):
                    continue  # NaN in, NaN out: the caller asked for that
                raise NonFiniteResult(
                    f"outputs.{name}",
                    f"finite input gave {first_non_finite(array)}: float32 overflowed "
                    "(check weights, input.scale and depth)",
                )
        if output_dtype == "float16":
            outputs = {name: to_float16(name, array) for name, array in outputs.items()}
        return Extraction(outputs, plan, compiled.pipeline_id)


def run_memory(pipeline: Pipeline, plan: BatchPlan, policy: BatchingPolicy | None) -> int:
    """What running `plan` holds at its peak, as run_bytes charges it: its activations, or,
    when the batcher runs it in pieces of max_batch_size images, one piece's activations and
    the outputs of all of them twice (the pieces, then the arrays joined from them).

    Charging a request of 3,300 small images its whole activations (4 GB for 192 channels of
    28x28) refused it as Busy beside one other, where its pieces held 40 MB at a time.
    """
    memory = plan.cost.memory_bytes
    if policy is None or not policy.enabled or plan.batch <= policy.max_batch_size:
        return memory
    piece = math.ceil(memory * policy.max_batch_size / plan.batch)
    by_name = {layer.name: layer.output_bytes for layer in plan.layers}
    outputs = plan.batch * sum(by_name[name] for name in pipeline.output_names)
    return min(memory, piece + 2 * outputs)


def to_float16(name: str, array: np.ndarray) -> np.ndarray:
    """float32 -> float16, refusing values float16 cannot hold rather than returning Inf."""
    with np.errstate(over="ignore"):  # overflow is reported below, as an error
        half = array.astype(np.float16)
    # Only values float32 held and float16 cannot: NaN/Inf input (when allowed) stays as is.
    if not all_finite(half) and bool(np.any(np.isfinite(array) & ~np.isfinite(half))):
        raise NonFiniteResult(
            f"outputs.{name}",
            f"values up to {float(np.abs(array).max())} overflow float16 (max 65504): "
            "ask for FLOAT32",
        )
    return half
