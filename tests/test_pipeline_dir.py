"""`featmap serve --pipelines DIR`: spec files registered at start, under their file names.

Real folders of spec files, .npz weights and .npy calibration images; real servers (in-process,
and `featmap serve` processes for the exit status and the log); numbers against the NumPy
reference.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from featmap.client import FeatmapRpcError, FeatureClient
from featmap.contract.spec import content_id, parse_pipeline
from featmap.service.pipeline_dir import PipelineFileError
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_cli import featmap_serve
from tests.test_int8 import CALIBRATION
from tests.test_int8 import SPEC as INT8_SPEC
from tests.test_layout import loaded_after

# A conv whose kernel comes from the .npz beside the spec, then a pool: what a file names.
TENSOR_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {"op": "conv2d", "name": "conv", "filters": 4, "kernel_size": 3,
         "weights": {"tensor": "kernel"}, "bias": {"tensor": "bias"}},
        {"op": "relu"},
        {"op": "global_max_pool2d", "name": "features"},
    ],
    "outputs": ["conv", "features"],
}  # fmt: skip
RNG = np.random.default_rng(23)
TENSORS = {
    "kernel": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
    "bias": RNG.standard_normal(4).astype(np.float32),
}
IMAGES = RNG.random((2, 3, 12, 12), dtype=np.float32)
# One layer with filters 0: the field the refusal must name.
INVALID_SPEC = "input: {channels: 3}\nlayers:\n  - {op: relu}\n  - {op: max_pool2d, pool_size: 0}\n"
INVALID_FIELD = "layers[1].pool_size"


def settings(folder: Path, **overrides: Any) -> ServerSettings:
    return ServerSettings(
        host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=4, pipelines_dir=folder,
        **overrides,
    )  # fmt: skip


def write_specs(folder: Path) -> Path:
    """conv.yaml with conv.npz beside it, and readme.json: two pipelines by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "conv.yaml").write_text(yaml.safe_dump(TENSOR_SPEC), encoding="utf-8")
    np.savez(folder / "conv.npz", **TENSORS)
    (folder / "readme.json").write_text(json.dumps(README_SPEC), encoding="utf-8")
    return folder


@pytest.fixture
def specs(tmp_path: Path) -> Path:
    return write_specs(tmp_path / "pipelines")


@pytest.fixture
def served(specs: Path) -> Iterator[tuple[FeatmapServer, FeatureClient]]:
    with (
        FeatmapServer(settings(specs)) as server,
        FeatureClient(server.address, timeout=30) as client,
    ):
        yield server, client


def test_each_file_extracts_by_its_name(
    served: tuple[FeatmapServer, FeatureClient],
) -> None:
    _, client = served
    conv = client.extract(IMAGES, "conv")
    assert_matches_reference(conv, parse_pipeline(TENSOR_SPEC), IMAGES, TENSORS)
    readme = client.extract(IMAGES, "readme")
    assert_matches_reference(readme, parse_pipeline(README_SPEC), IMAGES)
    listed = {tuple(info.names): info.pipeline_id for info in client.list_pipelines()}
    assert listed == {
        ("conv",): content_id(parse_pipeline(TENSOR_SPEC), TENSORS),
        ("readme",): parse_pipeline(README_SPEC).pipeline_id,
    }
    assert sorted(client.get_pipeline("conv").weight_names) == ["bias", "kernel"]


def test_a_restart_on_the_same_folder_gives_the_same_ids(specs: Path) -> None:
    ids = []
    for _ in range(2):
        with (
            FeatmapServer(settings(specs)) as server,
            FeatureClient(server.address, timeout=30) as client,
        ):
            ids.append(
                sorted((info.names[0], info.pipeline_id) for info in client.list_pipelines())
            )
    assert ids[0] == ids[1] and len(ids[0]) == 2


def test_the_files_name_wins_at_each_start_and_the_store_keeps_one_entry(
    specs: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    conv_id = content_id(parse_pipeline(TENSOR_SPEC), TENSORS)
    readme_id = parse_pipeline(README_SPEC).pipeline_id
    with (
        FeatmapServer(settings(specs, pipeline_store=str(store))) as server,
        FeatureClient(server.address, timeout=30) as client,
    ):
        assert client.get_pipeline("conv").pipeline_id == conv_id
        # A runtime registration moves the file's name to another pipeline (replace) ...
        client.register(README_SPEC, name="conv", replace=True)
        assert client.get_pipeline("conv").pipeline_id == readme_id
    entries = sorted(p.name for p in store.rglob("*.entry"))
    # ... the next start on the same folder and store moves it back, and writes nothing twice.
    with (
        FeatmapServer(settings(specs, pipeline_store=str(store))) as server,
        FeatureClient(server.address, timeout=30) as client,
    ):
        assert client.get_pipeline("conv").pipeline_id == conv_id
        outputs = client.extract(IMAGES, "conv")
    assert_matches_reference(outputs, parse_pipeline(TENSOR_SPEC), IMAGES, TENSORS)
    assert sorted(p.name for p in store.rglob("*.entry")) == entries
    assert entries == sorted([f"{conv_id}.entry", f"{readme_id}.entry"])


def test_tenant_folders_hold_each_tenants_pipelines_apart(tmp_path: Path) -> None:
    folder = write_specs(tmp_path / "pipelines")
    write_specs(folder / "acme")
    (folder / "acme" / "readme.json").unlink()
    (folder / "acme" / "private.json").write_text(json.dumps(README_SPEC), encoding="utf-8")
    tokens = ["acme:acme-token", "default-token"]
    with FeatmapServer(settings(folder, auth_tokens=tokens)) as server:
        with FeatureClient(server.address, timeout=30, token="acme-token") as acme:
            assert {i.names[0] for i in acme.list_pipelines()} == {"conv", "private"}
            outputs = acme.extract(IMAGES, "private")
            assert_matches_reference(outputs, parse_pipeline(README_SPEC), IMAGES)
        with FeatureClient(server.address, timeout=30, token="default-token") as default:
            assert {i.names[0] for i in default.list_pipelines()} == {"conv", "readme"}
            with pytest.raises(FeatmapRpcError) as caught:
                default.extract(IMAGES, "private")
            assert caught.value.code.name == "NOT_FOUND"


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_a_missing_folder_is_refused_even_when_skipping(tmp_path: Path, skip_invalid: bool) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(PipelineFileError, match=rf"pipelines_dir: {missing} is not a folder"):
        FeatmapServer(settings(missing, skip_invalid_pipelines=skip_invalid))


def test_a_folder_that_names_no_tenant_is_refused(specs: Path) -> None:
    (specs / "nobody").mkdir()
    with pytest.raises(PipelineFileError, match=r"nobody: .*tenant.*\['acme'\]"):
        FeatmapServer(settings(specs, auth_tokens=["acme:acme-token"]))
    with pytest.raises(PipelineFileError, match=r"nobody: .*no token names one"):
        FeatmapServer(settings(specs))


@pytest.mark.parametrize(
    ("stem", "why"),
    [("9lives", "starting with a letter"), ("a" * 32, "looks like a pipeline id"),
     ("has space", "starting with a letter"), ("n" * 65, "1-64 letters")],
    ids=["digit", "id", "space", "long"],
)  # fmt: skip
def test_a_stem_that_breaks_the_name_rule_is_refused(specs: Path, stem: str, why: str) -> None:
    (specs / f"{stem}.json").write_text(json.dumps(README_SPEC), encoding="utf-8")
    with pytest.raises(PipelineFileError) as caught:
        FeatmapServer(settings(specs))
    assert str(caught.value).startswith(f"{specs / stem}.json: name: ")
    assert why in str(caught.value)


def test_problems_name_the_file_they_are_in(specs: Path) -> None:
    # The kernel in the .npz has the wrong shape: the .npz and the tensor are named.
    np.savez(specs / "conv.npz", kernel=np.zeros((4, 3, 2, 2), np.float32), bias=TENSORS["bias"])
    with pytest.raises(PipelineFileError, match=r"conv\.npz: weights\['kernel'\]"):
        FeatmapServer(settings(specs))
    (specs / "conv.npz").unlink()  # a spec naming tensors without its .npz
    with pytest.raises(PipelineFileError, match=r"conv\.yaml: .*'(kernel|bias)'"):
        FeatmapServer(settings(specs))
    (specs / "conv.yaml").write_text("input: {channels: [", encoding="utf-8")
    with pytest.raises(PipelineFileError, match=r"conv\.yaml is not valid YAML"):
        FeatmapServer(settings(specs))


def test_two_files_for_one_name_are_refused_and_dot_entries_ignored(specs: Path) -> None:
    # A ConfigMap volume: ..data links to a timestamped folder, the files link into it.
    hidden = specs / "..2026_12_07_00_00_00.0001"
    hidden.mkdir()
    (hidden / "broken.yaml").write_text(INVALID_SPEC, encoding="utf-8")
    (specs / "..data").symlink_to(hidden.name)
    (specs / ".editor.yaml.swp").write_text("not yaml: [", encoding="utf-8")
    (specs / "README.txt").write_text("what these are", encoding="utf-8")
    with FeatmapServer(settings(specs)) as server:
        assert len(server.service.registry) == 2
    (specs / "readme.yml").write_text(yaml.safe_dump(README_SPEC), encoding="utf-8")
    with pytest.raises(PipelineFileError, match=r"\['readme.json', 'readme.yml'\] would both"):
        FeatmapServer(settings(specs))


def test_reads_are_bounded_by_the_request_limits(specs: Path) -> None:
    padding = "# " + "x" * 1200 + "\n"
    (specs / "readme.yaml").write_text(padding + yaml.safe_dump(README_SPEC), encoding="utf-8")
    (specs / "readme.json").unlink()
    with pytest.raises(PipelineFileError, match=r"readme\.yaml is \d+ bytes, over max_spec_bytes"):
        FeatmapServer(settings(specs, max_spec_bytes=1024))
    (specs / "readme.yaml").unlink()
    # 64 KiB of zeros compress to well under 1 KiB: the unpacked size is what counts.
    zeros = {"kernel": np.zeros((4, 3, 3, 3), np.float32), "bias": np.zeros(16384, np.float32)}
    np.savez_compressed(specs / "conv.npz", **zeros)
    assert (specs / "conv.npz").stat().st_size < 1024
    with pytest.raises(
        PipelineFileError,
        match=r"weights: \S+conv\.npz holds \d+ bytes, 66\d+ unpacked: over max_message_bytes=1024",
    ):
        FeatmapServer(settings(specs, max_message_bytes=1024))


def test_yaml_aliases_count_as_what_they_stand_for(specs: Path) -> None:
    # yaml.safe_dump writes aliases for shared objects: such a file reads as usual.
    layer = {"op": "relu"}
    shared = {**README_SPEC, "layers": [*README_SPEC["layers"], layer, layer]}
    (specs / "shared.yaml").write_text(yaml.safe_dump(shared), encoding="utf-8")
    assert "*id001" in (specs / "shared.yaml").read_text()
    with FeatmapServer(settings(specs)) as server:
        assert len(server.service.registry) == 3
    # Nine levels of ten aliases each: 10**9 nodes from a few hundred bytes.
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)
    ]
    (specs / "bomb.yaml").write_text("\n".join(levels) + "\n", encoding="utf-8")
    assert (specs / "bomb.yaml").stat().st_size < 1024
    with pytest.raises(PipelineFileError, match=r"bomb\.yaml is not valid YAML: .*past 1048576"):
        FeatmapServer(settings(specs))


def test_int8_calibration_images_from_the_npy_beside_the_spec(tmp_path: Path) -> None:
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "small.yaml").write_text(yaml.safe_dump(INT8_SPEC), encoding="utf-8")
    np.save(folder / "small.calibration.npy", CALIBRATION)
    with (
        FeatmapServer(settings(folder)) as server,
        FeatureClient(server.address, timeout=60) as client,
    ):
        info = client.get_pipeline("small")
    pipeline = parse_pipeline(INT8_SPEC)
    assert info.pipeline_id == content_id(pipeline, {}, CALIBRATION)
    assert info.pipeline_id != content_id(pipeline, {}, None)
    assert info.int8 is not None


# --------------------------------------------------------------------------- featmap serve


def test_serve_refuses_to_start_naming_the_file_and_field(specs: Path) -> None:
    (specs / "broken.yaml").write_text(INVALID_SPEC, encoding="utf-8")
    with featmap_serve("--port", "0", "--pipelines", str(specs)) as serving:
        assert serving.process.wait(timeout=60) == 2
        stderr = serving.stderr()
    assert "listening" not in stderr and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"featmap serve: error: {specs / 'broken.yaml'}: {INVALID_FIELD}: ")


def test_serve_skip_invalid_logs_the_file_and_serves_the_rest(specs: Path) -> None:
    (specs / "broken.yaml").write_text(INVALID_SPEC, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATMAP_")}
    env["FEATMAP_PIPELINES_DIR"] = str(specs)  # the setting's variable, with the flag
    with featmap_serve("--port", "0", "--skip-invalid", env=env) as serving:
        port = serving.wait_listening()
        with FeatureClient(f"127.0.0.1:{port}", timeout=30) as client:
            outputs = client.extract(IMAGES, "conv")
            assert {i.names[0] for i in client.list_pipelines()} == {"conv", "readme"}
        serving.process.send_signal(signal.SIGTERM)
        assert serving.process.wait(timeout=15) == 0
        stderr = serving.stderr()
    assert_matches_reference(outputs, parse_pipeline(TENSOR_SPEC), IMAGES, TENSORS)
    [skipped] = [line for line in stderr.splitlines() if "skipped" in line]
    assert "ERROR" in skipped and f"{specs / 'broken.yaml'}: {INVALID_FIELD}: " in skipped


def test_the_spec_file_reader_loads_no_onnx() -> None:
    # The commands of the `[cli]` install read spec files with it.
    loaded = loaded_after("import featmap.service.specfiles")
    assert "featmap.service.specfiles" in loaded
    assert not {"onnx", "onnxruntime", "featmap.service.api"} & loaded


def test_an_npy_header_must_account_for_its_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "small.yaml").write_text(yaml.safe_dump(INT8_SPEC), encoding="utf-8")
    # A header claiming a million images over 64 bytes of data: refused before any allocation.
    with (folder / "small.calibration.npy").open("wb") as file:
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 3, 16, 16)}
        np.lib.format.write_array_header_1_0(file, header)
        file.write(bytes(64))
    claimed = r"a float32 array of shape \[1000000, 3, 16, 16\] is not the 64 bytes"
    with pytest.raises(PipelineFileError, match=rf"calibration: \S+\.calibration\.npy: {claimed}"):
        FeatmapServer(settings(folder))
    np.save(folder / "small.calibration.npy", np.array([None, 1], dtype=object))
    with pytest.raises(PipelineFileError, match=r"object arrays are not read"):
        FeatmapServer(settings(folder))
