"""jobs/parts.py: a .npy job's rows streamed into the output-to-be, and --resume over them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featmap.contract.spec import Pipeline, parse_pipeline
from featmap.jobs.extract import run_extract
from featmap.jobs.job import JobError
from featmap.jobs.outputs import NPY_HEADER_ROOM, npy_header_in_room
from featmap.jobs.parts import StreamedRows
from featmap.jobs.runners import EmbeddedRunner, RemoteRunner
from featmap.service.server import FeatmapServer
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_extract import ONE_OUTPUT_SPEC, CountingRunner, decoded

# Fashion-MNIST's shape through a small random-features stack: (8, 7, 7) = 392 floats a row.
ARRAY_SPEC = {
    "input": {"channels": 1, "dtype": "uint8", "scale": 1 / 255},
    "layers": [
        {"op": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same",
         "weights": {"init": "he_normal", "seed": 0}},
        {"op": "relu"},
        {"op": "avg_pool2d", "pool_size": 4, "name": "features"},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def arrays() -> Pipeline:
    return parse_pipeline(ARRAY_SPEC)


def data_offset(path: Path) -> int:
    """Where a .npy file's array starts, as numpy reads its header."""
    with path.open("rb") as file:
        version = np.lib.format.read_magic(file)
        assert version == (1, 0)
        np.lib.format.read_array_header_1_0(file)
        return file.tell()


@pytest.mark.parametrize("shape", [(0,), (3, 4), (70_000, 3072), (5, 8, 7, 7)])
def test_the_header_fills_its_room_and_numpy_reads_it(
    shape: tuple[int, ...], tmp_path: Path
) -> None:
    values = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    path = tmp_path / "a.npy"
    header = npy_header_in_room(shape)
    assert len(header) == NPY_HEADER_ROOM
    if values.size <= 1 << 20:
        path.write_bytes(header + values.tobytes())
        np.testing.assert_array_equal(np.load(path), values)
        np.testing.assert_array_equal(np.load(path, mmap_mode="r"), values)
        assert data_offset(path) == NPY_HEADER_ROOM
    with pytest.raises(ValueError, match="does not fit"):
        npy_header_in_room((1,) * 2000)


def test_a_streamed_npy_is_the_held_one_written_once(arrays: Pipeline, tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (23, 1, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    held, streamed = tmp_path / "held.npy", tmp_path / "streamed.npy"
    common = {"batch_size": 4, "shard_size": 5}
    run_extract(arrays, [tmp_path / "images.npy"], held, EmbeddedRunner(arrays), **common)
    # Saved from the first shard on: every shard goes to the rows file as it finishes.
    report = run_extract(
        arrays, [tmp_path / "images.npy"], streamed, EmbeddedRunner(arrays),
        checkpoint_after_s=0, **common,
    )  # fmt: skip
    assert (report.images, report.shards) == (23, 5)
    assert streamed.read_bytes()[NPY_HEADER_ROOM:] == held.read_bytes()[data_offset(held) :]
    assert data_offset(streamed) == NPY_HEADER_ROOM  # page-aligned rows for a mapped load
    features = np.load(streamed, mmap_mode="r")
    assert features.shape == (23, 8, 7, 7)
    assert_matches_reference({"features": np.asarray(features)}, arrays, images)
    assert not (tmp_path / "streamed.npy.parts").exists()


def broken_last(photos: Path, folder: Path) -> list[str]:
    """The images of `photos` (six, of four formats) in `folder`, and a broken PNG sorted
    last; their names."""
    folder.mkdir()
    names = [*sorted(p.name for p in photos.iterdir() if p.is_file()), "x_broken.png"]
    for name in names[:-1]:
        (folder / name).write_bytes((photos / name).read_bytes())
    (folder / "x_broken.png").write_bytes(b"not a png")
    return names


def assert_npy_matches_reference(output: Path, pipeline: Pipeline, files: list[Path]) -> None:
    features = np.load(output)
    assert len(features) == len(files)
    for row, path in zip(features, files, strict=True):
        assert_matches_reference({"features": row[None]}, pipeline, decoded(str(path), pipeline))


def test_resume_reuses_the_rows_up_to_the_first_damaged_shard(photos: Path, tmp_path: Path) -> None:
    pipeline = parse_pipeline(ONE_OUTPUT_SPEC)
    inputs = tmp_path / "inputs"
    names = broken_last(photos, inputs)  # a shard each
    output = tmp_path / "features.npy"
    options = {"shard_size": 1, "batch_size": 1, "resume": True, "checkpoint_after_s": 0}
    with pytest.raises(JobError, match=r"x_broken\.png"):
        run_extract(pipeline, [inputs], output, EmbeddedRunner(pipeline), **options)
    parts = tmp_path / "features.npy.parts"
    lines = (parts / StreamedRows.LOG).read_text().splitlines()
    assert [json.loads(line)["shard"] for line in lines] == list(range(len(names) - 1))
    assert json.loads(lines[1])["paths"] == [str(inputs / names[1])]
    assert not output.exists()

    # Shard 1's bytes change on disk: shards 1 and 2 are computed again, shard 0 is kept.
    row_bytes = 8 * 4  # features: (8, 1, 1) float32
    with (parts / StreamedRows.ROWS).open("r+b") as rows:
        rows.seek(NPY_HEADER_ROOM + row_bytes + 3)
        rows.write(b"\xff")
    Image.open(photos / "rgb0.png").save(inputs / "x_broken.png")  # the image is fixed
    counting = CountingRunner(pipeline)
    report = run_extract(pipeline, [inputs], output, counting, **options)
    assert (report.shards, report.shards_reused) == (len(names), 1)
    assert counting.images == len(names) - 1
    assert not parts.exists()
    assert_npy_matches_reference(output, pipeline, [inputs / n for n in names])


def test_a_torn_log_line_ends_what_resume_reuses(photos: Path, tmp_path: Path) -> None:
    pipeline = parse_pipeline(ONE_OUTPUT_SPEC)
    inputs = tmp_path / "inputs"
    names = broken_last(photos, inputs)
    output = tmp_path / "features.npy"
    options = {"shard_size": 1, "batch_size": 1, "resume": True, "checkpoint_after_s": 0}
    with pytest.raises(JobError):
        run_extract(pipeline, [inputs], output, EmbeddedRunner(pipeline), **options)
    log = tmp_path / "features.npy.parts" / StreamedRows.LOG
    text = log.read_text()
    log.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 20])  # the last line, cut
    (inputs / "x_broken.png").unlink()
    counting = CountingRunner(pipeline)
    report = run_extract(pipeline, [inputs], output, counting, **options)
    # Every good image's shard was written; the last one's line was cut, so it runs again.
    assert (report.shards, report.shards_reused) == (len(names) - 1, len(names) - 2)
    assert counting.images == 1
    assert_npy_matches_reference(output, pipeline, [inputs / n for n in names[:-1]])


def test_rows_of_another_shape_stop_a_npy_job_at_once(photos: Path, tmp_path: Path) -> None:
    # conv1 keeps each image's size; the photos alternate between two sizes, ten in all.
    single = parse_pipeline({**README_SPEC, "outputs": ["conv1"]})
    counting = CountingRunner(single)
    files = sorted(path for path in photos.rglob("*") if path.is_file())
    with pytest.raises(JobError, match="different shapes per image") as caught:
        run_extract(single, files, tmp_path / "x.npy", counting, shard_size=1, batch_size=1)
    assert caught.value.exit_code == 2
    assert counting.images < len(files)  # not after computing them all
    assert not (tmp_path / "x.npy").exists()


def test_a_skipped_input_leaves_no_row_in_a_streamed_npy(photos: Path, tmp_path: Path) -> None:
    pipeline = parse_pipeline(ONE_OUTPUT_SPEC)
    inputs = tmp_path / "inputs"
    names = broken_last(photos, inputs)
    (inputs / "m_broken.png").write_bytes(b"not a png either")  # sorted into the middle
    names = sorted([*names, "m_broken.png"])
    output = tmp_path / "features.npy"
    report = run_extract(
        pipeline, [inputs], output, EmbeddedRunner(pipeline),
        shard_size=2, batch_size=1, checkpoint_after_s=0, on_error="skip",
    )  # fmt: skip
    skipped = {Path(path).name for path, _ in report.skipped}
    assert skipped == {"m_broken.png", "x_broken.png"}
    kept = [inputs / name for name in names if name not in skipped]
    assert report.images == len(kept)
    assert_npy_matches_reference(output, pipeline, kept)


def test_a_remote_job_streams_the_rows_the_server_computed(
    arrays: Pipeline, server: FeatmapServer, tmp_path: Path
) -> None:
    images = np.random.default_rng(2).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    remote = RemoteRunner(arrays, [server.address], in_flight=4, timeout=60)
    try:
        report = run_extract(
            arrays, [tmp_path / "images.npy"], tmp_path / "remote.npy", remote,
            batch_size=4, shard_size=8, checkpoint_after_s=0,
        )  # fmt: skip
    finally:
        remote.close()
    assert (report.images, report.shards) == (40, 5)
    features = np.load(tmp_path / "remote.npy")
    assert_matches_reference({"features": features}, arrays, images)
    assert not (tmp_path / "remote.npy.parts").exists()
