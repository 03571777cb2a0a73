"""What a pipeline gets from image pixels, and the pipeline that takes the pixels themselves.

Image files decode to uint8 pixels p in 0..255. The rule for a pipeline's input values:

- a uint8 pipeline gets p;
- a float pipeline gets p / 255 in its dtype, unless `input.scale` is set: then p as floats,
  since the graph multiplies by `scale` itself (dividing here too would scale twice).

The *pixel variant* of a pipeline takes p as uint8 and does that division inside the graph:
the same layers, weights and outputs, `input.dtype` uint8, `input.scale` kept when set, else
1/255. A batch of pixels is then a quarter of the float32 bytes to copy, send and check, and
the client does no arithmetic on them. How near its features are to the pipeline's own:

- `input.scale` set: exactly equal. The float path feeds float32(p) (float16 holds 0..255
  exactly too) and the variant's Cast gives the same values, so the graph does the same
  arithmetic on the same tensor.
- no `input.scale`, float32: equal to float32 rounding. The graph's float32(p) * float32(1/255)
  differs from the float path's float32(p / 255) by one unit in the last place for 126 of the
  256 pixel values (6e-8 relative; no float32 constant does better, and `input.std` = 255 would
  be exact only without mean/std). The NumPy reference of the variant computes
  p * float64(float32(1/255)), within the same half unit of p / 255.
- no `input.scale`, float16: the float path rounds p / 255 to float16 (up to 2^-11 relative)
  before the graph casts it to float32; the variant skips that rounding, so its features are
  nearer the reference computed on the exact pixel values.
"""

from __future__ import annotations

import numpy as np

from .spec import InputSpec, Pipeline, parse_pipeline
from .tensors import from_hwc

PIXEL_DTYPE = "uint8"
# What the float path divides by; the variant multiplies by its float32 reciprocal.
PIXEL_SCALE = 1 / 255


def image_values(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W, C) uint8 pixels as the pipeline's input: its layout and dtype, the scaling rule."""
    return pixel_values(from_hwc(pixels, spec.layout), spec)


def pixel_values(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 pixels already in the pipeline's layout (one image or a batch) as its input values."""
    if spec.dtype == PIXEL_DTYPE:
        return np.ascontiguousarray(pixels)
    # With input.scale the graph scales, so it must see the raw values (else scaled twice).
    values = pixels.astype(np.float32) if spec.scale is not None else pixels / np.float32(255)
    return np.ascontiguousarray(values, dtype=spec.dtype)


def pixel_pipeline(pipeline: Pipeline) -> Pipeline:
    """The pipeline's pixel variant (see the module docstring); a uint8 pipeline is its own."""
    spec = pipeline.input
    if spec.dtype == PIXEL_DTYPE:
        return pipeline
    scale = spec.scale if spec.scale is not None else PIXEL_SCALE
    data = pipeline.model_dump(mode="json")
    data["input"] = {**data["input"], "dtype": PIXEL_DTYPE, "scale": scale}
    # Validated anew rather than model_copy'd: the copy would keep the cached pipeline id.
    return parse_pipeline(data)
