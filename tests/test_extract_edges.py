"""The batch job's edges: damaged parts, weight tensors, Ctrl-C, discarded parts, dead servers."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from featmap.contract.errors import InvalidSpec
from featmap.contract.spec import Pipeline, parse_pipeline
from featmap.jobs.extract import run_extract
from featmap.jobs.images import ArrayFiles, InputError
from featmap.jobs.job import JobError
from featmap.jobs.outputs import Results, part_rows, row_blocks, write_npz
from featmap.jobs.parts import CHECKPOINT_AFTER_S, HeldShards, Shard
from featmap.jobs.runners import EmbeddedRunner, RemoteRunner, request_images
from featmap.service.server import FeatmapServer
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_cli import FEATMAP, clean_env, free_port
from tests.test_extract import (
    CountingRunner,
    assert_npz_matches_reference,
    decoded,
    featmap,
    spec_file,
)

TENSOR_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {
            "op": "conv2d",
            "name": "conv",
            "filters": 4,
            "kernel_size": 3,
            "padding": "same",
            "weights": {"tensor": "conv.w"},
            "bias": {"tensor": "conv.b"},
        },
        {"op": "global_max_pool2d", "name": "features"},
    ],
    "outputs": ["features"],
}
TENSORS = {
    "conv.w": np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32),
    "conv.b": np.arange(4, dtype=np.float32),
}


def failed_run_with_a_saved_shard(photos: Path, readme_pipeline: Pipeline, tmp_path: Path) -> Path:
    """Inputs whose first shard ran and whose second failed (a broken file sorted last)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("alpha0.tiff", "gray0.bmp"):
        (inputs / name).write_bytes((photos / name).read_bytes())
    (inputs / "x_broken.png").write_bytes(b"not a png")
    with pytest.raises(JobError, match="x_broken"):
        run_extract(
            readme_pipeline, [inputs], tmp_path / "out.npz", EmbeddedRunner(readme_pipeline),
            shard_size=2,
        )  # fmt: skip
    assert (tmp_path / "out.npz.parts" / "shard-00000.json").exists()
    (inputs / "x_broken.png").write_bytes((photos / "rgb0.png").read_bytes())
    return inputs


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # cut short: zipfile's BadZipFile, or EOFError
        lambda data: b"PK\x03\x04" + b"\0" * 64,  # a zip header and nothing of substance
        lambda data: b"",  # empty
        lambda data: data[:-30],  # the central directory cut off
    ],
    ids=["half", "header-only", "empty", "no-directory"],
)
def test_a_damaged_shard_with_an_intact_manifest_is_recomputed(
    damage: Any, photos: Path, readme_pipeline: Pipeline, tmp_path: Path
) -> None:
    inputs = failed_run_with_a_saved_shard(photos, readme_pipeline, tmp_path)
    shard = tmp_path / "out.npz.parts" / "shard-00000.npz"
    shard.write_bytes(damage(shard.read_bytes()))
    counting = CountingRunner(readme_pipeline)
    report = run_extract(
        readme_pipeline, [inputs], tmp_path / "out.npz", counting, shard_size=2, resume=True
    )
    assert (report.shards, report.shards_reused, counting.images) == (2, 0, 3)
    assert_npz_matches_reference(tmp_path / "out.npz", readme_pipeline)


def test_weights_for_tensor_specs_embedded_and_remote(
    photos: Path, server: FeatmapServer, tmp_path: Path
) -> None:
    pipeline = parse_pipeline(TENSOR_SPEC)
    np.savez(tmp_path / "tensors.npz", **TENSORS)
    spec = spec_file(tmp_path, TENSOR_SPEC)
    args = ["extract", "--pipeline", spec, "--input", photos / "rgb0.png", photos / "rgb1.png"]
    embedded = featmap(*args, "--output", tmp_path / "e.npz", "--weights", tmp_path / "tensors.npz")
    assert embedded.returncode == 0, embedded.stderr
    remote = featmap(
        *args, "--output", tmp_path / "r.npz", "--weights", tmp_path / "tensors.npz",
        "--server", server.address,
    )  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    with np.load(tmp_path / "e.npz") as e, np.load(tmp_path / "r.npz") as r:
        for index, path in enumerate(e["paths"]):
            image = decoded(str(path), pipeline)
            assert_matches_reference(
                {"features": e["features"][index][None]}, pipeline, image, TENSORS
            )
            np.testing.assert_allclose(r["features"][index], e["features"][index], rtol=1e-6)


def test_missing_weights_are_a_usage_error_naming_the_tensor(photos: Path, tmp_path: Path) -> None:
    result = featmap(
        "extract", "--pipeline", spec_file(tmp_path, TENSOR_SPEC), "--input", photos / "rgb0.png",
        "--output", tmp_path / "out.npz",
    )  # fmt: skip
    assert result.returncode == 2
    assert "layers[0].weights.tensor" in result.stderr and "conv.w" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_embedded_runner_checks_the_tensors() -> None:
    pipeline = parse_pipeline(TENSOR_SPEC)
    with pytest.raises(InvalidSpec, match=r"conv\.w"):
        EmbeddedRunner(pipeline)


def test_remote_runner_registers_tensors_on_the_server(server: FeatmapServer) -> None:
    pipeline = parse_pipeline(TENSOR_SPEC)
    runner = RemoteRunner(pipeline, [server.address], in_flight=2, timeout=30, tensors=TENSORS)
    try:
        images = np.random.default_rng(0).random((2, 3, 9, 9)).astype(np.float32)
        (outputs,) = runner.run([images])
    finally:
        runner.close()
    assert_matches_reference(outputs, pipeline, images, TENSORS)


def test_remote_runner_sends_small_batches_together_and_splits_their_outputs_back(
    server: FeatmapServer,
) -> None:
    pipeline = parse_pipeline(README_SPEC)
    rng = np.random.default_rng(5)
    # Tiny images: a few kFLOPs each, so every batch of one shape and dtype goes in one request.
    batches = [rng.random((n, 3, 8, 8)).astype(np.float32) for n in (4, 4, 3)]
    batches += [rng.random((2, 3, 10, 10)).astype(np.float32)]  # another shape: its own request
    runner = RemoteRunner(pipeline, [server.address], in_flight=2, timeout=30)
    sent: list[int] = []
    extract_iter = runner.client.extract_iter

    def counted(requests: Any, *args: Any, **kwargs: Any) -> Any:
        def noted() -> Any:
            for request in requests:
                sent.append(len(request))
                yield request

        return extract_iter(noted(), *args, **kwargs)

    runner.client.extract_iter = counted  # type: ignore[method-assign]
    try:
        outputs = list(runner.run(iter(batches)))
    finally:
        runner.close()
    assert sent == [11, 2]
    assert len(outputs) == len(batches)
    for batch, batch_outputs in zip(batches, outputs, strict=True):
        assert_matches_reference(batch_outputs, pipeline, batch)


def test_large_images_go_one_batch_a_request() -> None:
    pipeline = parse_pipeline(README_SPEC)
    small = np.zeros((32, 3, 8, 8), dtype=np.float32)
    large = np.zeros((32, 3, 2048, 2048), dtype=np.float32)
    limits = {"max_images_per_request": 64, "max_flops": 10**13, "max_activation_bytes": 2**40}
    assert request_images(pipeline, large, limits) == 32
    assert request_images(pipeline, small, limits) == 64  # the server's limit
    assert request_images(pipeline, small, {**limits, "max_images_per_request": 10**6}) > 64
    # Fewer than a batch by the server's limits: the batch goes alone, as it would unjoined.
    assert request_images(pipeline, small, {**limits, "max_activation_bytes": 1}) == 32


SLOW_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {
            "op": "conv2d",
            "filters": 64,
            "kernel_size": 9,
            "padding": "same",
            "weights": {"init": "glorot_uniform", "seed": 0},
        },
        {"op": "global_avg_pool2d", "name": "features"},
    ],
}


def test_ctrl_c_saves_shards_says_how_to_resume_and_exits_130(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(48):
        pixels = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(images / f"{index:03d}.png")
    spec, output = spec_file(tmp_path, SLOW_SPEC), tmp_path / "out.npz"
    args = [
        str(FEATMAP), "extract", "--pipeline", str(spec), "--input", str(images),
        "--output", str(output), "--shard-size", "4", "--batch-size", "4", "--threads", "1",
        "--checkpoint-after", "0",
    ]  # fmt: skip
    parts = tmp_path / "out.npz.parts"
    with subprocess.Popen(
        args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=clean_env()
    ) as process:
        deadline = time.monotonic() + 60
        while not (parts / "shard-00000.json").exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no shard was saved"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if "interrupted" in line]
    saved = len(list(parts.glob("shard-*.json")))
    assert f"{saved} finished shards are saved in {parts}" in line and "--resume" in line
    assert 1 <= saved < 12 and not output.exists()

    rerun = subprocess.run(
        [*args[:-4], "--threads", "0", "--shard-size", "4"],
        capture_output=True, text=True, timeout=120, env=clean_env(), check=False,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert f"discarding {saved} finished shards" in rerun.stderr
    assert "--resume" in rerun.stderr


def test_a_dead_address_fails_within_about_a_second() -> None:
    pipeline = parse_pipeline(README_SPEC)
    runner = RemoteRunner(pipeline, [f"127.0.0.1:{free_port()}"], in_flight=2, timeout=30)
    images = np.zeros((1, 3, 8, 8), np.float32)
    started = time.monotonic()
    try:
        with pytest.raises(Exception, match="UNAVAILABLE"):
            list(runner.run([images]))
    finally:
        runner.close()
    assert time.monotonic() - started < 1.5


def test_manifests_name_the_weights(photos: Path, tmp_path: Path) -> None:
    # Shards computed with other weights are not reused: the id covers the tensors.
    np.savez(tmp_path / "a.npz", **TENSORS)
    np.savez(tmp_path / "b.npz", **{**TENSORS, "conv.b": TENSORS["conv.b"] + 1})
    spec = spec_file(tmp_path, TENSOR_SPEC)
    ids = []
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for weights in ("a.npz", "b.npz"):
        inputs = [photos / "rgb0.png", tmp_path / "broken.png"]
        result = featmap(
            "extract", "--pipeline", spec, "--input", *inputs, "--output", tmp_path / "o.npz",
            "--weights", tmp_path / weights, "--shard-size", "1", "--resume",
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        manifest = json.loads((tmp_path / "o.npz.parts" / "shard-00000.json").read_text())
        ids.append(manifest["pipeline_id"])
    assert ids[0] != ids[1] and parse_pipeline(TENSOR_SPEC).pipeline_id not in ids


# --------------------------------------------------------------------------- checkpoints


def test_a_young_job_keeps_its_shards_in_memory_and_writes_only_its_output(
    photos: Path, readme_pipeline: Pipeline, tmp_path: Path
) -> None:
    parts = tmp_path / "out.npz.parts"
    seen: list[bool] = []
    counting = CountingRunner(readme_pipeline)
    inner_run = counting.run

    def run(batches: Any) -> Any:
        for outputs in inner_run(batches):
            seen.append(parts.exists())
            yield outputs

    counting.run = run  # type: ignore[method-assign]
    report = run_extract(readme_pipeline, [photos], tmp_path / "out.npz", counting, shard_size=2)
    assert report.shards > 2 and len(seen) >= report.shards
    assert not any(seen) and not parts.exists()
    assert_npz_matches_reference(tmp_path / "out.npz", readme_pipeline)


def test_held_shards_go_to_disk_once_the_job_is_old_or_they_are_too_many_bytes() -> None:
    def finished(index: int, rows: int) -> tuple[Shard, Results]:
        results = Results(["f"])
        for row in range(rows):
            results.add(f"{index}-{row}", {"f": np.full(4, row, dtype=np.float32)})  # 16 bytes
        return Shard(index, []), results

    young = HeldShards(after_s=3600, most_bytes=40)
    first, second = finished(0, 2), finished(1, 1)
    assert young.add(*first) == []  # 32 bytes held
    assert young.get(0) is first[1]
    assert young.add(*second) == [first, second]  # 48 > 40: both go, in order
    assert young.get(0) is None and young.get(1) is None
    third = finished(2, 1)
    assert young.add(*third) == [third]  # from then on, each as it finishes

    old = HeldShards(after_s=0, most_bytes=2**30)
    assert old.add(*first) == [first]
    failing = HeldShards(after_s=3600, most_bytes=2**30)
    failing.add(*first)
    failing.add(*second)
    assert failing.release() == [first, second] and failing.release() == []


def test_the_help_names_the_checkpoint_default() -> None:
    result = featmap("extract", "--help")
    assert f"(default {CHECKPOINT_AFTER_S:g};" in " ".join(result.stdout.split())


def test_merge_maps_stored_parts_and_reads_any_other_part_as_numpy_does(tmp_path: Path) -> None:
    results = Results(["f"])
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5, 2, 3)).astype(np.float32)
    for index, row in enumerate(rows):
        results.add(f"image-{index}", {"f": row})
    stored = tmp_path / "stored.npz"
    write_npz(results, stored)
    mapped = part_rows(stored, "f")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, rows)
    # A compressed member, or one with another dtype, is read the way np.load reads it.
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, paths=np.array(results.paths), f=rows)
    read = part_rows(compressed, "f")
    assert not isinstance(read, np.memmap)
    np.testing.assert_array_equal(read, rows)
    doubles = tmp_path / "doubles.npz"
    np.savez(doubles, paths=np.array(results.paths), f=rows.astype(np.float64))
    np.testing.assert_array_equal(part_rows(doubles, "f"), rows)
    # Results still in memory are read as they are.
    np.testing.assert_array_equal(part_rows(results, "f"), rows)


@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    picks=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), max_size=20),
    strided=st.booleans(),
)
def test_row_blocks_are_the_rows_in_order_and_views_of_their_batches_where_they_follow_on(
    sizes: list[int], picks: list[tuple[int, int]], strided: bool
) -> None:
    # Batches' outputs as the job keeps them: rows as views (of a strided array too, which
    # cannot be viewed as blocks), picked in any order, a batch's run of rows in between.
    batches = [
        np.arange(size * 6, dtype=np.float32).reshape(size, 2, 3) + 100 * index
        for index, size in enumerate(sizes)
    ]
    if strided:
        batches = [np.repeat(batch, 2, axis=2)[:, :, ::2] for batch in batches]
    rows = [batch[row] for batch in batches for row in range(len(batch))]
    rows += [batches[b % len(batches)][r % len(batches[b % len(batches)])] for b, r in picks]
    blocks = row_blocks(rows)
    np.testing.assert_array_equal(np.concatenate(blocks), np.stack(rows))
    if not strided:  # each batch's run at the start is one view of that batch, not a copy
        for batch, block in zip(batches, blocks, strict=False):
            assert block.shape == batch.shape and np.shares_memory(block, batch)


def test_a_member_claiming_more_rows_than_its_record_holds_is_not_mapped(tmp_path: Path) -> None:
    rows = np.arange(24, dtype=np.float32).reshape(4, 6)
    part = tmp_path / "part.npz"
    np.savez(part, paths=np.array(["a", "b", "c", "d"]), f=rows)
    data = part.read_bytes()
    header = b"'shape': (4, 6)"
    assert data.count(header) == 1
    part.write_bytes(data.replace(header, b"'shape': (9, 6)"))
    # Read by np.load instead, which finds the damage (here by the member's CRC).
    with pytest.raises((ValueError, zipfile.BadZipFile)):
        part_rows(part, "f")


# A pipeline whose 7x7 pool needs images of at least 7x7: a 4x4 batch file is too small.
POOLED_SPEC: dict[str, Any] = {
    "input": {"channels": 1, "dtype": "float32"},
    "layers": [
        {"op": "conv2d", "filters": 4, "kernel_size": 3, "padding": "same",
         "weights": {"init": "he_normal", "seed": 3}},
        {"op": "relu"},
        {"op": "avg_pool2d", "pool_size": 7},
    ],
}  # fmt: skip


class CountingArrayFiles(ArrayFiles):
    """ArrayFiles that counts how often it reads a file from disk."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def array(self, file: str) -> np.ndarray:
        self.reads.append(file)
        return super().array(file)


def test_a_batch_file_is_read_and_checked_once_and_its_rows_come_as_float32_copies(
    tmp_path: Path,
) -> None:
    spec = parse_pipeline(POOLED_SPEC).input
    values = np.random.default_rng(0).normal(size=(10, 1, 8, 8))  # float64, as NumPy's default
    path = tmp_path / "batch.npy"
    np.save(path, values)
    arrays = CountingArrayFiles()
    pieces = [arrays.rows(str(path), start, start + 4, spec) for start in (0, 4, 8)]
    assert arrays.reads == [str(path)]
    for start, piece in zip((0, 4, 8), pieces, strict=True):
        assert type(piece) is np.ndarray and piece.dtype == np.float32
        assert piece.flags.c_contiguous and piece.flags.writeable
        np.testing.assert_array_equal(piece, values[start : start + 4].astype(np.float32))
    pieces[0][...] = 0  # float64 rows come converted: the file is untouched
    np.testing.assert_array_equal(np.load(path), values)
    # Rows of the input's own dtype are views of the mapping, which no one can write through.
    pixels = tmp_path / "pixels.npy"
    np.save(pixels, np.arange(10 * 64, dtype=np.float32).reshape(10, 1, 8, 8))
    view = arrays.rows(str(pixels), 2, 5, spec)
    assert not view.flags.writeable and view.flags.c_contiguous
    np.testing.assert_array_equal(view, np.load(pixels)[2:5])


def test_a_bad_batch_file_fails_every_piece_naming_the_file(tmp_path: Path) -> None:
    spec = parse_pipeline(POOLED_SPEC).input
    path = tmp_path / "three-channels.npy"
    np.save(path, np.zeros((6, 3, 8, 8), np.float32))
    arrays = CountingArrayFiles()
    for start in (0, 3):
        with pytest.raises(InputError) as caught:
            arrays.rows(str(path), start, start + 3, spec)
        assert caught.value.path == str(path)
        assert "3 channels" in caught.value.reason and "input.channels=1" in caught.value.reason
    assert arrays.reads == [str(path)]


def test_batch_files_of_two_sizes_skip_the_rows_too_small_and_compute_the_rest(
    tmp_path: Path,
) -> None:
    pipeline = parse_pipeline(POOLED_SPEC)
    rng = np.random.default_rng(1)
    first, small, last = (
        rng.normal(size=(5, 1, 14, 14)).astype(np.float32),
        rng.normal(size=(3, 1, 4, 4)).astype(np.float32),
        rng.normal(size=(4, 1, 14, 14)).astype(np.float32),
    )
    files = [tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "c.npy"]
    for file, array in zip(files, (first, small, last), strict=True):
        np.save(file, array)
    output = tmp_path / "out.npz"
    report = run_extract(
        pipeline, files, output, EmbeddedRunner(pipeline), batch_size=2, on_error="skip"
    )
    assert report.images == 9
    assert [path for path, _ in report.skipped] == [f"{files[1]}[{row}]" for row in range(3)]
    assert all("too small" in reason for _, reason in report.skipped)
    with np.load(output, allow_pickle=False) as archive:
        name = pipeline.output_names[0]
        assert_matches_reference({name: archive[name][:5]}, pipeline, first)
        assert_matches_reference({name: archive[name][5:]}, pipeline, last)
