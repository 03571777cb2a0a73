"""The spec: validation names the field, canonical form and ids, shape arithmetic."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from featmap.contract.errors import InvalidSpec
from featmap.contract.ops import (
    layer_costs,
    resolve_pads,
    window_output_size,
)
from featmap.contract.spec import (
    LAYER_TYPES,
    Pipeline,
    json_schema,
    parse_pipeline,
)
from tests.conftest import README_SPEC


def conv(**fields: Any) -> dict[str, Any]:
    """A conv2d layer dict with zero weights unless overridden."""
    return {"op": "conv2d", "filters": 4, "kernel_size": 3, "weights": {"init": "zeros"}, **fields}


def batch_norm(**fields: Any) -> dict[str, Any]:
    """A batch_norm layer over 3 channels: the identity unless overridden."""
    ones, zeros = {"values": [1, 1, 1]}, {"values": [0, 0, 0]}
    return {"op": "batch_norm", "scale": ones, "shift": zeros, "mean": zeros, "var": ones,
            **fields}  # fmt: skip


def spec_with(*layers: dict[str, Any], channels: int = 3, **extra: Any) -> dict[str, Any]:
    return {"input": {"channels": channels}, "layers": list(layers), **extra}


INVALID_SPECS: list[tuple[dict[str, Any] | str, str, str]] = [
    ("{not json", "spec_json", "not valid JSON"),
    (spec_with({"op": "conv3d"}), "layers[0].op", "unknown op 'conv3d'"),
    (spec_with({"kernel_size": 3}), "layers[0].op", "missing"),
    (spec_with(conv(kernel=3)), "layers[0].kernel", "unknown field"),
    (spec_with(conv(kernel_size=0)), "layers[0].kernel_size", "int >= 1"),
    (spec_with(conv(kernel_size=[3, 3, 3])), "layers[0].kernel_size", "[h, w]"),
    (spec_with(conv(stride=0)), "layers[0].stride", "int >= 1"),
    (spec_with(conv(padding="full")), "layers[0].padding", "'same', 'same_lower', 'valid'"),
    (
        spec_with({"op": "max_pool2d", "pool_size": 2, "dilation": 2, "padding": "same_lower"}),
        "layers[0].padding",
        "'same_lower' with dilation (2, 2) needs stride 1 in a pool",
    ),
    (
        spec_with({"op": "avg_pool2d", "pool_size": 2, "padding": "same_lower", "ceil_mode": True}),
        "layers[0].ceil_mode",
        "has no effect with padding='same_lower'",
    ),
    (
        spec_with(batch_norm(var={"values": [1, -1, 0]}), batch_norm(), channels=3),
        "layers[0].var.values",
        "var + epsilon must be > 0",
    ),
    (
        spec_with(batch_norm(var={"init": "he_normal"})),
        "layers[0].var.init",
        "only 'zeros' (with epsilon > 0)",
    ),
    (
        spec_with(batch_norm(scale={"values": [1, 2]})),
        "layers[0].scale.values",
        "expected (channels,) = (3,)",
    ),
    (spec_with(batch_norm(epsilon=-1)), "layers[0].epsilon", "greater than or equal to 0"),
    (spec_with(conv(padding=[1, 2])), "layers[0].padding", "[top, left, bottom, right]"),
    (spec_with(conv(groups=2)), "layers[0].groups", "does not divide the 3 input channels"),
    (spec_with(conv(groups=3, filters=4)), "layers[0].groups", "does not divide filters=4"),
    (
        spec_with(conv(filters=1, weights={"values": [[[[1, 2, 3]]]]})),
        "layers[0].weights.values",
        "expected (filters, in_channels/groups, kh, kw) = (1, 3, 3, 3)",
    ),
    (
        spec_with(conv(filters=1, kernel_size=1, weights={"values": [[[1], [2, 3], [4]]]})),
        "layers[0].weights.values",
        "rectangular",
    ),
    (spec_with(conv(weights={"init": "lecun"})), "layers[0].weights.init", "Input should be"),
    (spec_with(conv(weights={"init": "zeros", "preset": "box"})), "layers[0].weights", "exactly"),
    (spec_with(conv(weights={"preset": "sobel_x"}, kernel_size=5)), "layers[0].kernel_size", "3x3"),
    (
        spec_with(conv(weights={"preset": "identity"}, kernel_size=2)),
        "layers[0].kernel_size",
        "odd",
    ),
    (spec_with(conv(weights={"preset": "box", "sigma": 1.0})), "layers[0].weights.sigma", "gauss"),
    (spec_with(conv(bias={"values": [1, 2]})), "layers[0].bias.values", "expected (filters,)"),
    (
        spec_with(conv(bias={"preset": "box"})),
        "layers[0].bias",
        "exactly one of 'values', 'init' or 'tensor'",
    ),
    (
        spec_with({"op": "relu", "name": "a"}, {"op": "relu", "name": "a"}),
        "layers[1].name",
        "already the name of layers[0]",
    ),
    (
        spec_with({"op": "relu", "name": "relu_1"}, {"op": "relu"}),
        "layers[0].name",
        "automatic name",
    ),
    (spec_with({"op": "relu", "name": "images"}), "layers[0].name", "names the input"),
    (spec_with({"op": "relu", "name": "bad name"}), "layers[0].name", "pattern"),
    (spec_with({"op": "relu"}, outputs=["nope"]), "outputs[0]", "'nope' is not a layer name"),
    (spec_with({"op": "relu"}, outputs=[]), "outputs", "at least one"),
    (spec_with({"op": "relu", "name": "r"}, outputs=["r", "r"]), "outputs", "twice"),
    (spec_with(), "layers", "at least 1"),
    ({"layers": [{"op": "relu"}]}, "input", "Field required"),
    ({"input": {"channels": 0}, "layers": [{"op": "relu"}]}, "input.channels", "greater"),
    ({"input": {"channels": 3, "layout": "CHW"}, "layers": [{"op": "relu"}]}, "input.layout", ""),
    ({"input": {"channels": 3, "mean": [1, 2]}, "layers": [{"op": "relu"}]}, "input.mean", "1 or"),
    ({"input": {"channels": 1, "std": 0}, "layers": [{"op": "relu"}]}, "input.std", "0"),
    (
        spec_with({"op": "max_pool2d", "pool_size": 2, "padding": "same", "ceil_mode": True}),
        "layers[0].ceil_mode",
        "no effect",
    ),
    (spec_with({"op": "leaky_relu", "alpha": -1}), "layers[0].alpha", "greater than or equal"),
    (
        spec_with({"op": "flatten"}, {"op": "max_pool2d", "pool_size": 2}),
        "layers[1].op",
        "follows a flatten",
    ),
]


@pytest.mark.parametrize(("spec", "field", "message"), INVALID_SPECS)
def test_invalid_spec_names_the_field(spec: dict[str, Any] | str, field: str, message: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_pipeline(spec if isinstance(spec, str) else json.dumps(spec))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert message in str(caught.value)


def test_dict_and_json_text_parse_alike() -> None:
    assert parse_pipeline(README_SPEC) == parse_pipeline(json.dumps(README_SPEC))


def test_canonical_form_and_id_ignore_spelling() -> None:
    base = parse_pipeline(README_SPEC)
    respelled = copy.deepcopy(README_SPEC)
    respelled["layers"][0]["kernel_size"] = [3, 3]
    respelled["layers"][0]["stride"] = 1
    respelled["layers"][2]["padding"] = 0  # explicit zero padding
    respelled["layers"][2]["padding"] = "valid"
    reordered = dict(reversed(list(respelled.items())))
    other = parse_pipeline(reordered)
    assert other.canonical_json() == base.canonical_json()
    assert other.pipeline_id == base.pipeline_id
    changed = copy.deepcopy(README_SPEC)
    changed["layers"][0]["weights"]["seed"] = 1
    assert parse_pipeline(changed).pipeline_id != base.pipeline_id


def test_explicit_padding_int_is_four_sides() -> None:
    layer = parse_pipeline(spec_with(conv(padding=2))).layers[0]
    assert layer.padding == (2, 2, 2, 2)  # type: ignore[union-attr]


def test_names_and_outputs() -> None:
    pipeline = parse_pipeline(README_SPEC)
    assert pipeline.layer_names == ["conv1", "relu_1", "max_pool2d_2", "features"]
    assert pipeline.output_names == ["conv1", "features"]
    default = parse_pipeline(spec_with({"op": "relu"}, {"op": "global_max_pool2d"}))
    assert default.output_names == ["global_max_pool2d_1"]


def test_models_are_frozen() -> None:
    pipeline = parse_pipeline(README_SPEC)
    with pytest.raises(ValueError, match="frozen"):
        pipeline.outputs = None  # type: ignore[misc]


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "pads"),
    [
        ((7, 9), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
        # total padding 1 (odd): the extra row/column goes to the bottom/right (SAME_UPPER)
        ((8, 8), (2, 2), (1, 1), (1, 1), (0, 0, 1, 1)),
        # 7 / 2 -> 4 outputs; (4 - 1) * 2 + 3 - 7 = 2 -> 1 and 1
        ((7, 7), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),
        # 8 / 2 -> 4 outputs; (4 - 1) * 2 + 3 - 8 = 1 -> 0 top, 1 bottom
        ((8, 8), (3, 3), (2, 2), (1, 1), (0, 0, 1, 1)),
        # dilation 2 makes a 3-kernel span 5: total 4
        ((6, 6), (3, 3), (1, 1), (2, 2), (2, 2, 2, 2)),
        # stride larger than the kernel: never negative
        ((9, 9), (2, 2), (3, 3), (1, 1), (0, 0, 0, 0)),
    ],
)
def test_same_padding_is_same_upper(
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pads: tuple[int, int, int, int],
) -> None:
    assert resolve_pads("same", size, kernel, stride, dilation) == pads


def test_window_output_size_floor_and_ceil() -> None:
    # 5 wide, pool 2 stride 2: floor gives 2, ceil gives 3 (last window half outside)
    assert window_output_size(5, 0, 0, 2, 2, 1, ceil=False) == 2
    assert window_output_size(5, 0, 0, 2, 2, 1, ceil=True) == 3
    # PyTorch's rule: a last window that would start in the end padding is dropped
    # in 4 + pad 1 each side, pool 2 stride 2: ceil((6-2)/2)+1 = 3 windows start at 0, 2, 4;
    # start 4 is inside the data (4 < 4 + 1), so all 3 stay.
    assert window_output_size(4, 1, 1, 2, 2, 1, ceil=True) == 3
    # in 3 + pad 1 each side, pool 2 stride 2: ceil(3/2)+1 = 3, third window starts at 4 >= 3 + 1
    assert window_output_size(3, 1, 1, 2, 2, 1, ceil=True) == 2


def test_infer_shapes_readme() -> None:
    shapes = layer_costs(parse_pipeline(README_SPEC), 64, 48)
    assert [s.shape for s in shapes] == [(8, 64, 48), (8, 64, 48), (8, 32, 24), (8, 1, 1)]


def test_infer_shapes_strides_and_flatten() -> None:
    pipeline = parse_pipeline(
        spec_with(conv(stride=2, padding="same"), conv(padding="valid"), {"op": "flatten"})
    )
    # 9x7 -> same stride 2 -> 5x4 -> valid 3x3 -> 3x2 -> flatten 4*3*2
    assert [s.shape for s in layer_costs(pipeline, 9, 7)] == [(4, 5, 4), (4, 3, 2), (24,)]


def test_empty_output_names_the_layer_and_sizes() -> None:
    pipeline = parse_pipeline(spec_with({"op": "relu"}, conv(kernel_size=9)))
    with pytest.raises(InvalidSpec) as caught:
        layer_costs(pipeline, 6, 6)
    assert caught.value.field == "layers[1].kernel_size"
    assert "(9, 9)" in str(caught.value) and "(6, 6)" in str(caught.value)


def test_pool_padding_must_be_smaller_than_the_window() -> None:
    pipeline = parse_pipeline(spec_with({"op": "max_pool2d", "pool_size": 2, "padding": 2}))
    with pytest.raises(InvalidSpec) as caught:
        layer_costs(pipeline, 8, 8)
    assert caught.value.field == "layers[0].padding"


def test_json_schema_lists_every_op() -> None:
    schema = json.dumps(json_schema())
    for layer in LAYER_TYPES:
        op = layer.model_fields["op"].annotation.__args__[0]  # type: ignore[union-attr]
        assert f'"{op}"' in schema
    assert Pipeline.model_json_schema()["additionalProperties"] is False
