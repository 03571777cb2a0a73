"""The graph builder: valid, deterministic ONNX with dynamic N/H/W and in-graph preprocessing."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from featmap.contract.spec import (
    LAYER_TYPES,
    Pipeline,
    parse_pipeline,
)
from featmap.service.graph import GRAPH_BUILDERS, INPUT_NAME, IR_VERSION, OPSET, compile_pipeline
from featmap.service.reference import REFERENCE_OPS
from tests.conftest import README_SPEC, assert_matches_reference, run_onnx


def pipeline_of(*layers: dict[str, Any], **input_fields: Any) -> Pipeline:
    return parse_pipeline({"input": {"channels": 3, **input_fields}, "layers": list(layers)})


def dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_every_op_has_a_graph_builder_and_a_reference() -> None:
    ops = {layer.model_fields["op"].annotation.__args__[0] for layer in LAYER_TYPES}  # type: ignore[union-attr]
    assert set(GRAPH_BUILDERS) == ops
    assert set(REFERENCE_OPS) == ops


def test_model_is_checker_clean_with_named_opset(readme_pipeline: Pipeline) -> None:
    model = compile_pipeline(readme_pipeline)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == OPSET >= 17
    assert model.ir_version == IR_VERSION
    props = {p.key: p.value for p in model.metadata_props}
    assert props["featmap.pipeline_id"] == readme_pipeline.pipeline_id


def test_same_spec_same_bytes(readme_pipeline: Pipeline) -> None:
    first = compile_pipeline(readme_pipeline).SerializeToString()
    again = compile_pipeline(parse_pipeline(README_SPEC)).SerializeToString()
    assert first == again


def test_inputs_and_outputs_are_dynamic(readme_pipeline: Pipeline) -> None:
    graph = compile_pipeline(readme_pipeline).graph
    (images,) = graph.input
    assert images.name == INPUT_NAME
    assert dims(images) == ["N", 3, "H", "W"]
    assert [o.name for o in graph.output] == ["conv1", "features"]
    assert dims(graph.output[0])[:2] == ["N", 8]
    assert dims(graph.output[1]) == ["N", 8, 1, 1]


def test_one_model_serves_any_image_size(readme_pipeline: Pipeline) -> None:
    rng = np.random.default_rng(1)
    for shape in [(1, 3, 8, 8), (2, 3, 17, 31), (3, 3, 64, 40)]:
        images = rng.standard_normal(shape).astype(np.float32)
        assert_matches_reference(run_onnx(readme_pipeline, images), readme_pipeline, images)


def test_nhwc_uint8_are_handled_in_the_graph() -> None:
    pipeline = pipeline_of(
        {"op": "relu"}, layout="NHWC", dtype="uint8", scale=1 / 255, mean=[0.5], std=[0.25]
    )
    graph = compile_pipeline(pipeline).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert dims(graph.input[0]) == ["N", "H", "W", 3]
    assert [n.op_type for n in graph.node] == ["Cast", "Transpose", "Mul", "Sub", "Div", "Relu"]
    images = np.random.default_rng(2).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    assert_matches_reference(run_onnx(pipeline, images), pipeline, images)


def test_float16_input_is_cast_to_float32() -> None:
    pipeline = pipeline_of({"op": "global_avg_pool2d"}, dtype="float16")
    graph = compile_pipeline(pipeline).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert graph.node[0].op_type == "Cast"
    images = np.random.default_rng(3).standard_normal((2, 3, 9, 9)).astype(np.float16)
    assert_matches_reference(run_onnx(pipeline, images), pipeline, images)


def conv(**fields: Any) -> dict[str, Any]:
    return {
        "op": "conv2d",
        "filters": 4,
        "kernel_size": 3,
        "weights": {"init": "he_uniform"},
        **fields,
    }


@pytest.mark.parametrize(
    ("layer", "node_types", "attributes"),
    [
        (conv(padding="valid"), ["Conv"], {"auto_pad": b"VALID"}),
        (conv(padding=[1, 2, 3, 0]), ["Conv"], {"pads": [1, 2, 3, 0]}),
        # stride 1: SAME pads do not depend on the image size, so they are static
        (conv(padding="same", kernel_size=4), ["Conv"], {"pads": [1, 1, 2, 2]}),
        (conv(padding="same", stride=2), ["Conv"], {"auto_pad": b"SAME_UPPER"}),
        # onnxruntime has no SAME with dilation: the padding is computed in the graph
        (conv(padding="same", stride=2, dilation=2), ["Pad", "Conv"], {"auto_pad": b"VALID"}),
        # stride > pool size: crop what no window covers, then SAME_UPPER
        (
            {"op": "max_pool2d", "pool_size": 2, "stride": 3, "padding": "same"},
            ["Slice", "MaxPool"],
            {"auto_pad": b"SAME_UPPER"},
        ),
    ],
)
def test_padding_translation(
    layer: dict[str, Any], node_types: list[str], attributes: dict[str, Any]
) -> None:
    pipeline = pipeline_of(layer)
    graph = compile_pipeline(pipeline).graph
    heavy = [n for n in graph.node if n.op_type in {"Pad", "Slice", "Conv", "MaxPool"}]
    assert [n.op_type for n in heavy] == node_types
    node_attributes = {a.name: onnx.helper.get_attribute_value(a) for a in heavy[-1].attribute}
    for key, value in attributes.items():
        assert node_attributes[key] == value
    for size in [(7, 9), (6, 8), (9, 9), (10, 11)]:
        images = np.random.default_rng(4).standard_normal((1, 3, *size)).astype(np.float32)
        assert_matches_reference(run_onnx(pipeline, images), pipeline, images)


def test_keras_words_become_onnx_attributes() -> None:
    layer = conv(kernel_size=[3, 1], stride=[2, 1], dilation=[1, 2], groups=1, filters=6)
    node = next(n for n in compile_pipeline(pipeline_of(layer)).graph.node if n.op_type == "Conv")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["kernel_shape"] == [3, 1]
    assert attributes["strides"] == [2, 1]
    assert attributes["dilations"] == [1, 2]
    assert attributes["group"] == 1


BN = {
    "op": "batch_norm",
    "name": "bn",
    "scale": {"values": [2.0, 0.5]},
    "shift": {"values": [1.0, -1.0]},
    "mean": {"values": [0.5, -0.5]},
    "var": {"values": [1.0, 3.0]},
}
BN_CONV = {"op": "conv2d", "name": "conv", "filters": 2, "kernel_size": 3,
           "weights": {"init": "he_normal", "seed": 3}}  # fmt: skip


@pytest.mark.parametrize(
    ("layers", "outputs", "op_types"),
    [
        # folded: the conv's kernel and bias absorb it, and its node computes `bn`
        ([BN_CONV, BN], None, ["Conv"]),
        # the conv's own output is requested: it must survive, so the batch norm stays a node
        ([BN_CONV, BN], ["conv", "bn"], ["Conv", "BatchNormalization"]),
        # no conv before it
        ([BN_CONV, {"op": "relu"}, BN], None, ["Conv", "Relu", "BatchNormalization"]),
    ],
    ids=["folded", "conv_requested", "after_relu"],
)
def test_batch_norm_folds_into_the_conv_before_it(
    layers: list[dict[str, Any]], outputs: list[str] | None, op_types: list[str]
) -> None:
    spec: dict[str, Any] = {"input": {"channels": 3}, "layers": layers}
    if outputs is not None:
        spec["outputs"] = outputs
    p = parse_pipeline(spec)
    model = compile_pipeline(p)
    assert [node.op_type for node in model.graph.node] == op_types
    assert [o.name for o in model.graph.output] == p.output_names
    images = np.random.default_rng(0).normal(size=(2, 3, 7, 6)).astype(np.float32)
    assert_matches_reference(run_onnx(p, images), p, images)
