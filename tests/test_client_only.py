"""The client library on `pip install featmap` alone: no pydantic, Pillow, PyYAML or tqdm, no
server modules. A fresh interpreter where none of them can be imported drives a real server
(started here, where everything is installed) through FeatureClient and AsyncFeatureClient.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from featmap.contract.spec import parse_pipeline
from featmap.jobs.cli import CLI_MODULES, SERVER_MODULES
from featmap.service.server import FeatmapServer
from tests.conftest import assert_matches_reference, local

# What the extras bring, and pydantic's compiled core: none of it importable in the probe.
UNINSTALLED = sorted(CLI_MODULES | SERVER_MODULES | {"pydantic_core"})

SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {"op": "conv2d", "name": "conv1", "filters": 4, "kernel_size": 3, "padding": "same",
         "weights": {"tensor": "conv1.w"}, "bias": {"tensor": "conv1.b"}},
        {"op": "relu"},
        {"op": "global_avg_pool2d", "name": "features"},
    ],
    "outputs": ["conv1", "features"],
}  # fmt: skip
INLINE: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {"op": "conv2d", "name": "conv1", "filters": 4, "kernel_size": 3,
         "weights": {"init": "he_normal", "seed": 0}},
        {"op": "max_pool2d", "pool_size": 2, "name": "pooled"},
    ],
    "outputs": ["pooled"],
}  # fmt: skip
INT8 = {**INLINE, "precision": "int8", "max_error": 1.0}

# Run by the probe: everything the client library offers, the results saved for the checks.
PROBE = """
import asyncio, json, sys
import numpy as np

from featmap.client import AsyncFeatureClient, FeatureClient

address, unix_address, folder = sys.argv[1:4]
spec, inline, int8 = (json.loads(text) for text in sys.argv[4:7])
rng = np.random.default_rng(0)
w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
b = rng.standard_normal(4).astype(np.float32)
images = rng.random((40, 3, 16, 16), dtype=np.float32)
saved, report = {"images": images, "w": w, "b": b}, {}

# A small message limit: the batch goes in several requests, sized without the spec.
with FeatureClient(address, timeout=60, max_message_bytes=64 << 10) as fc:
    fc.wait_ready(30)
    report["version"] = fc.server_info().version
    pid = fc.register(spec, weights={"conv1.w": w, "conv1.b": b}, name="client-only")
    for key, value in fc.extract(images, pid).items():
        saved[f"by_id.{key}"] = value
    saved["by_name.conv1"] = fc.extract(images[:3], "client-only")["conv1"]
    saved["inline.pooled"] = fc.extract(images[:5], inline)["pooled"]
    saved["json.pooled"] = fc.extract(images[:5], json.dumps(inline))["pooled"]
    streamed = list(fc.extract_stream([images[:2], images[2:7]], pid))
    saved["stream.features"] = np.concatenate([out["features"] for out in streamed])
    info = fc.get_pipeline(pid)
    report["info"] = [info.pipeline_id == pid, info.spec, info.names, info.weight_names]
    int8_id = fc.register(int8)
    quantized = fc.get_pipeline(int8_id)
    report["int8"] = [quantized.precision, quantized.int8.max_error_allowed, quantized.int8.cpu]
    saved["int8.pooled"] = fc.extract(images[:2], int8_id)["pooled"]
    report["listed"] = sorted(p.pipeline_id for p in fc.list_pipelines())
    report["deleted"] = fc.delete_pipeline(int8_id)

async def asynchronous():
    async with AsyncFeatureClient(address, timeout=60) as afc:
        await afc.wait_ready(30)
        return (await afc.extract(images[:3], pid))["features"]

saved["async.features"] = asyncio.run(asynchronous())
with FeatureClient(unix_address, timeout=60, shared_memory=True) as shared:
    saved["shared.features"] = shared.extract(images[:6], pid)["features"]

np.savez(f"{folder}/outputs.npz", **saved)
report["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in UNINSTALLED)
print(json.dumps(report))
"""


def uninstalled_preamble(modules: list[str]) -> str:
    """Code that makes `modules` (and their submodules) unimportable, as if never installed."""
    return (
        "import importlib.abc, sys\n"
        f"UNINSTALLED = {modules!r}\n"
        "class Uninstalled(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in UNINSTALLED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Uninstalled())\n"
        "try:\n"
        "    import pydantic\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('pydantic still imports')\n"
    )


def test_the_client_library_works_without_the_extras(
    shm_server: FeatmapServer, tmp_path: Path
) -> None:
    address, unix_address = shm_server.address, local(shm_server)
    specs = [json.dumps(spec) for spec in (SPEC, INLINE, INT8)]
    result = subprocess.run(
        [sys.executable, "-c", uninstalled_preamble(UNINSTALLED) + PROBE,
         address, unix_address, str(tmp_path), *specs],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["version"]
    same_id, described, names, weight_names = report["info"]
    assert same_id and names == ["client-only"] and weight_names == ["conv1.b", "conv1.w"]
    assert parse_pipeline(described) == parse_pipeline(SPEC)
    precision, allowed, cpu = report["int8"]
    assert precision == "int8" and allowed == 1.0 and cpu
    assert report["deleted"] is True
    assert len(report["listed"]) >= 2

    saved = np.load(tmp_path / "outputs.npz")
    images, tensors = saved["images"], {"conv1.w": saved["w"], "conv1.b": saved["b"]}
    spec, inline = parse_pipeline(SPEC), parse_pipeline(INLINE)
    assert_matches_reference(
        {"conv1": saved["by_id.conv1"], "features": saved["by_id.features"]}, spec, images, tensors
    )
    np.testing.assert_array_equal(saved["by_name.conv1"], saved["by_id.conv1"][:3])
    for key, count in (("stream", 7), ("async", 3), ("shared", 6)):
        np.testing.assert_allclose(
            saved[f"{key}.features"], saved["by_id.features"][:count], rtol=1e-6, atol=1e-7
        )
    assert_matches_reference({"pooled": saved["inline.pooled"]}, inline, images[:5])
    np.testing.assert_array_equal(saved["json.pooled"], saved["inline.pooled"])
    assert saved["int8.pooled"].shape == saved["inline.pooled"][:2].shape
