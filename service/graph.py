"""spec -> onnx.ModelProto. Pure: the same spec always gives the same bytes.

The user's words (Keras/PyTorch) become ONNX's here and nowhere else:
kernel_size -> kernel_shape, stride -> strides, dilation -> dilations, groups -> group,
padding same -> auto_pad=SAME_UPPER, valid -> VALID, explicit [t, l, b, r] -> pads.
Height and width stay symbolic, so one compiled pipeline serves any image size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from featmap.contract import __version__
from featmap.contract.spec import (
    NO_TENSORS,
    RESERVED_NAME,
    AvgPool2d,
    Conv2d,
    Flatten,
    LeakyRelu,
    Padding,
    Pipeline,
    PoolBase,
    WeightTensors,
    content_id,
)
from featmap.contract.tensors import batch_shape
from featmap.service.weights import ConvParameters, pipeline_parameters

OPSET = 21
IR_VERSION = 10
INPUT_NAME = RESERVED_NAME
ELEM_TYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "uint8": TensorProto.UINT8,
}


@dataclass
class GraphBuilder:
    """Nodes and initializers collected while walking the layers."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def constant(self, name: str, value: np.ndarray) -> str:
        """Add an initializer; return its name."""
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op_type: str, inputs: list[str], output: str, **attributes: Any) -> str:
        """Add a node with one output; return that output's name."""
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output


LayerBuilder = Callable[[GraphBuilder, Any, str, str, ConvParameters | None], str]


def _same_upper_span(
    g: GraphBuilder, x: str, out: str, extent: tuple[int, int], stride: tuple[int, int]
) -> tuple[str, str]:
    """(input size [h, w], span the SAME_UPPER windows cover [h, w]) as graph tensors.

    span = (ceil(n / stride) - 1) * stride + extent: the padded size SAME_UPPER needs.
    """
    i64 = np.int64
    stride_array = np.array(stride, dtype=i64)
    size = g.node("Shape", [x], f"{out}:size", start=2, end=4)
    strides = g.constant(f"{out}:strides", stride_array)
    rounded_up = g.node(
        "Add", [size, g.constant(f"{out}:stride_minus_one", stride_array - 1)], f"{out}:rounded_up"
    )
    out_size = g.node("Div", [rounded_up, strides], f"{out}:out_size")
    covered = g.node("Mul", [out_size, strides], f"{out}:covered")
    extent_minus_stride = np.array(extent, dtype=i64) - stride_array
    span = g.node(
        "Add",
        [covered, g.constant(f"{out}:extent_minus_stride", extent_minus_stride)],
        f"{out}:span",
    )
    return size, span


def _padding_attributes(
    g: GraphBuilder,
    padding: Padding,
    x: str,
    out: str,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[str, dict[str, Any]]:
    """(the input to slide over, the padding attributes) for a sliding-window node."""
    if padding == "valid":
        return x, {"auto_pad": "VALID"}
    if padding != "same":
        assert not isinstance(padding, str)
        return x, {"pads": list(padding)}  # (top, left, bottom, right) is ONNX's order already
    extent = (((kernel[0] - 1) * dilation[0] + 1), ((kernel[1] - 1) * dilation[1] + 1))
    if stride == (1, 1):
        # SAME with stride 1 pads (extent - 1) whatever the image size: static pads are fastest.
        totals = [e - 1 for e in extent]
        return x, {"pads": [t // 2 for t in totals] + [t - t // 2 for t in totals]}
    if dilation == (1, 1) and all(s <= k for s, k in zip(stride, kernel, strict=True)):
        return x, {"auto_pad": "SAME_UPPER"}
    size, span = _same_upper_span(g, x, out, extent, stride)
    if dilation == (1, 1):
        # With stride > kernel, span - n can be negative and onnxruntime's pools then fail on a
        # negative end pad. The pixels past the span reach no window: cropping the input to
        # min(n, span) changes no output and leaves SAME_UPPER a padding >= 0.
        ends = g.node("Min", [size, span], f"{out}:crop_ends")
        starts = g.constant(f"{out}:crop_starts", np.zeros(2, dtype=np.int64))
        axes = g.constant(f"{out}:crop_axes", np.array([2, 3], dtype=np.int64))
        return g.node("Slice", [x, starts, ends, axes], f"{out}:cropped"), {
            "auto_pad": "SAME_UPPER"
        }
    # onnxruntime rejects auto_pad SAME with dilation (only convs dilate), so the SAME_UPPER
    # padding max(0, span - n), odd pixel at the end, is applied by a Pad node.
    zero = g.constant(f"{out}:zero", np.array(0, dtype=np.int64))
    total = g.node("Max", [g.node("Sub", [span, size], f"{out}:excess"), zero], f"{out}:total")
    begin = g.node(
        "Div", [total, g.constant(f"{out}:two", np.array(2, dtype=np.int64))], f"{out}:pad_begin"
    )
    end = g.node("Sub", [total, begin], f"{out}:pad_end")
    no_pad = g.constant(f"{out}:no_pad", np.zeros(2, dtype=np.int64))
    pads = g.node("Concat", [no_pad, begin, no_pad, end], f"{out}:pads", axis=0)
    return g.node("Pad", [x, pads], f"{out}:padded", mode="constant"), {"auto_pad": "VALID"}


def _conv(g: GraphBuilder, layer: Conv2d, x: str, out: str, p: ConvParameters | None) -> str:
    assert p is not None
    x, padding = _padding_attributes(
        g, layer.padding, x, out, layer.kernel_size, layer.stride, layer.dilation
    )
    inputs = [x, g.constant(f"{out}:kernel", p.kernel)]
    if p.bias is not None:
        inputs.append(g.constant(f"{out}:bias", p.bias))
    return g.node(
        "Conv",
        inputs,
        out,
        kernel_shape=list(layer.kernel_size),
        strides=list(layer.stride),
        dilations=list(layer.dilation),
        group=layer.groups,
        **padding,
    )


def _pool(g: GraphBuilder, layer: PoolBase, x: str, out: str, _: ConvParameters | None) -> str:
    kernel, stride = layer.pool_size, layer.stride or layer.pool_size
    x, padding = _padding_attributes(g, layer.padding, x, out, kernel, stride, (1, 1))
    attributes = {
        "kernel_shape": list(kernel),
        "strides": list(stride),
        "ceil_mode": int(layer.ceil_mode),
        **padding,
    }
    if isinstance(layer, AvgPool2d):
        attributes["count_include_pad"] = int(layer.count_include_pad)
        return g.node("AveragePool", [x], out, **attributes)
    return g.node("MaxPool", [x], out, **attributes)


def _leaky_relu(
    g: GraphBuilder, layer: LeakyRelu, x: str, out: str, _: ConvParameters | None
) -> str:
    return g.node("LeakyRelu", [x], out, alpha=layer.alpha)


def _flatten(g: GraphBuilder, layer: Flatten, x: str, out: str, _: ConvParameters | None) -> str:
    return g.node("Flatten", [x], out, axis=1)


def _plain(op_type: str) -> LayerBuilder:
    def build(g: GraphBuilder, layer: Any, x: str, out: str, _: ConvParameters | None) -> str:
        return g.node(op_type, [x], out)

    return build


GRAPH_BUILDERS: dict[str, LayerBuilder] = {
    "conv2d": _conv,
    "relu": _plain("Relu"),
    "leaky_relu": _leaky_relu,
    "max_pool2d": _pool,
    "avg_pool2d": _pool,
    "global_avg_pool2d": _plain("GlobalAveragePool"),
    "global_max_pool2d": _plain("GlobalMaxPool"),
    "flatten": _flatten,
}


def _preprocess(g: GraphBuilder, pipeline: Pipeline) -> str:
    """Cast to float32, NHWC -> NCHW, then (x * scale - mean) / std, all inside the graph."""
    spec = pipeline.input
    x = INPUT_NAME
    if spec.dtype != "float32":
        x = g.node("Cast", [x], "input:float32", to=TensorProto.FLOAT)
    if spec.layout == "NHWC":
        x = g.node("Transpose", [x], "input:nchw", perm=[0, 3, 1, 2])
    if spec.scale is not None:
        scale = g.constant("input:scale_value", np.array(spec.scale, dtype=np.float32))
        x = g.node("Mul", [x, scale], "input:scaled")
    for stat, op_type in (("mean", "Sub"), ("std", "Div")):
        value = getattr(spec, stat)
        if value is not None:
            per_channel = np.array(spec.channel_values(value), dtype=np.float32)
            constant = g.constant(f"input:{stat}_value", per_channel.reshape(1, -1, 1, 1))
            x = g.node(op_type, [x, constant], f"input:{stat}")
    return x


def _output_shape(pipeline: Pipeline, index: int) -> list[str | int | None]:
    channels = pipeline.input.channels
    flat = False
    for layer in pipeline.layers[: index + 1]:
        if isinstance(layer, Conv2d):
            channels = layer.filters
        flat = flat or isinstance(layer, Flatten)
    if flat:
        return ["N", None]
    if pipeline.layers[index].op.startswith("global_"):
        return ["N", channels, 1, 1]
    return ["N", channels, None, None]


def compile_pipeline(pipeline: Pipeline, tensors: WeightTensors = NO_TENSORS) -> onnx.ModelProto:
    """The ONNX model of a pipeline: input `images`, one output per requested layer name.

    `tensors` are the weight tensors the spec references by name (checked: see check_tensors).
    """
    g = GraphBuilder()
    parameters = pipeline_parameters(pipeline, tensors)
    x = _preprocess(g, pipeline)
    names = pipeline.layer_names
    for index, (layer, name) in enumerate(zip(pipeline.layers, names, strict=True)):
        x = GRAPH_BUILDERS[layer.op](g, layer, x, name, parameters.get(index))
    input_shape = list(batch_shape(pipeline.input.layout, "N", pipeline.input.channels, "H", "W"))
    graph = helper.make_graph(
        g.nodes,
        "featmap",
        inputs=[
            helper.make_tensor_value_info(INPUT_NAME, ELEM_TYPES[pipeline.input.dtype], input_shape)
        ],
        outputs=[
            helper.make_tensor_value_info(
                name, TensorProto.FLOAT, _output_shape(pipeline, names.index(name))
            )
            for name in pipeline.output_names
        ],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="featmap",
        producer_version=__version__,
    )
    helper.set_model_props(model, {"featmap.pipeline_id": content_id(pipeline, tensors)})
    return model
