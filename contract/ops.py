"""The op table: every layer kind described once, and the rules that read it.

An entry (`OpDef`) holds a layer kind's spec model, its shape and channel rule, its window
(conv and pools), the weights it takes (names, shapes), its FLOPs and what the spec must satisfy
for it; its parameters are the sizes of its weights. `LAYER_TYPES`, the `Layer` union, spec
validation, `featmap summary`, the server's limits (max_parameters, max_flops,
max_activation_bytes, max_kernel_size, int8's kernel taps), reply sizing, the memory budgets,
the weight checks and the symbolic output shapes all read it, through one walk over a
pipeline's shapes (`walk`). The graph builder (service/graph.py) and the NumPy reference
(service/reference.py) each register one function per op; tests/test_op_table.py fails for an
op without either, or without a golden case.

The sliding-window arithmetic (padding, output sizes, the dilated extent) shared by conv and
pooling lives here too, once; SAME padding is one rule (`SamePadding`) that the graph builder
and the reference both take.

FLOPs per image:
    conv2d              2 x multiply-adds: 2 * out_h * out_w * filters * (in_ch / groups) * kh * kw,
                        plus one per output element with a bias
    max/avg pooling     one per window element: out_h * out_w * channels * ph * pw
    global pooling      one per input element
    batch_norm          2 per element (one multiply-add), as written (folded into a conv: free)
    relu, leaky_relu    one per element
    flatten, input cast and scale/mean/std: 0
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeAlias, get_args

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from .errors import InvalidSpec
from .fields import (
    FIXED_PRESET_SIZES,
    SAME_PADDINGS,
    BiasSource,
    Count,
    InitSource,
    LayerBase,
    Padding,
    Pair,
    PresetSource,
    SpecFieldError,
    ValuesSource,
    WeightSource,
    flat_numbers,
    nested_shape,
)


class _Input(Protocol):
    """What the walks read of a pipeline's input (contract.spec.InputSpec)."""

    @property
    def channels(self) -> int: ...


class Pipeline(Protocol):
    """What the table's functions read of a pipeline (contract.spec.Pipeline, which imports
    this module: a protocol here keeps the two files out of a circle)."""

    @property
    def input(self) -> _Input: ...

    @property
    def layers(self) -> Sequence[LayerBase]: ...

    @property
    def precision(self) -> str: ...

    @property
    def layer_names(self) -> list[str]: ...

    @property
    def pipeline_id(self) -> str: ...


# Every layer computes in float32, whatever the input dtype: 4 bytes per output element.
ACTIVATION_ITEMSIZE = 4

Shape = tuple[int, ...]  # (C, H, W), or (features,) after flatten; per image
# A walk's dimensions: ints for an image size, _Symbol for symbolic H and W, None when unknown
# (the walk that checks a spec knows channels only).
Dims = tuple[Any, ...]


# --------------------------------------------------------------------------- sliding windows


def axis_extent(kernel: int, dilation: int) -> int:
    """The pixels a dilated window spans along one axis: (k - 1) * d + 1."""
    return (kernel - 1) * dilation + 1


def dilated_extent(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) a dilated window spans."""
    return (axis_extent(kernel[0], dilation[0]), axis_extent(kernel[1], dilation[1]))


@dataclass(frozen=True)
class Window:
    """A sliding window's geometry as the spec sets it, each pair (h, w)."""

    field: str  # the spec field that sets its size: kernel_size or pool_size
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: Padding
    ceil: bool = False
    # onnxruntime's pools refuse padding as large as the window on any side.
    pads_below_kernel: bool = False

    @property
    def extent(self) -> tuple[int, int]:
        """The dilated extent (h, w)."""
        return dilated_extent(self.kernel, self.dilation)

    @property
    def same(self) -> SamePadding:
        """The SAME rule of this window: SAME_LOWER for `same_lower`, else SAME_UPPER."""
        return SamePadding(self.extent, self.stride, lower=self.padding == "same_lower")


@dataclass(frozen=True)
class SamePadding:
    """`same` padding, TF/Keras/ONNX SAME_UPPER: output = ceil(in / stride), and the total
    padding max(0, (out - 1) * stride + extent - in) split with the odd pixel at the
    bottom/right; `lower` (`same_lower`, ONNX SAME_LOWER) puts the odd pixel at the top/left.
    The reference applies `pads`; the graph builder uses `static_pads` where the image size
    does not matter, else builds this same formula from `extent`, `stride` and `split`."""

    extent: tuple[int, int]
    stride: tuple[int, int]
    lower: bool = False

    @property
    def auto_pad(self) -> str:
        """ONNX's name of the rule."""
        return "SAME_LOWER" if self.lower else "SAME_UPPER"

    def split(self, total: int) -> tuple[int, int]:
        """(begin, end) of a total padding: the odd pixel at the end, or the beginning (lower)."""
        small = total // 2
        return (total - small, small) if self.lower else (small, total - small)

    def pads(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) for an input of `size` (h, w)."""
        begin, end = [], []
        for n, e, s in zip(size, self.extent, self.stride, strict=True):
            out = -(-n // s)
            first, last = self.split(max(0, (out - 1) * s + e - n))
            begin.append(first)
            end.append(last)
        return (begin[0], begin[1], end[0], end[1])

    @property
    def static_pads(self) -> tuple[int, int, int, int] | None:
        """The pads when they do not depend on the image size (stride 1: extent - 1), else None."""
        if self.stride != (1, 1):
            return None
        (top, bottom), (left, right) = (self.split(e - 1) for e in self.extent)
        return (top, left, bottom, right)


def resolve_pads(
    padding: Padding,
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """Padding as (top, left, bottom, right) for an input of `size` (h, w).

    `same` and `same_lower` are SamePadding (SAME_UPPER, SAME_LOWER); `valid` pads nothing.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding in SAME_PADDINGS:
        extent = dilated_extent(kernel, dilation)
        return SamePadding(extent, stride, lower=padding == "same_lower").pads(size)
    assert not isinstance(padding, str)
    return padding


def window_pads(window: Window, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A window's padding (top, left, bottom, right) for an input of `size` (h, w)."""
    return resolve_pads(window.padding, size, window.kernel, window.stride, window.dilation)


def window_output_size(
    size: int, pad_begin: int, pad_end: int, kernel: int, stride: int, dilation: int, ceil: bool
) -> int:
    """Output length along one axis (PyTorch/ONNX formula; ceil_mode drops a window that would
    start in the end padding, as PyTorch does)."""
    span = size + pad_begin + pad_end - axis_extent(kernel, dilation)
    if span < 0:
        return 0
    if not ceil:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


def _window_sizes(window: Window, height: int, width: int, where: str) -> tuple[int, int]:
    """The output (h, w) of a window over an image of height x width; InvalidSpec if none fit."""
    kernel, stride, dilation = window.kernel, window.stride, window.dilation
    pads = window_pads(window, (height, width))
    out = tuple(
        window_output_size(n, pads[i], pads[i + 2], kernel[i], stride[i], dilation[i], window.ceil)
        for i, n in enumerate((height, width))
    )
    if min(out) < 1:
        raise InvalidSpec(
            f"{where}.{window.field}",
            f"{window.field}={kernel} (dilated extent {window.extent}) exceeds the padded input "
            f"{(height + pads[0] + pads[2], width + pads[1] + pads[3])}",
        )
    if window.pads_below_kernel and any(p >= k for p, k in zip(pads, kernel * 2, strict=True)):
        raise InvalidSpec(
            f"{where}.padding",
            f"padding {pads} must be smaller than pool_size {kernel} on every side",
        )
    if window.pads_below_kernel and dilation != (1, 1):
        # Undilated, a window smaller than its padding always holds a pixel; dilated, its
        # taps can straddle the image and all land in the padding, where a pool has no value.
        for axis, n in enumerate((height, width)):
            empty = _empty_window(
                n, pads[axis], kernel[axis], stride[axis], dilation[axis], out[axis]
            )
            if empty is not None:
                raise InvalidSpec(
                    f"{where}.padding",
                    f"with dilation {list(dilation)} and padding {pads}, the window at output "
                    f"{'row' if axis == 0 else 'column'} {empty} lies wholly in the padding",
                )
    return out[0], out[1]


def _empty_window(
    size: int, pad_begin: int, kernel: int, stride: int, dilation: int, outputs: int
) -> int | None:
    """The first output position along an axis whose window has no tap on the image, or None."""
    for position in range(outputs):
        start = position * stride - pad_begin
        first = max(0, -(start // dilation)) if start < 0 else 0  # the first tap at or past 0
        if first < kernel and start + first * dilation <= size - 1:
            continue
        return position
    return None


# --------------------------------------------------------------------------- symbolic sizes


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
    extent = axis_extent(kernel, dilation)
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


def window_dims(window: Window, height: Any, width: Any, where: str) -> tuple[Any, Any]:
    """The output (h, w) of a window: numbers for an image size, symbols for symbolic H and W,
    None when the size is unknown."""
    if isinstance(height, int) and isinstance(width, int):
        return _window_sizes(window, height, width, where)
    if not isinstance(height, _Symbol) or not isinstance(width, _Symbol):
        return None, None
    padding = window.padding
    pads = (0, 0, 0, 0) if isinstance(padding, str) else padding
    mode = "same" if padding in SAME_PADDINGS else "ceil" if window.ceil else "floor"
    kernel, stride, dilation = window.kernel, window.stride, window.dilation
    new_height, new_width = (
        _symbolic_window(size, (pads[i], pads[i + 2]), kernel[i], stride[i], dilation[i], mode)
        for i, size in enumerate((height, width))
    )
    return new_height, new_width


def _unit(size: Any) -> Any:
    """A size of 1 in the walk's kind of dimension."""
    return _Symbol("1") if isinstance(size, _Symbol) else 1


def _features(channels: int, height: Any, width: Any) -> Any:
    """C * H * W, in the walk's kind of dimension."""
    if isinstance(height, int) and isinstance(width, int):
        return channels * height * width
    if height is None or width is None:
        return None
    if (str(height), str(width)) == ("1", "1"):
        return channels
    return _Symbol(f"{channels}*({height})*({width})")


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class WeightSlot:
    """One weight tensor a layer takes: its spec field, its source (None when left out), its
    shape for the layer's input channels, and the fans its `init` scales by."""

    field: str
    source: Any
    shape: Shape
    fan_in: int
    fan_out: int
    # How the shape reads, for error messages: "(filters, in_channels/groups, kh, kw)".
    layout: str


def _no_weights(layer: Any, in_channels: int) -> tuple[WeightSlot, ...]:
    return ()


def _no_check(layer: Any, in_channels: int, where: str) -> None:
    return None


def _no_weights_check(layer: Any, weights: Any, where: str) -> None:
    return None


@dataclass(frozen=True)
class OpDef:
    """One layer kind, described once: everything about it that is not ONNX nor NumPy."""

    model: type[LayerBase]  # its member of the Layer union
    # (layer, input dims, "layers[i]") -> output dims; the channel rule is part of it.
    output_shape: Callable[[Any, Dims, str], Dims]
    flops: Callable[[Any, Shape, Shape], int]  # (layer, input shape, output shape)
    weights: Callable[[Any, int], tuple[WeightSlot, ...]] = _no_weights  # (layer, in channels)
    window: Callable[[Any], Window] | None = None  # conv and pools
    # What the spec must satisfy given the input channels: SpecFieldError naming the field.
    check: Callable[[Any, int, str], None] = _no_check
    # What its weights' numbers must satisfy (layer, float32 arrays by field, "layers[i]"):
    # InvalidSpec naming the field.
    check_weights: Callable[[Any, Any, str], None] = _no_weights_check
    takes_image: bool = False  # its input must be (C, H, W): no flatten before it
    # onnxruntime's int8 kernel holds a pointer per tap and output pixel (QLinearConv, see
    # INT8_CONV_BYTES_PER_TAP): admit_int8_kernels bounds the taps and the budgets charge them.
    int8_taps: bool = False

    @property
    def op(self) -> str:
        """The op's name, as the spec writes it."""
        return str(get_args(self.model.model_fields["op"].annotation)[0])


def _same_shape(layer: Any, in_shape: Dims, where: str) -> Dims:
    return in_shape


def _per_input_element(layer: Any, in_shape: Shape, out_shape: Shape) -> int:
    return math.prod(in_shape)


# conv2d ----------------------------------------------------------------------------------------


class Conv2d(LayerBase):
    """2D convolution (cross-correlation, as in every framework), NCHW."""

    op: Literal["conv2d"]
    filters: Count
    kernel_size: Pair
    stride: Pair = (1, 1)
    padding: Padding = "valid"
    dilation: Pair = (1, 1)
    groups: Count = 1
    weights: WeightSource
    bias: BiasSource | None = None


def _conv_window(layer: Conv2d) -> Window:
    return Window("kernel_size", layer.kernel_size, layer.stride, layer.dilation, layer.padding)


def _conv_weights(layer: Conv2d, in_channels: int) -> tuple[WeightSlot, ...]:
    kh, kw = layer.kernel_size
    fan_in, fan_out = in_channels // layer.groups * kh * kw, layer.filters * kh * kw
    kernel = (layer.filters, in_channels // layer.groups, kh, kw)
    return (
        WeightSlot(
            "weights",
            layer.weights,
            kernel,
            fan_in,
            fan_out,
            "(filters, in_channels/groups, kh, kw)",
        ),
        WeightSlot("bias", layer.bias, (layer.filters,), fan_in, fan_out, "(filters,)"),
    )


def _conv_shape(layer: Conv2d, in_shape: Dims, where: str) -> Dims:
    return (layer.filters, *window_dims(_conv_window(layer), in_shape[1], in_shape[2], where))


def _conv_flops(layer: Conv2d, in_shape: Shape, out_shape: Shape) -> int:
    kh, kw = layer.kernel_size
    outputs = math.prod(out_shape)
    multiply_adds = outputs * (in_shape[0] // layer.groups) * kh * kw
    return 2 * multiply_adds + (outputs if layer.bias is not None else 0)


def _check_conv(layer: Conv2d, in_channels: int, where: str) -> None:
    if in_channels % layer.groups:
        raise SpecFieldError(
            f"{where}.groups",
            f"groups={layer.groups} does not divide the {in_channels} input channels",
        )
    if layer.filters % layer.groups:
        raise SpecFieldError(
            f"{where}.groups", f"groups={layer.groups} does not divide filters={layer.filters}"
        )
    kh, kw = layer.kernel_size
    kernel, bias = _conv_weights(layer, in_channels)
    weights = layer.weights
    if isinstance(weights, ValuesSource):
        shape = nested_shape(weights.values)
        if shape is None:
            raise SpecFieldError(
                f"{where}.weights.values", "must be a rectangular nested list of numbers"
            )
        if shape != kernel.shape:
            raise SpecFieldError(
                f"{where}.weights.values",
                f"has shape {shape}; expected {kernel.layout} = {kernel.shape}",
            )
        if not all(math.isfinite(x) for x in flat_numbers(weights.values)):
            raise SpecFieldError(f"{where}.weights.values", "contains a non-finite number")
    elif isinstance(weights, PresetSource):
        fixed = FIXED_PRESET_SIZES.get(weights.preset)
        if fixed is not None and fixed != (kh, kw):
            raise SpecFieldError(
                f"{where}.kernel_size",
                f"preset {weights.preset!r} is {fixed[0]}x{fixed[1]}; kernel_size is {kh}x{kw}",
            )
        if weights.preset == "identity" and (kh % 2 == 0 or kw % 2 == 0):
            raise SpecFieldError(
                f"{where}.kernel_size", f"identity preset needs odd sizes; got {kh}x{kw}"
            )
    if isinstance(layer.bias, ValuesSource):
        shape = nested_shape(layer.bias.values)
        if shape != bias.shape:
            raise SpecFieldError(
                f"{where}.bias.values", f"has shape {shape}; expected {bias.layout} = {bias.shape}"
            )
        if not all(math.isfinite(x) for x in flat_numbers(layer.bias.values)):
            raise SpecFieldError(f"{where}.bias.values", "contains a non-finite number")


CONV2D = OpDef(
    Conv2d,
    output_shape=_conv_shape,
    flops=_conv_flops,
    weights=_conv_weights,
    window=_conv_window,
    check=_check_conv,
    takes_image=True,
    int8_taps=True,
)


# relu, leaky_relu ------------------------------------------------------------------------------


class Relu(LayerBase):
    """max(x, 0)."""

    op: Literal["relu"]


class LeakyRelu(LayerBase):
    """x if x >= 0 else alpha * x (default alpha as PyTorch and ONNX: 0.01)."""

    op: Literal["leaky_relu"]
    alpha: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.01


RELU = OpDef(Relu, output_shape=_same_shape, flops=_per_input_element)
LEAKY_RELU = OpDef(LeakyRelu, output_shape=_same_shape, flops=_per_input_element)


# max_pool2d, avg_pool2d ------------------------------------------------------------------------


class PoolBase(LayerBase):
    """Fields shared by max and average pooling."""

    pool_size: Pair
    stride: Pair | None = None
    padding: Padding = "valid"
    dilation: Pair = (1, 1)
    ceil_mode: bool = False

    @model_serializer(mode="wrap")
    def _leave_out_no_dilation(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A pool without dilation dumps as it did before pools had the field: the same
        # canonical JSON and pipeline id, and a spec an older server accepts.
        data = handler(self)
        if isinstance(data, dict) and self.dilation == (1, 1):
            data.pop("dilation", None)
        return data

    @model_validator(mode="after")
    def _ceil_mode_needs_explicit_padding(self) -> PoolBase:
        if self.ceil_mode and self.padding in SAME_PADDINGS:
            raise SpecFieldError(
                "ceil_mode",
                f"has no effect with padding={self.padding!r} (output is ceil(in/stride))",
            )
        stride = self.stride or self.pool_size
        if self.padding in SAME_PADDINGS and self.dilation != (1, 1) and stride != (1, 1):
            # Its padding depends on the image size, and onnxruntime's pools take SAME with
            # dilation from no attribute: a graph-built pad would have to be -inf for max and
            # uncounted for average. Explicit pads say the same for a known size.
            raise SpecFieldError(
                "padding",
                f"{self.padding!r} with dilation {self.dilation} needs stride 1 in a pool; "
                "use explicit padding [top, left, bottom, right]",
            )
        return self


class MaxPool2d(PoolBase):
    """Max over each window; padding never wins a max."""

    op: Literal["max_pool2d"]


class AvgPool2d(PoolBase):
    """Mean over each window; padding counts only with count_include_pad."""

    op: Literal["avg_pool2d"]
    count_include_pad: bool = False


def _pool_window(layer: PoolBase) -> Window:
    stride = layer.stride or layer.pool_size
    return Window(
        "pool_size",
        layer.pool_size,
        stride,
        layer.dilation,
        layer.padding,
        ceil=layer.ceil_mode,
        pads_below_kernel=True,
    )


def _pool_shape(layer: PoolBase, in_shape: Dims, where: str) -> Dims:
    return (in_shape[0], *window_dims(_pool_window(layer), in_shape[1], in_shape[2], where))


def _pool_flops(layer: PoolBase, in_shape: Shape, out_shape: Shape) -> int:
    ph, pw = layer.pool_size
    return math.prod(out_shape) * ph * pw


MAX_POOL2D = OpDef(MaxPool2d, _pool_shape, _pool_flops, window=_pool_window, takes_image=True)
AVG_POOL2D = OpDef(AvgPool2d, _pool_shape, _pool_flops, window=_pool_window, takes_image=True)


# global_avg_pool2d, global_max_pool2d ----------------------------------------------------------


class GlobalAvgPool2d(LayerBase):
    """Mean over H and W, keeping (N, C, 1, 1)."""

    op: Literal["global_avg_pool2d"]


class GlobalMaxPool2d(LayerBase):
    """Max over H and W, keeping (N, C, 1, 1)."""

    op: Literal["global_max_pool2d"]


def _global_shape(layer: Any, in_shape: Dims, where: str) -> Dims:
    return (in_shape[0], _unit(in_shape[1]), _unit(in_shape[2]))


GLOBAL_AVG_POOL2D = OpDef(GlobalAvgPool2d, _global_shape, _per_input_element, takes_image=True)
GLOBAL_MAX_POOL2D = OpDef(GlobalMaxPool2d, _global_shape, _per_input_element, takes_image=True)


# flatten ---------------------------------------------------------------------------------------


class Flatten(LayerBase):
    """(N, C, H, W) -> (N, C*H*W), row-major as torch.flatten(x, 1)."""

    op: Literal["flatten"]


def _flatten_shape(layer: Flatten, in_shape: Dims, where: str) -> Dims:
    return (_features(*in_shape),)


def _no_flops(layer: Any, in_shape: Shape, out_shape: Shape) -> int:
    return 0


FLATTEN = OpDef(Flatten, _flatten_shape, _no_flops, takes_image=True)


# batch_norm ------------------------------------------------------------------------------------


class BatchNorm(LayerBase):
    """Inference batch normalization per channel: (x - mean) / sqrt(var + epsilon) * scale + shift.

    Right after a conv whose output is not requested, the graph folds it into that conv's kernel
    and bias (no node of its own); the reference computes it as written.
    """

    op: Literal["batch_norm"]
    scale: BiasSource
    shift: BiasSource
    mean: BiasSource
    var: BiasSource
    epsilon: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-5


BATCH_NORM_FIELDS = ("scale", "shift", "mean", "var")


def _batch_norm_weights(layer: BatchNorm, in_channels: int) -> tuple[WeightSlot, ...]:
    return tuple(
        WeightSlot(field, getattr(layer, field), (in_channels,), in_channels, in_channels,
                   "(channels,)")
        for field in BATCH_NORM_FIELDS
    )  # fmt: skip


def _check_batch_norm(layer: BatchNorm, in_channels: int, where: str) -> None:
    for slot in _batch_norm_weights(layer, in_channels):
        source = slot.source
        if isinstance(source, ValuesSource):
            shape = nested_shape(source.values)
            if shape != slot.shape:
                raise SpecFieldError(
                    f"{where}.{slot.field}.values",
                    f"has shape {shape}; expected {slot.layout} = {slot.shape}",
                )
            if not all(math.isfinite(x) for x in flat_numbers(source.values)):
                raise SpecFieldError(f"{where}.{slot.field}.values", "contains a non-finite number")
    var = layer.var
    if isinstance(var, ValuesSource) and not _positive_variance(
        flat_numbers(var.values), layer.epsilon
    ):
        raise SpecFieldError(f"{where}.var.values", VARIANCE_RULE)
    if isinstance(var, InitSource) and (var.init != "zeros" or layer.epsilon == 0):
        raise SpecFieldError(
            f"{where}.var.init",
            "a variance must be >= 0: only 'zeros' (with epsilon > 0), or values or a tensor",
        )


VARIANCE_RULE = "var + epsilon must be > 0 in every channel"


def _positive_variance(var: Any, epsilon: float) -> bool:
    return all(float(v) + epsilon > 0 for v in var)


def _check_batch_norm_weights(layer: BatchNorm, weights: Any, where: str) -> None:
    # A tensor's numbers are known only with the tensors: checked where the weights are made.
    if not _positive_variance(weights["var"].ravel().tolist(), layer.epsilon):
        raise InvalidSpec(f"{where}.var", VARIANCE_RULE)


def _batch_norm_flops(layer: BatchNorm, in_shape: Shape, out_shape: Shape) -> int:
    # One multiply-add per element (scale and shift folded with mean and var); 0 once folded
    # into a conv, which the table does not know: the count is the layer as written.
    return 2 * math.prod(in_shape)


BATCH_NORM = OpDef(
    BatchNorm,
    output_shape=_same_shape,
    flops=_batch_norm_flops,
    weights=_batch_norm_weights,
    check=_check_batch_norm,
    check_weights=_check_batch_norm_weights,
)


# --------------------------------------------------------------------------- the table

OPS: dict[str, OpDef] = {
    entry.op: entry
    for entry in (
        CONV2D,
        RELU,
        LEAKY_RELU,
        MAX_POOL2D,
        AVG_POOL2D,
        GLOBAL_AVG_POOL2D,
        GLOBAL_MAX_POOL2D,
        FLATTEN,
        BATCH_NORM,
    )
}
LAYER_TYPES: tuple[type[LayerBase], ...] = tuple(entry.model for entry in OPS.values())
# The ops whose input is an image (N, C, H, W): none of them may follow a flatten.
SPATIAL_OPS = frozenset(op for op, entry in OPS.items() if entry.takes_image)

if TYPE_CHECKING:
    Layer: TypeAlias = LayerBase
else:
    # The discriminated union of the table's models: pydantic validates only the member the
    # op names, so errors stay short and name the path (layers.3.kernel_size).
    Layer = Annotated[functools.reduce(operator.or_, LAYER_TYPES), Field(discriminator="op")]


def window_of(layer: LayerBase) -> Window | None:
    """The sliding window of a conv or pool layer, None for other layers."""
    window = OPS[layer.op].window
    return None if window is None else window(layer)


def window_geometry(
    layer: LayerBase,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, dilation) of a sliding-window layer, each as (h, w)."""
    window = window_of(layer)
    assert window is not None, f"{layer.op} has no window"
    return window.kernel, window.stride, window.dilation


# --------------------------------------------------------------------------- the walk


@dataclass(frozen=True)
class LayerShape:
    """What goes in and out of one layer: its input and output dims (per image)."""

    index: int
    name: str
    layer: Any  # Layer
    entry: OpDef
    in_shape: Dims
    out_shape: Dims

    @property
    def where(self) -> str:
        """The layer's path in the spec: layers[i]."""
        return f"layers[{self.index}]"

    @property
    def weights(self) -> tuple[WeightSlot, ...]:
        """The weight tensors the layer takes, shaped for its input channels."""
        return self.entry.weights(self.layer, self.in_shape[0])

    @property
    def parameters(self) -> int:
        """Weights plus biases: the sizes of the weight tensors it has."""
        return sum(math.prod(w.shape) for w in self.weights if w.source is not None)


def walk(
    pipeline: Pipeline, size: tuple[Any, Any] = (None, None), *, check: bool = False
) -> list[LayerShape]:
    """Every layer's input and output dims, for an image of `size` (h, w): ints, symbols
    (symbolic_shapes) or None (channels only, what checking a spec and its weights need).

    SpecFieldError for a layer the spec cannot have: an image op after flatten and, with
    `check` (the spec's own validation), what each op's entry checks. InvalidSpec naming the
    layer when an image of `size` is too small for it.
    """
    names = pipeline.layer_names
    shape: Dims = (pipeline.input.channels, *size)
    steps: list[LayerShape] = []
    for index, layer in enumerate(pipeline.layers):
        entry, where = OPS[layer.op], f"layers[{index}]"
        if entry.takes_image and len(shape) != 3:
            raise SpecFieldError(
                f"{where}.op", f"{layer.op} needs (N, C, H, W) but follows a flatten layer"
            )
        if check:
            entry.check(layer, shape[0], where)
        out_shape = entry.output_shape(layer, shape, where)
        steps.append(LayerShape(index, names[index], layer, entry, shape, out_shape))
        shape = out_shape
    return steps


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
    return [step.parameters for step in walk(pipeline)]


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
    try:
        steps = walk(pipeline, (height, width))
    except InvalidSpec as exc:
        raise InvalidSpec(exc.field, f"{exc.message} for an image of {height}x{width}") from None
    return tuple(
        LayerCost(
            step.name,
            step.layer.op,
            step.out_shape,
            step.parameters,
            step.entry.flops(step.layer, step.in_shape, step.out_shape),
        )
        for step in steps
    )


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
        batch * cost.shape[1] * cost.shape[2] * math.prod(window_geometry(layer)[0])
        for layer, cost in zip(pipeline.layers, costs, strict=True)
        if OPS[layer.op].int8_taps
    ]
    return INT8_CONV_BYTES_PER_TAP * max(workspaces, default=0)


def batch_cost(
    pipeline: Pipeline,
    batch: int,
    height: int,
    width: int,
    input_itemsize: int,
) -> Cost:
    """FLOPs and peak activation bytes for `batch` images of height x width.

    Activation memory is the input plus the largest pair of consecutive layer outputs (float32),
    since onnxruntime frees a tensor once its consumer ran (outputs the caller asked for are kept
    longer, which this estimate does not model). Every term is linear in the batch: one image's
    cost is remembered per pipeline id, size and input itemsize (the server asks for it on every
    request) and scaled.
    """
    one = _image_cost(_SizedPipeline(pipeline, height, width), input_itemsize)
    return Cost(
        flops=batch * one.flops,
        activation_bytes=batch * one.activation_bytes,
        workspace_bytes=batch * one.workspace_bytes,
    )


@functools.lru_cache(maxsize=1024)
def _image_cost(sized: _SizedPipeline, input_itemsize: int) -> Cost:
    pipeline = sized.pipeline
    _, height, width = sized.key
    costs = layer_costs(pipeline, height, width)
    sizes = [cost.output_bytes for cost in costs]
    pairs = [a + b for a, b in itertools.pairwise(sizes)] or sizes
    input_bytes = input_itemsize * pipeline.input.channels * height * width
    return Cost(
        flops=sum(cost.flops for cost in costs),
        activation_bytes=input_bytes + max(pairs),
        workspace_bytes=int8_conv_workspace(pipeline, 1, costs),
    )


# --------------------------------------------------------------------------- symbolic shapes


def symbolic_shapes(pipeline: Pipeline) -> dict[str, list[int | str]]:
    """Every layer's output shape with symbolic N, H and W, e.g. ["N", 8, "ceil(H/2)", ...].

    For describing outputs; the exact sizes for an image come from layer_costs.
    """
    return {
        step.name: ["N", *(_dim_text(d) for d in step.out_shape)]
        for step in symbolic_walk(pipeline)
    }


def symbolic_walk(pipeline: Pipeline) -> list[LayerShape]:
    """The walk for symbolic H and W: sizes that depend on them are symbols, the rest ints."""
    return walk(pipeline, (_Symbol("H"), _Symbol("W")))


def _dim_text(dim: Any) -> int | str:
    text = str(dim)
    return int(text) if text.isdigit() else text
