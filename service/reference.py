"""The NumPy reference: every op computed directly from the spec's semantics, in float64.

It mirrors graph.py op by op and shares nothing with it but the spec (and the weights the spec
names): where the two disagree, the ONNX graph or onnxruntime is wrong about our semantics.
Vectorized with sliding-window views; no Python loop over pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..contract.ops import (
    OPS,
    Window,
    dilated_extent,
    window_of,
    window_output_size,
    window_pads,
)
from ..contract.spec import (
    NO_TENSORS,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    LayerBase,
    LeakyRelu,
    MaxPool2d,
    Pipeline,
    WeightTensors,
)
from .weights import pipeline_weights

# (layer, input, the layer's weights by field) -> output, all float64 but the weights
ReferenceOp = Callable[[Any, np.ndarray, Mapping[str, np.ndarray]], np.ndarray]
# One function per op of the table (contract/ops.py OPS), registered with @reference_op.
REFERENCE_OPS: dict[str, ReferenceOp] = {}


def reference_op(op: str) -> Callable[[ReferenceOp], ReferenceOp]:
    """Register the function that computes `op`."""

    def register(compute: ReferenceOp) -> ReferenceOp:
        assert op in OPS and op not in REFERENCE_OPS, op
        REFERENCE_OPS[op] = compute
        return compute

    return register


def sliding_windows(
    x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> np.ndarray:
    """(N, C, H, W) already padded -> view (N, C, out_h, out_w, kh, kw) of every window."""
    windows = sliding_window_view(x, dilated_extent(kernel, dilation), axis=(2, 3))
    return windows[:, :, :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]]


def _pad(x: np.ndarray, pads: tuple[int, int, int, int], value: float) -> np.ndarray:
    top, left, bottom, right = pads
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)


def _window(layer: LayerBase) -> Window:
    window = window_of(layer)
    assert window is not None
    return window


def _window_pads(window: Window, x: np.ndarray) -> tuple[int, int, int, int]:
    """Padding, including the extra end rows/columns that ceil_mode's last window reaches."""
    kernel, stride, dilation = window.kernel, window.stride, window.dilation
    size = (x.shape[2], x.shape[3])
    top, left, bottom, right = window_pads(window, size)
    extra = []
    for axis, (begin, end) in enumerate(((top, bottom), (left, right))):
        out = window_output_size(
            size[axis], begin, end, kernel[axis], stride[axis], dilation[axis], window.ceil
        )
        needed = (out - 1) * stride[axis] + window.extent[axis]
        extra.append(max(0, needed - (size[axis] + begin + end)))
    return top, left, bottom + extra[0], right + extra[1]


@reference_op("conv2d")
def conv2d(layer: Conv2d, x: np.ndarray, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """Grouped, strided, dilated cross-correlation with zero padding."""
    window = _window(layer)
    kernel = weights["weights"].astype(np.float64)
    windows = sliding_windows(
        _pad(x, _window_pads(window, x), 0.0), window.kernel, window.stride, window.dilation
    )
    n, channels, out_h, out_w, kh, kw = windows.shape
    groups = layer.groups
    grouped = windows.reshape(n, groups, channels // groups, out_h, out_w, kh, kw)
    kernel = kernel.reshape(groups, layer.filters // groups, channels // groups, kh, kw)
    out = np.einsum("ngchwij,gfcij->ngfhw", grouped, kernel, optimize=True)
    out = out.reshape(n, layer.filters, out_h, out_w)
    if "bias" in weights:
        out = out + weights["bias"].astype(np.float64).reshape(1, -1, 1, 1)
    return out


@reference_op("max_pool2d")
def max_pool2d(layer: MaxPool2d, x: np.ndarray, _: Mapping[str, np.ndarray]) -> np.ndarray:
    """Max over each window; padding never wins a max."""
    window = _window(layer)
    padded = _pad(x, _window_pads(window, x), -np.inf)
    return sliding_windows(padded, window.kernel, window.stride, window.dilation).max(axis=(4, 5))


@reference_op("avg_pool2d")
def avg_pool2d(layer: AvgPool2d, x: np.ndarray, _: Mapping[str, np.ndarray]) -> np.ndarray:
    """Mean over each window; padding counts in it only if asked."""
    window = _window(layer)
    kernel, stride, dilation = window.kernel, window.stride, window.dilation
    pads = _window_pads(window, x)
    sums = sliding_windows(_pad(x, pads, 0.0), kernel, stride, dilation).sum(axis=(4, 5))
    # The divisor counts real pixels, plus the user's padding with count_include_pad; never
    # the rows/columns ceil_mode adds past the padding (PyTorch's rule).
    counted = np.ones((1, 1, x.shape[2], x.shape[3]))
    if layer.count_include_pad:
        explicit = window_pads(window, (x.shape[2], x.shape[3]))
        counted = _pad(counted, explicit, 1.0)
        top, left, bottom, right = (p - e for p, e in zip(pads, explicit, strict=True))
        counted = _pad(counted, (top, left, bottom, right), 0.0)
    else:
        counted = _pad(counted, pads, 0.0)
    divisor = sliding_windows(counted, kernel, stride, dilation).sum(axis=(4, 5))
    return sums / divisor


@reference_op("relu")
def relu(layer: Any, x: np.ndarray, _: Mapping[str, np.ndarray]) -> np.ndarray:
    """max(x, 0)."""
    return np.maximum(x, 0.0)


@reference_op("leaky_relu")
def leaky_relu(layer: LeakyRelu, x: np.ndarray, _: Mapping[str, np.ndarray]) -> np.ndarray:
    """x if x >= 0 else alpha * x."""
    return np.where(x >= 0, x, layer.alpha * x)


@reference_op("global_avg_pool2d")
def global_avg_pool2d(layer: Any, x: np.ndarray, _: Mapping[str, np.ndarray]) -> np.ndarray:
    """Mean over H, W keeping (N, C, 1, 1)."""
    return x.mean(axis=(2, 3), keepdims=True)


@reference_op("global_max_pool2d")
def global_max_pool2d(layer: Any, x: np.ndarray, _: Mapping[str, np.ndarray]) -> np.ndarray:
    """Max over H, W keeping (N, C, 1, 1)."""
    return x.max(axis=(2, 3), keepdims=True)


@reference_op("flatten")
def flatten(layer: Any, x: np.ndarray, _: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N, ...) -> (N, prod(...)), row-major."""
    return x.reshape(x.shape[0], -1)


@reference_op("batch_norm")
def batch_norm(layer: BatchNorm, x: np.ndarray, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """(x - mean) / sqrt(var + epsilon) * scale + shift per channel, as written (never folded)."""
    scale, shift, mean, var = (
        weights[field].astype(np.float64).reshape(1, -1, 1, 1)
        for field in ("scale", "shift", "mean", "var")
    )
    return (x - mean) / np.sqrt(var + layer.epsilon) * scale + shift


def preprocess(pipeline: Pipeline, images: np.ndarray) -> np.ndarray:
    """Images as the spec's input describes them -> float64 NCHW, normalized."""
    spec = pipeline.input
    x = images.astype(np.float64)
    if spec.layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    if spec.scale is not None:
        x = x * np.float64(np.float32(spec.scale))
    if spec.mean is not None:
        x = x - np.array(spec.channel_values(spec.mean), dtype=np.float32).reshape(1, -1, 1, 1)
    if spec.std is not None:
        x = x / np.array(spec.channel_values(spec.std), dtype=np.float32).reshape(1, -1, 1, 1)
    return x


def run_reference(
    pipeline: Pipeline, images: np.ndarray, tensors: WeightTensors = NO_TENSORS
) -> dict[str, np.ndarray]:
    """Every layer's float64 result for `images`, keyed by layer name."""
    weights = pipeline_weights(pipeline, tensors)
    x = preprocess(pipeline, images)
    results: dict[str, np.ndarray] = {}
    for index, (layer, name) in enumerate(zip(pipeline.layers, pipeline.layer_names, strict=True)):
        x = REFERENCE_OPS[layer.op](layer, x, weights.get(index, {}))
        results[name] = x
    return results


def reference_outputs(
    pipeline: Pipeline, images: np.ndarray, tensors: WeightTensors = NO_TENSORS
) -> dict[str, np.ndarray]:
    """The float64 results of the pipeline's requested outputs."""
    results = run_reference(pipeline, images, tensors)
    return {name: results[name] for name in pipeline.output_names}
