"""examples/fashion_mnist on a slice of the real data set: featmap's IDX reader against the
file's own bytes, and the random-features ridge above the raw-pixel ridge. Skipped where
Debian's dataset-fashion-mnist is not installed; the filters file is checked everywhere."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from featmap.jobs.idx import load_idx

EXAMPLE = Path(__file__).parent.parent / "examples" / "fashion_mnist"
DATA = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(
    not (DATA / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Fashion-MNIST is not installed in {DATA} (apt-get install dataset-fashion-mnist)",
)


@functools.cache
def example() -> ModuleType:
    """examples/fashion_mnist/fashion_mnist.py as a module (examples/ is no package)."""
    spec = importlib.util.spec_from_file_location("fashion_mnist", EXAMPLE / "fashion_mnist.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_filters_file_is_what_the_script_makes() -> None:
    with np.load(EXAMPLE / "filters.npz") as archive:
        filters = archive["filters"]
    made = example().random_filters()
    assert filters.shape == (192, 1, 5, 5) and filters.dtype == np.float32
    np.testing.assert_array_equal(filters, made)
    # Each filter's negative is the filter 96 further: a ReLU after them keeps both signs.
    np.testing.assert_array_equal(filters[96:], -filters[:96])
    np.testing.assert_allclose(np.linalg.norm(filters.reshape(192, -1), axis=1), 1, rtol=1e-6)


@needs_data
@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("t10k-images-idx3-ubyte.gz", (10000, 28, 28)),
        ("t10k-labels-idx1-ubyte.gz", (10000,)),
        ("train-labels-idx1-ubyte.gz", (60000,)),
    ],
)
def test_idx_reader_gives_the_file_bytes(name: str, shape: tuple[int, ...]) -> None:
    raw = gzip.decompress((DATA / name).read_bytes())
    array = load_idx(DATA / name)
    assert array.shape == shape and array.dtype == np.uint8
    offset = 4 + 4 * len(shape)  # magic, then one uint32 per dimension
    # Row-major: image i, row y, column x is byte offset + i*784 + y*28 + x.
    for index in [(0,) * len(shape), tuple(n - 1 for n in shape), tuple(n // 3 for n in shape)]:
        flat = int(np.ravel_multi_index(index, shape))
        assert array[index] == raw[offset + flat], index
    np.testing.assert_array_equal(array.reshape(-1), np.frombuffer(raw, np.uint8, offset=offset))
    if len(shape) == 1:
        assert set(np.unique(array)) == set(range(10))  # ten classes


@needs_data
def test_random_features_beat_raw_pixels_on_a_slice() -> None:
    # 2,000 training and 500 test images, the script's own code path (the job, embedded).
    outcome = example().run(DATA, 2000, 500, lam=2.0, threads=0)
    assert outcome.images == 2500
    assert outcome.accuracy > outcome.pixel_accuracy + 0.03, outcome
    assert outcome.accuracy > 0.8, outcome
