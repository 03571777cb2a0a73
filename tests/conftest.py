"""Shared fixtures: a real gRPC server on 127.0.0.1 (port 0), its client, and ONNX runners."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from featmap.client import FeatureClient
from featmap.contract.spec import (
    NO_TENSORS,
    Pipeline,
    WeightTensors,
    parse_pipeline,
)
from featmap.service.graph import INPUT_NAME, compile_pipeline
from featmap.service.int8.cache import CACHE_DIR_VARIABLE
from featmap.service.reference import reference_outputs
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings

# No test touches the user's pipeline store (~/.local/share/featmap/pipelines): in-process
# servers keep their registrations in memory, as a fresh server's empty listing expects, unless
# a test gives one a store of its own (tests/test_store.py); `featmap serve` subprocesses, whose
# environment tests/test_cli.py's clean_env clears of FEATMAP_*, each get a data folder of their
# own under DATA_ROOT (clean_env), so their default store is a fresh temporary one.
DATA_ROOT = tempfile.mkdtemp(prefix="featmap-test-data-")
atexit.register(shutil.rmtree, DATA_ROOT, True)
os.environ["FEATMAP_PIPELINE_STORE"] = "none"
os.environ["XDG_DATA_HOME"] = DATA_ROOT

# The README's first example: conv -> relu -> max pool -> global average pool, two taps.
README_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {
            "op": "conv2d",
            "name": "conv1",
            "filters": 8,
            "kernel_size": 3,
            "padding": "same",
            "weights": {"init": "he_normal", "seed": 0},
        },
        {"op": "relu"},
        {"op": "max_pool2d", "pool_size": 2},
        {"op": "global_avg_pool2d", "name": "features"},
    ],
    "outputs": ["conv1", "features"],
}


def run_onnx(pipeline: Pipeline, images: np.ndarray) -> dict[str, np.ndarray]:
    """The pipeline's requested outputs from a fresh onnxruntime CPU session."""
    session = ort.InferenceSession(
        compile_pipeline(pipeline).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = pipeline.output_names
    return dict(zip(names, session.run(names, {INPUT_NAME: images}), strict=True))


def assert_matches_reference(
    actual: Mapping[str, np.ndarray],
    pipeline: Pipeline,
    images: np.ndarray,
    tensors: WeightTensors = NO_TENSORS,
) -> None:
    """Shape, then dtype, then values against the float64 NumPy reference (same weights)."""
    expected = reference_outputs(pipeline, images, tensors)
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
        assert got.dtype == np.float32, f"{name}: dtype {got.dtype}"
        # float32 accumulation error grows with the values' magnitude; float64 is exact enough.
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Ray's tests first: ray.init forks its node from this process, and once earlier tests
    have left gRPC threads running here (servers, channels), a forked node sometimes never
    registered within Ray's 30 s (seen in about a third of full runs)."""
    items.sort(key=lambda item: Path(str(item.fspath)).name != "test_ray.py")


@pytest.fixture(autouse=True)
def private_cache_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test's own cache folder: nothing is read from or written to the user's.

    XDG_CACHE_HOME too, since the tests' `featmap` children run without FEATMAP_* variables.
    """
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(folder / "featmap"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder / "featmap"


@pytest.fixture(scope="session")
def readme_pipeline() -> Pipeline:
    """The README example as a validated Pipeline."""
    return parse_pipeline(README_SPEC)


@pytest.fixture(scope="session")
def server() -> Iterator[FeatmapServer]:
    """A real featmap server on 127.0.0.1, port chosen by the OS, for the whole session."""
    settings = ServerSettings(
        host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=4, max_images_per_request=64
    )
    with FeatmapServer(settings) as running:
        yield running


@pytest.fixture(scope="session")
def shm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatmapServer]:
    """A real server that also serves its Unix socket and offers shared memory there."""
    socket = tmp_path_factory.mktemp("socket") / "featmap.sock"
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        intra_op_threads=1,
        grpc_workers=4,
        unix_socket=socket,
        shared_memory=True,
    )
    with FeatmapServer(settings) as running:
        yield running


def local(server: FeatmapServer) -> str:
    """A server's Unix socket as a gRPC target (where shared memory is offered)."""
    assert server.unix_address is not None
    return server.unix_address


@pytest.fixture(scope="session")
def client(server: FeatmapServer) -> Iterator[FeatureClient]:
    """A FeatureClient connected to the session's server, ready."""
    with FeatureClient(server.address, timeout=60) as connected:
        connected.wait_ready()
        yield connected


def write_images(folder: Path, sizes: Iterable[tuple[int, int]] = ((20, 24), (12, 16))) -> None:
    """A PNG, JPEG, BMP and TIFF per size, grayscale, RGB, RGBA and palette among them."""
    rng = np.random.default_rng(0)
    (folder / "nested").mkdir(parents=True, exist_ok=True)
    for index, (h, w) in enumerate(sizes):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb, "RGB").save(folder / f"rgb{index}.png")
        Image.fromarray(rgb[:, :, 0], "L").save(folder / f"gray{index}.bmp")
        Image.fromarray(rgb, "RGB").save(folder / "nested" / f"photo{index}.jpg", quality=90)
        rgba = np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)])
        Image.fromarray(rgba, "RGBA").save(folder / f"alpha{index}.tiff")
        Image.fromarray(rgb, "RGB").convert("P").save(folder / "nested" / f"palette{index}.png")


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten images of two sizes and four formats, read-only for the tests that share them."""
    folder = tmp_path_factory.mktemp("photos")
    write_images(folder)
    return folder
