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

    InvalidSpec/InvalidTensor when the spec's {"tensor": NAME} weights are missing or wrong.
    """
    # Checked first: compile_pipeline trusts that RegisterPipeline already checked them.
    checked = check_tensors(pipeline, tensors)
    model = compile_pipeline(pipeline, checked)
    onnx.checker.check_model(model, full_check=True)
    Path(path).write_bytes(model.SerializeToString())
    return model
