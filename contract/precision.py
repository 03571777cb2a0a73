"""int8 precision: the error report the server measures and clients read, and its threshold.

The server measures (featmap.service.int8); the report's fields, its one-line description,
the threshold check and the Int8Report message live here, so that a client prints and compares
what the server sent without onnxruntime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ..v1 import featmap_pb2 as pb
from .errors import InvalidSpec

# The int8 error threshold when the spec sets none (its `max_error`): the largest
# |int8 - float32| over an output, as a fraction of that output's largest |float32|; ordinary
# pipelines measure 0.5-3 %.
DEFAULT_MAX_ERROR = 0.05


@dataclass(frozen=True)
class OutputError:
    """How far one int8 output is from float32 on the same images.

    cosine: the smallest, over images, cosine similarity of an image's flattened int8 and
    float32 results (1.0 when both are all zero, 0.0 when only one is).
    max_error: the largest |int8 - float32| over the whole output, divided by the largest
    |float32| (0.0 when both are all zero, inf when only float32 is).
    max_abs_error: the largest |int8 - float32|, in the output's own units.
    """

    cosine: float
    max_error: float
    max_abs_error: float


@dataclass(frozen=True)
class QuantizationReport:
    """What int8 costs a pipeline in accuracy, measured when it is quantized.

    The errors are measured on the user's calibration images (what they will send), or on the
    synthetic ones when there are none; the ranges come from both (quantize_with_report).
    `cpu` is the quantizing CPU's int8 dot-product features ("none" without), `weight_bits`
    the weights it chose for them: 8 where dot products sum every product exactly, 7 elsewhere
    (exact on every CPU). `max_error_allowed` is the threshold check_error passed it against
    (None: not checked).
    """

    errors: Mapping[str, OutputError]
    calibration_images: int
    synthetic_images: int
    cpu: str
    weight_bits: int
    max_error_allowed: float | None = None

    @property
    def max_error(self) -> float:
        """The largest relative error over all outputs."""
        return max(e.max_error for e in self.errors.values())

    @property
    def min_cosine(self) -> float:
        """The smallest per-image cosine similarity over all outputs."""
        return min(e.cosine for e in self.errors.values())

    @property
    def measured_on(self) -> str:
        """Which images the errors are measured on, in words."""
        if self.calibration_images:
            return f"{self.calibration_images} calibration images"
        return f"{self.synthetic_images} synthetic images"

    def describe(self) -> str:
        """One line for the log and the summary."""
        outputs = ", ".join(
            f"{name} cosine {e.cosine:.6f} max error {e.max_error:.2%}"
            for name, e in self.errors.items()
        )
        ranges = f"{self.calibration_images} calibration + {self.synthetic_images} synthetic"
        allowed = (
            "" if self.max_error_allowed is None else f"; allowed {self.max_error_allowed:.2%}"
        )
        return (
            f"int8 vs float32 on {self.measured_on}: {outputs} (ranges from {ranges} images; "
            f"CPU int8: {self.cpu}, {self.weight_bits}-bit weights{allowed})"
        )


def check_error(
    report: QuantizationReport, max_error: float = DEFAULT_MAX_ERROR, *, field: str = "precision"
) -> QuantizationReport:
    """The report, checked against `max_error`; InvalidSpec naming `field` when it exceeds it.

    INVALID_ARGUMENT, not FAILED_PRECONDITION: the error follows from what the request holds
    (spec, weights, calibration images, threshold), the same request fails the same way, and
    the caller fixes it by changing the request, not by waiting for the server to change.
    """
    over = [
        f"{name} max error {e.max_error:.2%} (cosine {e.cosine:.6f})"
        for name, e in report.errors.items()
        if not e.max_error <= max_error  # NaN fails too
    ]
    if over:
        raise InvalidSpec(
            field,
            f"int8 error exceeds max_error={max_error:.2%} on {report.measured_on}: "
            f"{'; '.join(over)}. Use float32, raise max_error, or calibrate on images like "
            "the ones you will send",
        )
    return dataclasses.replace(report, max_error_allowed=max_error)


def report_message(report: QuantizationReport) -> pb.Int8Report:
    """A report as the Int8Report message (outputs in the report's order)."""
    return pb.Int8Report(
        errors=[
            pb.OutputError(
                output=name,
                cosine=error.cosine,
                max_error=error.max_error,
                max_abs_error=error.max_abs_error,
            )
            for name, error in report.errors.items()
        ],
        calibration_images=report.calibration_images,
        synthetic_images=report.synthetic_images,
        cpu=report.cpu,
        weight_bits=report.weight_bits,
        max_error_allowed=report.max_error_allowed or 0.0,
    )


def report_from_message(message: pb.Int8Report) -> QuantizationReport:
    """An Int8Report message as a report."""
    return QuantizationReport(
        errors={
            error.output: OutputError(error.cosine, error.max_error, error.max_abs_error)
            for error in message.errors
        },
        calibration_images=message.calibration_images,
        synthetic_images=message.synthetic_images,
        cpu=message.cpu,
        weight_bits=message.weight_bits,
        max_error_allowed=message.max_error_allowed or None,
    )
