"""int8 pipelines on every path: the spec and its ids, admission, memory, and each entry point
(unary by id, by name and inline, stream, OIP, embedded, `featmap extract` both ways, Ray's
FeatureExtractor, summary, bench) against the NumPy reference within the error the server
reports (tests/test_quantize.py's assert_within_reported: on the images the error was measured
on, |int8 - reference| <= the reported |int8 - float32| + float32's tolerance).
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from PIL import Image

from featmap.client import FeatmapRpcError, FeatureClient
from featmap.contract.errors import InvalidSpec, InvalidTensor, LimitExceeded, Unsupported
from featmap.contract.limits import (
    DEFAULT_LIMITS,
    RequestLimits,
    admit_calibration,
    session_memory,
)
from featmap.contract.pixels import pixel_pipeline, pixel_values
from featmap.contract.precision import (
    QuantizationReport,
    report_from_message,
    report_message,
)
from featmap.contract.spec import DEFAULT_MAX_ERROR, Pipeline, content_id, parse_pipeline
from featmap.jobs.bench_int8 import run_int8_bench
from featmap.jobs.calibration import load_calibration
from featmap.jobs.cli import main
from featmap.jobs.export_onnx import export_onnx
from featmap.jobs.ray import FeatureExtractor
from featmap.jobs.runners import EmbeddedRunner
from featmap.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from featmap.service.graph import compile_pipeline
from featmap.service.int8 import (
    WEIGHT_BITS_PROPERTY,
    ErrorMeasure,
    check_int8_model_runs_here,
    cpu_int8_support,
    has_int8_dot_products,
    measure_error,
    model_properties,
    quantize_pipeline,
    run_model,
    synthetic_calibration,
    weight_bits_for,
)
from featmap.service.runtime import CPU, SessionCache
from featmap.service.server import FeatmapServer
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc
from tests.conftest import README_SPEC
from tests.test_attacks import measure_session
from tests.test_oip import decoded, infer_request
from tests.test_quantize import SMALL_STANDARD, assert_within_reported

# Two conv blocks and a global average; the first block's activations are a tap, so the report
# has a full-resolution output and a pooled one.
SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "precision": "int8",
    "layers": [
        {"op": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same",
         "weights": {"init": "he_normal", "seed": 1}, "bias": {"init": "zeros"}},
        {"op": "relu", "name": "block1"},
        {"op": "max_pool2d", "pool_size": 2},
        {"op": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same",
         "weights": {"init": "he_normal", "seed": 2}},
        {"op": "relu"},
        {"op": "global_avg_pool2d", "name": "features"},
    ],
    "outputs": ["block1", "features"],
}  # fmt: skip
PIPELINE = parse_pipeline(SPEC)


def calibration_images(count: int = 6, size: int = 16, seed: int = 0) -> np.ndarray:
    """Photo-like float images in 0..1: smooth fields with noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    fields = rng.random((count, 3, 1, 1), dtype=np.float32) * (ramp[:, None] + ramp[None, :]) / 2
    noise = rng.random((count, 3, size, size), dtype=np.float32) * 0.5
    return np.clip(fields + noise, 0, 1).astype(np.float32)


CALIBRATION = calibration_images()


@pytest.fixture(scope="module")
def registered(client: FeatureClient) -> tuple[str, QuantizationReport]:
    """SPEC registered with CALIBRATION under the name int8-features: its id and report."""
    pipeline_id = client.register(SPEC, calibration=CALIBRATION, name="int8-features")
    report = client.get_pipeline(pipeline_id).int8
    assert report is not None
    return pipeline_id, report


# --------------------------------------------------------------------------- spec and ids


def test_float32_ids_and_canonical_json_are_unchanged() -> None:
    # Pinned before precision existed: float32 specs keep their ids byte for byte.
    readme = parse_pipeline(README_SPEC)
    assert readme.pipeline_id == "3782aa34257d7f58d76a19cdb9f5a58b"
    tensors = {"conv1.w": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}
    assert content_id(readme, tensors) == "170ca0179acd28c7e6e5601f08936ffe"
    assert "precision" not in readme.canonical_json() and "max_error" not in readme.model_dump()
    explicit = parse_pipeline({**README_SPEC, "precision": "float32"})
    assert explicit.canonical_json() == readme.canonical_json()
    assert content_id(explicit, tensors, None) == content_id(readme, tensors)


def test_int8_ids_cover_precision_threshold_and_calibration() -> None:
    int8 = PIPELINE.pipeline_id
    assert int8 != PIPELINE.with_precision("float32").pipeline_id
    assert '"precision":"int8"' in PIPELINE.canonical_json()
    stricter = parse_pipeline({**SPEC, "max_error": 0.02})
    assert stricter.pipeline_id != int8
    assert content_id(PIPELINE, {}, None) == int8
    calibrated = content_id(PIPELINE, {}, CALIBRATION)
    assert calibrated not in (int8, content_id(PIPELINE, {}, CALIBRATION[:5]))
    assert content_id(PIPELINE, {}, CALIBRATION.copy()) == calibrated
    # The same bytes as another dtype or shape are other images.
    assert content_id(PIPELINE, {}, CALIBRATION.view(np.uint8)) != calibrated
    assert content_id(PIPELINE, {}, CALIBRATION.reshape(6, 3, 8, 32)) != calibrated


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"precision": "float32", "max_error": 0.1}, "int8 error threshold"),
        ({"max_error": 0}, "greater than 0"),
        ({"max_error": 1.5}, "less than or equal to 1"),
        ({"max_error": float("nan")}, "finite"),
        ({"precision": "int4"}, "'float32' or 'int8'"),
    ],
)
def test_precision_fields_are_checked(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message) as caught:
        parse_pipeline({**SPEC, **extra})
    assert caught.value.field in ("max_error", "precision")


def test_with_precision() -> None:
    stricter = parse_pipeline({**SPEC, "max_error": 0.02})
    assert stricter.int8_max_error == 0.02 and PIPELINE.int8_max_error == DEFAULT_MAX_ERROR
    as_float = stricter.with_precision("float32")
    assert (as_float.precision, as_float.max_error) == ("float32", None)
    assert as_float.with_precision("int8") == PIPELINE
    assert PIPELINE.with_precision("int8") is PIPELINE


# --------------------------------------------------------------------------- admission, memory


def test_calibration_admission() -> None:
    plan = admit_calibration(PIPELINE, CALIBRATION, DEFAULT_LIMITS)
    assert (plan.batch, plan.height, plan.width) == (6, 16, 16)
    float32 = PIPELINE.with_precision("float32")
    cases: list[tuple[Pipeline, np.ndarray, RequestLimits, type[Exception], str]] = [
        (float32, CALIBRATION, DEFAULT_LIMITS, InvalidTensor, "calibration"),
        (PIPELINE, CALIBRATION, RequestLimits(max_calibration_images=5), LimitExceeded,
         "calibration.shape"),
        (PIPELINE, CALIBRATION.astype(np.float16), DEFAULT_LIMITS, InvalidTensor,
         "calibration.dtype"),
        (PIPELINE, CALIBRATION[:, :2], DEFAULT_LIMITS, InvalidTensor, "calibration.shape"),
        (PIPELINE, CALIBRATION[0], DEFAULT_LIMITS, InvalidTensor, "calibration.shape"),
        (PIPELINE, CALIBRATION[:, :, :1, :1], DEFAULT_LIMITS, InvalidSpec, "layers[2].pool_size"),
        (PIPELINE, CALIBRATION, RequestLimits(max_pixels_per_image=100), LimitExceeded,
         "calibration.shape"),
    ]  # fmt: skip
    for pipeline, images, limits, error, field in cases:
        with pytest.raises(error) as caught:
            admit_calibration(pipeline, images, limits)
        assert caught.value.field == field, caught.value
    non_finite = CALIBRATION.copy()
    non_finite[1, 0, 0, 0] = np.nan
    # NaN never calibrates, even where the server lets NaN images run.
    with pytest.raises(InvalidTensor) as caught:
        admit_calibration(PIPELINE, non_finite, RequestLimits(allow_non_finite_input=True))
    assert caught.value.field == "calibration.data"


def test_int8_memory_is_charged_by_parameters_and_calibration() -> None:
    float32 = session_memory(PIPELINE.with_precision("float32"))
    synthetic = session_memory(PIPELINE)
    assert synthetic.steady < float32.steady  # int8 weights: 1 byte each
    assert synthetic.peak > float32.peak  # calibration runs on top of compiling
    small = session_memory(PIPELINE, (4, 3, 16, 16))
    large = session_memory(PIPELINE, (4, 3, 512, 512))
    assert small.steady == large.steady == synthetic.steady
    assert small.peak < synthetic.peak < large.peak  # synthetic images are 224 x 224
    # A pipeline that takes no 224 x 224 image cannot calibrate on the synthetic images.
    layers = [{**SPEC["layers"][0], "kernel_size": 250, "padding": "valid"}]
    wide = parse_pipeline({"input": SPEC["input"], "precision": "int8", "layers": layers})
    with pytest.raises(InvalidSpec, match="calibrated on 224x224 synthetic images") as caught:
        session_memory(wide)
    assert caught.value.field == "layers[0].kernel_size"
    assert session_memory(wide, (1, 3, 256, 256)).peak > 0  # with images it takes: charged


@pytest.mark.parametrize(
    ("spec", "shape", "check_steady"),
    [
        # 8.4 M weights on 2 tiny images: the per-parameter constants.
        ({"input": {"channels": 512}, "precision": "int8", "layers": [
            {"op": "conv2d", "filters": 256, "kernel_size": 8,
             "weights": {"init": "he_normal", "seed": 0}}]}, [2, 512, 8, 8], True),
        # Few weights, 16 images of 224 x 224 and a full-resolution tap: the image terms.
        (SPEC, [16, 3, 224, 224], False),
        # The synthetic images alone, 64 channels of them.
        ({"input": {"channels": 64}, "precision": "int8", "layers": [
            {"op": "conv2d", "filters": 16, "kernel_size": 1,
             "weights": {"init": "he_normal"}}]}, None, False),
        # The largest int8 kernel: onnxruntime's int8 conv workspace (8 bytes a tap and pixel).
        ({"input": {"channels": 3}, "precision": "int8", "max_error": 1.0, "layers": [
            {"op": "conv2d", "filters": 16, "kernel_size": 11, "padding": "same",
             "weights": {"init": "he_normal"}}]}, None, False),
        ({"input": {"channels": 3}, "precision": "int8", "max_error": 1.0, "layers": [
            {"op": "conv2d", "filters": 64, "kernel_size": 11, "padding": "same",
             "weights": {"init": "he_normal"}}]}, [8, 3, 160, 160], False),
    ],
    ids=["parameters", "images", "synthetic", "kernel_11", "kernel_11_wide"],
)  # fmt: skip
def test_measured_int8_bytes_hold(
    spec: dict[str, Any], shape: list[int] | None, check_steady: bool
) -> None:
    """The int8 constants the budgets charge (contract.limits) against what a build costs, both
    ways: never more than charged, and not far below."""
    measured = measure_session(spec, shape)
    assert measured["charged_peak"] / 1.5 <= measured["peak"] <= measured["charged_peak"] * 1.1
    if check_steady:
        assert measured["steady"] <= measured["charged_steady"] * 1.1


# --------------------------------------------------------------------------- the report


def test_error_measure_over_batches_is_measure_error() -> None:
    rng = np.random.default_rng(1)
    reference = {"a": rng.random((20, 5), np.float32), "b": rng.random((20, 2, 3), np.float32)}
    noisy = {name: (value + rng.normal(0, 0.01, value.shape)).astype(np.float32)
             for name, value in reference.items()}  # fmt: skip
    measure = ErrorMeasure()
    for start in (0, 7, 13):
        stop = {0: 7, 7: 13, 13: 20}[start]
        measure.add(
            {n: v[start:stop] for n, v in reference.items()},
            {n: v[start:stop] for n, v in noisy.items()},
        )
    assert measure.errors() == measure_error(reference, noisy)


def test_report_message_round_trip(registered: tuple[str, QuantizationReport]) -> None:
    _, report = registered
    assert report_from_message(report_message(report)) == report
    assert report.max_error_allowed == DEFAULT_MAX_ERROR
    assert list(report.errors) == ["block1", "features"]


def test_get_pipeline_reports_what_a_direct_measurement_gives(
    client: FeatureClient, registered: tuple[str, QuantizationReport]
) -> None:
    pipeline_id, report = registered
    info = client.get_pipeline("int8-features", include_model=True)
    assert (info.pipeline_id, info.precision, info.int8) == (pipeline_id, "int8", report)
    assert (report.calibration_images, report.synthetic_images) == (6, 16)
    model = onnx.ModelProto.FromString(info.onnx_model)
    properties = {p.key: p.value for p in model.metadata_props}
    assert properties["featmap.precision"] == "int8"
    assert properties["featmap.pipeline_id"] == pipeline_id == content_id(PIPELINE, {}, CALIBRATION)
    # The float32 model and the served int8 model on the calibration images, threads as the
    # server's (1): the same numbers the server reported.
    float_outputs = run_model(compile_pipeline(PIPELINE), CALIBRATION, threads=1)
    assert measure_error(float_outputs, run_model(model, CALIBRATION, threads=1)) == report.errors
    assert client.get_pipeline(client.register(README_SPEC)).precision == "float32"
    assert client.get_pipeline(client.register(README_SPEC)).int8 is None


def test_register_response_carries_the_report(
    server: FeatmapServer, registered: tuple[str, QuantizationReport]
) -> None:
    _, report = registered
    request = pb.RegisterPipelineRequest(spec_json=json.dumps(SPEC))
    request.calibration.CopyFrom(
        pb.Tensor(dtype=pb.FLOAT32, shape=CALIBRATION.shape, data=CALIBRATION.tobytes())
    )
    with grpc.insecure_channel(server.address) as channel:
        response = pb_grpc.FeatureExtractorStub(channel).RegisterPipeline(request, timeout=60)
    assert report_from_message(response.int8) == report
    assert response.int8.cpu and response.int8.max_error_allowed == DEFAULT_MAX_ERROR
    # The weights the server's CPU computes exactly, said in the reply (and so by GetPipeline).
    assert response.int8.weight_bits == weight_bits_for(cpu_int8_support()) == report.weight_bits


def test_too_large_an_error_is_refused(
    client: FeatureClient, registered: tuple[str, QuantizationReport]
) -> None:
    _, report = registered
    strict = {**SPEC, "max_error": 1e-6}
    measured = f"block1 max error {report.errors['block1'].max_error:.2%}"
    with pytest.raises(FeatmapRpcError) as caught:
        client.register(strict, calibration=CALIBRATION)
    error = caught.value
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "max_error")
    assert "max_error=0.00% on 6 calibration images" in error.details and measured in error.details
    with pytest.raises(FeatmapRpcError) as caught:  # inline: on the synthetic images
        client.extract(CALIBRATION, strict)
    error = caught.value
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "max_error")
    assert "on 16 synthetic images" in error.details


def test_a_refused_int8_spec_costs_its_quantization_once(server: FeatmapServer) -> None:
    # Refused for its measured error, an int8 spec is remembered by content id: sent again and
    # again (inline or registered), it is refused at once, and a second client keeps its pace.
    strict = {**SPEC, "max_error": 1e-5}
    small = np.random.default_rng(3).random((1, 3, 16, 16), np.float32)
    with FeatureClient(server.address, timeout=60, retries=0) as attacker:
        started = time.process_time()
        with pytest.raises(FeatmapRpcError) as first:
            attacker.extract(small, strict)
        quantizing = time.process_time() - started
        assert first.value.field == "max_error"
        latencies: list[float] = []
        done = threading.Event()

        def bystander() -> None:
            with FeatureClient(server.address, timeout=60) as other:
                while not done.is_set():
                    began = time.perf_counter()
                    other.extract(small, README_SPEC)
                    latencies.append(time.perf_counter() - began)

        watcher = threading.Thread(target=bystander)
        watcher.start()
        try:
            started = time.process_time()
            for _ in range(10):
                with pytest.raises(FeatmapRpcError) as again:
                    attacker.extract(small, strict)
                assert str(again.value) == str(first.value)
            with pytest.raises(FeatmapRpcError) as registered:
                attacker.register(strict)
            assert registered.value.details == first.value.details
            repeats = time.process_time() - started
        finally:
            done.set()
            watcher.join()
    print(f"first refusal {quantizing:.2f} s CPU, 11 more {repeats:.2f} s; bystander p50 "
          f"{statistics.median(latencies) * 1e3:.1f} ms over {len(latencies)} calls")  # fmt: skip
    assert repeats < quantizing  # eleven refusals cost less than one quantization
    assert latencies and statistics.median(latencies) < 0.25


def test_calibration_is_refused_where_it_has_no_place(client: FeatureClient) -> None:
    with pytest.raises(FeatmapRpcError) as caught:
        client.register(README_SPEC, calibration=CALIBRATION)
    assert (caught.value.code, caught.value.field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "calibration",
    )
    with pytest.raises(FeatmapRpcError) as caught:
        client.register(SPEC, calibration=CALIBRATION[:, :2])
    assert caught.value.field == "calibration.shape"


# --------------------------------------------------------------------------- every path


def test_unary_by_id_and_name(
    client: FeatureClient, registered: tuple[str, QuantizationReport]
) -> None:
    pipeline_id, report = registered
    for key in (pipeline_id, "int8-features"):
        outputs = client.extract(CALIBRATION, key)
        assert_within_reported(outputs, PIPELINE, CALIBRATION, report)


def test_inline_spec_uses_the_synthetic_calibration(client: FeatureClient) -> None:
    # Registered without calibration, the same spec is the same session as inline: its report
    # is what the inline spec measured, on the synthetic images.
    report = client.get_pipeline(client.register(SPEC)).int8
    assert report is not None and report.measured_on == "16 synthetic images"
    images = synthetic_calibration(compile_pipeline(PIPELINE))[::4]
    assert_within_reported(client.extract(images, SPEC), PIPELINE, images, report)


def test_stream(client: FeatureClient, registered: tuple[str, QuantizationReport]) -> None:
    pipeline_id, report = registered
    parts = list(client.extract_stream([CALIBRATION[:2], CALIBRATION[2:]], pipeline_id))
    outputs = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    assert_within_reported(outputs, PIPELINE, CALIBRATION, report)


def test_open_inference_protocol(
    server: FeatmapServer, registered: tuple[str, QuantizationReport]
) -> None:
    _, report = registered
    with grpc.insecure_channel(server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(infer_request("int8-features", CALIBRATION), timeout=60)
    assert_within_reported(decoded(response), PIPELINE, CALIBRATION, report)


def test_embedded_runner() -> None:
    runner = EmbeddedRunner(PIPELINE, threads=1, calibration=CALIBRATION)
    assert runner.report is not None and runner.report.max_error_allowed == DEFAULT_MAX_ERROR
    compiled = runner.target(CALIBRATION).compiled
    assert compiled is not None and compiled.providers == ["CPUExecutionProvider"]
    (outputs,) = runner.run([CALIBRATION])
    assert_within_reported(outputs, PIPELINE, CALIBRATION, runner.report)
    with pytest.raises(InvalidTensor):
        EmbeddedRunner(PIPELINE.with_precision("float32"), calibration=CALIBRATION)
    with pytest.raises(InvalidSpec) as caught:
        EmbeddedRunner(parse_pipeline({**SPEC, "max_error": 1e-6}))
    assert caught.value.field == "max_error"


def test_ray_feature_extractor(client: FeatureClient, registered: Any) -> None:
    _, report = registered
    embedded = FeatureExtractor(PIPELINE, threads=1, calibration=CALIBRATION)
    assert embedded.report == report
    batch = embedded({"image": CALIBRATION, "path": np.arange(6)})
    outputs = {name: batch[name] for name in PIPELINE.output_names}
    assert_within_reported(outputs, PIPELINE, CALIBRATION, report)
    remote = FeatureExtractor(SPEC, server=client.address, calibration=CALIBRATION)
    assert remote.report == report
    batch = remote({"image": CALIBRATION})
    assert_within_reported(
        {name: batch[name] for name in PIPELINE.output_names}, PIPELINE, CALIBRATION, report
    )
    remote.close()


# --------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five photo-like 24 x 24 PNGs, and a 1 x 1 one: too small for the pipeline, and of
    another size than the first (left out of the calibration images)."""
    folder = tmp_path_factory.mktemp("int8-pngs")
    for index, image in enumerate(calibration_images(count=5, size=24, seed=3)):
        pixels = np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"a{index}.png")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8), "RGB").save(folder / "b.png")
    return folder


def test_featmap_extract_embedded_and_remote(
    pngs: Path, tmp_path: Path, server: FeatmapServer, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({**SPEC, "precision": "float32"}))  # --precision says int8
    calibration = load_calibration([pngs], PIPELINE.input, 6, None)
    assert calibration.images is not None and len(calibration.images) == 5
    assert calibration.left_out == 1
    # Image files run through the pipeline's pixel variant, calibrated on their pixels.
    variant = pixel_pipeline(PIPELINE)
    expected = quantize_pipeline(variant, {}, calibration.images, threads=1).report
    common = ["--pipeline", str(spec_file), "--input", str(pngs), "--precision", "int8"]
    common += ["--calibrate", "6", "--threads", "1", "--on-error", "skip"]
    archives = {}
    for mode, extra in (("embedded", []), ("remote", ["--server", server.address])):
        output = tmp_path / f"{mode}.npz"
        quantized = server.service.cache.stats.quantized
        status = main(["extract", *common, "--output", str(output), *extra])
        assert status == 3  # b.png is too small for the pipeline: skipped, and said
        # The server quantizes the pixel variant the job runs, not the float one it never does.
        assert server.service.cache.stats.quantized - quantized == (mode == "remote")
        archives[mode] = np.load(output)
        stderr = capsys.readouterr().err
        assert "calibrating int8 on 5 of the first 6 inputs, (3, 24, 24) each" in stderr
        assert expected.describe().split(" (ranges")[0] in stderr
        assert str(archives[mode]["paths"][-1]).endswith("a4.png")
        assert archives[mode]["outputs"].tolist() == ["block1", "features"]
    # Every image extracted was a calibration image: within the reported error.
    outputs = {name: archives["embedded"][name] for name in PIPELINE.output_names}
    values = pixel_values(calibration.images, PIPELINE.input)
    assert_within_reported(outputs, PIPELINE, values, expected)
    for name in PIPELINE.output_names:  # the same int8 model on both sides
        np.testing.assert_allclose(archives["remote"][name], outputs[name], rtol=0, atol=1e-6)


def test_featmap_extract_refuses_calibrate_for_float32(
    pngs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    args = ["extract", "--pipeline", str(spec_file), "--input", str(pngs)]
    args += ["--output", str(tmp_path / "out.npz"), "--precision", "float32", "--calibrate", "2"]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert "--calibrate calibrates int8 pipelines" in capsys.readouterr().err


def test_featmap_summary(pngs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    assert main(["summary", "--pipeline", str(spec_file)]) == 0
    out = capsys.readouterr().out
    report = quantize_pipeline(PIPELINE).report
    assert "computed in int8" in out and "int8 vs float32 on 16 synthetic images" in out
    table = out.split("int8 vs float32")[1]
    row = next(line for line in table.splitlines() if line.startswith("features "))
    assert row.split()[1:3] == [f"{report.errors['features'].cosine:.6f}",
                                f"{report.errors['features'].max_error:.2%}"]  # fmt: skip
    assert "Within max_error=5.00%" in out
    assert f"CPU int8 dot products: {report.cpu}; weights: {report.weight_bits}-bit" in out
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps({**SPEC, "max_error": 1e-6}))
    args = ["summary", "--pipeline", str(strict), "--calibrate", str(pngs), "--input-size", "24"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # --input-size resizes image files: the 1 x 1 one calibrates too.
    assert "on 6 calibration images" in out and "Refused: max_error: int8 error exceeds" in out
    float32 = tmp_path / "float32.json"
    float32.write_text(json.dumps(README_SPEC))
    with pytest.raises(SystemExit) as exited:
        main(["summary", "--pipeline", str(float32), "--calibrate", str(pngs)])
    assert exited.value.code == 2


def test_export_onnx_writes_what_the_server_runs(tmp_path: Path) -> None:
    model = export_onnx(PIPELINE, tmp_path / "int8.onnx", weight_bits=None)
    served = SessionCache(1, [CPU], 1).compile(PIPELINE)
    assert (tmp_path / "int8.onnx").read_bytes() == model.SerializeToString() == served.model_bytes
    spec = tmp_path / "int8.json"
    spec.write_text(json.dumps(PIPELINE.model_dump(mode="json")))
    argv = ["export-onnx", "--pipeline", str(spec), "-o", str(tmp_path / "here.onnx")]
    assert main([*argv, "--int8-weights", "this-cpu"]) == 0
    assert (tmp_path / "here.onnx").read_bytes() == served.model_bytes


@pytest.mark.parametrize("bits", [None, 7, 8], ids=["default", "7", "8"])
def test_an_exported_int8_model_says_its_weights(tmp_path: Path, bits: int | None) -> None:
    # A file travels to CPUs of either class: by default its weights are exact on all of them.
    spec = tmp_path / "int8.json"
    spec.write_text(json.dumps(PIPELINE.model_dump(mode="json")))
    path = tmp_path / "int8.onnx"
    argv = ["export-onnx", "--pipeline", str(spec), "-o", str(path)]
    assert main(argv if bits is None else [*argv, "--int8-weights", str(bits)]) == 0
    model = onnx.load(str(path))
    assert model_properties(model)[WEIGHT_BITS_PROPERTY] == str(bits or 7)
    if bits == 8 and not has_int8_dot_products(cpu_int8_support()):
        with pytest.raises(Unsupported):
            check_int8_model_runs_here(model)
    else:
        check_int8_model_runs_here(model)


def test_export_onnx_standard_ops_gives_the_same_numbers(tmp_path: Path) -> None:
    # PIPELINE taps its first block's ReLU: that conv stays off the 2x2 blocks.
    pipeline = parse_pipeline({**SMALL_STANDARD, "precision": "int8"})
    served = export_onnx(pipeline, tmp_path / "int8.onnx")
    assert "com.microsoft" in {node.domain for node in served.graph.node}  # the 2x2 blocks
    spec = tmp_path / "int8.json"
    spec.write_text(json.dumps({**SMALL_STANDARD, "precision": "int8"}))
    portable = tmp_path / "portable.onnx"
    argv = ["export-onnx", "--pipeline", str(spec), "-o", str(portable), "--standard-ops"]
    assert main(argv) == 0
    standard = onnx.load(str(portable))
    assert {node.domain for node in standard.graph.node} == {""}
    assert {p.key: p.value for p in standard.metadata_props} == {
        p.key: p.value for p in served.metadata_props
    }
    images = calibration_images(count=3, size=18, seed=5)
    want, got = run_model(served, images), run_model(standard, images)
    for name in pipeline.output_names:
        np.testing.assert_array_equal(got[name], want[name])


def test_bench_int8_rows() -> None:
    lines: list[str] = []
    rows = run_int8_bench(
        threads=1, batch=2, size=32, seconds=0.05, job_images=2, rounds=1, log=lines.append
    )
    assert [row.path for row in rows] == [
        "onnxruntime in-process int8",
        "featmap unary int8",
        "featmap stream int8",
        "featmap extract int8 (embedded job, first run)",
        "featmap extract int8 (embedded job, repeat, cache warm)",
    ]
    assert all(row.images_per_s > 0 and math.isfinite(row.ratio) for row in rows)
    assert "CPU int8: " in rows[0].note and "CPU int8 dot products" in lines[0]


# --------------------------------------------------------------------------- batch_norm


def _batch_norm(channels: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "op": "batch_norm",
        "scale": {"values": rng.uniform(0.5, 1.5, channels).tolist()},
        "shift": {"values": rng.uniform(-0.2, 0.2, channels).tolist()},
        "mean": {"values": rng.uniform(-0.1, 0.1, channels).tolist()},
        "var": {"values": rng.uniform(0.5, 2.0, channels).tolist()},
    }


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "standalone"])
def test_batch_norm_in_int8(folded: bool) -> None:
    # Folded into the conv, it adds no node to quantize; after the ReLU it is a
    # BatchNormalization node, which has no int8 kernel and stays float32 between Q/DQ pairs.
    conv = {"op": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same",
            "weights": {"init": "he_normal", "seed": 1}}  # fmt: skip
    layers = [conv, _batch_norm(16, 2), {"op": "relu"}]
    if not folded:
        layers = [conv, {"op": "relu"}, _batch_norm(16, 2)]
    pipeline = parse_pipeline({"input": {"channels": 3}, "layers": [*layers,
                               {"op": "global_avg_pool2d", "name": "features"}]})  # fmt: skip
    quantized = quantize_pipeline(pipeline, calibration=CALIBRATION)
    op_types = [node.op_type for node in quantized.model.graph.node]
    assert op_types.count("BatchNormalization") == (0 if folded else 1)
    assert not any(t.startswith("QLinearBatch") for t in op_types)
    outputs = run_model(quantized.model, CALIBRATION)
    assert_within_reported(outputs, pipeline, CALIBRATION, quantized.report)
