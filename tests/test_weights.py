"""Weight sources: presets by hand, values reshaped as written, seeded inits reproducible."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from featmap.contract.errors import InvalidSpec
from featmap.contract.spec import (
    Conv2d,
    InitSource,
    parse_pipeline,
)
from featmap.service.weights import (
    gaussian_1d,
    layer_weights,
    pipeline_weights,
    standard_normal,
    uniform,
)


def conv_layer(**fields: Any) -> Conv2d:
    spec = {"op": "conv2d", "filters": 2, "kernel_size": 3, **fields}
    layer = parse_pipeline({"input": {"channels": 4}, "layers": [spec]}).layers[0]
    assert isinstance(layer, Conv2d)
    return layer


def test_sobel_x_fills_every_filter_and_channel() -> None:
    kernel = layer_weights(conv_layer(weights={"preset": "sobel_x"}), 4)["weights"]
    # (filters, in_channels, kh, kw) = (2, 4, 3, 3), each slice the 2D Sobel x kernel
    assert kernel.shape == (2, 4, 3, 3) and kernel.dtype == np.float32
    expected = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)
    for f in range(2):
        for c in range(4):
            np.testing.assert_array_equal(kernel[f, c], expected)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("sobel_y", [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]),
        ("laplacian", [[0, 1, 0], [1, -4, 1], [0, 1, 0]]),
        ("identity", [[0, 0, 0], [0, 1, 0], [0, 0, 0]]),
        ("box", [[1 / 9] * 3] * 3),
    ],
)
def test_fixed_presets(preset: str, expected: list[list[float]]) -> None:
    kernel = layer_weights(conv_layer(weights={"preset": preset}), 4)["weights"]
    np.testing.assert_allclose(kernel[1, 3], np.array(expected, dtype=np.float32), rtol=1e-7)


def test_depthwise_preset_has_one_channel_per_filter() -> None:
    layer = conv_layer(filters=4, groups=4, weights={"preset": "laplacian"})
    assert layer_weights(layer, 4)["weights"].shape == (4, 1, 3, 3)


def test_gaussian_default_sigma_follows_opencv() -> None:
    # OpenCV: sigma = 0.3 * ((3 - 1) * 0.5 - 1) + 0.8 = 0.8 for a 3-tap kernel
    g = gaussian_1d(3, None)
    side = math.exp(-1 / (2 * 0.8**2))
    np.testing.assert_allclose(g, np.array([side, 1, side]) / (1 + 2 * side))
    kernel = layer_weights(conv_layer(kernel_size=[3, 5], weights={"preset": "gaussian"}), 4)
    assert kernel["weights"].shape == (2, 4, 3, 5)
    np.testing.assert_allclose(kernel["weights"][0, 0].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        kernel["weights"][0, 0], kernel["weights"][0, 0][::-1, ::-1], rtol=1e-6
    )


def test_gaussian_sigma() -> None:
    g = gaussian_1d(5, 2.0)
    raw = np.exp(-(np.arange(-2, 3) ** 2) / 8.0)
    np.testing.assert_allclose(g, raw / raw.sum())


def test_values_keep_their_layout() -> None:
    values = np.arange(2 * 4 * 3 * 3, dtype=np.float64).reshape(2, 4, 3, 3) / 7
    layer = conv_layer(weights={"values": values.tolist()}, bias={"values": [0.5, -1.25]})
    parameters = layer_weights(layer, 4)
    np.testing.assert_array_equal(parameters["weights"], values.astype(np.float32))
    assert parameters.get("bias") is not None
    np.testing.assert_array_equal(parameters["bias"], np.array([0.5, -1.25], dtype=np.float32))


def test_uniform_is_the_top_53_bits_of_pcg64() -> None:
    raw = np.random.PCG64(7).random_raw(5)
    expected = [int(r) >> 11 for r in raw]
    np.testing.assert_array_equal(uniform(7, 5), np.array(expected, dtype=np.float64) / 2**53)


def test_seed_zero_stream_is_pinned() -> None:
    # PCG64(0)'s first raw words, written down: if NumPy ever changed PCG64 or SeedSequence,
    # every `init` in every saved pipeline would silently change with it.
    raw = [11749869230777074271, 4976686463289251617, 755828109848996024]
    np.testing.assert_array_equal(uniform(0, 3), np.array([r >> 11 for r in raw]) / 2**53)


def test_standard_normal_statistics() -> None:
    z = standard_normal(3, 200_001)
    assert z.shape == (200_001,)
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1) < 0.01


@pytest.mark.parametrize(
    ("init", "std"),
    [
        ("he_normal", math.sqrt(2 / (4 * 9))),
        ("he_uniform", math.sqrt(6 / (4 * 9)) / math.sqrt(3)),
        ("glorot_normal", math.sqrt(2 / (4 * 9 + 64 * 9))),
        ("glorot_uniform", math.sqrt(6 / (4 * 9 + 64 * 9)) / math.sqrt(3)),
    ],
)
def test_init_scales(init: str, std: float) -> None:
    # fan_in = in_channels/groups * kh * kw = 36; fan_out = filters * kh * kw = 576
    layer = conv_layer(filters=64, weights={"init": init, "seed": 11})
    kernel = layer_weights(layer, 4)["weights"]
    assert kernel.shape == (64, 4, 3, 3)
    assert abs(kernel.std() / std - 1) < 0.05
    if init.endswith("uniform"):
        assert np.abs(kernel).max() <= std * math.sqrt(3)


def test_inits_are_deterministic_and_seeded() -> None:
    a = layer_weights(conv_layer(weights={"init": "he_normal", "seed": 1}), 4)["weights"]
    b = layer_weights(conv_layer(weights={"init": "he_normal", "seed": 1}), 4)["weights"]
    c = layer_weights(conv_layer(weights={"init": "he_normal", "seed": 2}), 4)["weights"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_zeros_and_bias_init() -> None:
    layer = conv_layer(weights={"init": "zeros"}, bias={"init": "he_uniform", "seed": 5})
    parameters = layer_weights(layer, 4)
    assert not parameters["weights"].any()
    assert parameters.get("bias") is not None and parameters["bias"].shape == (2,)
    assert np.abs(parameters["bias"]).max() <= math.sqrt(6 / 36)


def test_pipeline_parameters_track_channels() -> None:
    pipeline = parse_pipeline(
        {
            "input": {"channels": 3},
            "layers": [
                {"op": "conv2d", "filters": 5, "kernel_size": 1, "weights": {"init": "zeros"}},
                {"op": "relu"},
                {"op": "conv2d", "filters": 2, "kernel_size": 3, "weights": {"preset": "box"}},
            ],
        }
    )
    parameters = pipeline_weights(pipeline)
    assert sorted(parameters) == [0, 2]
    assert parameters[0]["weights"].shape == (5, 3, 1, 1)
    assert parameters[2]["weights"].shape == (2, 5, 3, 3)


def test_init_source_defaults_seed_zero() -> None:
    assert InitSource(init="zeros").seed == 0


def test_a_batch_norm_variance_tensor_must_keep_var_plus_epsilon_positive() -> None:
    spec = {
        "input": {"channels": 2},
        "layers": [
            {"op": "batch_norm", "scale": {"tensor": "s"}, "shift": {"tensor": "b"},
             "mean": {"tensor": "m"}, "var": {"tensor": "v"}, "epsilon": 0.5},
        ],
    }  # fmt: skip
    pipeline = parse_pipeline(spec)
    ones = np.ones(2, np.float32)
    good = {"s": ones, "b": ones, "m": ones, "v": np.array([0.0, -0.25], np.float32)}
    assert sorted(pipeline_weights(pipeline, good)[0]) == ["mean", "scale", "shift", "var"]
    bad = {**good, "v": np.array([1.0, -0.5], np.float32)}  # -0.5 + 0.5 is not > 0
    with pytest.raises(InvalidSpec) as caught:
        pipeline_weights(pipeline, bad)
    assert caught.value.field == "layers[0].var"
