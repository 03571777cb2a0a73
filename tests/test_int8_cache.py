"""int8 in the job: quantized models kept on disk (service.int8.cache) by the job and the server,
and uint8 pixels fed straight into the quantized graph (passes.pixels_as_quantized_input), each
against the NumPy reference within the error the report states."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from featmap.contract.pixels import PIXEL_SCALE, pixel_pipeline
from featmap.contract.spec import content_id, parse_pipeline
from featmap.jobs.cli import main
from featmap.jobs.runners import EmbeddedRunner
from featmap.service.int8 import DEFAULT_SETTINGS, Int8Settings, quantize_pipeline, run_model
from featmap.service.int8.cache import ENTRY_SUFFIX, QuantizedModelCache, quantized_key
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from tests.test_int8 import CALIBRATION, PIPELINE, SPEC, pngs  # noqa: F401 (a fixture)
from tests.test_quantize import assert_within_reported

PIXELS = np.round(CALIBRATION * 255).astype(np.uint8)  # (6, 3, 16, 16)


def entries(folder: Path) -> list[Path]:
    """The cache entries in a folder."""
    return sorted(folder.glob(f"*{ENTRY_SUFFIX}"))


# --------------------------------------------------------------------------- uint8 pixels


def input_readers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes that read the model's input."""
    name = model.graph.input[0].name
    return [node for node in model.graph.node if name in node.input]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_pixels_are_the_quantized_input(layout: str) -> None:
    pipeline = parse_pipeline({**SPEC, "input": {"channels": 3, "layout": layout}})
    variant = pixel_pipeline(pipeline)
    pixels = PIXELS if layout == "NCHW" else np.ascontiguousarray(PIXELS.transpose(0, 2, 3, 1))
    quantized = quantize_pipeline(variant, {}, pixels, threads=1)
    model = quantized.model
    # No Cast, Mul or QuantizeLinear: the pixels (moved as uint8 by NHWC's Transpose) are read
    # by the quantized ops themselves, with the scale 1/255 and the zero point 0.
    assert "Cast" not in {node.op_type for node in model.graph.node}
    (reader,) = input_readers(model)
    assert reader.op_type != "Cast"
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # Past the nodes that move bytes (the layout's Transpose, the channel Pad), the first
    # node that reads quantized values: its input scale and zero point are the pixels'.
    while reader.op_type in ("Transpose", "Pad", "Shape"):
        (reader,) = [node for node in model.graph.node if reader.output[0] in node.input[:1]]
    assert reader.op_type in ("DequantizeLinear", "QLinearConv")
    assert initializers[reader.input[1]] == np.float32(PIXEL_SCALE)
    assert initializers[reader.input[2]] == 0
    # The features are the reference's within the reported error, on the images it measured.
    outputs = run_model(model, pixels, threads=1)
    assert_within_reported(outputs, variant, pixels, quantized.report)
    # Without the pass the Cast stays. (Its error is no bound for the pass's: the two round
    # differently downstream, and either may measure the larger maximum.)
    plain = quantize_pipeline(
        variant, {}, pixels, threads=1, settings=Int8Settings(pixel_input=False)
    )
    assert input_readers(plain.model)[0].op_type == "Cast"


def test_mean_and_std_keep_the_float_input() -> None:
    # (p/255 - mean) / std per channel is no per-tensor uint8 quantization of p: left as it is.
    normalized = {"channels": 3, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    variant = pixel_pipeline(parse_pipeline({**SPEC, "input": normalized}))
    quantized = quantize_pipeline(variant, {}, PIXELS, threads=1)
    assert input_readers(quantized.model)[0].op_type == "Cast"
    assert_within_reported(
        run_model(quantized.model, PIXELS, threads=1), variant, PIXELS, quantized.report
    )


# --------------------------------------------------------------------------- the disk cache


def test_a_repeat_job_quantizes_nothing(tmp_path: Path) -> None:
    first = EmbeddedRunner(PIPELINE, threads=1, calibration=CALIBRATION, int8_cache_dir=tmp_path)
    stats = first.extractor.cache.stats
    assert (stats.quantized, stats.quantized_from_disk) == (1, 0)
    assert first.int8_source == "quantized" and len(entries(tmp_path)) == 1
    again = EmbeddedRunner(PIPELINE, threads=1, calibration=CALIBRATION, int8_cache_dir=tmp_path)
    stats = again.extractor.cache.stats
    assert (stats.quantized, stats.quantized_from_disk) == (0, 1)
    assert again.int8_source == "disk cache"
    # The report came with the model, checked against the spec's threshold as a fresh one is.
    assert again.report == first.report and again.report is not None
    (fresh,) = first.run([CALIBRATION])
    (cached,) = again.run([CALIBRATION])
    for name in PIPELINE.output_names:
        np.testing.assert_array_equal(cached[name], fresh[name])
    assert_within_reported(cached, PIPELINE, CALIBRATION, again.report)
    # Other calibration images are another pipeline: quantized, and kept beside the first.
    other = EmbeddedRunner(
        PIPELINE, threads=1, calibration=CALIBRATION[:3], int8_cache_dir=tmp_path
    )
    assert other.int8_source == "quantized" and len(entries(tmp_path)) == 2


def test_the_key_covers_what_changes_the_bytes() -> None:
    pipeline_id = content_id(PIPELINE, {}, CALIBRATION)
    key = quantized_key(pipeline_id, DEFAULT_SETTINGS, "avx512_vnni")
    assert key == quantized_key(pipeline_id, DEFAULT_SETTINGS, "avx512_vnni")
    others = {
        quantized_key(pipeline_id, DEFAULT_SETTINGS, "none"),  # 7-bit weights
        quantized_key(pipeline_id, DEFAULT_SETTINGS, "amx_int8 avx512_vnni"),  # the report's CPU
        quantized_key(pipeline_id, Int8Settings(headroom=1.5), "avx512_vnni"),
        quantized_key(pipeline_id, Int8Settings(pixel_input=False), "avx512_vnni"),
        quantized_key(content_id(PIPELINE, {}, CALIBRATION[:3]), DEFAULT_SETTINGS, "avx512_vnni"),
    }
    assert key not in others and len(others) == 5


@pytest.mark.parametrize("damage", ["flipped", "truncated", "foreign", "oversized"])
def test_a_damaged_entry_is_ignored_logged_and_rebuilt(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    EmbeddedRunner(PIPELINE, threads=1, calibration=CALIBRATION, int8_cache_dir=tmp_path)
    (entry,) = entries(tmp_path)
    content = entry.read_bytes()
    cache = QuantizedModelCache(tmp_path)
    if damage == "flipped":
        entry.write_bytes(content[:-100] + bytes([content[-100] ^ 1]) + content[-99:])
    elif damage == "truncated":
        entry.write_bytes(content[: len(content) // 2])
    elif damage == "foreign":
        entry.write_bytes(b"\x00" * len(content))
    else:
        cache = QuantizedModelCache(tmp_path, max_entry_bytes=len(content) - 1)
    with caplog.at_level(logging.WARNING, logger="featmap.service.int8.cache"):
        assert cache.load(entry.stem) is None
    assert f"ignoring {entry}" in caplog.text
    if damage == "oversized":
        return
    rebuilt = EmbeddedRunner(PIPELINE, threads=1, calibration=CALIBRATION, int8_cache_dir=tmp_path)
    assert rebuilt.int8_source == "quantized"
    assert entry.read_bytes() == content  # replaced by a whole entry
    assert cache.load(entry.stem) is not None


def test_concurrent_writers_leave_one_whole_entry(tmp_path: Path) -> None:
    runner = EmbeddedRunner(PIPELINE, threads=1, calibration=CALIBRATION, int8_cache_dir=tmp_path)
    (entry,) = entries(tmp_path)
    cached = QuantizedModelCache(tmp_path).load(entry.stem)
    assert cached is not None and runner.report is not None
    # Eight writers of one key, each with other model bytes, and a reader throughout.
    bodies = [cached.model_bytes + bytes([index]) * 1000 for index in range(8)]
    seen: list[bytes] = []
    writing = threading.Event()

    def write(body: bytes) -> None:
        for _ in range(5):
            assert QuantizedModelCache(tmp_path).store("key", body, cached.report) is not None

    def read() -> None:
        while writing.is_set():
            loaded = QuantizedModelCache(tmp_path).load("key")
            if loaded is not None:
                seen.append(loaded.model_bytes)

    writing.set()
    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(body,)) for body in bodies]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    writing.clear()
    reader.join()
    final = QuantizedModelCache(tmp_path).load("key")
    assert final is not None and final.model_bytes in bodies and final.report == cached.report
    assert all(body in bodies for body in seen)  # never half of one
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.name, f"key{ENTRY_SUFFIX}"])


def extract_args(images: Path, tmp_path: Path, *extra: str) -> list[str]:
    """`featmap extract` of the int8 test pipeline over `images`, one core."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    output = tmp_path / f"out{len(list(tmp_path.glob('out*')))}.npz"
    return ["extract", "--pipeline", str(spec_file), "--input", str(images), "--output",
            str(output), "--threads", "1", "--on-error", "skip", *extra]  # fmt: skip


def test_featmap_extract_cache_flags(
    pngs: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
    private_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def run(*extra: str) -> tuple[str, dict[str, Any]]:
        arguments = extract_args(pngs, tmp_path, *extra)
        assert main(arguments) == 3  # pngs' 1 x 1 image is skipped
        archive = np.load(arguments[arguments.index("--output") + 1])
        return capsys.readouterr().err, {name: archive[name] for name in PIPELINE.output_names}

    # The default: the user's cache folder (here the test's own, FEATMAP_CACHE_DIR).
    stderr, first = run()
    assert "int8 calibrated, quantized and measured in" in stderr
    assert f"kept in {private_cache_dir}" in stderr and len(entries(private_cache_dir)) == 1
    stderr, again = run()
    assert f"int8 model read from the cache in {private_cache_dir}" in stderr
    for name in PIPELINE.output_names:
        np.testing.assert_array_equal(again[name], first[name])
    folder = tmp_path / "elsewhere"
    stderr, _ = run("--cache-dir", str(folder))
    assert f"kept in {folder}" in stderr and len(entries(folder)) == 1
    for off in (["--no-cache"], ["--cache-dir", "none"]):
        stderr, _ = run(*off)
        assert "(no cache: --no-cache)" in stderr
    assert len(entries(private_cache_dir)) == len(entries(folder)) == 1


def test_the_server_reads_and_writes_the_cache(tmp_path: Path) -> None:
    # A job's entry serves the server: same pipeline, weights and calibration, same key.
    EmbeddedRunner(PIPELINE, threads=1, calibration=CALIBRATION, int8_cache_dir=tmp_path)
    settings = ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=2)
    with FeatmapServer(settings.model_copy(update={"int8_cache_dir": tmp_path})) as running:
        from featmap.client import FeatureClient

        with FeatureClient(running.address, timeout=60) as client:
            pipeline_id = client.register(SPEC, calibration=CALIBRATION)
            report = client.get_pipeline(pipeline_id).int8
            outputs = client.extract(CALIBRATION, pipeline_id)
        stats = running.service.cache.stats
        assert (stats.quantized, stats.quantized_from_disk) == (0, 1)
    assert report is not None
    assert_within_reported(outputs, PIPELINE, CALIBRATION, report)
