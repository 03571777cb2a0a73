"""`featmap export-onnx`: the ONNX model the server would run, written to a file."""

from __future__ import annotations

from pathlib import Path

import onnx

from featmap.contract.spec import NO_TENSORS, Pipeline, WeightTensors
from featmap.service.graph import compile_pipeline
from featmap.service.weights import check_tensors


def export_onnx(
    pipeline: Pipeline, path: str | Path, tensors: WeightTensors = NO_TENSORS
) -> onnx.ModelProto:
    """Compile the pipeline (as the server does), check the model and write it to `path`.

    An int8 pipeline is quantized on the synthetic calibration images, as the server does for
    an inline spec. InvalidSpec/InvalidTensor when the spec's {"tensor": NAME} weights are
    missing or wrong.
    """
    # Checked first: compile_pipeline trusts that RegisterPipeline already checked them.
    checked = check_tensors(pipeline, tensors)
    if pipeline.precision == "int8":
        from featmap.service.quantize import quantize_pipeline  # 0.3 s: only when needed

        model = quantize_pipeline(pipeline, checked).model
    else:
        model = compile_pipeline(pipeline, checked)
    onnx.checker.check_model(model, full_check=True)
    Path(path).write_bytes(model.SerializeToString())
    return model
