"""Ray Data: FeatureExtractor in map_batches actors gives `featmap extract`'s features, by path."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from featmap.contract.spec import (
    Pipeline,
    parse_pipeline,
)
from featmap.contract.tensors import from_hwc
from featmap.jobs.bench_ray import RAY_EXAMPLE
from featmap.jobs.extract import run_extract
from featmap.jobs.images import InputError, decode_image, find_files
from featmap.jobs.ray import IMAGE_EXTENSIONS, FeatureExtractor, actor_pool, to_pipeline_input
from featmap.jobs.runners import EmbeddedRunner
from featmap.service.server import FeatmapServer
from tests.conftest import README_SPEC, write_images
from tests.test_extract import rows

# The README pipeline in the other layout and dtype: raw uint8 pixels, HWC, scaled in the graph.
UINT8_NHWC_SPEC: dict[str, Any] = {
    **README_SPEC,
    "input": {"channels": 3, "layout": "NHWC", "dtype": "uint8", "scale": 1 / 255},
}

pytestmark = [
    # Ray Data's DataContext() sets its own deprecated fields (use_push_based_shuffle,
    # use_polars) to their defaults while constructing itself: not ours to fix.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
    # ray.init's notice of a coming change to CUDA_VISIBLE_DEVICES handling (Ray 2.51).
    pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning"),
]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A local two-CPU Ray instance for this module, shut down after it."""
    ray = pytest.importorskip("ray")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception:  # Ray raises a bare Exception when its node times out
        # Seen in full runs on the loaded 2-core machine: the local instance's processes did
        # not come up in time. One clean second try, then a failure is a failure.
        ray.shutdown()
        time.sleep(2)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten images of two sizes and four formats (gray, RGBA and palette among them)."""
    folder = tmp_path_factory.mktemp("ray-photos")
    write_images(folder)
    return folder


def extract_file(
    pipeline: Pipeline, photos: Path, output: Path, **job: Any
) -> dict[str, dict[str, Any]]:
    """`featmap extract`'s embedded job on `photos`: path -> {output: (1, ...) array}."""
    run_extract(pipeline, [photos], output, EmbeddedRunner(pipeline), **job)
    with np.load(output, allow_pickle=False) as archive:
        paths = [str(p) for p in archive["paths"]]
        return {path: rows(archive, pipeline, i) for i, path in enumerate(paths)}


def ray_features(
    ray: Any, pipeline: Pipeline, photos: Path, *, encoded: bool = False, **extractor: Any
) -> dict[str, dict[str, Any]]:
    """read_images -> to_pipeline_input, or read_binary_files (`encoded`), -> FeatureExtractor
    on two actors: path -> outputs."""
    if encoded:
        dataset = ray.data.read_binary_files(
            str(photos), include_paths=True, file_extensions=IMAGE_EXTENSIONS
        )
        extractor = {**extractor, "encoded_column": "bytes"}
    else:
        dataset = ray.data.read_images(str(photos), mode="RGB", include_paths=True)
        dataset = dataset.map_batches(
            to_pipeline_input, fn_kwargs={"pipeline": pipeline}, batch_format="numpy"
        )
    dataset = dataset.map_batches(
        FeatureExtractor,
        fn_constructor_args=(pipeline,),
        fn_constructor_kwargs=extractor,
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5,  # two actors and the read tasks share the two CPUs
        batch_size=4,
        batch_format="numpy",
    )
    return {
        str(Path(row["path"])): {name: row[name][None] for name in pipeline.output_names}
        for row in dataset.take_all()
    }


def assert_same_features(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Same paths; per path, same output shapes, dtype, values."""
    assert sorted(got) == sorted(want)
    for path, outputs in want.items():
        for name, array in outputs.items():
            assert got[path][name].shape == array.shape, (path, name)
            assert got[path][name].dtype == np.float32, (path, name)
            np.testing.assert_allclose(got[path][name], array, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- without Ray


@pytest.mark.parametrize("spec", [README_SPEC, UINT8_NHWC_SPEC], ids=["float-nchw", "uint8-nhwc"])
def test_to_pipeline_input_gives_extracts_pixels(spec: dict[str, Any], photos: Path) -> None:
    pipeline = parse_pipeline(spec)
    path = photos / "rgb0.png"
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))  # (20, 24, 3)
    batch = to_pipeline_input({"image": pixels[None], "path": np.array([str(path)])}, pipeline)
    # featmap extract decodes the same uint8 pixels, in the pipeline's layout, for the
    # pipeline's pixel variant: the float pipeline gets no floats from here either.
    want = from_hwc(decode_image(path, pipeline.input, None), pipeline.input.layout)
    assert batch["image"].shape == (1, *want.shape)
    assert batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"][0], want)
    assert batch["path"].tolist() == [str(path)]


def encoded_batch(photos: Path, names: list[str]) -> dict[str, np.ndarray]:
    """What read_binary_files(include_paths=True) gives for these files: bytes and path."""
    column = np.empty(len(names), dtype=object)
    column[:] = [(photos / name).read_bytes() for name in names]
    return {"bytes": column, "path": np.array([str(photos / name) for name in names])}


@pytest.mark.parametrize("draft", [False, True], ids=["resize", "resize-draft"])
def test_encoded_images_decode_by_extracts_rules(draft: bool, photos: Path, tmp_path: Path) -> None:
    pipeline = parse_pipeline(README_SPEC)
    names = [str(Path(file).relative_to(photos)) for file in find_files([photos])]
    want = extract_file(pipeline, photos, tmp_path / "f.npz", resize=(10, 12), draft=draft)
    extractor = FeatureExtractor(pipeline, encoded_column="bytes", resize=(10, 12), draft=draft)
    batch = extractor(encoded_batch(photos, names))
    # The outputs replace the encoded column; the decoded pixels stay in the actor.
    assert sorted(batch) == ["conv1", "features", "path"]
    assert batch["conv1"].shape == (10, 8, 10, 12)  # one stacked batch: every image resized
    got = {
        str(path): {name: batch[name][row][None] for name in pipeline.output_names}
        for row, path in enumerate(batch["path"])
    }
    assert_same_features(got, want)


def test_encoded_images_to_a_server(photos: Path, tmp_path: Path, server: FeatmapServer) -> None:
    pipeline = parse_pipeline(README_SPEC)
    names = [str(Path(file).relative_to(photos)) for file in find_files([photos])]
    want = extract_file(pipeline, photos, tmp_path / "f.npz")
    # The PNGs and JPEGs of both sizes go encoded (two requests); the BMPs and TIFFs, which a
    # server does not take, are decoded here; every row lands back at its place.
    before = server.service.decoder.decoded
    with closing(FeatureExtractor(pipeline, server=server.address, encoded_column="bytes")) as fx:
        batch = fx(encoded_batch(photos, names))
    assert server.service.decoder.decoded - before == 6  # 2 JPEGs and 4 PNGs
    got = {
        str(path): {name: batch[name][row][None] for name in pipeline.output_names}
        for row, path in enumerate(batch["path"])
    }
    assert_same_features(got, want)


def test_a_corrupt_encoded_image_is_named(photos: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes((photos / "nested" / "photo0.jpg").read_bytes()[:50])
    extractor = FeatureExtractor(parse_pipeline(README_SPEC), encoded_column="bytes")
    with pytest.raises(InputError, match=r"broken\.jpg: cannot decode image"):
        extractor(encoded_batch(tmp_path, ["broken.jpg"]))


def test_int8_pixels_match_the_int8_job(photos: Path, tmp_path: Path) -> None:
    pipeline = parse_pipeline({**README_SPEC, "precision": "int8"})
    files = find_files([photos])
    calibration = np.stack(
        [from_hwc(decode_image(Path(f), pipeline.input, (16, 16)), "NCHW") for f in files]
    )
    # The job's runner and the extractor quantize the pixel variant on the same pixels.
    runner = EmbeddedRunner(pipeline, calibration=calibration)
    run_extract(pipeline, [photos], tmp_path / "f.npz", runner, resize=(16, 16))
    extractor = FeatureExtractor(
        pipeline, encoded_column="bytes", resize=(16, 16), calibration=calibration
    )
    assert extractor.report is not None and extractor.report == runner.report
    names = [str(Path(file).relative_to(photos)) for file in files]
    batch = extractor(encoded_batch(photos, names))
    with np.load(tmp_path / "f.npz", allow_pickle=False) as archive:
        assert [str(p) for p in archive["paths"]] == batch["path"].tolist()
        np.testing.assert_array_equal(batch["features"], archive["features"])


def test_actor_pool_keeps_threads_times_actors_within_the_cpus() -> None:
    def node(cpus: float, alive: bool = True) -> dict[str, Any]:
        return {"Alive": alive, "Resources": {"CPU": cpus, "memory": 1e9}}

    one = actor_pool([node(2)])
    assert (one.actors, one.threads, one.cpus_per_actor) == (1, 2, 1.0)
    # A dead node and one without CPUs (a GPU-only head, say) get no actor.
    cluster = actor_pool([node(16), node(8), node(32, alive=False), node(0)])
    # One actor a node; threads within the smallest node's CPUs, one CPU left to Ray's tasks.
    assert (cluster.actors, cluster.threads, cluster.cpus_per_actor) == (2, 8, 7.0)
    assert actor_pool([node(1)]).cpus_per_actor == 0.0
    with pytest.raises(ValueError, match="no live Ray node"):
        actor_pool([node(4, alive=False)])
    assert "jpg" in IMAGE_EXTENSIONS and "png" in IMAGE_EXTENSIONS


def test_extractor_rows_of_several_sizes_stay_in_order(readme_pipeline: Pipeline) -> None:
    rng = np.random.default_rng(0)
    images = [rng.random((3, h, w), dtype=np.float32) for h, w in ((8, 8), (6, 10), (8, 8))]
    column = np.empty(3, dtype=object)
    column[:] = images
    extractor = FeatureExtractor(readme_pipeline, outputs=["features"])
    batch = extractor({"image": column, "id": np.arange(3)})
    # features is (8, 1, 1) for every size, so the column stacks.
    assert batch["features"].shape == (3, 8, 1, 1)
    assert "conv1" not in batch
    for row, image in enumerate(images):
        alone = extractor({"image": image[None]})["features"][0]
        np.testing.assert_allclose(batch["features"][row], alone, rtol=1e-6, atol=1e-6)
    assert batch["id"].tolist() == [0, 1, 2]


def test_extractor_refuses_unknown_outputs(readme_pipeline: Pipeline) -> None:
    with pytest.raises(Exception, match="nope"):
        FeatureExtractor(readme_pipeline, outputs=["nope"])
    with pytest.raises(ValueError, match="overwrite the image column"):
        FeatureExtractor(readme_pipeline, image_column="features")


# --------------------------------------------------------------------------- Ray Data


@pytest.mark.parametrize("encoded", [False, True], ids=["read_images", "read_binary_files"])
def test_embedded_matches_featmap_extract(
    encoded: bool, ray_cluster: Any, photos: Path, tmp_path: Path
) -> None:
    pipeline = parse_pipeline(README_SPEC)
    want = extract_file(pipeline, photos, tmp_path / "features.npz")
    assert len(want) == 10
    got = ray_features(ray_cluster, pipeline, photos, encoded=encoded, threads=1)
    assert_same_features(got, want)


def test_server_mode_matches_featmap_extract(
    ray_cluster: Any, photos: Path, tmp_path: Path, server: FeatmapServer
) -> None:
    # A float pipeline: the actors send its pixel variant with the uint8 pixels.
    pipeline = parse_pipeline(README_SPEC)
    want = extract_file(pipeline, photos, tmp_path / "features.npz")
    got = ray_features(
        ray_cluster, pipeline, photos, server=server.address, client_options={"timeout": 30}
    )
    assert_same_features(got, want)


def readme_ray_example() -> str:
    """The Python block of the README's Ray Data section."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Ray Data") :]
    return section[
        section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))
    ]


def test_the_readme_example_runs_as_written(photos: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    pipeline = parse_pipeline({**README_SPEC, "outputs": ["features"]})
    (tmp_path / "pipeline.yaml").write_text(json.dumps(pipeline.model_dump(mode="json")))
    (tmp_path / "photos").symlink_to(photos)
    code = readme_ray_example()
    # `featmap bench --ray` times this very text.
    assert code == RAY_EXAMPLE
    assert '"photos/"' in code and '"pipeline.yaml"' in code and '"features/"' in code
    # A fresh interpreter on a two-CPU Ray, as a user's machine here would have.
    program = "import ray\nray.init(num_cpus=2, include_dashboard=False)\n" + code
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = pq.read_table(tmp_path / "features").to_pydict()
    expected = extract_file(pipeline, photos, tmp_path / "expected.npz")
    assert sorted(Path(p).name for p in table["path"]) == sorted(Path(p).name for p in expected)
    by_name = {Path(path).name: outputs for path, outputs in expected.items()}
    for path, features in zip(table["path"], table["features"], strict=True):
        want = by_name[Path(path).name]["features"][0]
        np.testing.assert_allclose(
            np.array(features).reshape(want.shape), want, rtol=1e-5, atol=1e-6
        )
