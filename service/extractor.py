"""The plain function behind Extract: check images against the spec and limits, run, check."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from featmap.service.batching import BatchingPolicy, DynamicBatcher
from featmap.service.errors import InvalidTensor, LimitExceeded, NonFiniteResult
from featmap.service.limits import check_cost, check_kernel_sizes, request_cost
from featmap.service.runtime import CompiledPipeline, SessionCache
from featmap.service.spec import LayerShape, Pipeline, infer_shapes


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits checked before any work starts."""

    max_images_per_request: int
    max_pixels_per_image: int
    max_layers: int
    max_parameters: int
    max_message_bytes: int
    # Defaults as ServerSettings', so that callers outside the server need not name them.
    max_kernel_size: int = 64
    max_flops: int = 10**13
    max_activation_bytes: int = 16 << 30
    allow_non_finite_input: bool = False


def _first_non_finite(array: np.ndarray) -> str:
    index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
    return f"{array[index]} at index {list(index)}"


def all_finite(array: np.ndarray) -> bool:
    """True when no NaN/Inf; two SIMD reductions instead of a boolean temporary."""
    return bool(np.isfinite(array.min()) and np.isfinite(array.max()))


def image_size(pipeline: Pipeline, images: np.ndarray, limits: RequestLimits) -> tuple[int, int]:
    """(height, width) of a batch that fits the spec's input and the limits, else an error."""
    spec = pipeline.input
    if images.ndim != 4:
        raise InvalidTensor(
            "images.shape",
            f"has rank {images.ndim} {list(images.shape)}; expected 4 ({spec.layout})",
        )
    if images.dtype.name != spec.dtype:
        raise InvalidTensor(
            "images.dtype", f"{images.dtype.name} does not match input.dtype={spec.dtype}"
        )
    n, *dims = images.shape
    channels, height, width = (
        (dims[0], dims[1], dims[2]) if spec.layout == "NCHW" else (dims[2], dims[0], dims[1])
    )
    if n == 0:
        raise InvalidTensor("images.shape", "batch is empty (N = 0)")
    if channels != spec.channels:
        axis = 1 if spec.layout == "NCHW" else 3
        raise InvalidTensor(
            "images.shape",
            f"{list(images.shape)} has {channels} channels on axis {axis} ({spec.layout}); "
            f"input.channels={spec.channels}",
        )
    if height == 0 or width == 0:
        raise InvalidTensor("images.shape", f"{list(images.shape)} has an empty image")
    if n > limits.max_images_per_request:
        raise LimitExceeded(
            "images.shape",
            f"{n} images exceed max_images_per_request={limits.max_images_per_request}",
        )
    if height * width > limits.max_pixels_per_image:
        raise LimitExceeded(
            "images.shape",
            f"{height}x{width} = {height * width} pixels exceed "
            f"max_pixels_per_image={limits.max_pixels_per_image}",
        )
    if len(pipeline.layers) > limits.max_layers:
        raise LimitExceeded(
            "layers", f"{len(pipeline.layers)} layers exceed max_layers={limits.max_layers}"
        )
    if pipeline.parameter_count() > limits.max_parameters:
        raise LimitExceeded(
            "layers",
            f"{pipeline.parameter_count()} weights exceed max_parameters={limits.max_parameters}",
        )
    check_kernel_sizes(pipeline, limits.max_kernel_size)
    if images.dtype.kind == "f" and not limits.allow_non_finite_input and not all_finite(images):
        raise InvalidTensor("images.data", f"contains {_first_non_finite(images)}")
    return height, width


class Extractor:
    """Runs compiled pipelines on batches: checks first, then the run, then result checks."""

    def __init__(self, cache: SessionCache, limits: RequestLimits) -> None:
        self.cache = cache
        self.limits = limits

    def check(self, pipeline: Pipeline, images: np.ndarray, *, reply_limit: bool = True) -> None:
        """Everything that can be known wrong before running: images, limits, output sizes.

        A too-small image fails here, naming the layer; with reply_limit (the outputs travel in
        the reply, not in shared memory) a reply too big to send fails before the work.
        """
        height, width = image_size(pipeline, images, self.limits)
        # Computed once: a too-small image fails here, naming the layer.
        shapes = infer_shapes(pipeline, height, width)
        cost = request_cost(
            pipeline, len(images), height, width, images.dtype.itemsize, shapes=shapes
        )
        check_cost(cost, self.limits.max_flops, self.limits.max_activation_bytes)
        if reply_limit:
            self._check_reply_bytes(pipeline, len(images), shapes)

    @staticmethod
    def _height_width(pipeline: Pipeline, images: np.ndarray) -> tuple[int, int]:
        h, w = (2, 3) if pipeline.input.layout == "NCHW" else (1, 2)
        return images.shape[h], images.shape[w]

    def check_reply(self, pipeline: Pipeline, images: np.ndarray) -> None:
        """The outputs for `images` fit in one reply message."""
        shapes = infer_shapes(pipeline, *self._height_width(pipeline, images))
        self._check_reply_bytes(pipeline, len(images), shapes)

    def _check_reply_bytes(self, pipeline: Pipeline, batch: int, shapes: list[LayerShape]) -> None:
        by_name = {shape.name: shape.shape for shape in shapes}
        reply_bytes = sum(4 * batch * math.prod(by_name[n]) for n in pipeline.output_names)
        if reply_bytes > self.limits.max_message_bytes:
            raise LimitExceeded(
                "outputs",
                f"the reply would be {reply_bytes} bytes, over max_message_bytes="
                f"{self.limits.max_message_bytes}: send fewer images per request (or stream "
                "them with ExtractStream) or ask for fewer outputs",
            )

    def run(
        self,
        compiled: CompiledPipeline,
        images: np.ndarray,
        batcher: DynamicBatcher | None = None,
        policy: BatchingPolicy | None = None,
    ) -> dict[str, np.ndarray]:
        """The requested float32 outputs of a checked batch; NonFiniteResult on overflow.

        With a batcher and an enabled policy, concurrent calls share onnxruntime runs; the
        checks stay per request, so one caller's overflow fails that caller alone.
        """
        if batcher is not None and policy is not None:
            outputs = batcher.run(compiled, images, policy)
        else:
            outputs = compiled.run(images)
        for name, array in outputs.items():
            if not all_finite(array):
                if self.limits.allow_non_finite_input and not all_finite(images):
                    continue  # NaN in, NaN out: the caller asked for that
                raise NonFiniteResult(
                    f"outputs.{name}",
                    f"finite input gave {_first_non_finite(array)}: float32 overflowed "
                    "(check weights, input.scale and depth)",
                )
        return outputs

    def extract(self, pipeline: Pipeline, images: np.ndarray) -> dict[str, np.ndarray]:
        """Check, compile (cached) and run an inline pipeline on a batch."""
        self.check(pipeline, images)
        return self.run(self.cache.get(pipeline), images)
