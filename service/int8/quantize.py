"""float32 ONNX model -> int8 ONNX model with its measured error: the steps in order.

onnxruntime's static quantization does the work: QDQ format, per-channel symmetric int8
weights, uint8 activations calibrated by min/max over the calibration images (calibration),
around it the graph passes (passes) and the 2x2 block rewrite (blocks). The weights are 8-bit
where the CPU has int8 dot products and 7-bit elsewhere, where 8-bit products saturate (cpu).
The error is measured on the calibration images (error). `quantize_pipeline` is what the
session cache, `featmap summary` and `featmap export-onnx` call for an int8 spec.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from ...contract.errors import InvalidTensor
from ...contract.limits import DEFAULT_CALIBRATION_SIZE, admit_int8_kernels
from ...contract.precision import QuantizationReport
from ...contract.spec import NO_TENSORS, Pipeline, WeightTensors, content_id
from ..graph import compile_pipeline
from .blocks import pooled_convs_on_blocks
from .calibration import (
    CalibrationBatches,
    check_calibration,
    image_size,
    input_info,
    synthetic_calibration,
    widen_ranges,
)
from .cpu import (
    DEFAULT_SETTINGS,
    WEIGHT_BITS_PROPERTY,
    Int8Settings,
    check_runs_here,
    cpu_int8_support,
)
from .error import ErrorMeasure, run_batches
from .passes import (
    QUANTIZED_OP_TYPES,
    align_conv_channels,
    float_nodes,
    pad_after_quantize,
    pixels_as_quantized_input,
    shapes_from_quantized,
)

# The ONNX metadata property that says an int8 model is one ("int8"), beside WEIGHT_BITS_PROPERTY.
PRECISION_PROPERTY = "featmap.precision"

_ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}


@dataclass(frozen=True)
class QuantizedModel:
    """An int8 model and the error it was measured to have."""

    model: onnx.ModelProto
    report: QuantizationReport


def model_properties(model: onnx.ModelProto) -> dict[str, str]:
    """A model's metadata properties."""
    return {p.key: p.value for p in model.metadata_props}


def check_int8_model_runs_here(model: onnx.ModelProto) -> None:
    """Unsupported when an int8 model's weights would be inexact on this CPU (check_runs_here).

    A model quantized here always runs here; one quantized elsewhere (read from a file or a
    store) may hold 8-bit weights that this CPU's kernels saturate. A model without the
    property is float32, or was not made by featmap.
    """
    weight_bits = model_properties(model).get(WEIGHT_BITS_PROPERTY)
    if weight_bits is not None:
        check_runs_here(int(weight_bits))


def quantize_int8(
    model: onnx.ModelProto,
    calibration: np.ndarray | Sequence[np.ndarray],
    *,
    settings: Int8Settings = DEFAULT_SETTINGS,
    still_wanted: Callable[[], None] | None = None,
) -> onnx.ModelProto:
    """The int8 version of a float32 model, calibrated on `calibration`.

    Args:
        model: a compiled pipeline (one input, float32 outputs); it is not modified.
        calibration: a batch of images as the model's input takes them (dtype, layout), or
            several batches (each may have its own image size): the ranges cover them all.
        settings: how to quantize; the defaults are the measured best here, with the
            weight bits this CPU computes exactly (Int8Settings.for_cpu).
        still_wanted: called before each calibration batch; what it raises stops the work.

    Returns:
        A model with the same input and outputs and the metadata properties
        featmap.precision=int8 and featmap.int8_weight_bits. The same model, images, settings
        (weight bits decided) and onnxruntime version give the same bytes.
    """
    settings = settings.for_cpu()
    image_sets = [calibration] if isinstance(calibration, np.ndarray) else list(calibration)
    if not image_sets:
        raise InvalidTensor("calibration", "no calibration images")
    for images in image_sets:
        check_calibration(model, images)
    input_name, _, _ = input_info(model)
    prepared = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's stays as is
    if settings.align_channels:
        prepared = align_conv_channels(prepared)
    options: dict[str, Any] = {
        "quant_format": _FORMATS[settings.quant_format],
        "op_types_to_quantize": list(QUANTIZED_OP_TYPES),
        "nodes_to_exclude": [*float_nodes(prepared), *settings.keep_float],
        "per_channel": settings.per_channel,
        # onnxruntime's reduce_range is 7-bit weights (activations keep their 8 bits).
        "reduce_range": settings.weight_bits == 7,
        "activation_type": _ACTIVATION_TYPES[settings.activation_type],
        "weight_type": QuantType.QInt8,
        "calibrate_method": CalibrationMethod.MinMax,
        "extra_options": {
            "WeightSymmetric": True,
            "ActivationSymmetric": settings.symmetric_activations,
        },
    }
    with tempfile.TemporaryDirectory(prefix="featmap-int8-") as scratch:
        # onnxruntime's quantization tools work on files: given a ModelProto, they save it with
        # external data (quantize_static even converts the caller's proto in place), which
        # quant_pre_process then fails to read back. Plain files in a private folder avoid both.
        directory = Path(scratch)
        onnx.save(prepared, str(directory / "float32.onnx"))
        # Shape inference (onnx) and basic graph optimization (onnxruntime); symbolic shape
        # inference would need sympy and only helps transformers.
        quant_pre_process(
            str(directory / "float32.onnx"),
            str(directory / "preprocessed.onnx"),
            skip_symbolic_shape=True,
        )
        # Calibrate (this first pass also quantizes, with the raw ranges: thrown away), widen the
        # cached ranges, then quantize from the cache without running the model again.
        cache = directory / "ranges.json"
        quantize_static(
            str(directory / "preprocessed.onnx"),
            str(directory / "raw.onnx"),
            CalibrationBatches(input_name, image_sets, still_wanted),
            calibration_cache_path=str(cache),
            **options,
        )
        widen_ranges(cache, settings.headroom)
        quantize_static(
            str(directory / "preprocessed.onnx"),
            str(directory / "int8.onnx"),
            None,
            calibration_cache_path=str(cache),
            **options,
        )
        quantized = onnx.load(str(directory / "int8.onnx"))
    quantized = pad_after_quantize(shapes_from_quantized(quantized))
    if settings.pooled_conv_blocks:
        quantized = pooled_convs_on_blocks(quantized)
    if settings.pixel_input:
        quantized = pixels_as_quantized_input(quantized)
    properties = model_properties(quantized)
    properties[PRECISION_PROPERTY] = "int8"
    properties[WEIGHT_BITS_PROPERTY] = str(settings.weight_bits)
    helper.set_model_props(quantized, dict(sorted(properties.items())))
    return quantized


def quantize_with_report(
    model: onnx.ModelProto,
    calibration: np.ndarray | None = None,
    *,
    add_synthetic: bool = True,
    pixel_max: float | None = None,
    settings: Int8Settings = DEFAULT_SETTINGS,
    threads: int = 0,
    still_wanted: Callable[[], None] | None = None,
) -> QuantizedModel:
    """Quantize `model` for images like `calibration`, and measure its error on them.

    The ranges come from `calibration` and, with `add_synthetic` (always when there is no
    calibration), from synthetic_calibration at the same image size: its black, white and
    noise images cover images darker, brighter or sharper than the user's, which would
    otherwise clip (scripts/int8_speed.py --calibration: up to 47 % error instead of 1 %), for
    a slightly coarser resolution. The error is measured on `calibration`, or on the
    synthetic images when there is none: both models run on them and every output is
    compared. `pixel_max` is for the synthetic images (see synthetic_calibration).
    `still_wanted` is called between batches of images; what it raises stops the work.
    """
    if calibration is not None:
        check_calibration(model, calibration)
    size = DEFAULT_CALIBRATION_SIZE if calibration is None else image_size(model, calibration)
    synthetic = (
        synthetic_calibration(model, size=size, pixel_max=pixel_max)
        if calibration is None or add_synthetic
        else None
    )
    image_sets = [images for images in (calibration, synthetic) if images is not None]
    quantized = quantize_int8(model, image_sets, settings=settings, still_wanted=still_wanted)
    measured = image_sets[0]
    # Batch by batch, both models side by side: memory stays a batch of outputs.
    measure = ErrorMeasure()
    for float_outputs, int8_outputs in zip(
        run_batches(model, measured, threads),
        run_batches(quantized, measured, threads),
        strict=True,
    ):
        measure.add(float_outputs, int8_outputs)
        if still_wanted is not None:
            still_wanted()
    errors = measure.errors()
    report = QuantizationReport(
        errors=errors,
        calibration_images=0 if calibration is None else len(calibration),
        synthetic_images=0 if synthetic is None else len(synthetic),
        cpu=cpu_int8_support(),
        weight_bits=int(model_properties(quantized)[WEIGHT_BITS_PROPERTY]),
    )
    return QuantizedModel(model=quantized, report=report)


def quantize_pipeline(
    pipeline: Pipeline,
    tensors: WeightTensors = NO_TENSORS,
    calibration: np.ndarray | None = None,
    *,
    threads: int = 0,
    settings: Int8Settings = DEFAULT_SETTINGS,
    still_wanted: Callable[[], None] | None = None,
) -> QuantizedModel:
    """A pipeline's compiled graph quantized to int8, with its report (not yet checked).

    Float pixels are 0..1 unless input.scale is set: then raw 0..255 values, as `featmap
    extract` sends them (the synthetic images follow the same rule). The model's
    featmap.pipeline_id names its content, calibration images included.
    """
    admit_int8_kernels(pipeline)  # what int8 cannot run, named before any work (InvalidSpec)
    pixel_max = 255.0 if pipeline.input.scale is not None else None
    quantized = quantize_with_report(
        compile_pipeline(pipeline, tensors),
        calibration,
        pixel_max=pixel_max,
        threads=threads,
        settings=settings,
        still_wanted=still_wanted,
    )
    properties = model_properties(quantized.model)
    properties["featmap.pipeline_id"] = content_id(pipeline, tensors, calibration)
    helper.set_model_props(quantized.model, dict(sorted(properties.items())))
    return quantized
