"""IDX files: the reader on hand-written files (plain, gzipped, hostile headers) and
`featmap extract` over them, against the NumPy reference. Runs everywhere: no data set needed."""

from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from featmap.contract.spec import Pipeline, parse_pipeline
from featmap.jobs.extract import run_extract
from featmap.jobs.idx import IdxError, is_idx_name, load_idx, read_header
from featmap.jobs.images import find_files
from featmap.jobs.job import JobError
from featmap.jobs.runners import EmbeddedRunner, RemoteRunner
from featmap.service.server import FeatmapServer
from tests.conftest import assert_matches_reference

# 1 -> 2 conv 3x3 on 6x5 images, a max pool, flattened: small enough for the reference.
SPEC = {
    "input": {"channels": 1, "dtype": "uint8", "scale": 1 / 255},
    "layers": [
        {
            "op": "conv2d",
            "filters": 2,
            "kernel_size": 3,
            "weights": {"init": "he_normal", "seed": 3},
        },
        {"op": "relu"},
        {"op": "max_pool2d", "pool_size": 2},
        {"op": "flatten", "name": "features"},
    ],
}


def idx_bytes(code: int, shape: tuple[int, ...], data: bytes) -> bytes:
    """An IDX file by hand: 0x0000, the type code, the dims, big-endian sizes, the data."""
    return struct.pack(">HBB", 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + data


def write(path: Path, content: bytes, gzipped: bool = False) -> Path:
    path.write_bytes(gzip.compress(content) if gzipped else content)
    return path


@pytest.mark.parametrize("gzipped", [False, True])
def test_ubyte_images_read_as_the_bytes_say(tmp_path: Path, gzipped: bool) -> None:
    # 2 images of 3x2: bytes 0..11 in row-major order.
    data = bytes(range(12))
    name = "imgs-idx3-ubyte" + (".gz" if gzipped else "")
    path = write(tmp_path / name, idx_bytes(0x08, (2, 3, 2), data), gzipped)
    header, is_gzip = read_header(path)
    assert (header.shape, header.dtype.name, header.offset, is_gzip) == (
        (2, 3, 2),
        "uint8",
        16,
        gzipped,
    )
    array = load_idx(path)
    assert array.shape == (2, 3, 2)
    assert array.dtype == np.uint8
    assert array[1, 2, 1] == 11 and array[0, 1, 0] == 2  # [n, y, x] = 6n + 2y + x
    np.testing.assert_array_equal(array.reshape(-1), np.arange(12))
    assert not array.flags.writeable


@pytest.mark.parametrize("gzipped", [False, True])
def test_big_endian_types(tmp_path: Path, gzipped: bool) -> None:
    # int16 0x0102 = 258 and -2; float32 1.5 (0x3FC00000), double -0.25.
    shorts = write(tmp_path / "s.idx", idx_bytes(0x0B, (2,), b"\x01\x02\xff\xfe"), gzipped)
    np.testing.assert_array_equal(load_idx(shorts), [258, -2])
    floats = write(tmp_path / "f.idx", idx_bytes(0x0D, (1,), b"\x3f\xc0\x00\x00"), gzipped)
    np.testing.assert_array_equal(load_idx(floats), [1.5])
    doubles = write(tmp_path / "d.idx", idx_bytes(0x0E, (1,), struct.pack(">d", -0.25)), gzipped)
    np.testing.assert_array_equal(load_idx(doubles), [-0.25])


def test_names_taken_as_idx() -> None:
    for name in ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz", "x.idx", "x.IDX3.gz"]:
        assert is_idx_name(name), name
    for name in ["images.gz", "ubyte.png", "x.npy", "idx3-ubyte.txt"]:
        assert not is_idx_name(name), name


HOSTILE = {
    # What the header says, what the file holds, and a word the error must carry.
    "bad magic": (b"\x12\x34\x08\x01" + b"\x00\x00\x00\x01" + b"x", "not an IDX file"),
    "unknown type": (idx_bytes(0x07, (1,), b"x"), "type code 0x07"),
    "no dimensions": (b"\x00\x00\x08\x00", "0 dimensions"),
    "too many dimensions": (b"\x00\x00\x08\x40" + b"\x00" * 256, "64 dimensions"),
    "sizes cut short": (b"\x00\x00\x08\x03\x00\x00\x00\x02", "sizes need 16 bytes"),
    # 4 billion x 4 billion x 4 billion pixels promised by a 20-byte file.
    "huge dims": (idx_bytes(0x08, (2**32 - 1,) * 3, b"abcd"), "but the file holds 4 bytes"),
    "data cut short": (idx_bytes(0x08, (2, 2, 2), b"1234567"), "but the file holds 7 bytes"),
    "data too long": (idx_bytes(0x08, (1, 2, 2), b"12345"), "but the file holds 5 bytes"),
    "empty": (b"", "too short"),
}


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_errors_naming_the_file(
    tmp_path: Path, case: str, gzipped: bool
) -> None:
    content, words = HOSTILE[case]
    path = write(tmp_path / "hostile-idx3-ubyte", content, gzipped)
    if gzipped:  # the gzipped forms of the size checks say it in gzip's terms
        words = {
            "huge dims": "gzipped bytes cannot hold",
            "data cut short": "gzip trailer records 23",
            "data too long": "gzip trailer records 21",
        }.get(case, words)
    with pytest.raises(IdxError) as raised:
        load_idx(path)
    assert str(path) in str(raised.value)
    assert words in str(raised.value)


def test_gzip_whose_trailer_lies_is_an_error(tmp_path: Path) -> None:
    # The trailer says 24 bytes (as the header does) but the stream holds the header alone:
    # caught while streaming, before any image goes anywhere.
    content = idx_bytes(0x08, (2, 2, 2), b"12345678")
    packed = bytearray(gzip.compress(content[:16]))
    packed[-4:] = struct.pack("<I", len(content))
    path = write(tmp_path / "lie-idx3-ubyte.gz", bytes(packed))
    with pytest.raises(IdxError, match=r"lie-idx3-ubyte\.gz"):
        load_idx(path)


def test_hostile_gzip_is_refused_before_allocating(tmp_path: Path) -> None:
    # A gzip of a few hundred bytes whose header promises 2**40 bytes and whose trailer agrees
    # (modulo 2**32): refused from the compressed size alone, at once.
    content = idx_bytes(0x08, (2**20, 2**10, 2**10), b"\x00" * 4096)
    packed = bytearray(gzip.compress(content))
    packed[-4:] = struct.pack("<I", (16 + 2**40) % 2**32)
    path = write(tmp_path / "bomb-idx3-ubyte.gz", bytes(packed))
    started = time.perf_counter()
    with pytest.raises(IdxError, match="gzipped bytes cannot hold"):
        load_idx(path)
    assert time.perf_counter() - started < 5  # generous: nothing was decompressed but the head


def test_not_gzip_at_all_but_gzip_magic(tmp_path: Path) -> None:
    path = write(tmp_path / "broken-idx3-ubyte.gz", b"\x1f\x8b" + b"\x00" * 30)
    with pytest.raises(IdxError, match="not a readable gzip file"):
        load_idx(path)


# --------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return parse_pipeline(SPEC)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """70 images of 6x5 pixels: more than a batch and a shard of the tests' sizes."""
    return np.random.default_rng(7).integers(0, 256, (70, 6, 5), dtype=np.uint8)


def idx_images(folder: Path, pixels: np.ndarray, gzipped: bool) -> Path:
    name = "images-idx3-ubyte" + (".gz" if gzipped else "")
    return write(folder / name, idx_bytes(0x08, pixels.shape, pixels.tobytes()), gzipped)


@pytest.mark.parametrize("gzipped", [False, True])
def test_extract_over_idx_matches_the_reference(
    tmp_path: Path, pipeline: Pipeline, pixels: np.ndarray, gzipped: bool
) -> None:
    path = idx_images(tmp_path, pixels, gzipped)
    output = tmp_path / "out.npz"
    report = run_extract(pipeline, [path], output, EmbeddedRunner(pipeline), batch_size=8,
                         shard_size=32)  # fmt: skip
    assert report.images == 70 and report.shards == 3
    with np.load(output, allow_pickle=False) as archive:
        assert list(archive["paths"]) == [f"{path}[{i}]" for i in range(70)]
        features = archive["features"]
    # (N, H, W) pixels are (N, 1, H, W) for a one-channel NCHW pipeline.
    assert_matches_reference({"features": features}, pipeline, pixels[:, None])


def test_float_pipeline_takes_idx_pixels_as_pixels(
    tmp_path: Path, pixels: np.ndarray, server: FeatmapServer
) -> None:
    # float32 NHWC without scale: IDX pixels p give p / 255, as image files do, embedded and
    # through a server.
    spec = {**SPEC, "input": {"channels": 1, "layout": "NHWC"}}
    pipeline = parse_pipeline(spec)
    path = idx_images(tmp_path, pixels, gzipped=True)
    run_extract(pipeline, [path], tmp_path / "e.npz", EmbeddedRunner(pipeline), batch_size=16)
    remote = RemoteRunner(pipeline, [server.address], in_flight=2, timeout=60)
    try:
        run_extract(pipeline, [path], tmp_path / "r.npz", remote, batch_size=16)
    finally:
        remote.close()
    expected_input = (pixels[:, :, :, None] / 255).astype(np.float32)
    for output in ("e.npz", "r.npz"):
        with np.load(tmp_path / output, allow_pickle=False) as archive:
            assert_matches_reference({"features": archive["features"]}, pipeline, expected_input)


def test_idx_and_npy_of_the_same_pixels_give_the_same_rows(
    tmp_path: Path, pipeline: Pipeline, pixels: np.ndarray
) -> None:
    path = idx_images(tmp_path, pixels, gzipped=False)
    np.save(tmp_path / "same.npy", pixels[:, None])
    run_extract(pipeline, [path, tmp_path / "same.npy"], tmp_path / "out.npz",
                EmbeddedRunner(pipeline), batch_size=32, shard_size=50)  # fmt: skip
    with np.load(tmp_path / "out.npz", allow_pickle=False) as archive:
        features, paths = archive["features"], list(archive["paths"])
    # Sorted paths: images-idx3-ubyte before same.npy.
    assert paths[:70] == [f"{path}[{i}]" for i in range(70)]
    assert paths[70:] == [f"{tmp_path / 'same.npy'}[{i}]" for i in range(70)]
    np.testing.assert_array_equal(features[:70], features[70:])


def test_resume_reuses_idx_shards(tmp_path: Path, pipeline: Pipeline, pixels: np.ndarray) -> None:
    path = idx_images(tmp_path, pixels, gzipped=True)
    output = tmp_path / "out.npz"
    run_extract(pipeline, [path], output, EmbeddedRunner(pipeline), shard_size=20)
    first = np.load(output)["features"]
    # Interrupted after two shards: their parts are reused, the rest computed, rows the same.
    parts = output.with_name(output.name + ".parts")
    report = None
    runner = EmbeddedRunner(pipeline)
    calls = 0
    run = runner.run

    def failing(batches):  # type: ignore[no-untyped-def]
        nonlocal calls
        for outputs in run(batches):
            calls += 1
            if calls > 2:
                raise JobError("stopped")
            yield outputs

    runner.run = failing  # type: ignore[method-assign]
    with pytest.raises(JobError, match="stopped"):
        run_extract(pipeline, [path], output, runner, shard_size=20, batch_size=20)
    assert len(list(parts.glob("shard-*.json"))) == 2
    report = run_extract(pipeline, [path], output, EmbeddedRunner(pipeline), shard_size=20,
                         batch_size=20, resume=True)  # fmt: skip
    assert report.shards_reused == 2 and report.images_computed == 30
    np.testing.assert_array_equal(np.load(output)["features"], first)


def test_labels_and_hostile_files_are_named(tmp_path: Path, pipeline: Pipeline) -> None:
    labels = write(tmp_path / "labels-idx1-ubyte", idx_bytes(0x08, (3,), b"\x01\x02\x03"))
    with pytest.raises(JobError, match=r"labels-idx1-ubyte.*1-D IDX file holds labels"):
        run_extract(pipeline, [labels], tmp_path / "out.npz", EmbeddedRunner(pipeline))
    hostile = write(tmp_path / "h-idx3-ubyte", idx_bytes(0x08, (2**31, 2**31, 2**31), b""))
    report = run_extract(pipeline, [hostile, labels], tmp_path / "out.npz",
                         EmbeddedRunner(pipeline), on_error="skip")  # fmt: skip
    assert [path for path, _ in report.skipped] == [str(hostile), str(labels)]
    assert "promises" in report.skipped[0][1]


def test_folders_find_idx_files_by_name(tmp_path: Path) -> None:
    for name in ["a-idx3-ubyte", "b-idx3-ubyte.gz", "c.idx", "notes.txt", "d.gz"]:
        (tmp_path / name).write_bytes(b"")
    found = [Path(file).name for file in find_files([tmp_path])]
    assert found == ["a-idx3-ubyte", "b-idx3-ubyte.gz", "c.idx"]
