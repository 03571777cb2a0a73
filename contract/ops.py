"""Per-op rules, in one table: output shape, parameters and FLOPs of every layer kind.

`featmap summary`, the server's limits (max_parameters, max_flops, max_activation_bytes), the
reply sizing on both sides and the memory budgets all read these numbers; nothing else
computes them. The sliding-window arithmetic (padding, output sizes) shared by conv and pooling
lives here too, once; the graph builder and the NumPy reference use it.

FLOPs per image:
    conv2d              2 x multiply-adds: 2 * out_h * out_w * filters * (in_ch / groups) * kh * kw,
                        plus one per output element with a bias
    max/avg pooling     one per window element: out_h * out_w * channels * ph * pw
    global pooling      one per input element
    relu, leaky_relu    one per element
    flatten, input cast and scale/mean/std: 0
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from featmap.contract.errors import InvalidSpec
from featmap.contract.spec import (
    Conv2d,
    GlobalAvgPool2d,
    GlobalMaxPool2d,
    Padding,
    Pipeline,
    PoolBase,
)

# Every layer computes in float32, whatever the input dtype: 4 bytes per output element.
ACTIVATION_ITEMSIZE = 4

Shape = tuple[int, ...]  # (C, H, W), or (features,) after flatten; per image


# --------------------------------------------------------------------------- sliding windows


def window_geometry(
    layer: Conv2d | PoolBase,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, dilation) of a sliding-window layer, each as (h, w)."""
    if isinstance(layer, Conv2d):
        return layer.kernel_size, layer.stride, layer.dilation
    return layer.pool_size, layer.stride or layer.pool_size, (1, 1)


def window_field(layer: Conv2d | PoolBase) -> str:
    """The spec field that sets a window's size: kernel_size or pool_size."""
    return "kernel_size" if isinstance(layer, Conv2d) else "pool_size"


def resolve_pads(
    padding: Padding,
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """Padding as (top, left, bottom, right) for an input of `size` (h, w).

    `same` is TF/Keras/ONNX SAME_UPPER: output = ceil(in / stride) and the total padding
    max(0, (out - 1) * stride + (k - 1) * dilation + 1 - in) is split with the odd pixel at the
    bottom/right. `valid` pads nothing.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        begin, end = [], []
        for n, k, s, d in zip(size, kernel, stride, dilation, strict=True):
            out = -(-n // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
            begin.append(total // 2)
            end.append(total - total // 2)
        return (begin[0], begin[1], end[0], end[1])
    assert not isinstance(padding, str)
    return padding


def window_output_size(
    size: int, pad_begin: int, pad_end: int, kernel: int, stride: int, dilation: int, ceil: bool
) -> int:
    """Output length along one axis (PyTorch/ONNX formula; ceil_mode drops a window that would
    start in the end padding, as PyTorch does)."""
    span = size + pad_begin + pad_end - (kernel - 1) * dilation - 1
    if span < 0:
        return 0
    if not ceil:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


def _window_shape(layer: Conv2d | PoolBase, in_shape: Shape, where: str) -> Shape:
    channels, h, w = in_shape
    kernel, stride, dilation = window_geometry(layer)
    pads = resolve_pads(layer.padding, (h, w), kernel, stride, dilation)
    ceil = isinstance(layer, PoolBase) and layer.ceil_mode
    out = tuple(
        window_output_size(n, pads[i], pads[i + 2], kernel[i], stride[i], dilation[i], ceil)
        for i, n in enumerate((h, w))
    )
    if min(out) < 1:
        extent = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True))
        field = window_field(layer)
        raise InvalidSpec(
            f"{where}.{field}",
            f"{field}={kernel} (dilated extent {extent}) exceeds the padded input "
            f"{(h + pads[0] + pads[2], w + pads[1] + pads[3])}",
        )
    if isinstance(layer, PoolBase) and any(p >= k for p, k in zip(pads, kernel * 2, strict=True)):
        raise InvalidSpec(
            f"{where}.padding",
            f"padding {pads} must be smaller than pool_size {kernel} on every side",
        )
    return (layer.filters if isinstance(layer, Conv2d) else channels, *out)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class OpRule:
    """What one op does to sizes: its output shape, its parameters and its FLOPs per image."""

    output_shape: Callable[[Any, Shape, str], Shape]  # (layer, input shape, "layers[i]")
    parameters: Callable[[Any, int], int]  # (layer, input channels)
    flops: Callable[[Any, Shape, Shape], int]  # (layer, input shape, output shape)


def _same_shape(layer: Any, in_shape: Shape, where: str) -> Shape:
    return in_shape


def _no_parameters(layer: Any, in_channels: int) -> int:
    return 0


def _conv_parameters(layer: Conv2d, in_channels: int) -> int:
    kh, kw = layer.kernel_size
    weights = layer.filters * (in_channels // layer.groups) * kh * kw
    return weights + (layer.filters if layer.bias is not None else 0)


def _conv_flops(layer: Conv2d, in_shape: Shape, out_shape: Shape) -> int:
    kh, kw = layer.kernel_size
    outputs = math.prod(out_shape)
    multiply_adds = outputs * (in_shape[0] // layer.groups) * kh * kw
    return 2 * multiply_adds + (outputs if layer.bias is not None else 0)


def _pool_flops(layer: PoolBase, in_shape: Shape, out_shape: Shape) -> int:
    ph, pw = layer.pool_size
    return math.prod(out_shape) * ph * pw


def _per_input_element(layer: Any, in_shape: Shape, out_shape: Shape) -> int:
    return math.prod(in_shape)


def _global_shape(layer: Any, in_shape: Shape, where: str) -> Shape:
    return (in_shape[0], 1, 1)


def _flatten_shape(layer: Any, in_shape: Shape, where: str) -> Shape:
    return (math.prod(in_shape),)


_WINDOW_POOL = OpRule(_window_shape, _no_parameters, _pool_flops)
_ELEMENTWISE = OpRule(_same_shape, _no_parameters, _per_input_element)
_GLOBAL_POOL = OpRule(_global_shape, _no_parameters, _per_input_element)

OP_RULES: dict[str, OpRule] = {
    "conv2d": OpRule(_window_shape, _conv_parameters, _conv_flops),
    "relu": _ELEMENTWISE,
    "leaky_relu": _ELEMENTWISE,
    "max_pool2d": _WINDOW_POOL,
    "avg_pool2d": _WINDOW_POOL,
    "global_avg_pool2d": _GLOBAL_POOL,
    "global_max_pool2d": _GLOBAL_POOL,
    "flatten": OpRule(_flatten_shape, _no_parameters, lambda layer, i, o: 0),
}


# --------------------------------------------------------------------------- what reads it


@dataclass(frozen=True)
class LayerCost:
    """One layer for one image: its output shape, parameters and FLOPs."""

    name: str
    op: str
    shape: Shape
    parameters: int
    flops: int

    @property
    def output_bytes(self) -> int:
        """Bytes of this layer's float32 output for one image."""
        return ACTIVATION_ITEMSIZE * math.prod(self.shape)


def layer_parameters(pipeline: Pipeline) -> list[int]:
    """Weights plus biases of every layer, in order (0 for layers without any)."""
    counts, channels = [], pipeline.input.channels
    for layer in pipeline.layers:
        counts.append(OP_RULES[layer.op].parameters(layer, channels))
        if isinstance(layer, Conv2d):
            channels = layer.filters
    return counts


def parameter_count(pipeline: Pipeline) -> int:
    """Weights and biases of the whole pipeline."""
    return sum(layer_parameters(pipeline))


class _SizedPipeline:
    """A pipeline and an image size as a cache key: by pipeline id, not by hashing the model."""

    __slots__ = ("key", "pipeline")

    def __init__(self, pipeline: Pipeline, height: int, width: int) -> None:
        self.pipeline = pipeline
        self.key = (pipeline.pipeline_id, height, width)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SizedPipeline) and self.key == other.key


def layer_costs(pipeline: Pipeline, height: int, width: int) -> list[LayerCost]:
    """Every layer's output shape, parameters and FLOPs for one height x width image.

    InvalidSpec naming the layer when the image is too small for it. Remembered per pipeline
    id and size: the server checks every request with it, and a job or a client sees the same
    few sizes over and over.
    """
    return list(_layer_costs(_SizedPipeline(pipeline, height, width)))


@functools.lru_cache(maxsize=1024)
def _layer_costs(sized: _SizedPipeline) -> tuple[LayerCost, ...]:
    pipeline = sized.pipeline
    _, height, width = sized.key
    in_shape: Shape = (pipeline.input.channels, height, width)
    costs: list[LayerCost] = []
    names = pipeline.layer_names
    for index, (layer, parameters) in enumerate(
        zip(pipeline.layers, layer_parameters(pipeline), strict=True)
    ):
        rule = OP_RULES[layer.op]
        try:
            out_shape = rule.output_shape(layer, in_shape, f"layers[{index}]")
        except InvalidSpec as exc:
            raise InvalidSpec(
                exc.field, f"{exc.message} for an image of {height}x{width}"
            ) from None
        flops = rule.flops(layer, in_shape, out_shape)
        costs.append(LayerCost(names[index], layer.op, out_shape, parameters, flops))
        in_shape = out_shape
    return tuple(costs)


# onnxruntime's int8 conv (QLinearConv, MLAS) builds an indirection buffer for each image: an
# 8-byte pointer per kernel tap and output pixel, whatever the channels (measured with
# onnxruntime 1.32: 3->16 kernel 32 at 256x256, one image, 514 MB for 512 predicted; linear in
# the batch, the image's pixels and the taps; nothing like it in float32 convs or int8 pools,
# which work in bounded tiles). tests/test_attacks.py keeps it honest.
INT8_CONV_BYTES_PER_TAP = 8


@dataclass(frozen=True)
class Cost:
    """The work one batch asks for: arithmetic, the peak of live activations, and for int8 the
    largest int8 conv's workspace (held while that conv runs: see INT8_CONV_BYTES_PER_TAP)."""

    flops: int
    activation_bytes: int
    workspace_bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        """What the run holds at its peak: activations and workspace."""
        return self.activation_bytes + self.workspace_bytes


def int8_conv_workspace(pipeline: Pipeline, batch: int, costs: list[LayerCost]) -> int:
    """Bytes of the largest int8 conv workspace for `batch` images (0 for float32)."""
    if pipeline.precision != "int8":
        return 0
    workspaces = [
        batch * cost.shape[1] * cost.shape[2] * math.prod(layer.kernel_size)
        for layer, cost in zip(pipeline.layers, costs, strict=True)
        if isinstance(layer, Conv2d)
    ]
    return INT8_CONV_BYTES_PER_TAP * max(workspaces, default=0)


def batch_cost(
    pipeline: Pipeline,
    batch: int,
    height: int,
    width: int,
    input_itemsize: int,
    costs: list[LayerCost] | None = None,
) -> Cost:
    """FLOPs and peak activation bytes for `batch` images of height x width.

    Activation memory is the input plus the largest pair of consecutive layer outputs (float32),
    since onnxruntime frees a tensor once its consumer ran (outputs the caller asked for are kept
    longer, which this estimate does not model).
    """
    if costs is None:
        costs = layer_costs(pipeline, height, width)
    sizes = [batch * cost.output_bytes for cost in costs]
    pairs = [a + b for a, b in itertools.pairwise(sizes)] or sizes
    input_bytes = input_itemsize * batch * pipeline.input.channels * height * width
    return Cost(
        flops=batch * sum(cost.flops for cost in costs),
        activation_bytes=input_bytes + max(pairs),
        workspace_bytes=int8_conv_workspace(pipeline, batch, costs),
    )


# --------------------------------------------------------------------------- symbolic shapes


@dataclass(frozen=True)
class _Symbol:
    """expression + offset, kept apart so that constants fold: H-2-2 is H-4."""

    expression: str
    offset: int = 0

    def __str__(self) -> str:
        return self.expression if self.offset == 0 else f"{self.expression}{self.offset:+d}"

    def plus(self, constant: int) -> _Symbol:
        return _Symbol(self.expression, self.offset + constant)

    def over(self, rounding: str, constant: int, stride: int) -> str:
        numerator = self.plus(constant)
        text = str(numerator) if numerator.offset == 0 else f"({numerator})"
        return f"{rounding}({text}/{stride})"


def _symbolic_window(
    size: _Symbol, pads: tuple[int, int], kernel: int, stride: int, dilation: int, mode: str
) -> _Symbol:
    extent = (kernel - 1) * dilation + 1
    if mode == "same":
        return size if stride == 1 else _Symbol(size.over("ceil", 0, stride))
    if stride == 1 and mode == "floor":
        return size.plus(pads[0] + pads[1] - extent + 1)
    # floor((n + p - e) / s) + 1 == floor((n + p - e + s) / s); likewise ceil
    rounding = "ceil" if mode == "ceil" else "floor"
    windows = size.over(rounding, pads[0] + pads[1] - extent + stride, stride)
    if mode == "ceil" and (pads[1] > 0 or stride > kernel):
        # PyTorch's rule: no window may start in the end padding (start <= n + pad_begin - 1);
        # it can only bite with end padding or with windows that skip pixels.
        windows = f"min({windows}, {size.over('floor', pads[0] - 1 + stride, stride)})"
    return _Symbol(windows)


def symbolic_shapes(pipeline: Pipeline) -> dict[str, list[int | str]]:
    """Every layer's output shape with symbolic N, H and W, e.g. ["N", 8, "ceil(H/2)", ...].

    For describing outputs; the exact sizes for an image come from layer_costs.
    """
    channels, height, width = pipeline.input.channels, _Symbol("H"), _Symbol("W")
    flat = False
    shapes: dict[str, list[int | str]] = {}
    for layer, name in zip(pipeline.layers, pipeline.layer_names, strict=True):
        if isinstance(layer, Conv2d | PoolBase):
            kernel, stride, dilation = window_geometry(layer)
            padding = layer.padding
            pads = (0, 0, 0, 0) if isinstance(padding, str) else padding
            mode = "same" if padding == "same" else "floor"
            if isinstance(layer, PoolBase) and layer.ceil_mode:
                mode = "ceil"
            height, width = (
                _symbolic_window(
                    size, (pads[i], pads[i + 2]), kernel[i], stride[i], dilation[i], mode
                )
                for i, size in enumerate((height, width))
            )
            channels = layer.filters if isinstance(layer, Conv2d) else channels
        elif isinstance(layer, GlobalAvgPool2d | GlobalMaxPool2d):
            height = width = _Symbol("1")
        elif layer.op == "flatten":
            flat = True
        spatial: list[int | str] = [
            int(str(d)) if str(d).isdigit() else str(d) for d in (height, width)
        ]
        if flat:
            features = channels if spatial == [1, 1] else f"{channels}*({height})*({width})"
            shapes[name] = ["N", features]
        else:
            shapes[name] = ["N", channels, *spatial]
    return shapes
