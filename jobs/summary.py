"""`featmap summary`: a Keras-style table of layers, output shapes, parameters and FLOPs, and
for an int8 pipeline the error int8 measures in this process."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..contract.errors import InvalidSpec
from ..contract.limits import DEFAULT_LIMITS, admit_calibration
from ..contract.ops import layer_costs, layer_parameters, symbolic_shapes
from ..contract.precision import QuantizationReport, check_error
from ..contract.spec import Pipeline

# The rules themselves are featmap.contract.ops' table; this is how the table prints them.
FLOP_CONVENTION = (
    "FLOPs per image: conv2d = 2 x multiply-adds (+1 per output with bias);\n"
    "  pooling = 1 per window element; global pooling = 1 per input element;\n"
    "  relu/leaky_relu = 1 per element; batch_norm = 2 per element (as written; folded\n"
    "  into the conv before it when compiled); flatten and input preprocessing = 0."
)
NO_SIZE_NOTE = "FLOPs need an image size: pass --input-size HxW (e.g. 224x224)."


def parse_input_size(text: str) -> tuple[int, int]:
    """'224x160' -> (224, 160); '64' -> (64, 64)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"expected HxW (e.g. 224x224) or one size; got {text!r}")
    sizes = [int(p) for p in parts]
    if min(sizes) < 1:
        raise ValueError(f"sizes must be >= 1; got {text!r}")
    return (sizes[0], sizes[-1])


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
    precision = "" if pipeline.precision == "float32" else f", computed in {pipeline.precision}"
    parts = [
        f"Pipeline {pipeline.pipeline_id} (input {channels} x {size}, {pipeline.input.dtype},"
        f" {pipeline.input.layout}{precision})",
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


def format_int8(report: QuantizationReport, refusal: str | None = None) -> str:
    """The measured int8 error as a table: per output, the smallest per-image cosine and the
    largest |int8 - float32| (relative to the output's largest |float32|, and absolute)."""
    header = ("Output", "Cosine (min)", "Max error", "Max abs error")
    rows = [
        (name, f"{e.cosine:.6f}", f"{e.max_error:.2%}", f"{e.max_abs_error:.6g}")
        for name, e in report.errors.items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(
            [
                row[0].ljust(widths[0]),
                *(cell.rjust(widths[i + 1]) for i, cell in enumerate(row[1:])),
            ]
        )

    rule = "-" * len(line(header))
    ranges = f"{report.calibration_images} calibration + {report.synthetic_images} synthetic"
    verdict = (
        f"Refused: {refusal}"
        if refusal is not None
        else f"Within max_error={report.max_error_allowed:.2%}"
        if report.max_error_allowed is not None
        else "Not checked against max_error"
    )
    parts = [
        f"int8 vs float32 on {report.measured_on} (ranges from {ranges} images)",
        rule.replace("-", "="),
        line(header),
        rule,
        *(line(row) for row in rows),
        rule.replace("-", "="),
        verdict,
        f"CPU int8 dot products: {report.cpu}; weights: {report.weight_bits}-bit "
        + (
            "(summed exactly by those dot products)"
            if report.weight_bits == 8
            else "(exact on every CPU; 8-bit ones would saturate without int8 dot products)"
        ),
    ]
    return "\n".join(parts) + "\n"


def measure_int8(
    pipeline: Pipeline, tensors: Mapping[str, np.ndarray], calibration: np.ndarray | None
) -> str:
    """The int8 table of a pipeline quantized here as a server would (calibration: images
    admitted as RegisterPipeline admits them; None: the synthetic set)."""
    # The runtime is imported here, when used: the other commands never load onnxruntime.
    from ..service.int8 import quantize_pipeline
    from ..service.weights import check_tensors

    weights = check_tensors(pipeline, tensors)
    if calibration is not None:
        admit_calibration(pipeline, calibration, DEFAULT_LIMITS)
    report = quantize_pipeline(pipeline, weights, calibration).report
    try:
        return format_int8(check_error(report, pipeline.int8_max_error, field="max_error"))
    except InvalidSpec as refused:
        return format_int8(report, str(refused))
