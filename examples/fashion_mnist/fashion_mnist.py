"""Fashion-MNIST with random convolutional features and a ridge classifier, end to end.

featmap extracts the features of all 70,000 images (pipeline.yaml: random 5x5 filters and
their negatives, ReLU, a 7x7 average pool) straight from the data set's gzipped IDX files, in
this process (`featmap extract`'s job, embedded, to a .npy); NumPy then fits a closed-form
one-vs-rest ridge classifier on the standardised square roots of the features and prints the
test accuracy, beside the same ridge on the raw pixels.

    apt-get install dataset-fashion-mnist        # Debian/Ubuntu: the IDX files
    python examples/fashion_mnist/fashion_mnist.py

Options: --data FOLDER (default /usr/share/datasets/fashion-mnist), --train N --test N (a
slice: the first N images of each set), --lam (the ridge's lambda), --threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STARTED = time.perf_counter()

HERE = Path(__file__).parent
DATA = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = 10
LAMBDA = 2.0


def random_filters(count: int = 96, size: int = 5, seed: int = 0) -> np.ndarray:
    """(2 * count, 1, size, size) float32: zero-mean, unit-norm Gaussian filters, then their
    negatives, so that a ReLU after them keeps both signs of every response."""
    rng = np.random.default_rng(seed)
    filters = rng.standard_normal((count, 1, size, size))
    filters -= filters.mean(axis=(2, 3), keepdims=True)
    filters /= np.linalg.norm(filters.reshape(count, -1), axis=1)[:, None, None, None]
    return np.concatenate([filters, -filters]).astype(np.float32)


@dataclass
class Split:
    """One set's images' file, its labels, and how many of its first images are used."""

    images: Path
    labels: np.ndarray
    count: int


def load_splits(data: Path, train: int | None, test: int | None) -> dict[str, Split]:
    """The train and test sets (labels read with featmap's IDX reader)."""
    from featmap.jobs.idx import load_idx

    splits = {}
    for name, count in (("train", train), ("test", test)):
        images, labels = (data / file for file in FILES[name])
        all_labels = np.asarray(load_idx(labels), dtype=np.int64)
        used = len(all_labels) if count is None else min(count, len(all_labels))
        splits[name] = Split(images, all_labels[:used], used)
    return splits


def extract_features(splits: dict[str, Split], threads: int) -> dict[str, np.ndarray]:
    """featmap's features of each set, by `featmap extract`'s job in this process over the IDX
    files (a slice of a set goes as a .npy of its first images)."""
    from featmap.jobs.extract import run_extract
    from featmap.jobs.idx import load_idx
    from featmap.jobs.runners import EmbeddedRunner
    from featmap.service.specfiles import load_pipeline_file, load_weight_tensors

    pipeline = load_pipeline_file(HERE / "pipeline.yaml")
    tensors = load_weight_tensors(HERE / "filters.npz")
    runner = EmbeddedRunner(pipeline, threads, tensors)
    features = {}
    with tempfile.TemporaryDirectory(prefix="fashion-mnist-") as scratch:
        for name, split in splits.items():
            source = split.images
            if split.count < len(load_idx(source)):  # a slice: its first images, as (N, 1, H, W)
                source = Path(scratch) / f"{name}.npy"
                np.save(source, np.asarray(load_idx(split.images)[: split.count])[:, None])
            output = Path(scratch) / f"{name}-features.npy"
            run_extract(pipeline, [source], output, runner, batch_size=64, shard_size=4096)
            features[name] = np.load(output)
    runner.close()
    return features


def ridge_accuracy(train: np.ndarray, y_train: np.ndarray, test: np.ndarray,
                   y_test: np.ndarray, lam: float) -> float:  # fmt: skip
    """Test accuracy of one-vs-rest ridge regression on standardised features:
    W = (X^T X + lam I)^-1 X^T Y with Y in {-1, +1}, the class of the largest score."""
    mean = train.mean(axis=0)
    std = train.std(axis=0) + 1e-6
    x_train = (train - mean) / std
    x_test = (test - mean) / std
    targets = np.where(np.arange(CLASSES) == y_train[:, None], 1.0, -1.0).astype(np.float32)
    gram = (x_train.T @ x_train).astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    weights = np.linalg.solve(gram, (x_train.T @ targets).astype(np.float64))
    predicted = np.argmax(x_test @ weights.astype(np.float32), axis=1)
    return float(np.mean(predicted == y_test))


@dataclass
class Outcome:
    """What a run measured."""

    accuracy: float
    pixel_accuracy: float
    images: int
    extract_seconds: float


def run(data: Path, train: int | None, test: int | None, lam: float, threads: int) -> Outcome:
    """Extract, fit, score; and the same ridge on raw pixels."""
    from featmap.jobs.idx import load_idx

    splits = load_splits(data, train, test)
    started = time.perf_counter()
    features = extract_features(splits, threads)
    extract_seconds = time.perf_counter() - started
    # Square roots of the pooled ReLUs (a power normalisation): the few large responses no
    # longer dominate, which a linear classifier needs.
    roots = {name: np.sqrt(np.maximum(f, 0), dtype=np.float32) for name, f in features.items()}
    accuracy = ridge_accuracy(
        roots["train"], splits["train"].labels, roots["test"], splits["test"].labels, lam
    )
    pixels = {
        name: np.asarray(load_idx(split.images)[: split.count], dtype=np.float32).reshape(
            split.count, -1
        )
        for name, split in splits.items()
    }
    pixel_accuracy = ridge_accuracy(
        pixels["train"], splits["train"].labels, pixels["test"], splits["test"].labels, lam
    )
    images = sum(split.count for split in splits.values())
    return Outcome(accuracy, pixel_accuracy, images, extract_seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help=f"the IDX files ({DATA})")
    parser.add_argument("--train", type=int, help="use the first N training images (all)")
    parser.add_argument("--test", type=int, help="use the first N test images (all)")
    parser.add_argument("--lam", type=float, default=LAMBDA, help=f"ridge lambda ({LAMBDA})")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (cores)")
    args = parser.parse_args()
    if not (args.data / FILES["train"][0]).exists():
        print(f"no Fashion-MNIST in {args.data}: apt-get install dataset-fashion-mnist",
              file=sys.stderr)  # fmt: skip
        return 2
    outcome = run(args.data, args.train, args.test, args.lam, args.threads)
    total = time.perf_counter() - STARTED
    print(f"test accuracy {outcome.accuracy:.2%} (ridge on raw pixels: "
          f"{outcome.pixel_accuracy:.2%})")  # fmt: skip
    print(f"features of {outcome.images} images in {outcome.extract_seconds:.1f} s "
          f"({outcome.images / outcome.extract_seconds:.0f} images/s); whole script "
          f"{total:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
