"""The limits, and the admission checks that apply them: one function per question.

- `check_spec_bytes`: may this spec text be parsed at all? (an inline spec, RegisterPipeline),
  before a byte of it is parsed.
- `admit_pipeline`: may this pipeline run here at all? (RegisterPipeline, an inline spec in
  Extract/ExtractStream, the embedded runner, Ray): layers, parameters, kernel sizes.
- `admit_batch`: may this batch run on an admitted pipeline? (Extract, ExtractStream, OIP
  ModelInfer, the embedded runner, Ray): the images' rank, dtype, channels and sizes, the work
  (FLOPs, activation memory) and, when the outputs travel in a reply, the reply's size.
- `admit_calibration`: may these images calibrate an int8 pipeline? (RegisterPipeline, the
  embedded runner): the batch rules, their number, and finite values.

Both run before anything is allocated for the request, and raise the contract's errors.

And the memory estimates the server's budgets charge before allocating (`spec_memory`,
`session_memory`): pure arithmetic over measured bytes per unit, README "Memory budgets".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidRequest, InvalidSpec, InvalidTensor, LimitExceeded
from .ops import (
    INT8_CONV_BYTES_PER_TAP,
    OPS,
    Cost,
    LayerCost,
    batch_cost,
    layer_costs,
    parameter_count,
    window_of,
)
from .spec import Pipeline
from .tensors import (
    all_finite,
    dtype_name,
    first_non_finite,
    image_axes,
    image_size,
    reply_bytes,
    reply_message_bytes,
)

MIB = 1 << 20

# Measured with onnxruntime 1.32 on CPU (tests/test_attacks.py keeps them honest): a compiled
# session holds its model's bytes (4 a weight, kept for GetPipeline) and onnxruntime's own copy
# of the initializers (4 a weight): 8.2 bytes a weight. Building it peaks at 32 bytes a weight:
# the float64 initializer, its float32 copy, the ModelProto, its serialization and the session.
SESSION_BYTES_PER_PARAMETER = 8
COMPILE_BYTES_PER_PARAMETER = 32
SESSION_OVERHEAD_BYTES = MIB  # a small session measured 0.6 MiB
# A parsed spec's Python objects per byte of its JSON text: ~56 for numbers in `values`
# (about 600 bytes a number), ~40 for layers.
SPEC_BYTES_PER_TEXT_BYTE = 64

# int8 (precision: int8). Calibration: the images the user sent plus SYNTHETIC_CALIBRATION
# synthetic ones at their size (DEFAULT_CALIBRATION_SIZE when none were sent), run
# CALIBRATION_BATCH at a time; the error is measured on the user's images, else the synthetic.
SYNTHETIC_CALIBRATION = 16
DEFAULT_CALIBRATION_SIZE = (224, 224)
CALIBRATION_BATCH = 8
# Measured with onnxruntime 1.32 on CPU (tests/test_int8.py keeps them honest). A kept int8
# session holds the int8 model's bytes (1 a weight, kept for GetPipeline) and onnxruntime's
# int8 weights (1 a weight): measured 2.1. Building one peaks where compiling float32 does
# (measured 32.0 a weight: the float32 model is built first; quantizing it through files and
# sessions of its own costs less), plus what the images cost, measured on the standard pipeline,
# a full-resolution tap and a 64-channel input: CALIBRATION_RUN_FACTOR x the layers'
# activations of a CALIBRATION_BATCH (admit_batch's estimate less its input: the calibration
# session and the two that measure the error side by side each hold them) and
# CALIBRATION_INPUT_FACTOR x the input batch; OUTPUT_FACTOR x a batch's outputs (both models',
# and their float64 differences); the synthetic images; and generating one
# (SYNTHETIC_BYTES_PER_VALUE per pixel and channel + 1: its FFT in float64 and complex); and
# the int8 session's conv workspace for a CALIBRATION_BATCH (ops.INT8_CONV_BYTES_PER_TAP).
# Charged, they came out 5-40 % above what was measured (tests/test_int8.py: 11x11 kernels on
# 16 and 64 filters, a full-resolution tap, 64 input channels, 8.4 M weights).
# Kernel taps (height x width) an int8 conv may have: see admit_int8_kernels.
INT8_MAX_KERNEL_TAPS = 121
INT8_SESSION_BYTES_PER_PARAMETER = 2
INT8_COMPILE_BYTES_PER_PARAMETER = 32
CALIBRATION_RUN_FACTOR = 4
CALIBRATION_INPUT_FACTOR = 2
OUTPUT_FACTOR = 12
SYNTHETIC_BYTES_PER_VALUE = 32


@dataclass(frozen=True)
class RequestLimits:
    """Limits checked before any work starts; the defaults are the server's."""

    max_message_bytes: int = 64 * MIB
    # The JSON text of a spec, checked before parsing (parsing costs ~64 bytes a byte).
    max_spec_bytes: int = MIB
    max_images_per_request: int = 4096
    max_pixels_per_image: int = 8192 * 8192
    max_layers: int = 128
    # Weights and biases over all conv layers (float32: 4 bytes each).
    max_parameters: int = 64 * MIB
    # Conv kernel_size and pool pool_size, per axis.
    max_kernel_size: int = 64
    # Per request, from the spec and the batch's shape (featmap.contract.ops says how).
    max_flops: int = 10**13
    max_activation_bytes: int = 16 * 1024 * MIB
    # Off: NaN/Inf in float input is INVALID_ARGUMENT; on: it runs, and NaN/Inf may come out.
    allow_non_finite_input: bool = False
    # Images that may calibrate an int8 pipeline (RegisterPipeline's calibration tensor).
    max_calibration_images: int = 256
    # Names one registered pipeline may have in its tenant (GetPipeline/ListPipelines list them).
    max_names_per_pipeline: int = 16
    # One encoded image's bytes (ExtractRequest.encoded), checked before its header is read.
    max_encoded_image_bytes: int = 32 * MIB


DEFAULT_LIMITS = RequestLimits()

# The formats an encoded image may have, as Pillow names them: the photos and drawings people
# send. Others (BMP, TIFF, GIF, ...) are refused before their header is parsed: each format
# taken is a parser a hostile caller may reach.
ENCODED_FORMATS = ("JPEG", "PNG", "WEBP")


@dataclass(frozen=True)
class BatchPlan:
    """What admit_batch learned of a batch: its size, each layer's shape and cost, the work."""

    batch: int
    height: int
    width: int
    layers: list[LayerCost]
    cost: Cost
    reply_bytes: int


@dataclass(frozen=True)
class SessionMemory:
    """Estimated bytes of a compiled session: while cached, and while being built."""

    steady: int
    peak: int


def session_memory(pipeline: Pipeline, calibration: tuple[int, ...] | None = None) -> SessionMemory:
    """What compiling and keeping `pipeline`'s session costs, from its parameter count and, for
    int8, from the shape of its calibration images (None: the synthetic set alone)."""
    parameters = parameter_count(pipeline)
    if pipeline.precision == "float32":
        return SessionMemory(
            steady=SESSION_OVERHEAD_BYTES + SESSION_BYTES_PER_PARAMETER * parameters,
            peak=SESSION_OVERHEAD_BYTES + COMPILE_BYTES_PER_PARAMETER * parameters,
        )
    return SessionMemory(
        steady=SESSION_OVERHEAD_BYTES + INT8_SESSION_BYTES_PER_PARAMETER * parameters,
        peak=SESSION_OVERHEAD_BYTES
        + INT8_COMPILE_BYTES_PER_PARAMETER * parameters
        + calibration_memory(pipeline, calibration),
    )


def calibration_memory(pipeline: Pipeline, calibration: tuple[int, ...] | None) -> int:
    """What calibrating an int8 pipeline and measuring its error costs beyond its parameters
    (see INT8_COMPILE_BYTES_PER_PARAMETER); `calibration` is the shape of the images sent
    (None: the synthetic set alone, at DEFAULT_CALIBRATION_SIZE)."""
    spec = pipeline.input
    if calibration is None:
        height, width = DEFAULT_CALIBRATION_SIZE
    else:
        _, height, width = image_size(spec.layout, calibration)
    itemsize = np.dtype(spec.dtype).itemsize
    try:
        layers = layer_costs(pipeline, height, width)
    except InvalidSpec as exc:
        if calibration is not None:
            raise  # admit_calibration said so already, naming the images
        raise InvalidSpec(
            exc.field,
            f"{exc.message}: without calibration images an int8 pipeline is calibrated on "
            f"{height}x{width} synthetic images; register it with calibration images it takes",
        ) from None
    run = batch_cost(pipeline, CALIBRATION_BATCH, height, width, itemsize)
    image_bytes = spec.channels * height * width * itemsize
    shapes = {layer.name: layer.shape for layer in layers}
    outputs = reply_bytes((shapes[name] for name in pipeline.output_names), CALIBRATION_BATCH)
    return (
        # The int8 session's conv workspace once: the float32 sessions have none.
        run.workspace_bytes
        + CALIBRATION_RUN_FACTOR * (run.activation_bytes - CALIBRATION_BATCH * image_bytes)
        + CALIBRATION_INPUT_FACTOR * CALIBRATION_BATCH * image_bytes
        + OUTPUT_FACTOR * outputs
        + SYNTHETIC_CALIBRATION * image_bytes
        + SYNTHETIC_BYTES_PER_VALUE * (spec.channels + 1) * height * width
    )


def calibration_flops(pipeline: Pipeline, calibration: tuple[int, ...] | None) -> int:
    """The FLOPs of quantizing an int8 pipeline: its calibration images and the synthetic ones
    through float32 for the ranges, then the measured images (the user's, else the synthetic)
    through both models for the error. `calibration` as for calibration_memory."""
    spec = pipeline.input
    if calibration is None:
        (height, width), sent = DEFAULT_CALIBRATION_SIZE, 0
    else:
        _, height, width = image_size(spec.layout, calibration)
        sent = calibration[0]
    per_image = batch_cost(pipeline, 1, height, width, np.dtype(spec.dtype).itemsize).flops
    measured = sent or SYNTHETIC_CALIBRATION
    return per_image * (sent + SYNTHETIC_CALIBRATION + 2 * measured)


def admit_quantization(
    pipeline: Pipeline, calibration: tuple[int, ...] | None, limits: RequestLimits
) -> None:
    """LimitExceeded when quantizing `pipeline` on such calibration images would need more
    than max_flops: the work is charged like an Extract of those images, before it starts."""
    flops = calibration_flops(pipeline, calibration)
    if flops > limits.max_flops:
        images = "the synthetic images" if calibration is None else "these calibration images"
        raise LimitExceeded(
            "calibration" if calibration is not None else "layers",
            f"quantizing this int8 pipeline on {images} needs {flops} FLOPs (the images through "
            f"float32 for the ranges, then through both models for the error), over "
            f"max_flops={limits.max_flops}: send fewer or smaller calibration images, or use "
            "float32",
        )


def spec_memory(text_bytes: int) -> int:
    """Estimated bytes of a parsed spec (and of parsing it) from its text's length."""
    return SPEC_BYTES_PER_TEXT_BYTE * text_bytes


def check_spec_bytes(text: str | bytes, limits: RequestLimits, field: str = "spec_json") -> int:
    """The spec text's length in bytes; LimitExceeded over max_spec_bytes, before parsing."""
    # An ASCII str (nearly every spec) is as long in UTF-8: no copy just to measure it.
    size = len(text) if isinstance(text, bytes) or text.isascii() else len(text.encode())
    if size > limits.max_spec_bytes:
        raise LimitExceeded(
            field,
            f"is {size} bytes, over max_spec_bytes={limits.max_spec_bytes}: send big weights "
            'as tensors with RegisterPipeline ({"tensor": NAME}), not as JSON values',
        )
    return size


def admit_pipeline(pipeline: Pipeline, limits: RequestLimits) -> None:
    """LimitExceeded when a pipeline is too large to run here, whatever its images."""
    if len(pipeline.layers) > limits.max_layers:
        raise LimitExceeded(
            "layers", f"{len(pipeline.layers)} layers exceed max_layers={limits.max_layers}"
        )
    for index, layer in enumerate(pipeline.layers):
        window = window_of(layer)
        if window is not None and max(window.kernel) > limits.max_kernel_size:
            field = window.field
            raise LimitExceeded(
                f"layers[{index}].{field}",
                f"{field}={list(window.kernel)} exceeds max_kernel_size={limits.max_kernel_size} "
                "per axis",
            )
    parameters = parameter_count(pipeline)
    if parameters > limits.max_parameters:
        raise LimitExceeded(
            "layers", f"{parameters} weights exceed max_parameters={limits.max_parameters}"
        )
    if pipeline.precision == "int8":
        admit_int8_kernels(pipeline)


def admit_int8_kernels(pipeline: Pipeline) -> None:
    """InvalidSpec for an int8 conv with more taps than INT8_MAX_KERNEL_TAPS, or a dilated
    average pool in an int8 pipeline.

    onnxruntime's int8 conv holds 8 bytes per tap and output pixel (INT8_CONV_BYTES_PER_TAP):
    a 64x64 kernel on one 224x224 image is 1.6 GB where float32 works in a few MB, and such a
    conv is bound by its multiply-adds, where int8 gains least.
    """
    for index, layer in enumerate(pipeline.layers):
        window = window_of(layer)
        if OPS[layer.op].int8_taps and window is not None:
            height, width = window.kernel
            if height * width > INT8_MAX_KERNEL_TAPS:
                raise InvalidSpec(
                    f"layers[{index}].{window.field}",
                    f"{window.field}={[height, width]} has {height * width} taps; int8 convs take "
                    f"at most {INT8_MAX_KERNEL_TAPS} (11x11): onnxruntime's int8 conv keeps "
                    f"{INT8_CONV_BYTES_PER_TAP} bytes per tap and output pixel. Use precision "
                    "float32 for this pipeline",
                )
        if layer.op == "avg_pool2d" and window is not None and window.dilation != (1, 1):
            # onnxruntime fuses a float AveragePool between quantized neighbours into its int8
            # QLinearAveragePool, which has no dilations, and then refuses the whole model.
            raise InvalidSpec(
                f"layers[{index}].dilation",
                "int8 takes no dilated avg_pool2d: onnxruntime's int8 average pool has no "
                "dilations. Use precision float32 for this pipeline",
            )


def check_request_bytes(size: int, limits: RequestLimits, field: str = "images") -> None:
    """LimitExceeded when a request message is over max_message_bytes, saying how to stream."""
    if size > limits.max_message_bytes:
        raise LimitExceeded(
            field,
            f"the request is {size} bytes, over max_message_bytes={limits.max_message_bytes}: "
            "send fewer images per request, or the batch in chunks with ExtractStream "
            "(FeatureClient.extract does so by itself)",
        )


def check_reply_bytes(size: int, limits: RequestLimits) -> None:
    """LimitExceeded when a reply of `size` bytes would be over max_message_bytes."""
    if size > limits.max_message_bytes:
        raise LimitExceeded(
            "outputs",
            f"the reply would be {size} bytes, over max_message_bytes="
            f"{limits.max_message_bytes}: send fewer images per request (or stream them with "
            "ExtractStream) or ask for fewer outputs",
        )


def admit_encoded(
    sizes: Sequence[int], resize: tuple[int, int] | None, limits: RequestLimits, field: str
) -> None:
    """Whether encoded images of these byte sizes, resized to `resize` (None: kept as they
    are), may be read at all: their number and bytes, and the size asked for. Errors name
    `field` (`encoded.images[3]`, `encoded.height`); each header is checked next
    (check_image_pixels), before anything is decoded."""
    if not sizes:
        raise InvalidTensor(f"{field}.images", "is empty: send at least one image")
    if len(sizes) > limits.max_images_per_request:
        raise LimitExceeded(
            f"{field}.images",
            f"{len(sizes)} images exceed max_images_per_request={limits.max_images_per_request}",
        )
    for index, size in enumerate(sizes):
        if size > limits.max_encoded_image_bytes:
            raise LimitExceeded(
                f"{field}.images[{index}]",
                f"is {size} bytes, over max_encoded_image_bytes={limits.max_encoded_image_bytes}",
            )
        if size == 0:
            raise InvalidTensor(f"{field}.images[{index}]", "is empty (0 bytes)")
    if resize is not None:
        height, width = resize
        for name, value in (("height", height), ("width", width)):
            if value < 1:
                raise InvalidRequest(
                    f"{field}.{name}", f"is {value}: set height and width both (>= 1), or neither"
                )
        check_image_pixels(height, width, limits, f"{field}.height")


def check_image_pixels(height: int, width: int, limits: RequestLimits, field: str) -> None:
    """LimitExceeded when an image of height x width is over max_pixels_per_image."""
    if height * width > limits.max_pixels_per_image:
        raise LimitExceeded(
            field,
            f"{height}x{width} = {height * width} pixels exceed "
            f"max_pixels_per_image={limits.max_pixels_per_image}",
        )


@dataclass(frozen=True)
class DeferredBatch:
    """A batch known by shape and dtype whose bytes are read only once it is admitted.

    What shared memory gives: the header travels in the request, the pixels are copied out of
    the client's segment only after admit_batch has accepted their shape (so a 100 GB region
    costs nothing until a batch that size would be admitted anyway). Encoded images alike:
    their headers give the shape, and they are decoded once admitted. `scratch_bytes`: what
    reading costs beyond the batch itself (decoding's full-size images), charged with it.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]
    scratch_bytes: int = 0

    @property
    def ndim(self) -> int:
        """The rank, as ndarray.ndim."""
        return len(self.shape)


# One onnxruntime run on the CPU holds at most about this many bytes of activations for each
# of its intra-op threads; a batch that needs more runs as several runs, one after another, so
# that what one layer writes is still in the caches when the next reads it. Measured with 2
# threads (AMD EPYC, L2 1 MiB a core, L3 32 MiB), onnxruntime alone, medians of 5: a
# 10,000x1x28x28 array through 192 5x5 filters, ReLU and a 7x7 average pool (1.15 MiB an
# image), batches of 32 in runs of 32 took 1,074 ms, of 16 686 ms, of 11 633 ms, of 8 652 ms,
# of 6 647 ms, of 4 661 ms; 224x224 images through the standard three-conv pipeline (12.8 MiB
# an image), a batch of 32 in runs of 4 took 133.0 ms, of 2 128.7 ms, of 1 124.5 ms. Memory
# falls with it: a batch of 32 of the latter in one run peaked at 580 MiB RSS (onnxruntime's
# arena grows in powers of two), in runs of 4 at 237 MiB. Per thread, so that many threads
# still get runs with work enough to share (16 threads: 64 MiB, the bound before this one). A
# batch's admission (admit_batch) still counts its whole activations, as if it ran at once.
RUN_ACTIVATION_BYTES_PER_THREAD = 4 * MIB


def run_activation_bytes(threads: int) -> int:
    """What one onnxruntime run on the CPU may hold with `threads` intra-op threads (0: one
    per core, as onnxruntime's default; os.cpu_count() here)."""
    return RUN_ACTIVATION_BYTES_PER_THREAD * max(1, threads or os.cpu_count() or 1)


def images_per_run(pipeline: Pipeline, height: int, width: int, itemsize: int, threads: int) -> int:
    """Images of height x width in one onnxruntime run on the CPU with `threads` intra-op
    threads (run_activation_bytes)."""
    per_image = batch_cost(pipeline, 1, height, width, itemsize).memory_bytes
    return max(1, run_activation_bytes(threads) // max(1, per_image))


def admit_batch(
    pipeline: Pipeline,
    images: np.ndarray | DeferredBatch,
    limits: RequestLimits,
    *,
    output_dtype: str = "float32",
    reply_in_message: bool = True,
    output_names: Sequence[str] | None = None,
    field: str = "images",
) -> BatchPlan:
    """The plan of a batch that fits the pipeline's input and every limit, else an error.

    `images` is (N, C, H, W) or (N, H, W, C) as input.layout says. A too-small image fails
    naming the layer; with reply_in_message (the outputs travel in the reply, not in shared
    memory) a reply too big to send fails here, before the work. The reply is sized from
    `output_names`, those it will carry, each once (default: all the pipeline's, as Extract
    sends them; OIP ModelInfer may ask for fewer). A DeferredBatch is admitted by
    its shape and dtype; its values are checked by admit_values once read. Errors name
    `field` (`images.shape`, ...).
    """
    spec = pipeline.input
    if images.ndim != 4:
        raise InvalidTensor(
            f"{field}.shape",
            f"has rank {images.ndim} {list(images.shape)}; expected 4 ({spec.layout})",
        )
    if dtype_name(images.dtype) != spec.dtype:
        raise InvalidTensor(
            f"{field}.dtype", f"{images.dtype.name} does not match input.dtype={spec.dtype}"
        )
    n = images.shape[0]
    channels, height, width = image_size(spec.layout, images.shape)
    if n == 0:
        raise InvalidTensor(f"{field}.shape", "batch is empty (N = 0)")
    if channels != spec.channels:
        axis = image_axes(spec.layout)[0]
        raise InvalidTensor(
            f"{field}.shape",
            f"{list(images.shape)} has {channels} channels on axis {axis} ({spec.layout}); "
            f"input.channels={spec.channels}",
        )
    if height == 0 or width == 0:
        raise InvalidTensor(f"{field}.shape", f"{list(images.shape)} has an empty image")
    if n > limits.max_images_per_request:
        raise LimitExceeded(
            f"{field}.shape",
            f"{n} images exceed max_images_per_request={limits.max_images_per_request}",
        )
    check_image_pixels(height, width, limits, f"{field}.shape")
    layers = layer_costs(pipeline, height, width)
    cost = batch_cost(pipeline, n, height, width, images.dtype.itemsize)
    if cost.flops > limits.max_flops:
        raise LimitExceeded(
            f"{field}.shape",
            f"the batch needs {cost.flops} FLOPs, over max_flops={limits.max_flops}: "
            "send fewer or smaller images per request",
        )
    if cost.memory_bytes > limits.max_activation_bytes:
        workspace = (
            f" ({cost.workspace_bytes} of them int8 conv workspace)" if cost.workspace_bytes else ""
        )
        raise LimitExceeded(
            f"{field}.shape",
            f"the batch needs an estimated {cost.memory_bytes} bytes of activations{workspace}, "
            f"over max_activation_bytes={limits.max_activation_bytes}: send fewer or smaller "
            "images",
        )
    by_name = {layer.name: layer.shape for layer in layers}
    names = pipeline.output_names if output_names is None else output_names
    reply = reply_bytes((by_name[name] for name in names), n, output_dtype)
    if reply_in_message:
        check_reply_bytes(reply_message_bytes(reply, len(names)), limits)
    if isinstance(images, np.ndarray):
        admit_values(images, limits, field)
    return BatchPlan(n, height, width, layers, cost, reply)


def admit_calibration(
    pipeline: Pipeline, images: np.ndarray, limits: RequestLimits, field: str = "calibration"
) -> BatchPlan:
    """The plan of calibration images an int8 pipeline may take, else an error naming `field`.

    The batch rules of admit_batch (shape, dtype, channels, sizes, FLOPs, activations, as if
    they ran as one batch), at most max_calibration_images of them, and finite values always:
    a NaN calibrates nothing.
    """
    if pipeline.precision != "int8":
        raise InvalidTensor(
            field, f"calibrates int8 pipelines only; this one's precision is {pipeline.precision}"
        )
    if images.ndim >= 1 and images.shape[0] > limits.max_calibration_images:
        raise LimitExceeded(
            f"{field}.shape",
            f"{images.shape[0]} calibration images exceed max_calibration_images="
            f"{limits.max_calibration_images}",
        )
    plan = admit_batch(pipeline, images, limits, reply_in_message=False, field=field)
    if not all_finite(images):
        raise InvalidTensor(f"{field}.data", f"contains {first_non_finite(images)}")
    return plan


def admit_values(images: np.ndarray, limits: RequestLimits, field: str = "images") -> None:
    """InvalidTensor for NaN/Inf in the images, unless allow_non_finite_input."""
    if not limits.allow_non_finite_input and not all_finite(images):
        raise InvalidTensor(f"{field}.data", f"contains {first_non_finite(images)}")
