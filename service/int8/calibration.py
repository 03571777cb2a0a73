"""The images int8 calibrates on and the ranges they give: checks, batches, synthetic images.

The calibrated ranges get headroom (Int8Settings) and are rounded up to a coarse grid before
the scales are chosen: images a little brighter or sharper than the calibration set are not
clipped, and last-bit differences between CPUs' float32 calibration runs give the same bytes.
When the user sends no images, or besides theirs, synthetic_calibration's seeded images span
what pixels can do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto
from onnxruntime.quantization import CalibrationDataReader

from ...contract.errors import InvalidTensor
from ...contract.limits import (
    CALIBRATION_BATCH,
    DEFAULT_CALIBRATION_SIZE,
    SYNTHETIC_CALIBRATION,
)
from ..weights import uniform

# The calibration set when the user sends none (see synthetic_calibration), at
# DEFAULT_CALIBRATION_SIZE; the calibration runs CALIBRATION_BATCH images at a time (min/max
# does not depend on how the images are batched, and small batches bound the calibration
# session's memory whatever the number of images). The contract's memory estimates count them.
DEFAULT_CALIBRATION_IMAGES = SYNTHETIC_CALIBRATION
# Calibrated ranges, widened by Int8Settings.headroom, are rounded up to this many significant
# bits (at most 1/128 wider).
RANGE_BITS = 8

_INPUT_DTYPES: dict[int, np.dtype[Any]] = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.UINT8: np.dtype(np.uint8),
}


def input_info(model: onnx.ModelProto) -> tuple[str, np.dtype[Any], list[int]]:
    """(name, dtype, static dims with 0 for symbolic ones) of the model's single input."""
    (graph_input,) = model.graph.input
    tensor_type = graph_input.type.tensor_type
    dims = [d.dim_value for d in tensor_type.shape.dim]
    return graph_input.name, _INPUT_DTYPES[tensor_type.elem_type], dims


def check_calibration(model: onnx.ModelProto, calibration: np.ndarray) -> None:
    """Calibration images must be a non-empty batch the model takes, and finite."""
    _, dtype, dims = input_info(model)
    if calibration.dtype != dtype:
        raise InvalidTensor(
            "calibration.dtype", f"calibration images are {calibration.dtype}; the input is {dtype}"
        )
    fits = calibration.ndim == len(dims) and all(
        want in (0, got) for want, got in zip(dims, calibration.shape, strict=True)
    )
    if not fits or calibration.shape[0] == 0 or calibration.size == 0:
        shape = tuple(d or "?" for d in dims)
        raise InvalidTensor(
            "calibration.shape",
            f"calibration images have shape {calibration.shape}; the input takes {shape}",
        )
    if dtype.kind == "f" and not np.isfinite(calibration).all():
        raise InvalidTensor("calibration.data", "calibration images contain NaN or Inf")


class CalibrationBatches(CalibrationDataReader):
    """Feeds the calibration images to onnxruntime's calibrator, CALIBRATION_BATCH at a time."""

    def __init__(
        self,
        input_name: str,
        image_sets: Sequence[np.ndarray],
        still_wanted: Callable[[], None] | None = None,
    ) -> None:
        # The model's height and width are dynamic: each set may have its own image size.
        self._batches: Iterator[np.ndarray] = (
            images[start : start + CALIBRATION_BATCH]
            for images in image_sets
            for start in range(0, len(images), CALIBRATION_BATCH)
        )
        self._input_name = input_name
        self._still_wanted = still_wanted

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as session inputs, or None when done (Abandoned: nobody waits)."""
        if self._still_wanted is not None:
            self._still_wanted()
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}


def _round_up(value: float, bits: int) -> float:
    """`value` rounded away from zero to `bits` significant bits."""
    if value == 0 or not math.isfinite(value):
        return value
    mantissa, exponent = math.frexp(abs(value))
    return math.copysign(math.ldexp(math.ceil(mantissa * 2**bits) / 2**bits, exponent), value)


def widen_ranges(cache: Path, headroom: float) -> None:
    """Widen onnxruntime's calibration cache (JSON) by `headroom`, rounded up, in place."""
    ranges = json.loads(cache.read_text())
    for tensor in ranges["data"].values():
        for end in ("lowest", "highest"):
            values = tensor[end]["data"]
            tensor[end]["data"] = [_round_up(v * headroom, RANGE_BITS) for v in values]
    cache.write_text(json.dumps(ranges, sort_keys=True))


def _synthetic_image(index: int, channels: int, height: int, width: int, seed: int) -> np.ndarray:
    """Image `index` of synthetic_calibration, (channels, height, width) in [0, 1], float64."""
    if index < 2:
        return np.full((channels, height, width), float(index))  # black, white
    stream = seed * 1_000_003 + index  # one PCG64 stream per image: memory stays per image
    if index % 2:
        return uniform(stream, channels * height * width).reshape(channels, height, width)
    # Amplitude 1/f over the 2D frequency plane (photographs' spectrum); no DC term.
    frequency = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    frequency[0, 0] = np.inf
    numbers = uniform(stream, (channels + 1) * frequency.size + 2)
    phases = numbers[:-2].reshape(channels + 1, *frequency.shape)
    fields = np.fft.irfft2(np.exp(2j * np.pi * phases) / frequency, s=(height, width))
    low = fields.min(axis=(1, 2), keepdims=True)
    high = fields.max(axis=(1, 2), keepdims=True)
    fields = (fields - low) / np.where(high > low, high - low, 1.0)
    # Photographs' channels are strongly correlated: a shared field plus a weaker own one.
    image = (fields[:1] + 0.35 * fields[1:]) / 1.35
    contrast = 0.3 + 0.7 * numbers[-2]
    return image * contrast + numbers[-1] * (1.0 - contrast)


def synthetic_calibration(
    model: onnx.ModelProto,
    *,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    size: tuple[int, int] = DEFAULT_CALIBRATION_SIZE,
    pixel_max: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Seeded images for a model's input that span what pixels can do.

    Image 0 is black and image 1 white (the brightness extremes a smoothing pipeline sees);
    then odd images are uniform noise, every pixel and channel independent (the sharpest
    local contrast an edge filter sees), and even ones colour 1/f noise, the spectrum of
    photographs, at a random contrast and brightness (natural structure). A white pixel is
    `pixel_max`: None means 255 for uint8 input and 1.0 (pixel / 255) for float input. The
    numbers come from PCG64's raw stream, the same on every machine and NumPy version.
    """
    _, dtype, dims = input_info(model)
    if len(dims) != 4 or not (dims[1] or dims[3]):
        raise ValueError(f"not an image input: dims {dims}")
    channels_last = dims[1] == 0  # channels are the one static axis: 1 (NCHW) or 3 (NHWC)
    channels = dims[3] if channels_last else dims[1]
    height, width = size
    white = pixel_max if pixel_max is not None else (255.0 if dtype == np.uint8 else 1.0)
    shape = (height, width, channels) if channels_last else (channels, height, width)
    images = np.empty((count, *shape), dtype)
    for index in range(count):
        image = _synthetic_image(index, channels, height, width, seed)
        # Whole 1/255 steps, as pixels are: a last-bit difference in the FFT cannot change them.
        values = np.round(image * 255.0) * (white / 255.0)
        images[index] = values.transpose(1, 2, 0) if channels_last else values
    return images


def image_size(model: onnx.ModelProto, images: np.ndarray) -> tuple[int, int]:
    """(height, width) of a batch the model takes."""
    _, _, dims = input_info(model)
    height_axis = 1 if dims[1] == 0 else 2  # NHWC: channels are the static last axis
    return images.shape[height_axis], images.shape[height_axis + 1]
