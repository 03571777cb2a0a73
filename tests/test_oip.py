"""The Open Inference Protocol (KServe v2 gRPC) on featmap's port, through a real server."""

from __future__ import annotations

import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from featmap.client import FeatureClient
from featmap.contract import __version__
from featmap.contract.images import decode_pixels
from featmap.contract.pixels import pixel_values
from featmap.contract.spec import parse_pipeline
from featmap.oip import grpc_predict_v2_pb2 as oip
from featmap.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from featmap.service.reference import reference_outputs
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from tests.conftest import README_SPEC, assert_matches_reference

UINT8_SPEC: dict[str, Any] = {
    "input": {"channels": 3, "dtype": "uint8", "layout": "NHWC", "scale": 1 / 255},
    "layers": [
        {
            "op": "conv2d",
            "name": "conv",
            "filters": 4,
            "kernel_size": 3,
            "weights": {"init": "he_normal", "seed": 1},
        },
        {"op": "relu"},
        {"op": "global_max_pool2d", "name": "pooled"},
    ],
    "outputs": ["pooled"],
}
# Where CI puts a venv with tritonclient[grpc] (see test_tritonclient_talks_to_featmap).
TRITONCLIENT_PYTHON = Path(os.environ.get("FEATMAP_TRITONCLIENT_PYTHON", "/tmp/tc/bin/python"))


@pytest.fixture(scope="module")
def stub(server: FeatmapServer) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    """A stub of inference.GRPCInferenceService on the session's server."""
    with grpc.insecure_channel(server.address) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def readme_model(client: FeatureClient) -> str:
    """The README pipeline, registered: its id is the model name."""
    return client.register(README_SPEC)


def infer_request(
    model: str, images: np.ndarray, datatype: str = "FP32", outputs: tuple[str, ...] = ()
) -> oip.ModelInferRequest:
    """A ModelInferRequest as stock clients send it: the pixels in raw_input_contents[0]."""
    request = oip.ModelInferRequest(model_name=model, id="req-1")
    request.inputs.add(name="images", datatype=datatype, shape=images.shape)
    request.raw_input_contents.append(np.ascontiguousarray(images).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def decoded(response: oip.ModelInferResponse) -> dict[str, np.ndarray]:
    """raw_output_contents as arrays, in the order of `outputs`."""
    assert len(response.outputs) == len(response.raw_output_contents)
    arrays = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        assert tensor.datatype == "FP32"
        arrays[tensor.name] = np.frombuffer(raw, dtype="<f4").reshape(tuple(tensor.shape))
    return arrays


def code_of(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and details a call fails with."""
    with pytest.raises(grpc.RpcError) as failure:
        call(request, timeout=30)
    error: Any = failure.value
    return error.code(), error.details()


def test_server_live_ready_and_metadata(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    metadata = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert (metadata.name, metadata.version, list(metadata.extensions)) == (
        "featmap",
        __version__,
        [],
    )


def test_not_ready_once_shutdown_begins() -> None:
    settings = ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=2)
    with FeatmapServer(settings) as running, grpc.insecure_channel(running.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(oip.ServerReadyRequest()).ready
        running.health.enter_graceful_shutdown()
        assert not stub.ServerReady(oip.ServerReadyRequest()).ready
        assert stub.ServerLive(oip.ServerLiveRequest()).live


def test_model_metadata_and_ready(
    stub: oip_grpc.GRPCInferenceServiceStub, readme_model: str
) -> None:
    metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name=readme_model))
    assert metadata.name == readme_model
    assert list(metadata.versions) == ["1"]
    [images] = metadata.inputs
    assert (images.name, images.datatype, list(images.shape)) == ("images", "FP32", [-1, 3, -1, -1])
    assert [(o.name, o.datatype, list(o.shape)) for o in metadata.outputs] == [
        ("conv1", "FP32", [-1, 8, -1, -1]),
        ("features", "FP32", [-1, 8, 1, 1]),
    ]
    assert stub.ModelReady(oip.ModelReadyRequest(name=readme_model)).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name=readme_model, version="1")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="nope")).ready


def test_model_infer_matches_reference(
    stub: oip_grpc.GRPCInferenceServiceStub, readme_model: str
) -> None:
    images = np.random.default_rng(0).standard_normal((2, 3, 12, 10)).astype(np.float32)
    response = stub.ModelInfer(infer_request(readme_model, images))
    assert (response.model_name, response.model_version, response.id) == (
        readme_model,
        "1",
        "req-1",
    )
    assert [o.name for o in response.outputs] == ["conv1", "features"]
    assert_matches_reference(decoded(response), parse_pipeline(README_SPEC), images)


def test_typed_contents_are_accepted(
    stub: oip_grpc.GRPCInferenceServiceStub, readme_model: str
) -> None:
    images = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)
    request = oip.ModelInferRequest(model_name=readme_model)
    tensor = request.inputs.add(name="images", datatype="FP32", shape=images.shape)
    tensor.contents.fp32_contents.extend(images.ravel().tolist())
    response = stub.ModelInfer(request)
    assert_matches_reference(decoded(response), parse_pipeline(README_SPEC), images)


def test_requested_outputs_select_taps(
    stub: oip_grpc.GRPCInferenceServiceStub, readme_model: str
) -> None:
    images = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    response = stub.ModelInfer(infer_request(readme_model, images, outputs=("features",)))
    arrays = decoded(response)
    assert list(arrays) == ["features"]
    assert arrays["features"].shape == (3, 8, 1, 1)
    full = decoded(stub.ModelInfer(infer_request(readme_model, images)))
    np.testing.assert_array_equal(arrays["features"], full["features"])


def test_uint8_model(stub: oip_grpc.GRPCInferenceServiceStub, client: FeatureClient) -> None:
    model = client.register(UINT8_SPEC)
    metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name=model))
    assert (metadata.inputs[0].datatype, list(metadata.inputs[0].shape)) == (
        "UINT8",
        [-1, -1, -1, 3],
    )
    images = np.random.default_rng(3).integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    response = stub.ModelInfer(infer_request(model, images, datatype="UINT8"))
    assert_matches_reference(decoded(response), parse_pipeline(UINT8_SPEC), images)


@pytest.mark.parametrize(
    ("case", "field_words"),
    [
        ("wrong-datatype", "inputs[0].datatype"),
        ("bad-shape", "inputs[0].shape"),
        ("wrong-channels", "images.shape"),
        ("byte-length", "raw_input_contents[0]"),
        ("unknown-output", "outputs[0].name"),
        ("input-name", "inputs[0].name"),
        ("two-inputs", "inputs"),
    ],
)
def test_bad_requests_are_invalid_argument(
    stub: oip_grpc.GRPCInferenceServiceStub, readme_model: str, case: str, field_words: str
) -> None:
    images = np.zeros((1, 3, 8, 8), dtype=np.float32)
    request = infer_request(readme_model, images)
    if case == "wrong-datatype":
        request.inputs[0].datatype = "FP16"
    elif case == "bad-shape":
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend([1, 3, -8, 8])
    elif case == "wrong-channels":
        request = infer_request(readme_model, np.zeros((1, 4, 8, 8), dtype=np.float32))
    elif case == "byte-length":
        request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    elif case == "unknown-output":
        request.outputs.add(name="nope")
    elif case == "input-name":
        request.inputs[0].name = "input"
    elif case == "two-inputs":
        request.inputs.add(name="images", datatype="FP32", shape=[1])
    code, details = code_of(stub.ModelInfer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(field_words), details


def test_unknown_model_is_not_found(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    images = np.zeros((1, 3, 8, 8), dtype=np.float32)
    code, details = code_of(stub.ModelInfer, infer_request("no-such-model", images))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in details
    code, _ = code_of(stub.ModelMetadata, oip.ModelMetadataRequest(name="no-such-model"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_unknown_version_is_not_found(
    stub: oip_grpc.GRPCInferenceServiceStub, readme_model: str
) -> None:
    request = oip.ModelMetadataRequest(name=readme_model, version="7")
    code, details = code_of(stub.ModelMetadata, request)
    assert code == grpc.StatusCode.NOT_FOUND
    assert details.startswith("version"), details


TRITON_SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np
    import tritonclient.grpc as tc

    url, model, out = sys.argv[1:4]
    client = tc.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model)
    metadata = client.get_model_metadata(model, as_json=True)
    assert metadata["inputs"][0]["datatype"] == "FP32", metadata
    images = np.random.default_rng(5).standard_normal((2, 3, 11, 9)).astype(np.float32)
    tensor = tc.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    outputs = [tc.InferRequestedOutput("conv1"), tc.InferRequestedOutput("features")]
    result = client.infer(model, [tensor], outputs=outputs)
    # Image files as a BYTES input, resized by the server (request parameters).
    files = tc.InferInput("images_encoded", [2], "BYTES")
    files.set_data_from_numpy(np.array([open(p, "rb").read() for p in sys.argv[4:]], dtype=object))
    resize = {"height": 8, "width": 10}
    encoded = client.infer(model, [files], outputs=outputs[1:], parameters=resize)
    np.savez(out, images=images, conv1=result.as_numpy("conv1"),
             features=result.as_numpy("features"), encoded=encoded.as_numpy("features"))
    """
)


def test_tritonclient_talks_to_featmap(
    server: FeatmapServer, readme_model: str, tmp_path: Path
) -> None:
    """Triton's own client against featmap, from a separate venv (tritonclient's protobuf pins
    differ from ours): `python3 -m venv /tmp/tc && /tmp/tc/bin/pip install 'tritonclient[grpc]'`
    or FEATMAP_TRITONCLIENT_PYTHON=/path/to/python."""
    if not TRITONCLIENT_PYTHON.exists():
        pytest.skip(f"no tritonclient venv at {TRITONCLIENT_PYTHON}")
    probe = subprocess.run(
        [str(TRITONCLIENT_PYTHON), "-c", "import tritonclient.grpc"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"{TRITONCLIENT_PYTHON} cannot import tritonclient.grpc")
    script = tmp_path / "triton_client.py"
    script.write_text(TRITON_SCRIPT)
    out = tmp_path / "result.npz"
    files = [tmp_path / "a.jpg", tmp_path / "b.png"]
    for file in files:
        pixels = np.random.default_rng(6).integers(0, 256, (12, 9, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(file)
    done = subprocess.run(
        [
            str(TRITONCLIENT_PYTHON),
            str(script),
            server.address,
            readme_model,
            str(out),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    with np.load(out) as result:
        images = result["images"]
        outputs = {name: result[name] for name in ("conv1", "features")}
        encoded = result["encoded"]
    readme = parse_pipeline(README_SPEC)
    assert_matches_reference(outputs, readme, images)
    # The registered float pipeline runs the decoded pixels as pixel / 255 (the pixel rule).
    pixels = np.stack([decode_pixels(file, 3, (8, 10)) for file in files]).transpose(0, 3, 1, 2)
    expected = reference_outputs(readme, pixel_values(pixels, readme.input))["features"]
    np.testing.assert_allclose(encoded, expected, rtol=1e-4, atol=1e-5)


def test_bearer_tokens_apply() -> None:
    settings = ServerSettings(
        host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=2, auth_tokens=["s3cret"]
    )
    with FeatmapServer(settings) as running, grpc.insecure_channel(running.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        code, _ = code_of(stub.ServerMetadata, oip.ServerMetadataRequest())
        assert code == grpc.StatusCode.UNAUTHENTICATED
        granted = stub.ServerMetadata(
            oip.ServerMetadataRequest(), metadata=(("authorization", "Bearer s3cret"),)
        )
        assert granted.name == "featmap"


def test_malformed_request_bytes_are_invalid_argument(server: FeatmapServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        code, details = code_of(call, b"\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in details


def test_float16_model(stub: oip_grpc.GRPCInferenceServiceStub, client: FeatureClient) -> None:
    spec = {**README_SPEC, "input": {"channels": 3, "dtype": "float16"}}
    model = client.register(spec)
    assert stub.ModelMetadata(oip.ModelMetadataRequest(name=model)).inputs[0].datatype == "FP16"
    images = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float16)
    response = stub.ModelInfer(infer_request(model, images, datatype="FP16"))
    assert_matches_reference(decoded(response), parse_pipeline(spec), images)


def test_calls_are_counted(stub: oip_grpc.GRPCInferenceServiceStub, server: FeatmapServer) -> None:
    registry = server.metrics.registry
    labels = {"method": "ServerMetadata", "code": "OK"}
    before = registry.get_sample_value("featmap_requests_total", labels) or 0.0
    stub.ServerMetadata(oip.ServerMetadataRequest())
    assert registry.get_sample_value("featmap_requests_total", labels) == before + 1
