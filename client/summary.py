"""`featmap summary`: a Keras-style table of layers, output shapes, parameters and FLOPs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from featmap.service.spec import (
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    GlobalMaxPool2d,
    LayerBase,
    Pipeline,
    PoolBase,
    infer_shapes,
    symbolic_shapes,
)

FLOP_CONVENTION = (
    "FLOPs per image: conv2d = 2 x multiply-adds (+1 per output with bias);\n"
    "  pooling = 1 per window element; global pooling = 1 per input element;\n"
    "  relu/leaky_relu = 1 per element; flatten and input preprocessing = 0."
)
NO_SIZE_NOTE = "FLOPs need an image size: pass --input-size HxW (e.g. 224x224)."


@dataclass(frozen=True)
class LayerCost:
    """One layer's output shape (C, H, W) or (features,), parameters and FLOPs per image."""

    name: str
    op: str
    shape: tuple[int, ...]
    parameters: int
    flops: int


def parse_input_size(text: str) -> tuple[int, int]:
    """'224x160' -> (224, 160); '64' -> (64, 64)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"expected HxW (e.g. 224x224) or one size; got {text!r}")
    sizes = [int(p) for p in parts]
    if min(sizes) < 1:
        raise ValueError(f"sizes must be >= 1; got {text!r}")
    return (sizes[0], sizes[-1])


def layer_parameters(pipeline: Pipeline) -> list[int]:
    """Weights plus bias of every layer, in order (0 for layers without parameters)."""
    counts, channels = [], pipeline.input.channels
    for layer in pipeline.layers:
        count = 0
        if isinstance(layer, Conv2d):
            kh, kw = layer.kernel_size
            count = layer.filters * (channels // layer.groups) * kh * kw
            count += layer.filters if layer.bias is not None else 0
            channels = layer.filters
        counts.append(count)
    return counts


def _layer_flops(layer: LayerBase, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    if isinstance(layer, Conv2d):
        kh, kw = layer.kernel_size
        outputs = math.prod(out_shape)
        multiply_adds = outputs * (in_shape[0] // layer.groups) * kh * kw
        return 2 * multiply_adds + (outputs if layer.bias is not None else 0)
    if isinstance(layer, PoolBase):
        ph, pw = layer.pool_size
        return math.prod(out_shape) * ph * pw
    if isinstance(layer, GlobalAvgPool2d | GlobalMaxPool2d):
        return math.prod(in_shape)
    if isinstance(layer, Flatten):
        return 0  # a reshape: no arithmetic
    return math.prod(out_shape)  # relu, leaky_relu: elementwise


def layer_costs(pipeline: Pipeline, height: int, width: int) -> list[LayerCost]:
    """Every layer's output shape, parameters and FLOPs for one height x width image.

    InvalidSpec if the image is too small for some layer (as infer_shapes).
    """
    shapes = infer_shapes(pipeline, height, width)
    in_shape: tuple[int, ...] = (pipeline.input.channels, height, width)
    costs = []
    for layer, shape, parameters in zip(
        pipeline.layers, shapes, layer_parameters(pipeline), strict=True
    ):
        flops = _layer_flops(layer, in_shape, shape.shape)
        costs.append(LayerCost(shape.name, shape.op, shape.shape, parameters, flops))
        in_shape = shape.shape
    return costs


def _shape_text(dims: list[int | str] | tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def format_summary(pipeline: Pipeline, input_size: tuple[int, int] | None = None) -> str:
    """The summary table as text: one row per layer, then totals and the FLOP convention."""
    channels = pipeline.input.channels
    rows: list[tuple[str, str, str, str, str]] = []
    if input_size is None:
        symbolic = symbolic_shapes(pipeline)
        rows.append(("images", "input", _shape_text(["N", channels, "H", "W"]), "0", "-"))
        for name, layer, parameters in zip(
            pipeline.layer_names, pipeline.layers, layer_parameters(pipeline), strict=True
        ):
            rows.append((name, layer.op, _shape_text(symbolic[name]), f"{parameters:,}", "-"))
        total_flops = "-"
    else:
        height, width = input_size
        costs = layer_costs(pipeline, height, width)
        rows.append(("images", "input", _shape_text(("N", channels, height, width)), "0", "0"))
        for cost in costs:
            rows.append(
                (
                    cost.name,
                    cost.op,
                    _shape_text(("N", *cost.shape)),
                    f"{cost.parameters:,}",
                    f"{cost.flops:,}",
                )
            )
        total_flops = f"{sum(c.flops for c in costs):,}"
    outputs = set(pipeline.output_names)
    header = ("Layer", "Op", "Output shape", "Params", "FLOPs")
    named = [(f"{r[0]} *" if r[0] in outputs else r[0], *r[1:]) for r in rows]
    widths = [max(len(row[i]) for row in [header, *named]) for i in range(5)]

    def line(row: tuple[str, ...]) -> str:
        left = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3]))
        right = "  ".join(cell.rjust(widths[i + 3]) for i, cell in enumerate(row[3:]))
        return f"{left}  {right}"

    rule = "-" * len(line(header))
    size = f"{input_size[0]}x{input_size[1]}" if input_size else "H x W (any)"
    parts = [
        f"Pipeline {pipeline.pipeline_id} (input {channels} x {size}, {pipeline.input.dtype},"
        f" {pipeline.input.layout})",
        rule.replace("-", "="),
        line(header),
        rule,
        *(line(row) for row in named),
        rule.replace("-", "="),
        f"Total params: {sum(layer_parameters(pipeline)):,}",
        f"Total FLOPs per image: {total_flops}",
        "* an output of the pipeline",
        FLOP_CONVENTION,
        *([] if input_size else [NO_SIZE_NOTE]),
    ]
    return "\n".join(parts) + "\n"
