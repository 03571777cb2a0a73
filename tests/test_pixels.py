"""Image pixels as pipeline input: the rule, and the pixel variant's features vs the float path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from featmap.contract.pixels import PIXEL_SCALE, image_values, pixel_pipeline
from featmap.contract.spec import Pipeline, parse_pipeline
from featmap.contract.tensors import from_hwc
from featmap.service.reference import reference_outputs
from tests.conftest import README_SPEC, assert_matches_reference, run_onnx

FLOAT32_SPEC = README_SPEC
NORMALIZED_SPEC: dict[str, Any] = {
    **README_SPEC,
    "input": {"channels": 3, "layout": "NHWC", "mean": [0.485, 0.456, 0.406], "std": 0.229},
}
SCALED_SPEC: dict[str, Any] = {
    **README_SPEC,
    "input": {"channels": 3, "scale": 0.0125, "mean": 1.5},
}
FLOAT16_SPEC: dict[str, Any] = {**README_SPEC, "input": {"channels": 3, "dtype": "float16"}}


def pixels_of(pipeline: Pipeline, count: int = 3, seed: int = 0) -> list[np.ndarray]:
    """(H, W, C) uint8 images, every value 0..255 present."""
    rng = np.random.default_rng(seed)
    shape = (13, 11, pipeline.input.channels)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
    images[0].reshape(-1)[:256] = np.arange(256)
    return images


def float_path(pipeline: Pipeline, pixels: list[np.ndarray]) -> np.ndarray:
    """The batch the pipeline's own rule gives for these pixels."""
    return np.stack([image_values(p, pipeline.input) for p in pixels])


def pixel_path(pipeline: Pipeline, pixels: list[np.ndarray]) -> np.ndarray:
    """The uint8 batch the pixel variant takes: the pixels in the pipeline's layout."""
    return np.stack([from_hwc(p, pipeline.input.layout) for p in pixels])


def test_the_variant_takes_uint8_and_folds_in_the_division() -> None:
    pipeline = parse_pipeline(NORMALIZED_SPEC)
    variant = pixel_pipeline(pipeline)
    assert variant.input.dtype == "uint8"
    assert variant.input.scale == PIXEL_SCALE
    assert (variant.input.mean, variant.input.std) == (pipeline.input.mean, pipeline.input.std)
    assert variant.layers == pipeline.layers and variant.output_names == pipeline.output_names
    assert variant.pipeline_id != pipeline.pipeline_id
    assert pixel_pipeline(parse_pipeline(SCALED_SPEC)).input.scale == 0.0125  # kept
    uint8 = pixel_pipeline(variant)
    assert uint8 is variant  # a uint8 pipeline is its own variant


@pytest.mark.parametrize("spec", [FLOAT32_SPEC, NORMALIZED_SPEC], ids=["plain", "mean-std-nhwc"])
def test_variant_features_equal_the_float_path_to_float32_rounding(spec: dict[str, Any]) -> None:
    pipeline = parse_pipeline(spec)
    pixels = pixels_of(pipeline)
    floats = float_path(pipeline, pixels)
    by_float = run_onnx(pipeline, floats)
    by_pixels = run_onnx(pixel_pipeline(pipeline), pixel_path(pipeline, pixels))
    # Both against the reference on the float path's input (float32(p / 255))...
    assert_matches_reference(by_float, pipeline, floats)
    assert_matches_reference(by_pixels, pipeline, floats)
    # ...and against each other: the inputs differ by at most one unit in the last place, so
    # the features differ by a few float32 roundings of their magnitude, no more.
    for name, want in by_float.items():
        tolerance = 8 * np.finfo(np.float32).eps * max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(by_pixels[name], want, rtol=0, atol=tolerance, err_msg=name)


def test_the_variants_input_is_within_an_ulp_of_the_float_paths() -> None:
    # The NumPy reference of the variant computes p * float64(float32(1/255)).
    pipeline = parse_pipeline(FLOAT32_SPEC)
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(3, axis=1)
    exact = pixels / 255.0
    by_rule = float_path(pipeline, [p for p in pixels.transpose(0, 2, 3, 1)]).astype(np.float64)
    scale = np.float64(np.float32(PIXEL_SCALE))
    ulp = np.spacing(np.float32(1.0)) * np.maximum(exact, 1e-30)
    assert np.all(np.abs(by_rule - exact) <= ulp)
    assert np.all(np.abs(pixels * scale - exact) <= ulp)
    want = reference_outputs(pipeline, by_rule.astype(np.float32))
    got = reference_outputs(pixel_pipeline(pipeline), pixels)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_with_input_scale_the_variant_is_exact() -> None:
    pipeline = parse_pipeline(SCALED_SPEC)
    pixels = pixels_of(pipeline)
    by_float = run_onnx(pipeline, float_path(pipeline, pixels))
    by_pixels = run_onnx(pixel_pipeline(pipeline), pixel_path(pipeline, pixels))
    for name in by_float:
        np.testing.assert_array_equal(by_pixels[name], by_float[name], err_msg=name)


def test_float16_pipelines_variant_skips_the_float16_rounding() -> None:
    pipeline = parse_pipeline(FLOAT16_SPEC)
    pixels = pixels_of(pipeline)
    exact = np.stack([from_hwc(p, "NCHW") for p in pixels]) / 255.0
    by_float = run_onnx(pipeline, float_path(pipeline, pixels))
    by_pixels = run_onnx(pixel_pipeline(pipeline), pixel_path(pipeline, pixels))
    reference = reference_outputs(pipeline, exact)  # on the exact pixel values
    for name, want in reference.items():
        assert np.abs(by_pixels[name] - want).max() <= np.abs(by_float[name] - want).max()
    assert_matches_reference(by_pixels, pixel_pipeline(pipeline), pixel_path(pipeline, pixels))
