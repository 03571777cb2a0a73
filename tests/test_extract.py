"""`featmap extract`: real image files in, .npz/.npy/.parquet out, checked against the reference."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from featmap.contract.spec import (
    Pipeline,
    parse_pipeline,
)
from featmap.jobs.extract import run_extract
from featmap.jobs.job import JobError
from featmap.jobs.runners import EmbeddedRunner, RemoteRunner
from featmap.jobs.targets import grpc_target
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from featmap.service.specfiles import load_pipeline_file
from tests.conftest import README_SPEC, assert_matches_reference, local
from tests.test_cli import FEATMAP, clean_env

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# conv1 (same padding) keeps each image's size, so its rows differ; features is (8, 1, 1).
ONE_OUTPUT_SPEC: dict[str, Any] = {**README_SPEC, "outputs": ["features"]}


def decoded(path: str, pipeline: Pipeline, resize: tuple[int, int] | None = None) -> np.ndarray:
    """The (1, ...) batch extract must have fed the pipeline for an image file."""
    with Image.open(path) as image:
        converted = image.convert(MODES[pipeline.input.channels])
    if resize is not None:
        converted = converted.resize((resize[1], resize[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted)
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    if pipeline.input.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    if pipeline.input.dtype == "uint8":
        return pixels[None]
    scale = 1.0 if pipeline.input.scale is not None else 1 / 255
    return (pixels[None] * scale).astype(pipeline.input.dtype)


def rows(archive: Any, pipeline: Pipeline, index: int) -> dict[str, np.ndarray]:
    """Image `index`'s outputs from an extract .npz, each as a batch of one."""
    return {
        name: (archive[name][index] if name in archive.files else archive[f"{name}__{index}"])[None]
        for name in pipeline.output_names
    }


def assert_npz_matches_reference(
    output: Path, pipeline: Pipeline, resize: tuple[int, int] | None = None
) -> list[str]:
    """Every row of an extract .npz against the reference on the same decoded pixels."""
    with np.load(output, allow_pickle=False) as archive:
        paths = [str(p) for p in archive["paths"]]
        assert paths == sorted(paths)
        for index, path in enumerate(paths):
            images = decoded(path, pipeline, resize)
            assert_matches_reference(rows(archive, pipeline, index), pipeline, images)
    return paths


def featmap(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`featmap ARGS` as a real process."""
    return subprocess.run(
        [str(FEATMAP), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )


def spec_file(folder: Path, spec: dict[str, Any], suffix: str = ".yaml") -> Path:
    """The spec written as YAML or JSON."""
    path = folder / f"pipeline{suffix}"
    path.write_text(yaml.safe_dump(spec) if suffix == ".yaml" else json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def readme() -> Pipeline:
    """The README pipeline (two outputs)."""
    return parse_pipeline(README_SPEC)


class CountingRunner:
    """An embedded runner that counts the images it ran."""

    def __init__(self, pipeline: Pipeline, on_run: Callable[[], None] = lambda: None) -> None:
        self.inner = EmbeddedRunner(pipeline)
        self.images = 0
        self.on_run = on_run

    def run(self, batches: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        self.on_run()

        def counted() -> Iterator[np.ndarray]:
            for batch in batches:
                self.images += len(batch)
                yield batch

        return self.inner.run(counted())

    def close(self) -> None:
        self.inner.close()


# --------------------------------------------------------------------------- the command


def test_cli_mixed_sizes_to_npz(photos: Path, readme: Pipeline, tmp_path: Path) -> None:
    output = tmp_path / "features.npz"
    result = featmap(
        "extract", "--pipeline", spec_file(tmp_path, README_SPEC), "--input", photos,
        "--output", output, "--batch-size", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 10 images" in result.stderr
    paths = assert_npz_matches_reference(output, readme)
    assert len(paths) == 10 and any("nested" in p for p in paths)
    with np.load(output, allow_pickle=False) as archive:
        # conv1 keeps each image's size: one array per image; features stack.
        assert "conv1" not in archive.files and archive["conv1__0"].shape[0] == 8
        assert archive["features"].shape == (10, 8, 1, 1)
        assert archive["skipped"].shape == (0,)
    assert not (tmp_path / "features.npz.parts").exists()


def test_cli_json_pipeline_and_files_as_inputs(photos: Path, tmp_path: Path) -> None:
    files = [photos / "rgb0.png", photos / "gray1.bmp"]
    output = tmp_path / "features.npy"
    pipeline_file = spec_file(tmp_path, ONE_OUTPUT_SPEC, ".json")
    result = featmap(
        "extract", "--pipeline", pipeline_file, "--input", *files, "--output", output,
        "--resize", "16x16", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    pipeline = load_pipeline_file(pipeline_file)
    features = np.load(output, allow_pickle=False)
    assert features.shape == (2, 8, 1, 1)
    for row, path in enumerate(sorted(map(str, files))):
        images = decoded(path, pipeline, (16, 16))
        assert_matches_reference({"features": features[row : row + 1]}, pipeline, images)


def test_cli_validation_error_names_the_field(photos: Path, tmp_path: Path) -> None:
    spec = json.loads(json.dumps(README_SPEC))
    spec["layers"][0]["kernel_size"] = 0
    output = tmp_path / "out.npz"
    result = featmap(
        "extract", "--pipeline", spec_file(tmp_path, spec), "--input", photos, "--output", output
    )
    assert result.returncode == 2
    assert result.stderr.startswith("featmap extract: error: layers[0].kernel_size: ")
    assert not output.exists()


def test_cli_corrupt_image_skip_and_fail(photos: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("rgb0.png", "alpha1.tiff"):
        (inputs / name).write_bytes((photos / name).read_bytes())
    (inputs / "broken.jpg").write_bytes((photos / "nested" / "photo0.jpg").read_bytes()[:200])
    pipeline_file = spec_file(tmp_path, README_SPEC)
    output = tmp_path / "out.npz"
    output.write_bytes(b"the previous run's output")

    failed = featmap("extract", "--pipeline", pipeline_file, "--input", inputs, "--output", output)
    assert failed.returncode == 1
    assert f"{inputs / 'broken.jpg'}" in failed.stderr
    # Atomic: the old output is intact and no temporary file is left beside it.
    assert output.read_bytes() == b"the previous run's output"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    skipped = featmap(
        "extract", "--pipeline", pipeline_file, "--input", inputs, "--output", output,
        "--on-error", "skip",
    )  # fmt: skip
    assert skipped.returncode == 3
    assert f"skipped 1 inputs:\n  {inputs / 'broken.jpg'}: " in skipped.stderr
    with np.load(output, allow_pickle=False) as archive:
        assert list(archive["skipped"]) == [str(inputs / "broken.jpg")]
        assert "decode" in str(archive["skipped_errors"][0])
        assert list(archive["paths"]) == [str(inputs / "alpha1.tiff"), str(inputs / "rgb0.png")]
    assert_npz_matches_reference(output, parse_pipeline(README_SPEC))


# --------------------------------------------------------------------------- formats


def test_parquet_rows_align_with_paths(photos: Path, readme: Pipeline, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    output = tmp_path / "features.parquet"
    run_extract(readme, [photos], output, EmbeddedRunner(readme), resize=(16, 16))
    table = pq.read_table(output)
    metadata = {k.decode(): json.loads(v) for k, v in table.schema.metadata.items()}
    assert metadata["featmap.shapes"] == {"conv1": [8, 16, 16], "features": [8, 1, 1]}
    assert metadata["featmap.pipeline_id"] == readme.pipeline_id
    assert table.column_names == ["path", "conv1", "features"]
    paths = table.column("path").to_pylist()
    assert paths == sorted(paths) and len(paths) == 10
    for index, path in enumerate(paths):
        actual = {
            name: np.asarray(table.column(name)[index].as_py(), dtype=np.float32).reshape(
                1, *metadata["featmap.shapes"][name]
            )
            for name in readme.output_names
        }
        assert_matches_reference(actual, readme, decoded(path, readme, (16, 16)))


def test_parquet_with_mixed_sizes_has_shape_columns(
    photos: Path, readme: Pipeline, tmp_path: Path
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    output = tmp_path / "features.parquet"
    run_extract(readme, [photos], output, EmbeddedRunner(readme))
    table = pq.read_table(output)
    shapes = table.column("conv1__shape").to_pylist()
    assert sorted({tuple(s) for s in shapes}) == [(8, 12, 16), (8, 20, 24)]
    path = table.column("path")[0].as_py()
    conv1 = np.asarray(table.column("conv1")[0].as_py(), dtype=np.float32).reshape(shapes[0])
    features = np.asarray(table.column("features")[0].as_py(), dtype=np.float32)
    actual = {"conv1": conv1[None], "features": features.reshape(1, 8, 1, 1)}
    assert_matches_reference(actual, readme, decoded(path, readme))


def test_npy_needs_a_single_output(photos: Path, readme: Pipeline, tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"\.npy output holds one array") as caught:
        run_extract(readme, [photos], tmp_path / "x.npy", EmbeddedRunner(readme))
    assert caught.value.exit_code == 2
    single = parse_pipeline(ONE_OUTPUT_SPEC | {"outputs": ["conv1"]})
    with pytest.raises(JobError, match="different shapes per image") as caught:
        run_extract(single, [photos], tmp_path / "x.npy", EmbeddedRunner(single))
    assert caught.value.exit_code == 2
    assert not (tmp_path / "x.npy").exists()


def test_array_inputs_npy_batch_and_npz(readme: Pipeline, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((3, 3, 10, 12))  # float64: taken as float32
    single = rng.standard_normal((3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "batch.npy", batch)
    np.savez(tmp_path / "single.npz", image=single)
    output = tmp_path / "out.npz"
    run_extract(readme, [tmp_path / "batch.npy", tmp_path / "single.npz"], output,
                EmbeddedRunner(readme))  # fmt: skip
    with np.load(output, allow_pickle=False) as archive:
        paths = list(archive["paths"])
        assert paths == [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(3)] + [
            str(tmp_path / "single.npz")
        ]
        for index, images in enumerate([*batch.astype(np.float32), single]):
            assert_matches_reference(rows(archive, readme, index), readme, images[None])


# --------------------------------------------------------------------------- servers


def test_server_gives_the_embedded_results(
    photos: Path, readme: Pipeline, server: FeatmapServer, tmp_path: Path
) -> None:
    run_extract(readme, [photos], tmp_path / "embedded.npz", EmbeddedRunner(readme))
    remote = RemoteRunner(readme, [server.address], in_flight=4, timeout=60)
    try:
        run_extract(readme, [photos], tmp_path / "remote.npz", remote, batch_size=2)
    finally:
        remote.close()
    assert_same_outputs(tmp_path / "remote.npz", tmp_path / "embedded.npz")


def assert_same_outputs(served_path: Path, embedded_path: Path) -> None:
    """Two .npz outputs of one job: the same names and paths, features to float32 rounding."""
    with (
        np.load(embedded_path, allow_pickle=False) as embedded,
        np.load(served_path, allow_pickle=False) as served,
    ):
        assert sorted(embedded.files) == sorted(served.files)
        for name in embedded.files:
            if embedded[name].dtype.kind == "U":  # paths, outputs, skipped
                np.testing.assert_array_equal(served[name], embedded[name])
            else:
                np.testing.assert_allclose(served[name], embedded[name], rtol=1e-6, atol=1e-6)


def count_checks(server: FeatmapServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one for every batch the server checks (one per Extract)."""
    calls: list[int] = []
    extractor = server.service.extractor
    extract = extractor.extract

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return extract(*args, **kwargs)

    monkeypatch.setattr(extractor, "extract", counted)
    return calls


def test_two_servers_share_the_load(
    photos: Path,
    readme: Pipeline,
    server: FeatmapServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=4)
    with FeatmapServer(settings) as second:
        requests = [count_checks(s, monkeypatch) for s in (server, second)]
        output = tmp_path / "balanced.npz"
        result = featmap(
            "extract", "--pipeline", spec_file(tmp_path, README_SPEC), "--input", photos,
            "--output", output, "--server", server.address, "--server", second.address,
            "--batch-size", "1", "--in-flight", "2",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    counts = [len(calls) for calls in requests]
    assert sum(counts) == 10 and min(counts) >= 1, counts
    assert_npz_matches_reference(output, readme)


def test_grpc_targets() -> None:
    assert grpc_target(["localhost:50051"]) == ("localhost:50051", False)
    assert grpc_target(["dns:///features.internal:50051"]) == (
        "dns:///features.internal:50051",
        True,
    )
    assert grpc_target(["10.0.0.1:1", "10.0.0.2:2"]) == ("ipv4:10.0.0.1:1,10.0.0.2:2", True)
    assert grpc_target(["[::1]:1", "[fe80::2]:2"]) == ("ipv6:[::1]:1,[fe80::2]:2", True)
    for servers in (["a.example:1", "b.example:1"], ["10.0.0.1:1", "[::1]:2"]):
        with pytest.raises(JobError) as caught:
            grpc_target(servers)
        assert caught.value.exit_code == 2


# --------------------------------------------------------------------------- resume


def test_resume_reuses_finished_shards(photos: Path, readme: Pipeline, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    names = [*sorted(p.name for p in photos.glob("*.png")), "x_broken.png"]
    for name in names[:-1]:
        (inputs / name).write_bytes((photos / name).read_bytes())
    (inputs / "x_broken.png").write_bytes(b"not a png")  # sorted last: in the second shard
    output = tmp_path / "features.npz"
    options: dict[str, Any] = {"shard_size": 2, "resume": True}

    with pytest.raises(JobError, match=r"x_broken\.png"):
        run_extract(readme, [inputs], output, EmbeddedRunner(readme), **options)
    parts = tmp_path / "features.npz.parts"
    first_shard = parts / "shard-00000.npz"
    manifest = json.loads((parts / "shard-00000.json").read_text())
    assert manifest["pipeline_id"] == readme.pipeline_id
    assert manifest["paths"] == [str(inputs / n) for n in names[:2]]
    assert not (parts / "shard-00001.json").exists() and not output.exists()
    finished_at = first_shard.stat().st_mtime_ns

    Image.open(photos / "rgb1.png").save(inputs / "x_broken.png")  # the image is fixed
    mtimes: list[int] = []
    counting = CountingRunner(readme, on_run=lambda: mtimes.append(first_shard.stat().st_mtime_ns))
    report = run_extract(readme, [inputs], output, counting, **options)
    assert (report.shards, report.shards_reused) == (2, 1)
    assert counting.images == 1  # shard 0 (two images) was not run again...
    assert mtimes == [finished_at]  # ...nor rewritten, when shard 1 ran
    assert not parts.exists()
    paths = assert_npz_matches_reference(output, readme)
    assert paths == [str(inputs / n) for n in names]


def test_resume_ignores_shards_of_another_pipeline(
    photos: Path, readme: Pipeline, tmp_path: Path
) -> None:
    output = tmp_path / "features.npz"
    other = parse_pipeline(ONE_OUTPUT_SPEC)
    files = sorted(photos.glob("*.png"))
    # Leave finished parts behind by failing on a broken file in the last shard.
    broken = tmp_path / "zz_broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(JobError, match="cannot decode"):
        run_extract(other, [*files, broken], output, EmbeddedRunner(other), shard_size=2)
    assert (tmp_path / "features.npz.parts" / "shard-00000.json").exists()
    counting = CountingRunner(readme)
    report = run_extract(readme, files, output, counting, shard_size=2, resume=True)
    assert report.shards_reused == 0 and counting.images == len(files)
    assert_npz_matches_reference(output, readme)


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_match_the_reference(example: Path, photos: Path, tmp_path: Path) -> None:
    pipeline = load_pipeline_file(example)
    output = tmp_path / "out.npz"
    report = run_extract(pipeline, [photos], output, EmbeddedRunner(pipeline), batch_size=4)
    assert report.images == 10 and not report.skipped
    assert_npz_matches_reference(output, pipeline)


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"edges.yaml", "random_features.yaml", "taps.yaml"}


def test_image_too_small_for_the_pipeline_is_skipped_by_path(
    photos: Path, readme: Pipeline, tmp_path: Path
) -> None:
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8), "RGB").save(tiny)
    output = tmp_path / "out.npz"
    report = run_extract(
        readme, [tiny, photos / "rgb0.png"], output, EmbeddedRunner(readme), on_error="skip"
    )
    assert report.images == 1
    ((path, reason),) = report.skipped
    assert path == str(tiny) and "too small" in reason and "pool_size" in reason


def test_cli_unreachable_server_exits_1(photos: Path, tmp_path: Path) -> None:
    from tests.test_cli import free_port

    address = f"127.0.0.1:{free_port()}"
    result = featmap(
        "extract", "--pipeline", spec_file(tmp_path, README_SPEC), "--input", photos / "rgb0.png",
        "--output", tmp_path / "out.npz", "--server", address, "--timeout", "20",
    )  # fmt: skip
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert not (tmp_path / "out.npz").exists()


def test_cli_resume_after_a_failure(photos: Path, readme: Pipeline, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("alpha0.tiff", "gray0.bmp"):
        (inputs / name).write_bytes((photos / name).read_bytes())
    (inputs / "rgb0.png").write_bytes(b"\x89PNG truncated")  # sorted last: shard 1
    args = [
        "extract", "--pipeline", spec_file(tmp_path, README_SPEC), "--input", inputs,
        "--output", tmp_path / "out.npz", "--shard-size", "2", "--resume",
    ]  # fmt: skip
    failed = featmap(*args)
    assert failed.returncode == 1, failed.stderr
    assert str(inputs / "rgb0.png") in failed.stderr and "--resume" in failed.stderr
    (inputs / "rgb0.png").write_bytes((photos / "rgb0.png").read_bytes())
    resumed = featmap(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "wrote 3 images" in resumed.stderr and "1 of 2 shards reused" in resumed.stderr
    assert_npz_matches_reference(tmp_path / "out.npz", readme)


# --------------------------------------------------------------------------- shared memory


def test_a_job_through_shared_memory_gives_the_reference(
    readme: Pipeline, shm_server: FeatmapServer, tmp_path: Path
) -> None:
    rng = np.random.default_rng(21)
    batch = rng.standard_normal((40, 3, 9, 9)).astype(np.float32)
    np.save(tmp_path / "batch.npy", batch)
    output = tmp_path / "features.npz"
    remote = RemoteRunner(
        readme, [local(shm_server)], in_flight=3, timeout=60, request_images=8,
        shared_memory=True,
    )  # fmt: skip
    try:
        assert remote.client._shared is not None  # its requests go by /dev/shm
        run_extract(readme, [tmp_path / "batch.npy"], output, remote, batch_size=4)
        owners = [transport.pool.secret for transport in remote.client._shared.all]
        for secret in owners:  # each transport used its regions (images and outputs)
            assert shm_server.service.shared_memory.renew("", secret) == 2
    finally:
        remote.close()
    with np.load(output, allow_pickle=False) as archive:
        for index, images in enumerate(batch):
            assert_matches_reference(rows(archive, readme, index), readme, images[None])


def test_cli_shared_memory_needs_a_server_that_offers_it(
    photos: Path, shm_server: FeatmapServer, server: FeatmapServer, tmp_path: Path
) -> None:
    spec = spec_file(tmp_path, README_SPEC)
    image = photos / "rgb0.png"
    output = tmp_path / "out.npz"
    refusals = {
        "it needs --server": [],
        "needs the server's Unix socket": ["--server", shm_server.address],
        "offers no shared memory": ["--server", f"unix:{tmp_path / 'off.sock'}"],
    }
    with FeatmapServer(ServerSettings(host="127.0.0.1", port=0, unix_socket=tmp_path / "off.sock")):
        for expected, where in refusals.items():
            result = featmap(
                "extract", "--pipeline", spec, "--input", image, "--output", output,
                "--shared-memory", *where,
            )  # fmt: skip
            assert result.returncode == 2, result.stderr
            assert expected in result.stderr
            assert not output.exists()


def test_image_files_go_encoded_beside_shared_memory_with_the_embedded_results(
    photos: Path, readme: Pipeline, shm_server: FeatmapServer, tmp_path: Path
) -> None:
    run_extract(readme, [photos], tmp_path / "embedded.npz", EmbeddedRunner(readme))
    remote = RemoteRunner(readme, [local(shm_server)], 3, 60, shared_memory=True)
    try:
        run_extract(readme, [photos], tmp_path / "shared.npz", remote, batch_size=2)
    finally:
        remote.close()
    assert_same_outputs(tmp_path / "shared.npz", tmp_path / "embedded.npz")
