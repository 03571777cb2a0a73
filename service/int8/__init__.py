"""int8 precision: a float32 model quantized for this CPU's int8 kernels, and its error measured."""

from __future__ import annotations

from .blocks import block_kernel
from .calibration import synthetic_calibration
from .cpu import (
    CPU_OVERRIDE_VARIABLE,
    DEFAULT_SETTINGS,
    PORTABLE_SETTINGS,
    WEIGHT_BITS_PROPERTY,
    Int8Settings,
    check_runs_here,
    cpu_int8_support,
    describe_weights,
    has_int8_dot_products,
    weight_bits_for,
)
from .error import ErrorMeasure, measure_error, output_error, run_model
from .quantize import (
    PRECISION_PROPERTY,
    QuantizedModel,
    check_int8_model_runs_here,
    model_properties,
    quantize_int8,
    quantize_pipeline,
    quantize_with_report,
)

__all__ = [
    "CPU_OVERRIDE_VARIABLE",
    "DEFAULT_SETTINGS",
    "PORTABLE_SETTINGS",
    "PRECISION_PROPERTY",
    "WEIGHT_BITS_PROPERTY",
    "ErrorMeasure",
    "Int8Settings",
    "QuantizedModel",
    "block_kernel",
    "check_int8_model_runs_here",
    "check_runs_here",
    "cpu_int8_support",
    "describe_weights",
    "has_int8_dot_products",
    "measure_error",
    "model_properties",
    "output_error",
    "quantize_int8",
    "quantize_pipeline",
    "quantize_with_report",
    "run_model",
    "synthetic_calibration",
    "weight_bits_for",
]
