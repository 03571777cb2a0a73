"""spec -> onnx.ModelProto. Pure: the same spec always gives the same bytes.

The user's words (Keras/PyTorch) become ONNX's here and nowhere else:
kernel_size -> kernel_shape, stride -> strides, dilation -> dilations, groups -> group,
padding same -> auto_pad=SAME_UPPER, same_lower -> SAME_LOWER, valid -> VALID, explicit
[t, l, b, r] -> pads. Height and width stay symbolic, so one compiled pipeline serves any image
size. A batch_norm right after a conv whose output is not requested folds into that conv.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..contract import __version__
from ..contract.ops import OPS, Window, symbolic_shapes, window_of
from ..contract.spec import (
    NO_TENSORS,
    RESERVED_NAME,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Flatten,
    LayerBase,
    LeakyRelu,
    MaxPool2d,
    Pipeline,
    PoolBase,
    WeightTensors,
    content_id,
)
from ..contract.tensors import batch_shape
from .weights import pipeline_weights

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
    # The tensors the model returns: a layer whose output is one of them is never folded away.
    outputs: frozenset[str] = frozenset()

    def initializer(self, name: str) -> np.ndarray:
        """The value of the initializer `name`."""
        return numpy_helper.to_array(next(t for t in self.initializers if t.name == name))

    def replace_initializer(self, name: str, value: np.ndarray) -> None:
        """Give the initializer `name` a new value (same name)."""
        index = next(i for i, t in enumerate(self.initializers) if t.name == name)
        self.initializers[index] = numpy_helper.from_array(value, name)

    def constant(self, name: str, value: np.ndarray) -> str:
        """Add an initializer; return its name."""
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op_type: str, inputs: list[str], output: str, **attributes: Any) -> str:
        """Add a node with one output; return that output's name."""
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output


# (builder, layer, input tensor, output name, the layer's weights by field) -> output tensor
LayerBuilder = Callable[[GraphBuilder, Any, str, str, Mapping[str, np.ndarray]], str]
# One function per op of the table (contract/ops.py OPS), registered with @graph_builder.
GRAPH_BUILDERS: dict[str, LayerBuilder] = {}


def graph_builder(op: str) -> Callable[[LayerBuilder], LayerBuilder]:
    """Register the function that adds `op`'s nodes to the graph."""

    def register(build: LayerBuilder) -> LayerBuilder:
        assert op in OPS and op not in GRAPH_BUILDERS, op
        GRAPH_BUILDERS[op] = build
        return build

    return register


def _same_span(
    g: GraphBuilder, x: str, out: str, extent: tuple[int, int], stride: tuple[int, int]
) -> tuple[str, str]:
    """(input size [h, w], span the SAME windows cover [h, w]) as graph tensors.

    span = (ceil(n / stride) - 1) * stride + extent: the padded size SAME_UPPER and SAME_LOWER
    need (SamePadding's total padding is max(0, span - n)).
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
    g: GraphBuilder, window: Window, x: str, out: str
) -> tuple[str, dict[str, Any]]:
    """(the input to slide over, the padding attributes) for a sliding-window node."""
    padding = window.padding
    if padding == "valid":
        return x, {"auto_pad": "VALID"}
    if padding not in ("same", "same_lower"):
        assert not isinstance(padding, str)
        return x, {"pads": list(padding)}  # (top, left, bottom, right) is ONNX's order already
    same = window.same
    static = same.static_pads
    if static is not None:
        # SAME with stride 1 pads (extent - 1) whatever the image size: static pads are fastest.
        return x, {"pads": list(static)}
    kernel, stride, dilation = window.kernel, window.stride, window.dilation
    if dilation == (1, 1) and all(s <= k for s, k in zip(stride, kernel, strict=True)):
        return x, {"auto_pad": same.auto_pad}
    size, span = _same_span(g, x, out, same.extent, same.stride)
    if dilation == (1, 1):
        # With stride > kernel, span - n can be negative and onnxruntime's pools then fail on a
        # negative end pad. The pixels past the span reach no window: cropping the input to
        # min(n, span) changes no output and leaves SAME a padding >= 0.
        ends = g.node("Min", [size, span], f"{out}:crop_ends")
        starts = g.constant(f"{out}:crop_starts", np.zeros(2, dtype=np.int64))
        axes = g.constant(f"{out}:crop_axes", np.array([2, 3], dtype=np.int64))
        return g.node("Slice", [x, starts, ends, axes], f"{out}:cropped"), {
            "auto_pad": same.auto_pad
        }
    # onnxruntime rejects auto_pad SAME with dilation, so the SAME padding max(0, span - n) is
    # applied by a Pad node of zeros (convs only: the spec refuses it for a strided pool).
    zero = g.constant(f"{out}:zero", np.array(0, dtype=np.int64))
    total = g.node("Max", [g.node("Sub", [span, size], f"{out}:excess"), zero], f"{out}:total")
    half = g.node(
        "Div", [total, g.constant(f"{out}:two", np.array(2, dtype=np.int64))], f"{out}:half"
    )
    rest = g.node("Sub", [total, half], f"{out}:rest")
    # SamePadding.split: the odd pixel at the end (SAME_UPPER) or the beginning (SAME_LOWER).
    begin, end = (rest, half) if same.lower else (half, rest)
    no_pad = g.constant(f"{out}:no_pad", np.zeros(2, dtype=np.int64))
    pads = g.node("Concat", [no_pad, begin, no_pad, end], f"{out}:pads", axis=0)
    return g.node("Pad", [x, pads], f"{out}:padded", mode="constant"), {"auto_pad": "VALID"}


def _window(layer: LayerBase) -> Window:
    window = window_of(layer)
    assert window is not None
    return window


@graph_builder("conv2d")
def conv2d(
    g: GraphBuilder, layer: Conv2d, x: str, out: str, weights: Mapping[str, np.ndarray]
) -> str:
    """Conv, its kernel and bias as initializers."""
    x, padding = _padding_attributes(g, _window(layer), x, out)
    inputs = [x, g.constant(f"{out}:kernel", weights["weights"])]
    if "bias" in weights:
        inputs.append(g.constant(f"{out}:bias", weights["bias"]))
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


def _pool_attributes(
    g: GraphBuilder, layer: PoolBase, x: str, out: str
) -> tuple[str, dict[str, Any]]:
    window = _window(layer)
    x, padding = _padding_attributes(g, window, x, out)
    attributes: dict[str, Any] = {
        "kernel_shape": list(window.kernel),
        "strides": list(window.stride),
        "ceil_mode": int(window.ceil),
        **padding,
    }
    if window.dilation != (1, 1):
        attributes["dilations"] = list(window.dilation)
    return x, attributes


@graph_builder("max_pool2d")
def max_pool2d(
    g: GraphBuilder, layer: MaxPool2d, x: str, out: str, weights: Mapping[str, np.ndarray]
) -> str:
    """MaxPool."""
    x, attributes = _pool_attributes(g, layer, x, out)
    return g.node("MaxPool", [x], out, **attributes)


@graph_builder("avg_pool2d")
def avg_pool2d(
    g: GraphBuilder, layer: AvgPool2d, x: str, out: str, weights: Mapping[str, np.ndarray]
) -> str:
    """AveragePool."""
    x, attributes = _pool_attributes(g, layer, x, out)
    attributes["count_include_pad"] = int(layer.count_include_pad)
    return g.node("AveragePool", [x], out, **attributes)


@graph_builder("relu")
def relu(g: GraphBuilder, layer: Any, x: str, out: str, weights: Mapping[str, np.ndarray]) -> str:
    """Relu."""
    return g.node("Relu", [x], out)


@graph_builder("leaky_relu")
def leaky_relu(
    g: GraphBuilder, layer: LeakyRelu, x: str, out: str, weights: Mapping[str, np.ndarray]
) -> str:
    """LeakyRelu."""
    return g.node("LeakyRelu", [x], out, alpha=layer.alpha)


@graph_builder("global_avg_pool2d")
def global_avg_pool2d(
    g: GraphBuilder, layer: Any, x: str, out: str, weights: Mapping[str, np.ndarray]
) -> str:
    """GlobalAveragePool."""
    return g.node("GlobalAveragePool", [x], out)


@graph_builder("global_max_pool2d")
def global_max_pool2d(
    g: GraphBuilder, layer: Any, x: str, out: str, weights: Mapping[str, np.ndarray]
) -> str:
    """GlobalMaxPool."""
    return g.node("GlobalMaxPool", [x], out)


@graph_builder("flatten")
def flatten(
    g: GraphBuilder, layer: Flatten, x: str, out: str, weights: Mapping[str, np.ndarray]
) -> str:
    """Flatten from axis 1."""
    return g.node("Flatten", [x], out, axis=1)


def _foldable_conv(g: GraphBuilder, x: str) -> onnx.NodeProto | None:
    """The Conv node that made `x`, when nothing else reads `x` and the model does not return it."""
    if not g.nodes or x in g.outputs:
        return None
    last = g.nodes[-1]
    if last.op_type != "Conv" or list(last.output) != [x]:
        return None
    return last


@graph_builder("batch_norm")
def batch_norm(
    g: GraphBuilder, layer: BatchNorm, x: str, out: str, weights: Mapping[str, np.ndarray]
) -> str:
    """Folded into the conv before it where there is one (kernel and bias absorb it), else
    BatchNormalization."""
    conv = _foldable_conv(g, x)
    if conv is None:
        inputs = [
            g.constant(f"{out}:{field}", weights[field])
            for field in ("scale", "shift", "mean", "var")
        ]
        return g.node("BatchNormalization", [x, *inputs], out, epsilon=layer.epsilon)
    # y = (conv(x) + b - mean) * factor + shift, factor = scale / sqrt(var + epsilon): the kernel
    # of filter f times factor[f], the bias (b - mean) * factor + shift. In float64, then float32.
    scale, shift, mean, var = (
        weights[field].astype(np.float64) for field in ("scale", "shift", "mean", "var")
    )
    factor = scale / np.sqrt(var + layer.epsilon)
    kernel = g.initializer(conv.input[1]).astype(np.float64)
    bias = g.initializer(conv.input[2]).astype(np.float64) if len(conv.input) > 2 else 0.0
    g.replace_initializer(conv.input[1], (kernel * factor.reshape(-1, 1, 1, 1)).astype(np.float32))
    folded_bias = ((bias - mean) * factor + shift).astype(np.float32)
    if len(conv.input) > 2:
        g.replace_initializer(conv.input[2], folded_bias)
    else:
        conv.input.append(g.constant(f"{conv.output[0]}:bias", folded_bias))
    # The conv's node now computes this layer: it takes its name.
    conv.output[0] = out
    conv.name = out
    return out


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


def _output_shapes(pipeline: Pipeline) -> dict[str, list[str | int | None]]:
    """Each layer's output shape for its value info: N, known sizes, None for H/W-dependent."""
    return {
        name: ["N", *(d if isinstance(d, int) else None for d in shape[1:])]
        for name, shape in symbolic_shapes(pipeline).items()
    }


def compile_pipeline(pipeline: Pipeline, tensors: WeightTensors = NO_TENSORS) -> onnx.ModelProto:
    """The ONNX model of a pipeline: input `images`, one output per requested layer name.

    `tensors` are the weight tensors the spec references by name (checked: see check_tensors).
    """
    g = GraphBuilder(outputs=frozenset(pipeline.output_names))
    weights = pipeline_weights(pipeline, tensors)
    x = _preprocess(g, pipeline)
    for index, (layer, name) in enumerate(zip(pipeline.layers, pipeline.layer_names, strict=True)):
        x = GRAPH_BUILDERS[layer.op](g, layer, x, name, weights.get(index, {}))
    shapes = _output_shapes(pipeline)
    input_shape = list(batch_shape(pipeline.input.layout, "N", pipeline.input.channels, "H", "W"))
    graph = helper.make_graph(
        g.nodes,
        "featmap",
        inputs=[
            helper.make_tensor_value_info(INPUT_NAME, ELEM_TYPES[pipeline.input.dtype], input_shape)
        ],
        outputs=[
            helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name])
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
