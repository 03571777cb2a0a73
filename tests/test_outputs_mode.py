"""Files featmap writes get open()'s mode, 0o666 less the umask, so other users can read them.

`tempfile.mkstemp` made every atomic write 0600: a batch job run as the image's uid 10001 left
results that the host user could not read. These tests need no Docker.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featmap.jobs.outputs import Contents, Results, atomic_path, write_merged, write_npz
from tests.conftest import README_SPEC
from tests.test_cli import FEATMAP, clean_env


def mode_of(path: Path) -> int:
    """The permission bits of a file."""
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    """Restores this process's umask after a test that sets it."""
    previous = os.umask(0o022)
    os.umask(previous)
    try:
        yield
    finally:
        os.umask(previous)


def two_images() -> Results:
    """Two images' worth of one (4,) output."""
    results = Results(["features"])
    for i in range(2):
        results.add(f"image-{i}.png", {"features": np.full((4,), i, dtype=np.float32)})
    return results


def write_results(results: Results, destination: Path, metadata: dict[str, str]) -> None:
    """`featmap extract`'s last step: one shard's part file merged into the destination."""
    part = destination.parent.parent / f"part-{destination.name}.npz"
    write_npz(results, part)
    contents = Contents(results.output_names)
    contents.add(0, results)
    write_merged(contents, [part], destination, metadata)
    part.unlink()


@pytest.mark.parametrize("suffix", [".npz", ".npy", ".parquet"])
@pytest.mark.parametrize(
    ("mask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o027, 0o640), (0o077, 0o600)]
)
def test_results_get_the_umask_mode(
    tmp_path: Path, umask: None, suffix: str, mask: int, expected: int
) -> None:
    destination = tmp_path / f"features{suffix}"
    os.umask(mask)
    write_results(two_images(), destination, metadata={})
    assert oct(mode_of(destination)) == oct(expected)
    assert [p.name for p in tmp_path.iterdir()] == [destination.name], "no temporary left"


def test_replacing_a_file_takes_the_umask_mode_too(tmp_path: Path, umask: None) -> None:
    destination = tmp_path / "features.npz"
    destination.write_bytes(b"old")
    destination.chmod(0o600)
    os.umask(0o022)
    write_results(two_images(), destination, metadata={})
    assert oct(mode_of(destination)) == oct(0o644)


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    destination = tmp_path / "manifest.json"
    with pytest.raises(RuntimeError), atomic_path(destination) as temporary:
        temporary.write_text("{}", encoding="utf-8")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["extract", "export-onnx", "visualize"])
def test_every_featmap_command_writes_with_the_umask_mode(tmp_path: Path, command: str) -> None:
    """The CLI under umask 027: 0o640 is neither mkstemp's 0600 nor the usual 0644."""
    pipeline = tmp_path / "pipeline.json"
    pipeline.write_text(json.dumps(README_SPEC), encoding="utf-8")
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(images / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    arguments = {
        "extract": ["--input", str(images), "--output", str(out / "features.npz"), "--quiet"],
        "export-onnx": ["--output", str(out / "pipeline.onnx")],
        "visualize": ["--image", str(images / "0.png"), "--output", str(out / "maps.png")],
    }[command]
    result = subprocess.run(
        [str(FEATMAP), command, "--pipeline", str(pipeline), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        umask=0o027,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    written = sorted(out.rglob("*"))
    assert written, f"featmap {command} wrote nothing"
    for path in written:
        expected = 0o750 if path.is_dir() else 0o640
        assert oct(mode_of(path)) == oct(expected), path.name
