"""onnxruntime vs the NumPy reference: shape, then dtype, then values.

A parametrized matrix walks every op and every option of it over several image sizes (odd ones
included, so SAME padding meets both parities), then hypothesis throws random valid pipelines at
both. A combination `layer_costs` rejects for an image size is skipped for that size, and
`test_the_matrix_mostly_runs` checks that the skips stay a small part of the matrix.
"""

from __future__ import annotations

import itertools
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from featmap.contract.errors import InvalidSpec
from featmap.contract.ops import layer_costs
from featmap.contract.spec import (
    Pipeline,
    parse_pipeline,
)
from tests.conftest import assert_matches_reference, run_onnx

# (height, width): odd and even, square and not, so SAME pads 0, 1 or 2 pixels per side.
IMAGE_SIZES = [(7, 9), (8, 8), (5, 6)]
BATCH = 2


def random_images(pipeline: Pipeline, batch: int, height: int, width: int, seed: int) -> np.ndarray:
    """Images in the pipeline's layout and dtype: uint8 0..255, floats around 0."""
    spec = pipeline.input
    rng = np.random.default_rng(seed)
    shape = (
        (batch, spec.channels, height, width)
        if spec.layout == "NCHW"
        else (batch, height, width, spec.channels)
    )
    if spec.dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.normal(0.0, 2.0, size=shape).astype(spec.dtype)


def fits(pipeline: Pipeline, height: int, width: int) -> bool:
    """Whether every layer's output is non-empty (and pool padding legal) for this image."""
    try:
        layer_costs(pipeline, height, width)
    except InvalidSpec:
        return False
    return True


def check_sizes(spec: dict[str, Any], case_id: str) -> None:
    """onnxruntime == reference for each image size the spec accepts; skip if it accepts none."""
    pipeline = parse_pipeline(spec)
    ran = 0
    for height, width in IMAGE_SIZES:
        if not fits(pipeline, height, width):
            continue
        seed = zlib.crc32(f"{case_id}/{height}x{width}".encode())
        images = random_images(pipeline, BATCH, height, width, seed)
        assert_matches_reference(run_onnx(pipeline, images), pipeline, images)
        ran += 1
    if not ran:
        pytest.skip(f"layer_costs rejects every image size in {IMAGE_SIZES}")


def single_layer(layer: dict[str, Any], channels: int) -> dict[str, Any]:
    """A one-layer spec over float32 NCHW images."""
    return {"input": {"channels": channels}, "layers": [layer]}


# --------------------------------------------------------------------------- conv2d matrix

CONV_CHANNELS = 4
KERNELS: dict[str, Any] = {"k1": 1, "k2": 2, "k3": 3, "k5": 5, "k3x1": [3, 1]}
STRIDES: dict[str, Any] = {"s1": 1, "s2": 2, "s3": 3, "s2x1": [2, 1]}
PADDINGS: dict[str, Any] = {
    "same": "same",
    "same_lower": "same_lower",
    "valid": "valid",
    "pad1": 1,
    "pad0121": [0, 1, 2, 1],
}
DILATIONS: dict[str, Any] = {"d1": 1, "d2": 2, "d1x2": [1, 2]}
# (groups, filters) over the 4 input channels: dense 4 -> 3; two groups of 2 channels, 3 filters
# each; depthwise, one filter per channel.
GROUPS: dict[str, tuple[int, int]] = {"g1": (1, 3), "g2": (2, 6), "depthwise": (4, 4)}
BIASES = ["no_bias", "bias_values", "bias_init"]


def conv_spec(
    kernel: Any, stride: Any, padding: Any, dilation: Any, groups: tuple[int, int], bias: str
) -> dict[str, Any]:
    group_count, filters = groups
    layer: dict[str, Any] = {
        "op": "conv2d",
        "filters": filters,
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": group_count,
        "weights": {"init": "he_normal", "seed": 11},
    }
    if bias == "bias_values":
        layer["bias"] = {"values": [0.25 * i - 0.5 for i in range(filters)]}
    elif bias == "bias_init":
        layer["bias"] = {"init": "glorot_uniform", "seed": 5}
    return single_layer(layer, CONV_CHANNELS)


CONV_CASES = [
    pytest.param(
        conv_spec(KERNELS[k], STRIDES[s], PADDINGS[p], DILATIONS[d], GROUPS[g], b),
        id="-".join((k, s, p, d, g, b)),
    )
    for k, s, p, d, g, b in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS, GROUPS, BIASES)
]


@pytest.mark.parametrize("spec", CONV_CASES)
def test_conv2d(spec: dict[str, Any], request: pytest.FixtureRequest) -> None:
    check_sizes(spec, request.node.callspec.id)


# --------------------------------------------------------------------------- pooling matrix

POOL_CHANNELS = 3
POOL_SIZES: dict[str, Any] = {"p2": 2, "p3": 3, "p2x3": [2, 3]}
# stride 3 is larger than pool 2 (and than one axis of [2, 3]): pixels no window reaches.
POOL_STRIDES: dict[str, Any] = {"s_default": None, "s1": 1, "s2": 2, "s3": 3}
POOL_PADDINGS: dict[str, Any] = {
    "same": "same",
    "same_lower": "same_lower",
    "valid": "valid",
    "pad1": 1,
    "pad1001": [1, 0, 0, 1],
}


def pool_cases(op: str) -> list[Any]:
    include_pad = [False, True] if op == "avg_pool2d" else [False]
    cases = []
    for size, stride, padding, ceil, count in itertools.product(
        POOL_SIZES, POOL_STRIDES, POOL_PADDINGS, [False, True], include_pad
    ):
        if ceil and padding in ("same", "same_lower"):
            continue  # the spec rejects it: ceil_mode has no effect with same padding
        layer: dict[str, Any] = {
            "op": op,
            "pool_size": POOL_SIZES[size],
            "padding": POOL_PADDINGS[padding],
            "ceil_mode": ceil,
        }
        if POOL_STRIDES[stride] is not None:
            layer["stride"] = POOL_STRIDES[stride]
        if op == "avg_pool2d":
            layer["count_include_pad"] = count
        words = [size, stride, padding, "ceil" if ceil else "floor"]
        if op == "avg_pool2d":
            words.append("include_pad" if count else "exclude_pad")
        cases.append(pytest.param(single_layer(layer, POOL_CHANNELS), id="-".join(words)))
    return cases


MAX_POOL_CASES = pool_cases("max_pool2d")
AVG_POOL_CASES = pool_cases("avg_pool2d")


@pytest.mark.parametrize("spec", MAX_POOL_CASES)
def test_max_pool2d(spec: dict[str, Any], request: pytest.FixtureRequest) -> None:
    check_sizes(spec, request.node.callspec.id)


@pytest.mark.parametrize("spec", AVG_POOL_CASES)
def test_avg_pool2d(spec: dict[str, Any], request: pytest.FixtureRequest) -> None:
    check_sizes(spec, request.node.callspec.id)


def dilated_pool_cases() -> list[Any]:
    """max and avg pooling with dilation: valid and explicit padding, floor and ceil, and both
    SAME rules (stride 1: the spec refuses SAME with dilation and a larger stride)."""
    cases = []
    paddings: dict[str, Any] = {"valid": "valid", "pad1": 1, "same": "same", "lower": "same_lower"}
    for op, dilation, padding, ceil in itertools.product(
        ("max_pool2d", "avg_pool2d"), ("d2", "d1x2"), paddings, (False, True)
    ):
        same = padding in ("same", "lower")
        if same and ceil:
            continue
        layer: dict[str, Any] = {
            "op": op,
            "pool_size": 2,
            "dilation": 2 if dilation == "d2" else [1, 2],
            "padding": paddings[padding],
            "stride": 1 if same else 2 if ceil else [1, 2],
            "ceil_mode": ceil,
        }
        if op == "avg_pool2d":
            layer["count_include_pad"] = padding == "pad1" and ceil
        words = [op, dilation, padding, "ceil" if ceil else "floor"]
        cases.append(pytest.param(single_layer(layer, POOL_CHANNELS), id="-".join(words)))
    return cases


DILATED_POOL_CASES = dilated_pool_cases()


@pytest.mark.parametrize("spec", DILATED_POOL_CASES)
def test_dilated_pools(spec: dict[str, Any], request: pytest.FixtureRequest) -> None:
    check_sizes(spec, request.node.callspec.id)


def test_the_matrix_mostly_runs() -> None:
    """Skipped (case, image size) pairs stay few: the matrix tests what it says it tests."""
    for name, cases, expected_cases, at_least in [
        ("conv2d", CONV_CASES, 5 * 4 * 5 * 3 * 3 * 3, 0.85),
        ("max_pool2d", MAX_POOL_CASES, 3 * 4 * 5 * 2 - 2 * 3 * 4, 0.9),
        ("avg_pool2d", AVG_POOL_CASES, 2 * (3 * 4 * 5 * 2 - 2 * 3 * 4), 0.9),
        ("dilated pools", DILATED_POOL_CASES, 2 * 2 * (2 * 2 + 2), 0.75),
    ]:
        assert len(cases) == expected_cases, name
        pipelines = [parse_pipeline(case.values[0]) for case in cases]
        ran = sum(fits(p, h, w) for p in pipelines for h, w in IMAGE_SIZES)
        fraction = ran / (len(pipelines) * len(IMAGE_SIZES))
        assert fraction >= at_least, f"{name}: only {fraction:.0%} of the matrix runs"


# --------------------------------------------------------------------------- other ops


OTHER_CASES = [
    pytest.param({"op": "relu"}, id="relu"),
    *(
        pytest.param({"op": "leaky_relu", "alpha": alpha}, id=f"leaky_relu_{alpha}")
        for alpha in (0.0, 0.01, 0.3, 1.0, 2.5)
    ),
    pytest.param({"op": "leaky_relu"}, id="leaky_relu_default"),
    pytest.param({"op": "global_avg_pool2d"}, id="global_avg_pool2d"),
    pytest.param({"op": "global_max_pool2d"}, id="global_max_pool2d"),
    pytest.param({"op": "flatten"}, id="flatten"),
]


# batch_norm alone, after a conv (folded into it), and after a conv whose output is requested
# (so it stays a BatchNormalization node).
BATCH_NORM_LAYER: dict[str, Any] = {
    "op": "batch_norm",
    "name": "bn",
    "scale": {"values": [1.5, -0.5, 2.0]},
    "shift": {"init": "he_normal", "seed": 4},
    "mean": {"values": [0.25, -1.0, 0.0]},
    "var": {"values": [0.5, 2.0, 0.0]},
    "epsilon": 1e-3,
}
BN_CONV: dict[str, Any] = {
    "op": "conv2d",
    "name": "conv",
    "filters": 3,
    "kernel_size": 3,
    "padding": "same",
    "weights": {"init": "he_normal", "seed": 1},
}
BATCH_NORM_CASES = [
    pytest.param(single_layer(BATCH_NORM_LAYER, 3), id="batch_norm_alone"),
    pytest.param(
        {"input": {"channels": 2}, "layers": [BN_CONV, BATCH_NORM_LAYER]}, id="batch_norm_folded"
    ),
    pytest.param(
        {
            "input": {"channels": 2},
            "layers": [{**BN_CONV, "bias": {"values": [1, 2, 3]}}, BATCH_NORM_LAYER],
        },
        id="batch_norm_folded_with_bias",
    ),
    pytest.param(
        {
            "input": {"channels": 2},
            "layers": [BN_CONV, BATCH_NORM_LAYER, {"op": "relu"}],
            "outputs": ["conv", "bn", "relu_2"],
        },
        id="batch_norm_after_a_requested_conv",
    ),
]


@pytest.mark.parametrize("spec", BATCH_NORM_CASES)
def test_batch_norm(spec: dict[str, Any], request: pytest.FixtureRequest) -> None:
    check_sizes(spec, request.node.callspec.id)


@pytest.mark.parametrize("layer", OTHER_CASES)
def test_elementwise_global_and_flatten(
    layer: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    check_sizes(single_layer(layer, 3), request.node.callspec.id)


# --------------------------------------------------------------------------- weights

INITS = ["he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "zeros"]


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("init", INITS)
def test_weight_inits(init: str, seed: int, request: pytest.FixtureRequest) -> None:
    layer = {
        "op": "conv2d",
        "filters": 3,
        "kernel_size": [3, 2],
        "padding": "same",
        "weights": {"init": init, "seed": seed},
        "bias": {"init": init, "seed": seed + 1},
    }
    check_sizes(single_layer(layer, 2), request.node.callspec.id)


def test_weight_values() -> None:
    kernel = np.random.default_rng(3).uniform(-1, 1, size=(4, 2, 2, 3)).round(4)
    layer = {
        "op": "conv2d",
        "filters": 4,
        "kernel_size": [2, 3],
        "padding": [1, 0, 1, 2],
        "weights": {"values": kernel.tolist()},
        "bias": {"values": [1.0, -1.0, 0.5, 0.0]},
    }
    check_sizes(single_layer(layer, 2), "values")


PRESET_CASES = [
    pytest.param({"preset": preset}, 3, id=preset) for preset in ("sobel_x", "sobel_y", "laplacian")
] + [
    pytest.param({"preset": "gaussian"}, 3, id="gaussian_3"),
    pytest.param({"preset": "gaussian"}, 5, id="gaussian_5"),
    pytest.param({"preset": "gaussian"}, [3, 5], id="gaussian_3x5"),
    pytest.param({"preset": "gaussian", "sigma": 1.5}, 5, id="gaussian_5_sigma1.5"),
    pytest.param({"preset": "gaussian", "sigma": 0.3}, 2, id="gaussian_2_sigma0.3"),
    pytest.param({"preset": "box"}, 1, id="box_1"),
    pytest.param({"preset": "box"}, 2, id="box_2"),
    pytest.param({"preset": "box"}, 3, id="box_3"),
    pytest.param({"preset": "box"}, [2, 5], id="box_2x5"),
    pytest.param({"preset": "identity"}, 1, id="identity_1"),
    pytest.param({"preset": "identity"}, 3, id="identity_3"),
    pytest.param({"preset": "identity"}, 5, id="identity_5"),
    pytest.param({"preset": "identity"}, [3, 5], id="identity_3x5"),
]


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(("weights", "kernel"), PRESET_CASES)
def test_presets(
    weights: dict[str, Any], kernel: Any, groups: int, request: pytest.FixtureRequest
) -> None:
    layer = {
        "op": "conv2d",
        "filters": 2,
        "kernel_size": kernel,
        "padding": "same",
        "groups": groups,
        "weights": weights,
    }
    check_sizes(single_layer(layer, 2), request.node.callspec.id)


# --------------------------------------------------------------------------- input


NORMALIZATIONS: dict[str, dict[str, Any]] = {
    "raw": {},
    "scale": {"scale": 1 / 255},
    "per_channel": {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "scalar": {"mean": 0.5, "std": 2.0},
}


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_input_preprocessing(
    layout: str, dtype: str, normalization: str, request: pytest.FixtureRequest
) -> None:
    spec = {
        "input": {"channels": 3, "layout": layout, "dtype": dtype, **NORMALIZATIONS[normalization]},
        "layers": [
            {
                "op": "conv2d",
                "name": "conv",
                "filters": 2,
                "kernel_size": 3,
                "stride": 2,
                "padding": "same",
                "weights": {"init": "glorot_uniform", "seed": 2},
            },
            {"op": "max_pool2d", "pool_size": 2, "padding": "same", "name": "pool"},
        ],
        "outputs": ["conv", "pool"],
    }
    check_sizes(spec, request.node.callspec.id)


@pytest.mark.parametrize(
    "activation",
    [{"op": "relu"}, {"op": "leaky_relu", "alpha": 0.2}],
    ids=["relu", "leaky_relu"],
)
def test_outputs_before_and_after_a_fusable_activation(
    activation: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    # onnxruntime fuses Conv + activation; asking for the conv's own output must still give it.
    spec = {
        "input": {"channels": 3},
        "layers": [
            {
                "op": "conv2d",
                "name": "conv",
                "filters": 16,
                "kernel_size": 3,
                "padding": "same",
                "weights": {"init": "he_normal", "seed": 4},
                "bias": {"init": "he_uniform", "seed": 4},
            },
            {**activation, "name": "act"},
            {"op": "avg_pool2d", "pool_size": 2, "ceil_mode": True, "name": "pool"},
        ],
        "outputs": ["pool", "conv", "act"],
    }
    check_sizes(spec, request.node.callspec.id)


def test_readme_pipeline(readme_pipeline: Pipeline) -> None:
    images = random_images(readme_pipeline, 3, 11, 13, seed=0)
    assert_matches_reference(run_onnx(readme_pipeline, images), readme_pipeline, images)


# --------------------------------------------------------------------------- hypothesis

MAX_SIDE = 24


def pairs(low: int, high: int) -> st.SearchStrategy[Any]:
    """An int (both axes) or [h, w]."""
    side = st.integers(low, high)
    return side | st.lists(side, min_size=2, max_size=2)


def as_pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


@st.composite
def conv_layers(draw: st.DrawFn, channels: int) -> dict[str, Any]:
    kernel = draw(pairs(1, 4))
    kh, kw = as_pair(kernel)
    groups = draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
    filters = groups * draw(st.integers(1, 2))
    presets = ["gaussian", "box"]
    if (kh, kw) == (3, 3):
        presets += ["sobel_x", "sobel_y", "laplacian"]
    if kh % 2 and kw % 2:
        presets.append("identity")
    source = draw(st.sampled_from(["init", "values", "preset"]))
    if source == "init":
        weights: dict[str, Any] = {
            "init": draw(st.sampled_from(INITS)),
            "seed": draw(st.integers(0, 2**16)),
        }
    elif source == "values":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        shape = (filters, channels // groups, kh, kw)
        weights = {"values": rng.uniform(-1, 1, size=shape).round(3).tolist()}
    else:
        weights = {"preset": draw(st.sampled_from(presets))}
    layer: dict[str, Any] = {
        "op": "conv2d",
        "filters": filters,
        "kernel_size": kernel,
        "stride": draw(pairs(1, 3)),
        "padding": draw(
            st.sampled_from(["same", "same_lower", "valid"])
            | st.integers(0, 2)
            | st.lists(st.integers(0, 2), min_size=4, max_size=4)
        ),
        "dilation": draw(pairs(1, 2)),
        "groups": groups,
        "weights": weights,
    }
    bias = draw(st.sampled_from(["none", "values", "init"]))
    if bias == "values":
        layer["bias"] = {
            "values": draw(st.lists(st.integers(-8, 8), min_size=filters, max_size=filters))
        }
    elif bias == "init":
        layer["bias"] = {"init": draw(st.sampled_from(INITS)), "seed": draw(st.integers(0, 99))}
    return layer


@st.composite
def pool_layers(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(["max_pool2d", "avg_pool2d"]))
    pool = draw(pairs(1, 3))
    ph, pw = as_pair(pool)
    padding = draw(
        st.sampled_from(["same", "same_lower", "valid"])
        | st.tuples(
            st.integers(0, ph - 1),
            st.integers(0, pw - 1),
            st.integers(0, ph - 1),
            st.integers(0, pw - 1),
        ).map(list)
    )
    layer: dict[str, Any] = {"op": op, "pool_size": pool, "padding": padding}
    stride = draw(st.none() | pairs(1, 3))
    if stride is not None:
        layer["stride"] = stride
    if padding not in ("same", "same_lower"):
        layer["ceil_mode"] = draw(st.booleans())
        # dilated pools with SAME padding need stride 1 (the spec says so): explicit only here
        layer["dilation"] = draw(pairs(1, 2))
    if op == "avg_pool2d":
        layer["count_include_pad"] = draw(st.booleans())
    return layer


@st.composite
def batch_norm_layers(draw: st.DrawFn, channels: int) -> dict[str, Any]:
    def values(low: float, high: float) -> dict[str, Any]:
        number = st.floats(low, high, allow_nan=False)
        return {"values": draw(st.lists(number, min_size=channels, max_size=channels))}

    return {
        "op": "batch_norm",
        "scale": values(-2, 2),
        "shift": values(-1, 1),
        "mean": values(-1, 1),
        "var": values(0, 3),
        "epsilon": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
    }


@st.composite
def input_specs(draw: st.DrawFn) -> dict[str, Any]:
    channels = draw(st.integers(1, 3))
    spec: dict[str, Any] = {
        "channels": channels,
        "layout": draw(st.sampled_from(["NCHW", "NHWC"])),
        "dtype": draw(st.sampled_from(["float32", "float16", "uint8"])),
    }
    if draw(st.booleans()):
        spec["scale"] = draw(st.sampled_from([1 / 255, 1 / 127.5, 0.5, 2.0]))
    stat = st.floats(-1, 1, allow_nan=False)
    spread = st.floats(0.1, 3, allow_nan=False)
    for field, values in (("mean", stat), ("std", spread)):
        choice = draw(st.sampled_from(["none", "scalar", "per_channel"]))
        if choice == "scalar":
            spec[field] = draw(values)
        elif choice == "per_channel":
            spec[field] = draw(st.lists(values, min_size=channels, max_size=channels))
    return spec


# What may follow the sliding-window body: after a global pool the image is 1x1, after flatten
# it is no image at all, so these close a pipeline.
TAILS: list[list[str]] = [
    [],
    ["global_avg_pool2d"],
    ["global_max_pool2d"],
    ["flatten"],
    ["global_avg_pool2d", "flatten"],
    ["global_max_pool2d", "flatten", "leaky_relu"],
    ["flatten", "relu"],
]


@st.composite
def cases(draw: st.DrawFn) -> tuple[Pipeline, np.ndarray]:
    """A random valid pipeline and a batch of images every one of its layers accepts."""
    inputs = draw(input_specs())
    channels = inputs["channels"]
    tail = draw(st.sampled_from(TAILS))
    # conv2d first: hypothesis favours (and shrinks towards) the first choice.
    body_ops = st.sampled_from(["conv2d", "pool", "conv2d", "relu", "leaky_relu", "batch_norm"])
    body = draw(st.lists(body_ops, min_size=0 if tail else 1, max_size=6 - len(tail)))
    layers: list[dict[str, Any]] = []
    for op in body + tail:
        if op == "conv2d":
            layer = draw(conv_layers(channels))
            channels = layer["filters"]
        elif op == "pool":
            layer = draw(pool_layers())
        elif op == "leaky_relu":
            layer = {"op": op, "alpha": draw(st.floats(0, 2, allow_nan=False))}
        elif op == "batch_norm":
            layer = draw(batch_norm_layers(channels))
        else:
            layer = {"op": op}
        layers.append(layer)
    names = [f"{layer['op']}_{i}" for i, layer in enumerate(layers)]
    outputs = draw(st.none() | st.lists(st.sampled_from(names), min_size=1, unique=True))
    spec: dict[str, Any] = {"input": inputs, "layers": layers}
    if outputs is not None:
        spec["outputs"] = outputs
    pipeline = parse_pipeline(spec)
    # Output sizes only grow with the input, so the largest image decides whether any fits.
    assume(fits(pipeline, MAX_SIDE, MAX_SIDE))
    height = draw(
        st.sampled_from([h for h in range(1, MAX_SIDE + 1) if fits(pipeline, h, MAX_SIDE)])
    )
    width = draw(st.sampled_from([w for w in range(1, MAX_SIDE + 1) if fits(pipeline, height, w)]))
    batch = draw(st.integers(1, 3))
    images = random_images(pipeline, batch, height, width, seed=draw(st.integers(0, 2**32 - 1)))
    return pipeline, images


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_random_pipelines_match_reference(case: tuple[Pipeline, np.ndarray]) -> None:
    pipeline, images = case
    assert_matches_reference(run_onnx(pipeline, images), pipeline, images)
