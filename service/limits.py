"""What a request costs (FLOPs, activation memory) and the limits on it, known before running."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from featmap.service.errors import LimitExceeded
from featmap.service.spec import (
    Conv2d,
    GlobalAvgPool2d,
    GlobalMaxPool2d,
    LayerShape,
    LeakyRelu,
    Pipeline,
    PoolBase,
    Relu,
    infer_shapes,
    window_geometry,
)

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Cost:
    """The work one batch asks for: arithmetic and the peak of live activations."""

    flops: int
    activation_bytes: int


def request_cost(
    pipeline: Pipeline,
    batch: int,
    height: int,
    width: int,
    input_itemsize: int,
    shapes: list[LayerShape] | None = None,
) -> Cost:
    """FLOPs and peak activation bytes for `batch` images of height x width.

    conv: 2*N*out_h*out_w*filters*(in_ch/groups)*kh*kw (a multiply and an add per tap);
    pools: one per window element; global pools and activations: one per input element;
    flatten: none (a reshape). Activation memory is the input plus the largest pair of
    consecutive layer outputs (float32), since onnxruntime frees a tensor once its consumer ran
    (outputs the caller asked for are kept longer, which this estimate does not model).
    """
    if shapes is None:
        shapes = infer_shapes(pipeline, height, width)
    in_shape: tuple[int, ...] = (pipeline.input.channels, height, width)
    flops = 0
    sizes: list[int] = []
    for layer, layer_shape in zip(pipeline.layers, shapes, strict=True):
        out_shape = layer_shape.shape
        out_elements = batch * math.prod(out_shape)
        if isinstance(layer, Conv2d):
            kh, kw = layer.kernel_size
            taps = (in_shape[0] // layer.groups) * kh * kw
            flops += 2 * out_elements * taps
        elif isinstance(layer, PoolBase):
            (kh, kw), _, _ = window_geometry(layer)
            flops += out_elements * kh * kw
        elif isinstance(layer, GlobalAvgPool2d | GlobalMaxPool2d | Relu | LeakyRelu):
            flops += batch * math.prod(in_shape)
        sizes.append(FLOAT32_BYTES * out_elements)
        in_shape = out_shape
    pairs = [a + b for a, b in itertools.pairwise(sizes)] or sizes
    input_bytes = input_itemsize * batch * pipeline.input.channels * height * width
    return Cost(flops=flops, activation_bytes=input_bytes + max(pairs))


def check_kernel_sizes(pipeline: Pipeline, max_kernel_size: int) -> None:
    """LimitExceeded naming the first conv or pool window over max_kernel_size on an axis."""
    for index, layer in enumerate(pipeline.layers):
        if isinstance(layer, Conv2d | PoolBase):
            kernel, _, _ = window_geometry(layer)
            if max(kernel) > max_kernel_size:
                field = "kernel_size" if isinstance(layer, Conv2d) else "pool_size"
                raise LimitExceeded(
                    f"layers[{index}].{field}",
                    f"{field}={list(kernel)} exceeds max_kernel_size={max_kernel_size} per axis",
                )


def check_cost(cost: Cost, max_flops: int, max_activation_bytes: int) -> None:
    """LimitExceeded when a batch would need more FLOPs or activation memory than allowed."""
    if cost.flops > max_flops:
        raise LimitExceeded(
            "images.shape",
            f"the batch needs {cost.flops} FLOPs, over max_flops={max_flops}: "
            "send fewer or smaller images per request",
        )
    if cost.activation_bytes > max_activation_bytes:
        raise LimitExceeded(
            "images.shape",
            f"the batch needs an estimated {cost.activation_bytes} bytes of activations, over "
            f"max_activation_bytes={max_activation_bytes}: send fewer or smaller images",
        )
