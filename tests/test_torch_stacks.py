"""torchvision's own conv stacks, exported by torch.onnx, imported by featmap, against torch.

AlexNet's, VGG11-BN's and VGG16's ``features`` (torchvision's definitions, random init, batch
norm statistics randomised, nothing downloaded) are exported by tests/torch_export.py, run with
the Python of a separate venv that has torch and torchvision (FEATMAP_TORCH_PYTHON, default
.venv-torch/bin/python; .ci/run makes it): torch is no dependency of featmap. Each exported
model is imported with featmap's importer, run through a real server and as an embedded
``featmap extract`` job, and compared with torch's own forward on the same images: float32
outputs against torch's float64 forward and its float32 forward, rtol 1e-4 and atol 1e-5 times
the output's magnitude (as tests.conftest.assert_matches_reference). The tests skip, saying
why, where that venv is missing or cannot import torch, torchvision.models and onnx.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from featmap.client import FeatureClient
from featmap.contract.spec import parse_pipeline
from featmap.jobs.onnx_import import import_onnx
from tests.test_cli import FEATMAP, clean_env

ROOT = Path(__file__).resolve().parents[1]
EXPORT_SCRIPT = ROOT / "tests" / "torch_export.py"
# Where .ci/run puts a venv with CPU torch, torchvision and onnx (see the module docstring).
TORCH_PYTHON = Path(os.environ.get("FEATMAP_TORCH_PYTHON", ROOT / ".venv-torch" / "bin" / "python"))
MODELS = ("alexnet", "vgg11_bn", "vgg16")
SIZE = 224  # the size these stacks were designed for: VGG16 ends at 512 x 7 x 7
IMAGES = 2
# torch's exporter and a featmap command on 2 shared cores: VGG16 is ~31 GFLOPs per call here.
TIMEOUT_S = 300

# VGG16's features as torchvision builds them (the table torchsummary prints): per conv, its
# filters, the side of its output at 224 and its parameters (3x3 weights + bias).
VGG16_CONVS = [
    (64, 224, 1_792),
    (64, 224, 36_928),
    (128, 112, 73_856),
    (128, 112, 147_584),
    (256, 56, 295_168),
    (256, 56, 590_080),
    (256, 56, 590_080),
    (512, 28, 1_180_160),
    (512, 28, 2_359_808),
    (512, 28, 2_359_808),
    (512, 14, 2_359_808),
    (512, 14, 2_359_808),
    (512, 14, 2_359_808),
]
VGG16_POOLS = [(64, 112), (128, 56), (256, 28), (512, 14), (512, 7)]
VGG16_PARAMETERS = 14_714_688


@dataclass(frozen=True)
class TorchExports:
    """What tests/torch_export.py wrote: the models, the images and torch's outputs."""

    folder: Path
    images: np.ndarray
    versions: dict[str, Any]

    def model(self, name: str) -> Path:
        return self.folder / f"{name}.onnx"

    def forward(self, name: str, dtype: str) -> np.ndarray:
        """torch's forward of `name` on `images`, computed in `dtype` (float32 or float64)."""
        return np.load(self.folder / f"{name}.{dtype}.npy")


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    """A command to completion, output captured, without FEATMAP_* settings."""
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=clean_env(),
        cwd=ROOT,
        check=False,
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> TorchExports:
    """The three stacks exported by torch, with torch's outputs (or a skip saying why not)."""
    if not TORCH_PYTHON.exists():
        pytest.skip(
            f"no torch venv at {TORCH_PYTHON} (.ci/run makes .venv-torch; or set "
            "FEATMAP_TORCH_PYTHON to a Python with torch, torchvision and onnx)"
        )
    probe = run(TORCH_PYTHON, EXPORT_SCRIPT, "--probe")
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"{TORCH_PYTHON} cannot import torch, torchvision.models and onnx: {last}")
    folder = tmp_path_factory.mktemp("torch")
    done = run(TORCH_PYTHON, EXPORT_SCRIPT, folder, "--size", str(SIZE), "--images", str(IMAGES))
    assert done.returncode == 0, done.stderr
    versions = json.loads((folder / "versions.json").read_text())
    return TorchExports(folder, np.load(folder / "images.npy"), versions)


def assert_matches_torch(got: np.ndarray, exports: TorchExports, name: str) -> None:
    """featmap's float32 output against torch's float64 and float32 forwards."""
    assert got.dtype == np.float32, got.dtype
    for dtype in ("float64", "float32"):
        want = exports.forward(name, dtype)
        assert got.shape == want.shape, f"{name}: shape {got.shape} != torch's {want.shape}"
        # float32 accumulation error grows with the values' magnitude (as conftest's check).
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(
            got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{name} vs torch {dtype}"
        )


def test_the_export_keeps_batch_norms_and_folds_nothing(exports: TorchExports) -> None:
    """What the importer is handed is torch's layers one for one: BatchNormalization nodes kept
    (training=PRESERVE), not folded into the convs by the exporter."""
    kinds = {
        name: Counter(n.op_type for n in onnx.load(exports.model(name)).graph.node)
        for name in MODELS
    }
    assert kinds["alexnet"]["Conv"] == 5 and kinds["alexnet"]["MaxPool"] == 3
    assert kinds["vgg11_bn"]["Conv"] == 8 and kinds["vgg11_bn"]["BatchNormalization"] == 8
    assert kinds["vgg16"]["Conv"] == 13 and kinds["vgg16"]["MaxPool"] == 5
    assert not kinds["alexnet"]["BatchNormalization"] and not kinds["vgg16"]["BatchNormalization"]
    # Whatever torch could not import was a detection op, never a layer of these stacks.
    assert all(op.startswith("torchvision::") for op in exports.versions["skipped_registrations"])


@pytest.mark.parametrize("name", MODELS)
def test_served_stack_matches_torch(
    exports: TorchExports, client: FeatureClient, name: str
) -> None:
    """import_onnx, RegisterPipeline with the tensors, Extract through a real server."""
    imported = import_onnx(exports.model(name))
    pipeline = parse_pipeline(imported.spec)
    assert len(pipeline.output_names) == 1, pipeline.output_names
    assert all(t.dtype == np.float32 for t in imported.tensors.values())
    pipeline_id = client.register(imported.spec, weights=imported.tensors)
    try:
        out = client.extract(exports.images, pipeline_id)
    finally:
        client.delete_pipeline(pipeline_id)
    assert list(out) == pipeline.output_names
    assert_matches_torch(out[pipeline.output_names[0]], exports, name)


@pytest.fixture(scope="module")
def imported_files(
    exports: TorchExports, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """`featmap import MODEL.onnx -o pipeline.yaml` per model: its spec and its .npz."""
    files: dict[str, tuple[Path, Path]] = {}
    for name in MODELS:
        spec = tmp_path_factory.mktemp(name) / "pipeline.yaml"
        done = run(FEATMAP, "import", exports.model(name), "-o", spec)
        assert done.returncode == 0, done.stderr
        weights = spec.with_suffix(".npz")
        assert weights.is_file() and str(weights) in done.stdout, done.stdout
        files[name] = (spec, weights)
    return files


@pytest.mark.parametrize("name", MODELS)
def test_embedded_job_matches_torch(
    exports: TorchExports, imported_files: dict[str, tuple[Path, Path]], name: str
) -> None:
    """`featmap extract` in this machine's process (no server) on the imported files."""
    spec, weights = imported_files[name]
    output = spec.parent / "features.npy"
    images = exports.folder / "images.npy"
    done = run(
        FEATMAP, "extract", "--pipeline", spec, "--weights", weights, "--input", images,
        "--output", output,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_matches_torch(np.load(output), exports, name)


# A row of the summary's table: layer (an output marked *), op, (shape), params, FLOPs.
ROW = re.compile(
    r"^(?P<layer>\S+)(?: \*)?\s+(?P<op>\w+)\s+\((?P<shape>[^)]*)\)"
    r"\s+(?P<params>[\d,]+)\s+(?P<flops>[\d,]+)$"
)


def test_vgg16_summary_is_the_table_users_know(
    imported_files: dict[str, tuple[Path, Path]],
) -> None:
    """13 convs and 5 max pools with torchvision's shapes and per-layer parameters, 512 x 7 x 7
    out at 224, 14,714,688 parameters in all, and each conv's FLOPs."""
    spec, weights = imported_files["vgg16"]
    done = run(
        FEATMAP, "summary", "--pipeline", spec, "--weights", weights, "--input-size", str(SIZE)
    )
    assert done.returncode == 0, done.stderr
    rows = [m.groupdict() for line in done.stdout.splitlines() if (m := ROW.match(line))]
    shape = [int(side) for side in rows[-1]["shape"].removeprefix("N, ").split(", ")]
    assert shape == [512, 7, 7], rows[-1]
    convs = [row for row in rows if row["op"] == "conv2d"]
    pools = [row for row in rows if row["op"] == "max_pool2d"]
    assert len(convs) == 13 and len(pools) == 5, done.stdout
    assert [row["shape"] for row in convs] == [f"N, {c}, {s}, {s}" for c, s, _ in VGG16_CONVS]
    assert [int(row["params"].replace(",", "")) for row in convs] == [p for *_, p in VGG16_CONVS]
    in_channels = [3] + [c for c, *_ in VGG16_CONVS[:-1]]
    flops = [
        2 * s * s * c * cin * 9 + s * s * c
        for (c, s, _), cin in zip(VGG16_CONVS, in_channels, strict=True)
    ]
    assert [int(row["flops"].replace(",", "")) for row in convs] == flops
    assert [row["shape"] for row in pools] == [f"N, {c}, {s}, {s}" for c, s in VGG16_POOLS]
    assert f"Total params: {VGG16_PARAMETERS:,}" in done.stdout, done.stdout
