"""Encoded images to the server (ExtractRequest.encoded, OIP "images_encoded", the job's
default with --server): the job's decoder, bounded before decoding, through real servers."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from featmap.client import AsyncFeatureClient, FeatmapRpcError, FeatureClient
from featmap.client.messages import encoded_parts
from featmap.contract.images import decode_pixels
from featmap.contract.pixels import pixel_pipeline, pixel_values
from featmap.contract.spec import Pipeline, parse_pipeline
from featmap.contract.wire import EncodedBatch
from featmap.jobs.extract import run_extract
from featmap.jobs.images import EncodedRule
from featmap.jobs.job import JobError
from featmap.jobs.runners import RemoteRunner
from featmap.oip import grpc_predict_v2_pb2 as oip
from featmap.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from featmap.service.reference import reference_outputs
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_cli import FEATMAP, clean_env

SIZE = (24, 20)  # what the tests resize to (H, W)
# 32 filters at full resolution: 3 images of 64x64 hold 1.5 MiB of activations.
WIDE_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {"op": "conv2d", "name": "conv", "filters": 32, "kernel_size": 3, "padding": "same",
         "weights": {"init": "he_normal", "seed": 2}},
    ],
    "outputs": ["conv"],
}  # fmt: skip


def encode(pixels: np.ndarray, kind: str, **options: Any) -> bytes:
    """An image file's bytes, written by Pillow."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, kind, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def files() -> list[bytes]:
    """A JPEG, a PNG, a lossless WebP and a JPEG of another size, all RGB."""
    rng = np.random.default_rng(7)
    pixels = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(3)]
    return [
        encode(pixels[0], "JPEG", quality=90),
        encode(pixels[1], "PNG"),
        encode(pixels[2], "WEBP", lossless=True),
        encode(rng.integers(0, 256, (50, 26, 3), dtype=np.uint8), "JPEG"),
    ]


@pytest.fixture(scope="module")
def readme() -> Pipeline:
    """The README pipeline (float32, NCHW)."""
    return parse_pipeline(README_SPEC)


def local_pixels(files: list[bytes], size: tuple[int, int] | None, layout: str) -> np.ndarray:
    """The files decoded here, by the one decoder, as a uint8 batch in `layout`."""
    batch = np.stack([decode_pixels(data, 3, size) for data in files])
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2) if layout == "NCHW" else batch)


def png_header(height: int, width: int) -> bytes:
    """A PNG whose header claims height x width RGB pixels, with no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def refusal(call: Any) -> FeatmapRpcError:
    """The FeatmapRpcError a call raises."""
    with pytest.raises(FeatmapRpcError) as failure:
        call()
    return failure.value


def serving(**settings: Any) -> Iterator[FeatmapServer]:
    """A real server on 127.0.0.1, port 0, one intra-op thread, with these settings."""
    options = ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1, **settings)
    with FeatmapServer(options) as running:
        yield running


def rss_bytes() -> int:
    """This process's resident memory now (the session's server runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------- Extract


def test_features_equal_the_local_decode_and_the_reference(
    client: FeatureClient, files: list[bytes], readme: Pipeline
) -> None:
    sent = files[:3]
    served = client.extract_encoded(sent, README_SPEC, size=SIZE)
    pixels = local_pixels(sent, SIZE, "NCHW")
    # The same decoder and the same pixel variant: the same numbers, exactly.
    local = client.extract(pixels, pixel_pipeline(readme))
    assert served["conv1"].shape == (3, 8, *SIZE)
    for name in ("conv1", "features"):
        np.testing.assert_array_equal(served[name], local[name])
    assert_matches_reference(served, readme, pixel_values(pixels, readme.input))


def test_images_of_one_size_need_no_resize(
    client: FeatureClient, files: list[bytes], readme: Pipeline
) -> None:
    served = client.extract_encoded(files[:3], README_SPEC)
    assert served["conv1"].shape == (3, 8, 30, 40)
    pixels = local_pixels(files[:3], None, "NCHW")
    assert_matches_reference(served, readme, pixel_values(pixels, readme.input))


def test_images_of_two_sizes_without_a_resize_are_refused(
    client: FeatureClient, files: list[bytes]
) -> None:
    error = refusal(lambda: client.extract_encoded([files[0], files[3]], README_SPEC))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == "encoded.images[1]"
    assert "50x26" in error.details and "30x40" in error.details


def test_an_nhwc_uint8_pipeline_and_grayscale(client: FeatureClient, files: list[bytes]) -> None:
    spec = {
        "input": {"channels": 1, "dtype": "uint8", "layout": "NHWC"},
        "layers": [
            {"op": "conv2d", "name": "conv", "filters": 2, "kernel_size": 3,
             "weights": {"init": "he_normal", "seed": 3}},
        ],
        "outputs": ["conv"],
    }  # fmt: skip
    served = client.extract_encoded(files[:3], spec, size=SIZE)
    gray = np.stack([decode_pixels(data, 1, SIZE) for data in files[:3]])
    local = client.extract(gray, spec)
    np.testing.assert_array_equal(served["conv"], local["conv"])


def test_a_truncated_jpeg_names_its_index_and_the_server_goes_on(
    client: FeatureClient, files: list[bytes], readme: Pipeline
) -> None:
    truncated = files[0][: len(files[0]) // 2]
    error = refusal(
        lambda: client.extract_encoded([files[1], files[2], truncated], README_SPEC, size=SIZE)
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == "encoded.images[2]"
    assert "truncated" in error.details
    served = client.extract_encoded(files[:2], README_SPEC, size=SIZE)
    pixels = local_pixels(files[:2], SIZE, "NCHW")
    assert_matches_reference(served, readme, pixel_values(pixels, readme.input))


@pytest.mark.parametrize("kind", ["BMP", "TIFF", "GIF"])
def test_formats_beyond_jpeg_png_webp_are_refused(client: FeatureClient, kind: str) -> None:
    data = encode(np.zeros((8, 8, 3), np.uint8), kind)
    error = refusal(lambda: client.extract_encoded([data], README_SPEC))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == "encoded.images[0]"
    assert "cannot decode image: not a JPEG, PNG, WEBP image" in error.details


def test_garbage_and_empty_files_are_refused(client: FeatureClient, files: list[bytes]) -> None:
    error = refusal(lambda: client.extract_encoded([files[1], b"not an image"], README_SPEC))
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "encoded.images[1]")
    error = refusal(lambda: client.extract_encoded([b""], README_SPEC))
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "encoded.images[0]")


def test_a_decompression_bomb_is_refused_from_its_header(
    client: FeatureClient, files: list[bytes]
) -> None:
    before = rss_bytes()
    for height, width in ((100_000, 100_000), (9000, 9000)):
        bomb = png_header(height, width)  # 10^10 pixels, 30 GB decoded; 81 M over 8192^2
        error = refusal(lambda b=bomb: client.extract_encoded([files[1], b], README_SPEC))  # type: ignore[misc]
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.field == "encoded.images[1]"
    assert "max_pixels_per_image" in error.details and "header" in error.details
    # Refused before decoding: nothing near a decoded image's size was ever allocated.
    assert rss_bytes() - before < 100 << 20


def test_stream_of_encoded_batches(
    client: FeatureClient, files: list[bytes], readme: Pipeline
) -> None:
    batches = [EncodedBatch(tuple(files[:2]), SIZE), EncodedBatch((files[2],), SIZE)]
    parts = list(client.extract_stream(batches, README_SPEC))
    assert [part["features"].shape[0] for part in parts] == [2, 1]
    pixels = local_pixels(files[:3], SIZE, "NCHW")
    joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    assert_matches_reference(joined, readme, pixel_values(pixels, readme.input))


def test_encoded_parts_split_by_bytes() -> None:
    batch = EncodedBatch((b"a" * 400, b"b" * 400, b"c" * 400, b"d" * 2000), (8, 8))
    room = 4096 + len("spec") + 2 * 411  # the envelope, the spec text, two images' fields
    parts = encoded_parts(batch, "spec", room)
    assert [part.images for part in parts] == [
        (b"a" * 400, b"b" * 400),
        (b"c" * 400,),
        (b"d" * 2000,),  # over the room alone: sent alone, for the server to name it
    ]
    assert all(part.size == (8, 8) for part in parts)
    # The reply's room splits too: one image's outputs at a time.
    assert len(encoded_parts(batch, "spec", 1 << 20, reply_per_image=600 << 10)) == 4


def test_a_batch_beyond_one_message_is_streamed_in_parts(
    server: FeatmapServer, files: list[bytes]
) -> None:
    sent = files[:3] * 4
    room = max(len(data) for data in sent) * 3 + 4096 + len(str(README_SPEC)) * 2
    with FeatureClient(server.address, timeout=60, max_message_bytes=room) as small:
        whole = small.extract_encoded(sent, README_SPEC, size=SIZE)
    with FeatureClient(server.address, timeout=60) as client:
        once = client.extract_encoded(sent, README_SPEC, size=SIZE)
    np.testing.assert_array_equal(whole["features"], once["features"])
    assert whole["features"].shape[0] == 12


def test_async_client(server: FeatmapServer, files: list[bytes], readme: Pipeline) -> None:
    async def run() -> dict[str, np.ndarray]:
        async with AsyncFeatureClient(server.address, timeout=60) as client:
            batches = [EncodedBatch(tuple(files[:3]), SIZE)]
            [streamed] = [out async for out in client.extract_iter(batches, README_SPEC)]
            single = await client.extract_encoded(files[:3], README_SPEC, size=SIZE)
            np.testing.assert_array_equal(streamed["features"], single["features"])
            return single

    served = asyncio.run(run())
    pixels = local_pixels(files[:3], SIZE, "NCHW")
    assert_matches_reference(served, readme, pixel_values(pixels, readme.input))


def test_registered_float_and_pixel_pipelines(
    client: FeatureClient, files: list[bytes], readme: Pipeline
) -> None:
    pixels = local_pixels(files[:3], SIZE, "NCHW")
    variant = client.register(pixel_pipeline(readme))
    exact = client.extract_encoded(files[:3], variant, size=SIZE)
    np.testing.assert_array_equal(exact["features"], client.extract(pixels, variant)["features"])
    # A registered float pipeline runs its own session on pixel/255: the pixel rule.
    float_id = client.register(README_SPEC)
    served = client.extract_encoded(files[:3], float_id, size=SIZE)
    assert_matches_reference(served, readme, pixel_values(pixels, readme.input))


def test_decoded_batches_join_the_dynamic_batcher(
    tight_batching: FeatmapServer, files: list[bytes], readme: Pipeline
) -> None:
    with FeatureClient(tight_batching.address, timeout=60) as client:
        model = client.register(pixel_pipeline(readme))
        before = tight_batching.service.batcher.stats
        barrier = threading.Barrier(6)

        def one(index: int) -> dict[str, np.ndarray]:
            barrier.wait()
            return client.extract_encoded([files[index % 3]], model, size=SIZE)

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(one, range(6)))
        after = tight_batching.service.batcher.stats
    pixels = local_pixels(files[:3], SIZE, "NCHW")
    expected = client_free_reference(readme, pixels)
    for index, result in enumerate(results):
        np.testing.assert_allclose(result["features"][0], expected[index % 3], rtol=1e-4, atol=1e-5)
    assert after.requests - before.requests == 6
    # The queue delay lets the six single-image calls share onnxruntime runs.
    assert after.batches - before.batches < 6


def client_free_reference(pipeline: Pipeline, pixels: np.ndarray) -> np.ndarray:
    """The reference features of uint8 pixels, by the pixel rule."""
    return reference_outputs(pipeline, pixel_values(pixels, pipeline.input))["features"]


@pytest.fixture(scope="module")
def tight_batching() -> Iterator[FeatmapServer]:
    """A server whose batcher waits up to 5 s for six images (a full batch goes at once), one
    batch at a time (two leaders gathering with a delay can pop each other's requests:
    reported, not this test's subject)."""
    yield from serving(
        grpc_workers=8, max_queue_delay_us=5_000_000, max_batch_size=6, concurrent_batches=1
    )


# --------------------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def tight() -> Iterator[FeatmapServer]:
    """A server with small limits for encoded images."""
    yield from serving(
        grpc_workers=2,
        max_encoded_image_bytes=6000,
        max_images_per_request=3,
        max_pixels_per_image=64 * 64,
        run_bytes=1 << 20,
    )


def test_limits_before_decoding(tight: FeatmapServer, files: list[bytes]) -> None:
    big = encode(np.random.default_rng(1).integers(0, 256, (60, 60, 3), np.uint8), "PNG")
    assert len(big) > 6000
    with FeatureClient(tight.address, timeout=60) as client:
        assert client.server_info().limits["max_encoded_image_bytes"] == 6000
        cases = [
            (lambda: client.extract_encoded([files[1], big], README_SPEC), "encoded.images[1]"),
            (lambda: client.extract_encoded(files[1:2] * 4, README_SPEC), "encoded.images"),
            (
                lambda: client.extract_encoded([png_header(65, 64)], README_SPEC),
                "encoded.images[0]",
            ),
            (
                lambda: client.extract_encoded(files[1:2], README_SPEC, size=(65, 64)),
                "encoded.height",
            ),
            # 3 images of 64x64 decode within every limit but the run budget (1 MiB) once 32
            # filters' activations are counted: refused before a pixel is decoded.
            (
                lambda: client.extract_encoded(files[1:2] * 3, WIDE_SPEC, size=(64, 64)),
                "encoded.shape",
            ),
        ]
        for call, field in cases:
            error = refusal(call)
            assert (error.code, error.field) == (grpc.StatusCode.RESOURCE_EXHAUSTED, field)
        served = client.extract_encoded(files[1:2], README_SPEC, size=(8, 8))
        assert served["features"].shape == (1, 8, 1, 1)


def test_draft_needs_a_resize(client: FeatureClient, files: list[bytes]) -> None:
    error = refusal(lambda: client.extract_encoded(files[:1], README_SPEC, draft=True))
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "encoded.draft")


# --------------------------------------------------------------------------- OIP


def bytes_tensor(files: list[bytes]) -> bytes:
    """KServe's binary BYTES layout: each element's 4-byte little-endian length, then it."""
    return b"".join(struct.pack("<I", len(data)) + data for data in files)


def test_oip_bytes_input(
    server: FeatmapServer, client: FeatureClient, files: list[bytes], readme: Pipeline
) -> None:
    model = client.register(pixel_pipeline(readme))
    pixels = local_pixels(files[:3], SIZE, "NCHW")
    expected = client.extract(pixels, model)
    with grpc.insecure_channel(server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        request = oip.ModelInferRequest(model_name=model)
        request.inputs.add(name="images_encoded", datatype="BYTES", shape=[3])
        request.raw_input_contents.append(bytes_tensor(files[:3]))
        request.parameters["height"].int64_param = SIZE[0]
        request.parameters["width"].int64_param = SIZE[1]
        request.outputs.add(name="features")
        response = stub.ModelInfer(request, timeout=60)
        features = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(
            tuple(response.outputs[0].shape)
        )
        np.testing.assert_array_equal(features, expected["features"])
        # The typed form: contents.bytes_contents.
        typed = oip.ModelInferRequest(model_name=model, parameters=request.parameters)
        tensor = typed.inputs.add(name="images_encoded", datatype="BYTES", shape=[3, 1])
        tensor.contents.bytes_contents.extend(files[:3])
        response = stub.ModelInfer(typed, timeout=60)
        conv1 = np.frombuffer(response.raw_output_contents[0], "<f4")
        np.testing.assert_array_equal(conv1, expected["conv1"].reshape(-1))
        # A bad element names the raw contents; a truncated image its index.
        broken = oip.ModelInferRequest(model_name=model, parameters=request.parameters)
        broken.inputs.add(name="images_encoded", datatype="BYTES", shape=[2])
        broken.raw_input_contents.append(bytes_tensor(files[:2])[:-5] + b"\x00")
        with pytest.raises(grpc.RpcError) as failure:
            stub.ModelInfer(broken, timeout=60)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "raw_input_contents[0]" in failure.value.details()  # type: ignore[attr-defined]
        truncated = oip.ModelInferRequest(model_name=model)
        truncated.inputs.add(name="images_encoded", datatype="BYTES", shape=[2])
        truncated.raw_input_contents.append(bytes_tensor([files[1], files[0][:300]]))
        with pytest.raises(grpc.RpcError) as failure:
            stub.ModelInfer(truncated, timeout=60)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "images_encoded.images[1]" in failure.value.details()  # type: ignore[attr-defined]
        # Other parameters are still refused.
        request.parameters["priority"].int64_param = 1
        with pytest.raises(grpc.RpcError) as failure:
            stub.ModelInfer(request, timeout=60)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "priority" in failure.value.details()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, files: list[bytes]) -> Path:
    """JPEGs, a PNG, a WebP and a BMP (decoded by the job: the server takes no BMP)."""
    path = tmp_path_factory.mktemp("encoded")
    for index, suffix in enumerate(["jpg", "png", "webp", "jpeg"]):
        (path / f"image{index}.{suffix}").write_bytes(files[index])
    pixels = np.random.default_rng(3).integers(0, 256, (30, 40, 3), np.uint8)
    Image.fromarray(pixels).save(path / "image4.bmp")
    return path


def job(
    pipeline: Pipeline, inputs: list[Path], output: Path, address: str, **options: Any
) -> dict[str, np.ndarray]:
    """run_extract through a server; the output file's arrays."""
    runner = RemoteRunner(pipeline, [address], in_flight=2, timeout=60)
    try:
        run_extract(pipeline, inputs, output, runner, batch_size=2, **options)
    finally:
        runner.close()
    with np.load(output, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


@pytest.mark.parametrize("resize", [SIZE, None])
def test_the_job_sends_files_and_gets_the_local_features(
    server: FeatmapServer, readme: Pipeline, folder: Path, tmp_path: Path, resize: Any
) -> None:
    address = server.address
    sent = job(readme, [folder], tmp_path / "sent.npz", address, resize=resize, encoded=True)
    local = job(readme, [folder], tmp_path / "local.npz", address, resize=resize)
    assert sorted(sent) == sorted(local)
    for name, array in local.items():
        np.testing.assert_array_equal(sent[name], array, err_msg=name)
    assert len(sent["paths"]) == 5


def test_the_job_skips_a_file_the_server_cannot_decode(
    server: FeatmapServer, readme: Pipeline, files: list[bytes], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(3):
        (folder / f"a{index}.jpg").write_bytes(files[0])
    broken = folder / "a1.jpg"
    broken.write_bytes(files[0][: len(files[0]) // 2])  # its header reads; its pixels do not
    out = job(readme, [folder], tmp_path / "out.npz", server.address, resize=SIZE,
              encoded=True, on_error="skip")  # fmt: skip
    assert list(out["paths"]) == [str(folder / "a0.jpg"), str(folder / "a2.jpg")]
    assert list(out["skipped"]) == [str(broken)]
    assert "truncated" in str(out["skipped_errors"][0])
    np.testing.assert_array_equal(out["features"][0], out["features"][1])
    with pytest.raises(JobError, match=r"a1\.jpg: .*truncated"):
        job(readme, [folder], tmp_path / "fail.npz", server.address, resize=SIZE, encoded=True)


def test_the_job_sends_as_they_are_only_the_files_its_server_takes(
    tight: FeatmapServer, readme: Pipeline, files: list[bytes], tmp_path: Path
) -> None:
    # The server takes encoded files of at most 6,000 bytes (the default is 32 MiB): the job
    # asks it, sends the small JPEG as it is and decodes the larger PNG itself, as a job with
    # --decode-locally would; it used to send both, and the server refused the PNG.
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(files[0])
    noise = np.random.default_rng(5).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    (folder / "b.png").write_bytes(encode(noise, "PNG"))
    assert len(files[0]) <= 6000 < (folder / "b.png").stat().st_size
    sent = job(readme, [folder], tmp_path / "sent.npz", tight.address, resize=SIZE, encoded=True)
    local = job(readme, [folder], tmp_path / "local.npz", tight.address, resize=SIZE)
    assert list(sent["paths"]) == [str(folder / "a.jpg"), str(folder / "b.png")]
    np.testing.assert_array_equal(sent["features"], local["features"])
    runner = RemoteRunner(readme, [tight.address], in_flight=1, timeout=60)
    try:
        assert runner.encoded_rule() == EncodedRule(6000, ("JPEG", "PNG", "WEBP"))
    finally:
        runner.close()


def test_the_command_sends_files_unless_told_to_decode_locally(
    server: FeatmapServer, folder: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "pipeline.json"
    spec.write_text(json.dumps(README_SPEC))
    before = server.service.decoder.decoded
    outputs = {}
    for mode, extra in (("sent", []), ("local", ["--decode-locally"])):
        output = tmp_path / f"{mode}.npz"
        done = subprocess.run(
            [str(FEATMAP), "extract", "--pipeline", str(spec), "--input", str(folder),
             "--output", str(output), "--resize", "24x20", "--server", server.address,
             "--quiet", *extra],
            capture_output=True, text=True, timeout=120, env=clean_env(), check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        with np.load(output, allow_pickle=False) as archive:
            outputs[mode] = archive["features"]
        if mode == "sent":  # the four JPEG, PNG and WebP files; the BMP is decoded here
            assert server.service.decoder.decoded - before == 4
    np.testing.assert_array_equal(outputs["sent"], outputs["local"])
    assert server.service.decoder.decoded - before == 4  # --decode-locally sent none
