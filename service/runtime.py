"""Where pipelines run: execution providers, onnxruntime sessions and their LRU cache."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..contract.errors import (
    Abandoned,
    Cancelled,
    ExecutionFailed,
    InvalidSpec,
    Unavailable,
)
from ..contract.limits import (
    DEFAULT_LIMITS,
    MIB,
    RequestLimits,
    admit_quantization,
    images_per_run,
    session_memory,
)
from ..contract.precision import QuantizationReport, check_error
from ..contract.spec import NO_TENSORS, Pipeline, WeightTensors, content_id
from ..contract.tensors import Outputs, image_size
from .budget import UNBOUNDED, MemoryBudget
from .graph import INPUT_NAME, compile_pipeline
from .sessions import CPU, CUDA, build_session

log = logging.getLogger(__name__)

# Given a function that stops a run, calls it once the run's caller has gone (or at once when
# it already has): how a server ties a run to its call.
OnGone = Callable[[Callable[[], None]], None]


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    return list(ort.get_available_providers())


def resolve_providers(requested: list[str] | None) -> list[str]:
    """Providers to ask for, in priority order, always ending in CPU as the fallback.

    None means CUDA when onnxruntime reports it available, else CPU alone.
    """
    available = available_providers()
    if requested is None:
        requested = [CUDA] if CUDA in available else []
    missing = [p for p in requested if p not in available]
    if missing:
        raise ValueError(
            f"execution providers {missing} are not available; this build has {available}"
        )
    return [p for p in requested if p != CPU] + [CPU]


# Where a caller keeps a run's outputs while the next runs go (the batcher's pieces of a large
# request, a job's shards), onnxruntime writing them into rows of arrays allocated up front
# (IOBinding) was measured faster than arrays of its own joined afterwards: 10,000 28x28
# images through 192 5x5 filters on 2 cores, runs of 32 kept in groups of 8, 0.59 s joined,
# 0.44 s written in place; each run's outputs dropped at once, 0.44 s.
def run_pieces(
    images: np.ndarray,
    step: int,
    run_piece: Callable[[np.ndarray, Outputs | None], Outputs],
    into: Outputs | None = None,
) -> Outputs:
    """`images` run `step` at a time by `run_piece(piece, into)`, each piece written into
    its rows of one array per output: `into`, or arrays shaped after the first piece's."""
    start = 0
    if into is None:
        first = run_piece(images[:step], None)
        into = {
            name: np.empty((len(images), *array.shape[1:]), array.dtype)
            for name, array in first.items()
        }
        for name, array in first.items():
            into[name][: len(array)] = array
        start = step
    for begin in range(start, len(images), step):
        rows = {name: array[begin : begin + step] for name, array in into.items()}
        run_piece(images[begin : begin + step], rows)
    return into


def check_into(into: Outputs, names: list[str], rows: int) -> None:
    """ValueError unless `into` holds, for each of `names`, a writeable C-contiguous float32
    array of `rows` rows: onnxruntime writes through its pointer (and checks the shape)."""
    for name in names:
        target = into.get(name)
        if target is None or not (
            target.dtype == np.float32
            and target.flags.c_contiguous
            and target.flags.writeable
            and target.shape[:1] == (rows,)
        ):
            got = "nothing" if target is None else f"{target.dtype} {list(target.shape)}"
            raise ValueError(
                f"outputs.{name}: into needs a writeable C-contiguous float32 array of {rows} "
                f"rows, got {got}"
            )


class ActiveRuns:
    """The onnxruntime runs in progress, so that a shutdown can stop them (RunOptions.terminate).

    onnxruntime checks the flag between nodes: a terminated run raises soon after, and the
    caller gets Unavailable instead of results. Once terminated, new runs are refused at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._options: set[ort.RunOptions] = set()
        self.terminated = False

    def start(self) -> ort.RunOptions:
        """RunOptions for one run, registered until `finish`; Unavailable after terminate()."""
        options = ort.RunOptions()
        # 0 is what onnxruntime assumes when it is unset, but its Python binding finds that out
        # by catching an exception on every run_with_iobinding: 29 us a run, measured.
        options.add_run_config_entry("gpu_graph_id", "0")
        with self._lock:
            if self.terminated:
                raise Unavailable("request", "the server is shutting down; retry elsewhere")
            self._options.add(options)
        return options

    def finish(self, options: ort.RunOptions) -> None:
        """The run is over."""
        with self._lock:
            self._options.discard(options)

    def terminate(self) -> int:
        """Stop every run in progress and refuse new ones; how many were stopped."""
        with self._lock:
            self.terminated = True
            for options in self._options:
                options.terminate = True
            return len(self._options)

    def __len__(self) -> int:
        with self._lock:
            return len(self._options)


@dataclass(frozen=True, eq=False)
class CompiledPipeline:
    """A pipeline with its ready onnxruntime session (and, for int8, the error it measured)."""

    pipeline: Pipeline
    pipeline_id: str
    session: ort.InferenceSession
    model_bytes: bytes
    runs: ActiveRuns = field(default_factory=ActiveRuns)
    report: QuantizationReport | None = None
    # int8: where its model came from ("quantized" here, or "disk cache") and how long that took.
    int8_source: str | None = None
    int8_seconds: float = 0.0
    threads: int = 0  # the session's intra-op threads (0: one per core); sizes runs on the CPU

    @property
    def providers(self) -> list[str]:
        """Providers the session actually placed nodes on, in priority order."""
        return list(self.session.get_providers())

    @functools.cached_property
    def on_cpu(self) -> bool:
        """Whether onnxruntime runs this session on the CPU (no GPU provider placed first)."""
        return self.providers[0] == CPU

    def run(
        self,
        images: np.ndarray,
        on_gone: OnGone | None = None,
        into: Outputs | None = None,
    ) -> Outputs:
        """The requested outputs for a batch that already passed the extractor's checks.

        On the CPU, a batch whose activations outgrow run_activation_bytes runs as consecutive
        runs of images_per_run images (contract.limits). `on_gone`, when given, is handed a
        function that stops this run (onnxruntime checks between nodes); the server calls it
        once the run's only caller has gone. `into`: one array per output (float32,
        C-contiguous, writeable, of exactly the outputs' shapes) that onnxruntime writes the
        outputs into (IOBinding) and that are returned, instead of arrays of its own.
        """
        names = self.pipeline.output_names
        if into is not None:
            check_into(into, names, len(images))
        options = self.runs.start()
        if on_gone is not None:
            on_gone(functools.partial(setattr, options, "terminate", True))
        step = len(images)
        if self.on_cpu:
            _, height, width = image_size(self.pipeline.input.layout, images.shape)
            step = images_per_run(self.pipeline, height, width, images.dtype.itemsize, self.threads)
        try:
            if len(images) <= step:
                if into is None:
                    results = self.session.run(names, {INPUT_NAME: images}, options)
                    return dict(zip(names, results, strict=True))
                self._run_into(images, into, options)  # one run: no pieces to cut
                return into
            return self._run_pieces(images, step, options, into)
        except Exception as exc:
            if options.terminate and not self.runs.terminated:
                raise Cancelled("request", "the caller went away; its run was stopped") from None
            if options.terminate:
                raise Unavailable(
                    "request", "the server is shutting down and stopped this run; retry elsewhere"
                ) from None
            log.exception("pipeline %s failed on %s", self.pipeline_id, images.shape)
            raise ExecutionFailed(
                "images", f"onnxruntime failed running pipeline {self.pipeline_id}: {exc}"
            ) from exc
        finally:
            self.runs.finish(options)

    def _run_pieces(
        self, images: np.ndarray, step: int, options: ort.RunOptions, into: Outputs | None
    ) -> Outputs:
        def run_piece(piece: np.ndarray, rows: Outputs | None) -> Outputs:
            names = self.pipeline.output_names
            if rows is None:
                results = self.session.run(names, {INPUT_NAME: piece}, options)
                return dict(zip(names, results, strict=True))
            self._run_into(piece, rows, options)
            return rows

        return run_pieces(images, step, run_piece, into)

    def _run_into(self, images: np.ndarray, into: Outputs, options: ort.RunOptions) -> None:
        """One onnxruntime run that writes its outputs into `into` (IOBinding on the CPU)."""
        names = self.pipeline.output_names
        if not self.on_cpu:
            results = self.session.run(names, {INPUT_NAME: images}, options)
            for name, result in zip(names, results, strict=True):
                into[name][...] = result
            return
        binding = self.session.io_binding()
        # Held in a name until the run is over: the binding may point into its bytes.
        contiguous = np.ascontiguousarray(images)
        binding.bind_cpu_input(INPUT_NAME, contiguous)
        for name in names:
            target = into[name]
            binding.bind_output(
                name, "cpu", 0, target.dtype, list(target.shape), target.ctypes.data
            )
        self.session.run_with_iobinding(binding, options)
        del contiguous


@dataclass
class CacheStats:
    """Counters of a SessionCache."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    quantized: int = 0  # int8 models quantized in this process
    quantized_from_disk: int = 0  # int8 models read from the disk cache instead


# What the refusals of int8 pipelines for their measured error may keep (RefusedInt8): ids and
# messages, each charged its text and a fixed overhead.
REFUSED_INT8_BYTES = MIB
REFUSAL_OVERHEAD_BYTES = 256


class RefusedInt8:
    """int8 pipelines refused for their measured error, by content id: sent again, the same
    refusal at once, without quantizing again. Bounded in bytes, least recently used first.

    The content id covers the spec (max_error included), the weights and the calibration
    images, and the CPU class is the process's: the same id always measures the same error.
    """

    def __init__(self, max_bytes: int = REFUSED_INT8_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._refusals: OrderedDict[str, InvalidSpec] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _cost(pipeline_id: str, refusal: InvalidSpec) -> int:
        return len(pipeline_id) + len(str(refusal)) + REFUSAL_OVERHEAD_BYTES

    def check(self, pipeline_id: str) -> None:
        """Raise the refusal remembered for this id, if there is one."""
        with self._lock:
            refusal = self._refusals.get(pipeline_id)
            if refusal is not None:
                self._refusals.move_to_end(pipeline_id)
        if refusal is not None:
            raise InvalidSpec(refusal.field, refusal.message)

    def remember(self, pipeline_id: str, refusal: InvalidSpec) -> None:
        """Keep a refusal, forgetting the oldest beyond max_bytes."""
        cost = self._cost(pipeline_id, refusal)
        with self._lock:
            if pipeline_id in self._refusals or cost > self.max_bytes:
                return
            self._refusals[pipeline_id] = refusal
            self.bytes += cost
            while self.bytes > self.max_bytes:
                old_id, old = self._refusals.popitem(last=False)
                self.bytes -= self._cost(old_id, old)

    def __len__(self) -> int:
        with self._lock:
            return len(self._refusals)


class SessionCache:
    """LRU cache of compiled sessions keyed by pipeline id; one build per id at a time.

    Bounded by a count (`capacity`) and by bytes (`budget_bytes`, the `session_cache_bytes`
    setting): a build reserves its estimated peak (contract.limits.session_memory) before it
    starts, evicting the least recently used sessions to make room, and keeps its steady
    estimate once built.
    """

    def __init__(
        self,
        capacity: int,
        providers: list[str],
        intra_op_threads: int = 0,
        *,
        spinning: bool = False,
        budget_bytes: int = UNBOUNDED,
        limits: RequestLimits = DEFAULT_LIMITS,
        int8_cache_dir: Path | None = None,
    ) -> None:
        self.capacity = capacity
        # Quantized models kept there across processes (service.int8.cache); None: none kept.
        self.int8_cache_dir = int8_cache_dir
        self.limits = limits
        self.refused = RefusedInt8()
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self.spinning = spinning
        self.stats = CacheStats()
        self.budget = MemoryBudget("session_cache_bytes", budget_bytes)
        # Shared by every session this cache builds: a shutdown stops all their runs.
        self.runs = ActiveRuns()
        self._sessions: OrderedDict[str, CompiledPipeline] = OrderedDict()
        self._charges: dict[str, int] = {}  # id -> steady bytes kept in the budget
        self._building: dict[str, Future[CompiledPipeline]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def get(
        self,
        pipeline: Pipeline,
        tensors: WeightTensors = NO_TENSORS,
        calibration: np.ndarray | None = None,
        *,
        still_wanted: Callable[[], None] | None = None,
    ) -> CompiledPipeline:
        """The compiled session for `pipeline`, building it on a miss (see `compile`).

        A build stops when its caller is gone (`still_wanted` raises Abandoned); callers that
        waited for that build then build it themselves.
        """
        key = content_id(pipeline, tensors, calibration)
        memory = session_memory(pipeline, None if calibration is None else calibration.shape)
        while True:
            with self._lock:
                compiled = self._sessions.get(key)
                if compiled is not None:
                    self._sessions.move_to_end(key)
                    self.stats.hits += 1
                    return compiled
                pending = self._building.get(key)
                if pending is None:
                    self.budget.reserve(
                        memory.peak, "layers", "compiling this pipeline", self._evict_locked
                    )
                    self.stats.misses += 1
                    self._building[key] = pending = Future()
                    break
            try:
                return pending.result()
            except Abandoned:
                continue  # the build's own caller went away, not this one
        try:
            compiled = self.compile(pipeline, tensors, calibration, still_wanted=still_wanted)
        except BaseException as exc:
            # A failed build is not cached: the next request for this spec tries again.
            with self._lock:
                del self._building[key]
                self.budget.cancel(memory.peak)
            pending.set_exception(exc)
            raise
        with self._lock:
            self._sessions[key] = compiled
            self._charges[key] = memory.steady
            self.budget.keep(memory.peak, memory.steady)
            del self._building[key]
            while len(self._sessions) > self.capacity:
                self._evict_locked()
        pending.set_result(compiled)
        return compiled

    def _evict_locked(self) -> int:
        """Drop the least recently used session; the bytes freed (0 when none is left)."""
        if not self._sessions:
            return 0
        key, _ = self._sessions.popitem(last=False)
        freed = self._charges.pop(key)
        self.budget.free(freed)
        self.stats.evictions += 1
        return freed

    def compile(
        self,
        pipeline: Pipeline,
        tensors: WeightTensors = NO_TENSORS,
        calibration: np.ndarray | None = None,
        *,
        still_wanted: Callable[[], None] | None = None,
    ) -> CompiledPipeline:
        """Build a session with this cache's providers and threads, without caching it.

        An int8 pipeline is quantized, calibrated on `calibration` (admitted by
        contract.limits.admit_calibration; None: the synthetic images alone) once its work
        passes the limits (admit_quantization), refused when its measured error exceeds the
        spec's max_error (InvalidSpec naming `max_error`), and runs on the CPU provider:
        onnxruntime's int8 QDQ kernels gain nothing elsewhere. Quantizing calls
        `still_wanted` between batches of images, which stops it by raising (Abandoned).
        """
        pipeline_id = content_id(pipeline, tensors, calibration)
        report = None
        providers = self.providers
        source, started = None, time.perf_counter()
        if pipeline.precision == "int8":
            self.refused.check(pipeline_id)
            admit_quantization(
                pipeline, None if calibration is None else calibration.shape, self.limits
            )
            model_bytes, report, source = self._quantize(
                pipeline, pipeline_id, tensors, calibration, still_wanted
            )
            providers = [CPU]
        else:
            model_bytes = compile_pipeline(pipeline, tensors).SerializeToString()
        try:
            session = build_session(
                model_bytes, providers, threads=self.intra_op_threads, spinning=self.spinning
            )
        except Exception as exc:
            raise ExecutionFailed(
                "spec", f"onnxruntime could not build the session: {exc}"
            ) from exc
        placed = session.get_providers()
        if providers[0] not in placed:
            log.warning(
                "pipeline %s: %s unavailable for this session, running on %s",
                pipeline_id,
                providers[0],
                placed,
            )
        return CompiledPipeline(
            pipeline=pipeline,
            pipeline_id=pipeline_id,
            session=session,
            model_bytes=model_bytes,
            runs=self.runs,
            report=report,
            int8_source=source,
            int8_seconds=time.perf_counter() - started if source else 0.0,
            threads=self.intra_op_threads,
        )

    def _quantize(
        self,
        pipeline: Pipeline,
        pipeline_id: str,
        tensors: WeightTensors,
        calibration: np.ndarray | None,
        still_wanted: Callable[[], None] | None,
    ) -> tuple[bytes, QuantizationReport, str]:
        """The int8 model bytes of a pipeline, its checked report, and where they came from
        ("quantized", or "disk cache" when int8_cache_dir held them); logged at INFO."""
        # Imported here: onnxruntime's quantization tools cost a float32-only server 0.3 s.
        from .int8 import DEFAULT_SETTINGS, check_runs_here, quantize_pipeline
        from .int8.cache import QuantizedModelCache, quantized_key

        disk = None if self.int8_cache_dir is None else QuantizedModelCache(self.int8_cache_dir)
        key = quantized_key(pipeline_id, DEFAULT_SETTINGS)
        cached = None if disk is None else disk.load(key)
        if cached is not None:
            model_bytes, unchecked, source = cached.model_bytes, cached.report, "disk cache"
            self.stats.quantized_from_disk += 1
        else:
            quantized = quantize_pipeline(
                pipeline,
                tensors,
                calibration,
                threads=self.intra_op_threads,
                still_wanted=still_wanted,
            )
            model_bytes, unchecked, source = (
                quantized.model.SerializeToString(),
                quantized.report,
                "quantized",
            )
            del quantized  # the bytes are what the session and GetPipeline need
            self.stats.quantized += 1
            if disk is not None:
                # Refused ones too: a repeat of the same request is refused without the work.
                disk.store(key, model_bytes, unchecked)
        # The key holds the CPU class, so a cached model's weights run exactly here as well.
        check_runs_here(unchecked.weight_bits)
        try:
            report = check_error(unchecked, pipeline.int8_max_error, field="max_error")
        except InvalidSpec as refusal:
            log.info("pipeline %s refused: %s", pipeline_id, unchecked.describe())
            self.refused.remember(pipeline_id, refusal)
            raise
        log.info("pipeline %s (%s): %s", pipeline_id, source, report.describe())
        if self.providers[0] != CPU:
            log.info("pipeline %s: int8 runs on %s, not %s", pipeline_id, CPU, self.providers[0])
        return model_bytes, report, source
