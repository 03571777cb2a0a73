"""`featmap export-onnx`: the ONNX model the server would run, written to a file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import onnx

from ..contract.spec import NO_TENSORS, Pipeline, WeightTensors
from ..service.graph import compile_pipeline
from ..service.weights import check_tensors


def export_onnx(
    pipeline: Pipeline,
    path: str | Path,
    tensors: WeightTensors = NO_TENSORS,
    *,
    standard_ops: bool = False,
    weight_bits: Literal[7, 8] | None = 7,
) -> onnx.ModelProto:
    """Compile the pipeline (as the server does), check the model and write it to `path`.

    An int8 pipeline is quantized on the synthetic calibration images, as the server does for
    an inline spec; with `standard_ops`, without the onnxruntime contrib ops the server's int8
    model may hold (the same numbers on onnxruntime; other runtimes can load it). A file
    travels, so its int8 weights are 7-bit by default, exact on every CPU; `weight_bits=8` is
    exact only where the CPU has int8 dot products, and None is what a server on this CPU
    runs (featmap.service.int8.cpu).
    InvalidSpec/InvalidTensor when the spec's {"tensor": NAME} weights are missing or wrong.
    """
    # Checked first: compile_pipeline trusts that RegisterPipeline already checked them.
    checked = check_tensors(pipeline, tensors)
    if pipeline.precision == "int8":
        # 0.3 s: only when needed
        from ..service.int8 import DEFAULT_SETTINGS, quantize_pipeline

        settings = replace(
            DEFAULT_SETTINGS, pooled_conv_blocks=not standard_ops, weight_bits=weight_bits
        )
        model = quantize_pipeline(pipeline, checked, settings=settings).model
    else:
        model = compile_pipeline(pipeline, checked)
    onnx.checker.check_model(model, full_check=True)
    Path(path).write_bytes(model.SerializeToString())
    return model
