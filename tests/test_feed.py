"""The batch job's feed: decoding ahead in order and bounded, batches by size, draft decoding."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featmap.contract.spec import Pipeline, parse_pipeline
from featmap.jobs.extract import run_extract
from featmap.jobs.feed import SizeGroups, load_ahead
from featmap.jobs.images import decode_image
from featmap.jobs.job import Job, JobError, Runner
from featmap.jobs.runners import EmbeddedRunner, RemoteRunner
from featmap.service.server import FeatmapServer
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_extract import decoded, featmap, rows, spec_file


def test_load_ahead_keeps_order_and_stays_within_depth() -> None:
    depth, taken, started = 5, [0], []
    lock = threading.Lock()

    def load(item: int) -> int:
        with lock:
            started.append(item - taken[0])  # how far ahead of the consumer this one is
        time.sleep(0.001 * (item % 3))  # finish out of order
        return item * 10

    results = []
    for value in load_ahead(range(40), load, threads=3, depth=depth):
        results.append(value)
        taken[0] += 1
    assert results == [item * 10 for item in range(40)]
    assert max(started) <= depth


def test_load_ahead_inline_and_closed_early() -> None:
    assert list(load_ahead(range(5), lambda item: item + 1, threads=0, depth=2)) == [1, 2, 3, 4, 5]
    loaded: list[int] = []
    feed = load_ahead(range(1000), lambda item: loaded.append(item) or item, threads=2, depth=4)
    assert next(feed) == 0
    feed.close()  # what has not started is cancelled
    time.sleep(0.05)
    assert len(loaded) <= 6


def test_size_groups_batch_each_size_in_order() -> None:
    shapes = [(2, 3), (2, 3), (4, 4), (2, 3), (4, 4), (4, 4), (2, 3), (5, 5), (2, 3)]
    groups = SizeGroups(batch_size=2)
    batches = []
    for position, shape in enumerate(shapes):
        full = groups.add(position, np.full(shape, position, dtype=np.float32))
        if full is not None:
            batches.append(full)
    batches += list(groups.flush())
    # Full batches as they fill, then what is left of each size in first-seen order.
    assert [b.positions for b in batches] == [[0, 1], [2, 4], [3, 6], [8], [5], [7]]
    for batch in batches:
        assert [int(image.flat[0]) for image in batch.array] == batch.positions
    assert groups.groups == {}


def test_uint8_and_float_images_of_one_size_batch_apart() -> None:
    groups = SizeGroups(batch_size=4)
    groups.add(0, np.zeros((3, 2, 2), np.uint8))
    groups.add(1, np.zeros((3, 2, 2), np.float32))
    assert sorted(b.array.dtype.name for b in groups.flush()) == ["float32", "uint8"]


def write_pngs(folder: Path, count: int, size: tuple[int, int] = (12, 10)) -> None:
    """`count` RGB PNGs of one size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{index:03d}.png")


def test_decode_threads_change_nothing_in_the_output(
    photos: Path, readme_pipeline: Pipeline, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in photos.rglob("*.*"):
        (inputs / path.name).write_bytes(path.read_bytes())
    (inputs / "broken.jpg").write_bytes(b"not a jpeg")
    outputs = []
    for threads in (0, 3):
        output = tmp_path / f"out{threads}.npz"
        run_extract(
            readme_pipeline, [inputs], output, EmbeddedRunner(readme_pipeline),
            batch_size=2, shard_size=3, on_error="skip", decode_threads=threads, prefetch=3,
        )  # fmt: skip
        outputs.append(np.load(output, allow_pickle=False))
    inline, threaded = outputs
    assert sorted(inline.files) == sorted(threaded.files)
    assert list(inline["skipped"]) == [str(inputs / "broken.jpg")]
    for name in inline.files:
        np.testing.assert_array_equal(threaded[name], inline[name], err_msg=name)


class RecordingRunner:
    """An embedded runner that notes, at each batch, how many inputs the job had loaded."""

    def __init__(self, pipeline: Pipeline, job_loads: list[int]) -> None:
        self.inner = EmbeddedRunner(pipeline)
        self.loads = job_loads
        self.ahead: list[int] = []
        self.received = 0

    def run(self, batches: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        def noted() -> Iterator[np.ndarray]:
            for batch in batches:
                self.received += len(batch)
                self.ahead.append(self.loads[0] - self.received)
                yield batch

        return self.inner.run(noted())

    def close(self) -> None:
        self.inner.close()


def test_the_job_decodes_a_bounded_way_ahead(
    readme_pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_pngs(tmp_path / "images", 60)
    loads = [0]
    load = Job.load

    def counted(self: Job, item: object) -> object:
        loads[0] += 1
        return load(self, item)  # type: ignore[arg-type]

    monkeypatch.setattr(Job, "load", counted)
    runner = RecordingRunner(readme_pipeline, loads)
    prefetch, batch_size = 6, 4
    run_extract(
        readme_pipeline, [tmp_path / "images"], tmp_path / "out.npz", runner,
        batch_size=batch_size, shard_size=20, decode_threads=2, prefetch=prefetch,
    )  # fmt: skip
    assert runner.received == 60
    # Loaded but not yet handed to the runner: at most the prefetch plus a batch being filled.
    assert max(runner.ahead) <= prefetch + batch_size


def big_jpeg(path: Path, size: int = 256) -> None:
    """A smooth JPEG, large enough that draft decoding has something to skip."""
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path, quality=95)


def test_draft_decoding_gives_the_size_asked_and_nearly_the_same_pixels(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    big_jpeg(path)
    spec = parse_pipeline(README_SPEC).input
    full = decode_image(path, spec, (32, 32))
    draft = decode_image(path, spec, (32, 32), draft=True)
    assert draft.shape == full.shape == (32, 32, 3) and draft.dtype == np.uint8
    # Not the same pixels (why draft is opt-in), but the same picture.
    assert np.abs(draft.astype(int) - full.astype(int)).mean() < 4


def test_draft_needs_resize_and_is_in_the_manifest(tmp_path: Path) -> None:
    big_jpeg(tmp_path / "a.jpg")
    spec = spec_file(tmp_path, README_SPEC)
    args = ["extract", "--pipeline", spec, "--input", tmp_path / "a.jpg"]
    refused = featmap(*args, "--output", tmp_path / "o.npz", "--jpeg-draft")
    assert refused.returncode == 2 and "--resize" in refused.stderr
    pipeline = parse_pipeline(README_SPEC)
    (tmp_path / "z_broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(JobError):  # a broken input fails the job after the first shard
        run_extract(
            pipeline, [tmp_path / "a.jpg", tmp_path / "z_broken.jpg"], tmp_path / "o.npz",
            EmbeddedRunner(pipeline), resize=(32, 32), shard_size=1, draft=True,
        )  # fmt: skip
    manifest = (tmp_path / "o.npz.parts" / "shard-00000.json").read_text()
    assert '"jpeg_draft": true' in manifest


def test_progress_shows_images_per_second(
    readme_pipeline: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_pngs(tmp_path / "images", 5)
    run_extract(
        readme_pipeline, [tmp_path / "images"], tmp_path / "out.npz",
        EmbeddedRunner(readme_pipeline), progress=True,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert "5/5" in err and "img/s" in err


@pytest.mark.parametrize("where", ["embedded", "remote"])
def test_arrays_and_image_files_of_one_size_in_one_job(
    where: str, readme_pipeline: Pipeline, server: FeatmapServer, tmp_path: Path
) -> None:
    # Pixels (uint8, the pixel variant) and arrays (float32, the pipeline) of the same size go
    # in batches of their own dtype, each through its pipeline, rows in input order.
    write_pngs(tmp_path / "in", 3)
    rng = np.random.default_rng(2)
    arrays = rng.random((2, 3, 12, 10), dtype=np.float32)
    np.save(tmp_path / "in" / "001a.npy", arrays)
    runner: Runner = (
        EmbeddedRunner(readme_pipeline)
        if where == "embedded"
        else RemoteRunner(readme_pipeline, [server.address], in_flight=2, timeout=60)
    )
    try:
        run_extract(readme_pipeline, [tmp_path / "in"], tmp_path / "out.npz", runner, batch_size=2)
    finally:
        runner.close()
    with np.load(tmp_path / "out.npz", allow_pickle=False) as archive:
        paths = [str(path) for path in archive["paths"]]
        assert [Path(path).name for path in paths] == [
            "000.png", "001.png", "001a.npy[0]", "001a.npy[1]", "002.png",
        ]  # fmt: skip
        for index, path in enumerate(paths):
            if path.endswith("]"):
                images = arrays[int(path[-2])][None]
            else:
                images = decoded(path, readme_pipeline)
            assert_matches_reference(rows(archive, readme_pipeline, index), readme_pipeline, images)
