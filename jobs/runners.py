"""What a batch job runs its batches on: the server's run path in this process
(EmbeddedRunner), or featmap servers over gRPC (RemoteRunner)."""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..contract.limits import DEFAULT_LIMITS, MIB
from ..contract.ops import batch_cost
from ..contract.pixels import PIXEL_DTYPE, pixel_pipeline, pixel_values
from ..contract.precision import QuantizationReport
from ..contract.spec import Pipeline
from ..contract.tensors import Outputs, dtype_name, single_image_size
from ..contract.wire import EncodedBatch
from .images import EncodedRule
from .targets import grpc_target, target_addresses

if TYPE_CHECKING:
    from ..client.channel import ChannelSecurity
    from ..service.extractor import Target
    from .job import JobBatch


ENCODED = "encoded"


def batch_key(batch: JobBatch) -> tuple[str, object]:
    """(the dtype a batch runs as, what batches joined with it share): its dtype and image
    shape, or uint8 pixels for encoded image files (ENCODED)."""
    if isinstance(batch, EncodedBatch):
        return PIXEL_DTYPE, ENCODED
    return dtype_name(batch.dtype), batch.shape[1:]


def pipelines_by_dtype(pipeline: Pipeline) -> dict[str, Pipeline]:
    """The pipeline for each batch dtype a runner takes: its own, and uint8 pixels."""
    return {pipeline.input.dtype: pipeline, PIXEL_DTYPE: pixel_pipeline(pipeline)}


def calibration_by_dtype(
    pipeline: Pipeline, images: np.ndarray | None
) -> dict[str, np.ndarray | None]:
    """An int8 pipeline's calibration images for each batch dtype a runner takes.

    Pixels (uint8, from image files) calibrate the pixel variant as they are and the pipeline
    itself as its input values; images in the pipeline's own dtype (array files) calibrate the
    pipeline only, and the pixel variant then takes the synthetic set (None).
    """
    if images is None:
        return {}
    if images.dtype.name == PIXEL_DTYPE and pipeline.input.dtype != PIXEL_DTYPE:
        return {PIXEL_DTYPE: images, pipeline.input.dtype: pixel_values(images, pipeline.input)}
    return {pipeline.input.dtype: images}


# A request's fixed cost (gRPC, protobuf, the server's admission and batcher: about 1-2 ms of
# CPU on each side) is noise beside 2 GFLOPs of convolutions (10-40 ms on one core); beside a
# batch of 32 small images (28x28, 7.5 MFLOPs each) it doubled the job's CPU time.
REQUEST_FLOPS = 2 * 10**9


def request_images(pipeline: Pipeline, batch: np.ndarray, limits: Mapping[str, Any]) -> int:
    """Images per request for a job's batches like `batch`: at least the batch, and as many
    as bring a request's work to REQUEST_FLOPS, within the server's `limits` (GetServerInfo's:
    images, FLOPs and activation bytes per request).

    The server runs a larger request as batches of its max_batch_size, so onnxruntime's runs
    stay the size they are fastest at; the client still bounds it by the message size.
    """
    _, height, width = single_image_size(pipeline.input.layout, batch.shape[1:])
    one = batch_cost(pipeline, 1, height, width, batch.dtype.itemsize)
    images = [math.ceil(REQUEST_FLOPS / max(1, one.flops))]
    for limit, per_image in (
        ("max_images_per_request", 1),
        ("max_flops", one.flops),
        ("max_activation_bytes", one.memory_bytes),
    ):
        if limits.get(limit):  # a limit the server did not report bounds nothing
            images.append(int(limits[limit]) // max(1, per_image))
    return max(len(batch), min(images))


# What one block of OutputBlocks holds: a few batches' outputs, so that a block held by a
# shard's last rows keeps little else alive.
OUTPUT_BLOCK_BYTES = 4 * MIB


class OutputBlocks:
    """Rows of float32 arrays allocated a block at a time, that consecutive batches' outputs
    are written into: a job keeps a shard's outputs until it is saved, and onnxruntime writing
    into rows allocated up front is faster than arrays of its own kept (service.runtime).

    The outputs' shapes are learned from a batch of each key (dtype and image shape) run
    without rows; `rows` has none to give until then.
    """

    def __init__(self, block_bytes: int = OUTPUT_BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes
        self._key: object = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._rows_a_block = 0  # learned with the shapes
        self._block: Outputs = {}
        self._capacity = 0
        self._used = 0

    def rows(self, key: object, count: int) -> Outputs | None:
        """Writeable rows for `count` images of `key`, or None (a key not learned yet)."""
        if self._shapes is None or key != self._key:
            return None
        if self._used + count > self._capacity:
            self._capacity = max(count, self._rows_a_block)
            self._block = {
                name: np.empty((self._capacity, *shape), np.float32)
                for name, shape in self._shapes.items()
            }
            self._used = 0
        start, self._used = self._used, self._used + count
        return {name: array[start : self._used] for name, array in self._block.items()}

    def learn(self, key: object, outputs: Outputs) -> None:
        """The shapes of `key`'s outputs, from a batch's (float32 ones only: others keep
        arrays of their own)."""
        self._key, self._block, self._capacity, self._used, self._shapes = key, {}, 0, 0, None
        if all(array.dtype == np.float32 and array.ndim for array in outputs.values()):
            self._shapes = {name: array.shape[1:] for name, array in outputs.items()}
            itemsize = np.dtype(np.float32).itemsize
            row_bytes = sum(itemsize * math.prod(shape) for shape in self._shapes.values())
            self._rows_a_block = self.block_bytes // max(1, row_bytes)


class EmbeddedRunner:
    """The server's admission, graph builder, session cache and run path, in this process.

    The limits are the server's defaults (featmap.contract.limits), not FEATMAP_* from the
    environment: this is no server. `tensors` are the weights a spec names as {"tensor": ...};
    `calibration` the images an int8 pipeline is calibrated on (None: the synthetic ones), and
    `report` what int8 was measured to cost (None for float32). Sessions are built on first
    use: a job of image files builds only the pixel variant's (an int8 one: the variant of the
    calibration images' dtype, at once, so that its report is known before the job runs).
    `int8_cache_dir` keeps quantized models across jobs (None: quantize every time).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        threads: int = 0,
        tensors: Mapping[str, np.ndarray] | None = None,
        calibration: np.ndarray | None = None,
        int8_cache_dir: Path | None = None,
        *,
        spinning: bool = False,
    ) -> None:
        # The runtime is imported here, when used: a job with --server never loads onnxruntime.
        from ..service.extractor import Extractor
        from ..service.runtime import SessionCache, resolve_providers
        from ..service.weights import check_tensors

        self.pipeline = pipeline
        self.pipelines = pipelines_by_dtype(pipeline)
        # `spinning` (onnxruntime's own default) only where nothing else needs the cores: a job
        # of image files decodes on threads beside onnxruntime, and pool threads spinning
        # between parallel sections take the cores the decoders need. Measured on 2 cores:
        # 1,536 JPEGs (224x224), spinning on cost 7.3 CPU ms per image and a quarter fewer
        # images/s, off 6.4 ms; a 10,000x1x28x28 .npy, whose rows are views, ran in 1.29 s
        # whole process with it on and 1.39 s off (median of 6).
        cache = SessionCache(
            len(self.pipelines),
            resolve_providers(None),
            threads,
            spinning=spinning,
            int8_cache_dir=int8_cache_dir,
        )
        self.extractor = Extractor(cache, DEFAULT_LIMITS)
        for each in self.pipelines.values():
            self.extractor.admit(each)
        self.weights = check_tensors(pipeline, tensors or {})
        self.calibrations = calibration_by_dtype(pipeline, calibration)
        for dtype, images in self.calibrations.items():
            if images is not None:
                self.extractor.admit_calibration(self.pipelines[dtype], images)
        self.targets: dict[str, Target] = {}
        self.blocks = OutputBlocks()
        self.report: QuantizationReport | None = None
        # int8: "quantized" or "disk cache", and the seconds that took (calibration included).
        self.int8_source: str | None = None
        self.int8_seconds = 0.0
        if pipeline.precision == "int8":
            # The session of the dtype the calibration came in (pixels: the one image files use).
            first = calibration.dtype if calibration is not None else pipeline.input.dtype
            compiled = self.target(np.empty((0,), dtype=first)).compiled
            if compiled is not None:
                self.report = compiled.report
                self.int8_source, self.int8_seconds = compiled.int8_source, compiled.int8_seconds

    def target(self, batch: np.ndarray) -> Target:
        """What a batch of this dtype runs as (the session built on first use)."""
        from ..service.extractor import Target

        dtype = dtype_name(batch.dtype)
        target = self.targets.get(dtype)
        if target is None:
            pipeline = self.pipelines.get(dtype, self.pipeline)  # admit_batch names a bad dtype
            calibration = self.calibrations.get(dtype)
            compiled = self.extractor.cache.get(pipeline, self.weights, calibration)
            target = self.targets[dtype] = Target(pipeline, compiled, None)
        return target

    def run(self, batches: Iterable[JobBatch]) -> Iterator[dict[str, np.ndarray]]:
        """Each batch's outputs (no reply to fit in a message: reply_in_message off), as rows
        of OutputBlocks."""
        for batch in batches:
            if not isinstance(batch, np.ndarray):
                raise TypeError("encoded images go to a server: decode them for this runner")
            key = batch_key(batch)
            rows = self.blocks.rows(key, len(batch))
            target = self.target(batch)
            outputs = self.extractor.extract(
                target, batch, reply_in_message=False, into=rows
            ).outputs
            if rows is None:
                self.blocks.learn(key, outputs)
            yield outputs

    def close(self) -> None:
        """Nothing to release beyond what the garbage collector does."""


class RemoteRunner:
    """Batches sent through FeatureClient, `in_flight` requests at a time, consecutive small
    ones joined into one request (`request_images`); with `shared_memory`, through /dev/shm
    (one server, on its Unix socket, that offers it: ValueError otherwise).

    A spec with {"tensor": NAME} weights, an int8 spec, or one given a `name`, is registered
    (with `tensors` and `calibration`, under `name`) on every address the servers resolve to
    (servers without a shared pipeline store keep their own), then run by id; `report` is what
    int8 was measured to cost on the first server (None for float32).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        servers: Sequence[str],
        in_flight: int,
        timeout: float,
        security: ChannelSecurity | None = None,
        tensors: Mapping[str, np.ndarray] | None = None,
        name: str | None = None,
        replace_name: bool = False,
        calibration: np.ndarray | None = None,
        request_images: int | None = None,
        shared_memory: bool = False,
    ) -> None:
        from ..client.channel import ChannelSecurity
        from ..client.client import FeatureClient

        # None: batches of small images are joined (see request_images); a number: at most
        # that many images a request (a batch is never split).
        self.request_images = request_images
        self.server_limits: dict[str, Any] | None = None

        target, balanced = grpc_target(servers)
        security = security or ChannelSecurity()
        options: dict[str, Any] = {
            "timeout": timeout,
            "tls": security.tls,
            "tls_ca": security.tls_ca,
            "tls_cert": security.tls_cert,
            "tls_key": security.tls_key,
            "tls_server_name": security.tls_server_name,
            "token": security.token,
        }
        self.client = FeatureClient(
            target,
            in_flight=in_flight,
            load_balancing=balanced,
            shared_memory=shared_memory,
            **options,
        )
        if shared_memory:
            info = self.client.server_info()
            self.server_limits = info.limits  # asked once (limits())
            if not info.shared_memory:
                self.client.close()
                raise ValueError(
                    f"the server at {target} offers no shared memory: start it with featmap "
                    "serve --unix-socket PATH --shared-memory, or leave --shared-memory out"
                )
        self.pipeline = pipeline
        self.pipelines: dict[str, Pipeline | str] = dict(pipelines_by_dtype(pipeline))
        self.report: QuantizationReport | None = None
        self._servers, self._options = servers, options
        self._tensors, self._name, self._replace_name = tensors, name, replace_name
        self._calibrations = calibration_by_dtype(pipeline, calibration)
        # The report of the variant the calibration came as (pixels: the one image files use),
        # as EmbeddedRunner's: the pixel variant's int8 model reads the pixels exactly.
        self._reported = pipeline.input.dtype if calibration is None else calibration.dtype.name
        self._registers = bool(
            tensors or pipeline.tensor_names or name or pipeline.precision == "int8"
        )
        if self._registers:
            # Registered up front, so that a refusal (weights, limits, int8's error) comes
            # before the job starts: the variant int8 reports on and the named pipeline. The
            # other variant is registered when a batch of its dtype comes (an int8 pipeline
            # is quantized on the server at registration: a job of image files never runs the
            # float variant, and should not pay for quantizing it).
            first = {self._reported, pipeline.input.dtype if name else self._reported}
            wanted = first if pipeline.precision == "int8" else set(self.pipelines)
            for dtype in sorted(wanted):
                self._register(dtype)

    def _register(self, dtype: str) -> None:
        """Register the pipeline for batches of `dtype` on every address the servers resolve
        to, and run it by its id from now on."""
        from ..client.client import FeatureClient

        each = pipelines_by_dtype(self.pipeline)[dtype]
        # The name goes to the user's pipeline, not to its pixel variant.
        named = dtype == self.pipeline.input.dtype
        for address in target_addresses(self._servers):
            with FeatureClient(address, **self._options) as replica:
                self.pipelines[dtype] = pipeline_id = replica.register(
                    each,
                    self._tensors,
                    name=self._name if named else None,
                    replace=self._replace_name and named,
                    calibration=self._calibrations.get(dtype),
                )
                first = self.report is None and dtype == self._reported
                if self.pipeline.precision == "int8" and first:
                    self.report = replica.get_pipeline(pipeline_id).int8

    def limits(self) -> dict[str, Any]:
        """The server's limits (GetServerInfo, asked once; of one replica where several)."""
        if self.server_limits is None:
            self.server_limits = self.client.server_info().limits
        return self.server_limits

    def encoded_rule(self) -> EncodedRule:
        """Which image files the server takes as they are: its own limits, not this job's."""
        return EncodedRule.of_server(self.limits())

    def run(self, batches: Iterable[JobBatch]) -> Iterator[dict[str, np.ndarray]]:
        """Each batch's outputs from the server(s), in order.

        Consecutive batches of one dtype and image shape share one extract_iter, `in_flight`
        requests deep; small ones travel together (see request_images), and their outputs
        are split back into the job's batches (views). Encoded image files go to the pixel
        variant, as pixels do (the server decodes them by the job's own decoder), each batch
        a request: its files' bytes bound it (feed.ENCODED_BATCH_BYTES).
        """
        for (dtype, kind), group in itertools.groupby(batches, key=batch_key):
            # An unexpected dtype goes with the pipeline: the server names images.dtype.
            runs_as = dtype if dtype in self.pipelines else self.pipeline.input.dtype
            if self._registers and isinstance(self.pipelines[runs_as], Pipeline):
                self._register(runs_as)
            pipeline = self.pipelines[runs_as]
            if kind == ENCODED:
                yield from self.client.extract_iter(group, pipeline)
                continue
            sizes: collections.deque[list[int]] = collections.deque()
            arrays = (batch for batch in group if isinstance(batch, np.ndarray))  # all are
            requests = self._requests(arrays, pipeline, sizes)
            for outputs in self.client.extract_iter(requests, pipeline):
                bounds = list(itertools.accumulate(sizes.popleft(), initial=0))
                for start, stop in itertools.pairwise(bounds):
                    yield {name: array[start:stop] for name, array in outputs.items()}

    def _requests(
        self,
        batches: Iterator[np.ndarray],
        pipeline: Pipeline | str,
        sizes: collections.deque[list[int]],
    ) -> Iterator[np.ndarray]:
        """The batches (one dtype and shape) joined into requests of about request_images
        images; each request's batch sizes are noted in `sizes` before it goes."""
        first = next(batches, None)
        if first is None:
            return
        if self.request_images is None:
            most = request_images(self.pipeline, first, self.limits())
        else:
            most = self.request_images
        most = min(most, self.client.images_per_message(first, pipeline))
        held: list[np.ndarray] = [first]
        for batch in itertools.chain(batches, [None]):
            if batch is not None and sum(map(len, held)) + len(batch) <= most:
                held.append(batch)
                continue
            sizes.append([len(each) for each in held])
            yield held[0] if len(held) == 1 else np.concatenate(held)
            held = [] if batch is None else [batch]

    def close(self) -> None:
        """Close the channel."""
        self.client.close()
