"""`featmap export-onnx`: the written file is a checked model that gives the reference's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from featmap.contract.spec import (
    Pipeline,
    parse_pipeline,
)
from featmap.service.graph import INPUT_NAME, compile_pipeline
from featmap.service.reference import reference_outputs
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_cli import run_featmap


def test_exported_model_runs_like_the_reference(tmp_path: Path, readme_pipeline: Pipeline) -> None:
    spec_path, model_path = tmp_path / "pipeline.json", tmp_path / "model.onnx"
    spec_path.write_text(json.dumps(README_SPEC))
    result = run_featmap("export-onnx", "--pipeline", str(spec_path), "-o", str(model_path))
    assert result.returncode == 0, result.stderr
    assert readme_pipeline.pipeline_id in result.stderr

    model = onnx.load(str(model_path))
    onnx.checker.check_model(model, full_check=True)
    # The same bytes the server compiles: export is not a second code path.
    assert model_path.read_bytes() == compile_pipeline(readme_pipeline).SerializeToString()

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).standard_normal((2, 3, 12, 10)).astype(np.float32)
    names = readme_pipeline.output_names
    outputs = dict(zip(names, session.run(names, {INPUT_NAME: images}), strict=True))
    assert_matches_reference(outputs, readme_pipeline, images)


def test_tensor_weights_cannot_be_exported(tmp_path: Path) -> None:
    spec = {
        "input": {"channels": 1},
        "layers": [
            {"op": "conv2d", "filters": 1, "kernel_size": 3, "weights": {"tensor": "w"}},
        ],
    }
    spec_path, model_path = tmp_path / "pipeline.json", tmp_path / "model.onnx"
    spec_path.write_text(json.dumps(spec))
    result = run_featmap("export-onnx", "--pipeline", str(spec_path), "-o", str(model_path))
    assert result.returncode == 2
    assert result.stderr.startswith("featmap export-onnx: error: layers[0].weights.tensor: ")
    assert not model_path.exists()


def test_tensor_weights_from_npz(tmp_path: Path) -> None:
    spec = {
        "input": {"channels": 1},
        "layers": [
            {
                "op": "conv2d",
                "name": "conv",
                "filters": 2,
                "kernel_size": 3,
                "weights": {"tensor": "w"},
                "bias": {"tensor": "b"},
            },
        ],
    }
    rng = np.random.default_rng(2)
    tensors = {
        "w": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "b": np.array([0.5, -1.0], dtype=np.float32),
    }
    spec_path, weights_path = tmp_path / "pipeline.json", tmp_path / "weights.npz"
    model_path = tmp_path / "model.onnx"
    spec_path.write_text(json.dumps(spec))
    np.savez(weights_path, **tensors)
    result = run_featmap(
        "export-onnx",
        "--pipeline",
        str(spec_path),
        "--weights",
        str(weights_path),
        "-o",
        str(model_path),
    )
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    images = rng.standard_normal((1, 1, 6, 6)).astype(np.float32)
    (got,) = session.run(["conv"], {INPUT_NAME: images})
    want = reference_outputs(parse_pipeline(spec), images, tensors)["conv"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
