"""A Node.js client built from featmap.proto alone (examples/node) against a real server:
Extract, RegisterPipeline, ExtractStream, an error's featmap-field trailer, and image files
sent encoded."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from featmap.contract.images import decode_pixels
from featmap.contract.pixels import pixel_values
from featmap.contract.spec import parse_pipeline
from featmap.service.server import FeatmapServer
from tests.conftest import README_SPEC, assert_matches_reference

NODE_CLIENT = Path(__file__).resolve().parent.parent / "examples" / "node"
TENSOR_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {
            "op": "conv2d",
            "name": "conv",
            "filters": 2,
            "kernel_size": 3,
            "padding": "same",
            "weights": {"tensor": "w"},
        },
        {"op": "global_avg_pool2d", "name": "features"},
    ],
    "outputs": ["conv", "features"],
}


@pytest.fixture(scope="module")
def node_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/node with its dependencies installed (npm ci into a copy), or a skip."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    work = tmp_path_factory.mktemp("node")
    # The script finds the proto at ../../proto: keep that layout in the copy.
    shutil.copytree(
        NODE_CLIENT, work / "examples" / "node", ignore=shutil.ignore_patterns("node_modules")
    )
    shutil.copytree(NODE_CLIENT.parent.parent / "proto", work / "proto")
    installed = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=work / "examples" / "node", capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if installed.returncode != 0:
        pytest.skip(f"npm ci failed (no npm registry?): {installed.stderr.strip()[-300:]}")
    return work / "examples" / "node" / "client.js"


def arrays(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        name: np.array(o["values"], dtype=np.float32).reshape(o["shape"])
        for name, o in outputs.items()
    }


def test_node_client_talks_to_featmap(
    node_client: Path, server: FeatmapServer, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    images = rng.random((2, 3, 6, 7), dtype=np.float32)
    weight = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    files = [tmp_path / "a.jpg", tmp_path / "b.png"]
    for file in files:
        Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)).save(file)
    job = {
        "spec": README_SPEC,
        "tensor_spec": TENSOR_SPEC,
        "weights": {"w": {"shape": list(weight.shape), "values": weight.ravel().tolist()}},
        "images": {"shape": list(images.shape), "values": images.ravel().tolist()},
        "files": {"paths": [str(file) for file in files], "height": 8, "width": 10},
    }
    result = subprocess.run(
        ["node", str(node_client), server.address],
        input=json.dumps(job), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)

    readme = parse_pipeline(README_SPEC)
    assert answers["inline"]["pipeline_id"] == readme.pipeline_id
    assert_matches_reference(arrays(answers["inline"]["outputs"]), readme, images)

    tensor_pipeline = parse_pipeline(TENSOR_SPEC)
    registered = arrays(answers["registered"]["outputs"])
    assert_matches_reference(registered, tensor_pipeline, images, {"w": weight})
    assert [message["sequence"] for message in answers["stream"]] == [0, 1]
    for message in answers["stream"]:
        for name, array in arrays(message["outputs"]).items():
            np.testing.assert_array_equal(array, registered[name])

    # The files, decoded by the server with the job's decoder: the reference on those pixels.
    pixels = np.stack([decode_pixels(file, 3, (8, 10)) for file in files]).transpose(0, 3, 1, 2)
    served = arrays(answers["files"]["outputs"])
    assert served["conv1"].shape == (2, 8, 8, 10)
    assert_matches_reference(served, readme, pixel_values(pixels, readme.input))

    error = answers["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["field"] == "images.shape"
    assert error["details"].startswith("images.shape:")
