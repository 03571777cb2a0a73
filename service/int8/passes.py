"""The QDQ graph passes around onnxruntime's quantizer: what stays float, channels, cleanups.

- Which ops quantize (QUANTIZED_OP_TYPES): those with integer kernels on onnxruntime's CPU
  provider, which it then runs fused (QLinearConv, uint8 MaxPool, QLinearAveragePool, ...). The
  input pre-processing (Cast, Transpose, scale/mean/std), GlobalMaxPool and the int64 shape
  arithmetic of SAME padding stay float: they have no integer kernel, and a Quantize/Dequantize
  pair around them would only add work and error. A few nodes must stay float because their
  int8 form computes something else (float_nodes).
- A dense conv whose input channels are not a multiple of 4 (the RGB first layer) gets zero
  channels and zero kernel slices appended: MLAS's fast symmetric int8 conv needs multiples of
  4; without it the 3-channel first conv takes 1.5x as long in int8 as in float32 (with it,
  about as long: a 3-channel conv is bound by memory and bookkeeping, not arithmetic).
- After quantizing, Shape nodes read the quantized tensors and the channel Pad moves uint8
  bytes (shapes_from_quantized, pad_after_quantize); remove_unused drops what nothing reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops quantized to int8/uint8; every other op keeps float32.
# Relu is listed so that it folds into the uint8 range of the conv before it (ReLU is then free);
# Flatten moves uint8 bytes unchanged.
QUANTIZED_OP_TYPES = (
    "Conv",
    "Relu",
    "LeakyRelu",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Flatten",
)
# MLAS's symmetric int8 conv kernels take input channels in multiples of this, and at least 16
# filters in multiples of 8 (AVX2; 4 on AVX-512).
CONV_CHANNEL_MULTIPLE = 4
CONV_MIN_FILTERS = 16
CONV_FILTER_MULTIPLE = 8


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name, as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def align_conv_channels(model: onnx.ModelProto) -> onnx.ModelProto:
    """Zero-pad dense convs' input channels to a multiple of CONV_CHANNEL_MULTIPLE, in place.

    Only where the symmetric kernels would then run (enough filters); the appended kernel
    slices are zero, so the conv computes exactly the same numbers.
    """
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        kernel = initializers.get(node.input[1]) if node.op_type == "Conv" else None
        if (
            kernel is not None
            and node_attributes(node).get("group", 1) == 1
            and kernel.dims[1] % CONV_CHANNEL_MULTIPLE
            and kernel.dims[0] >= CONV_MIN_FILTERS
            and kernel.dims[0] % CONV_FILTER_MULTIPLE == 0
        ):
            weights = numpy_helper.to_array(kernel)
            extra = CONV_CHANNEL_MULTIPLE - weights.shape[1] % CONV_CHANNEL_MULTIPLE
            zeros = np.zeros((weights.shape[0], extra, *weights.shape[2:]), weights.dtype)
            kernel.CopyFrom(
                numpy_helper.from_array(np.concatenate([weights, zeros], 1), kernel.name)
            )
            pads = f"{node.name}:channel_pads"
            # ONNX Pad's order: all axes' begins (N, C, H, W), then all ends.
            model.graph.initializer.append(
                numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64), pads)
            )
            padded = f"{node.name}:channel_padded"
            nodes.append(
                helper.make_node(
                    "Pad", [node.input[0], pads], [padded], name=padded, mode="constant"
                )
            )
            node.input[0] = padded
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that must stay float32 because their int8 form computes something else.

    - A Relu whose input is also a pipeline output (a tap before the activation): onnxruntime
      gives the Relu's input the Relu's output range [0, max] (adjust_tensor_ranges counts the
      input's consumers, not graph outputs), which clips the tapped values at 0.
    - An AveragePool with both ceil_mode and count_include_pad: QLinearAveragePool counts the
      cells ceil_mode adds past the padding, which the float op and our semantics never do.
    - A dilated AveragePool: QLinearAveragePool has no dilations (onnxruntime refuses the
      model).
    - A Conv with an all-zero filter: its weight scale is a dummy 1.0, so its int32 bias is
      quantized in steps of the input's scale, and a bias below half a step becomes 0.
    """
    outputs = {output.name for output in model.graph.output}
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}

    def must_stay_float(node: onnx.NodeProto) -> bool:
        attributes = node_attributes(node)
        if node.op_type == "Relu":
            return node.input[0] in outputs
        if node.op_type == "AveragePool":
            dilated = any(d != 1 for d in attributes.get("dilations", [1, 1]))
            counted_past_padding = attributes.get("ceil_mode", 0) and attributes.get(
                "count_include_pad", 0
            )
            return bool(dilated or counted_past_padding)
        if node.op_type == "Conv" and node.input[1] in initializers:
            kernel = numpy_helper.to_array(initializers[node.input[1]])
            return not kernel.reshape(len(kernel), -1).any(axis=1).all()
        return False

    return [node.name for node in model.graph.node if must_stay_float(node)]


def shapes_from_quantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """Let Shape nodes read a DequantizeLinear's quantized input instead of its output, in place.

    SAME padding with stride reads the input's size with a Shape node; fed from a
    DequantizeLinear, it makes onnxruntime dequantize a whole feature map for four numbers.
    """
    producers = {output: node for node in model.graph.node for output in node.output}
    for node in model.graph.node:
        producer = producers.get(node.input[0]) if node.op_type == "Shape" else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            node.input[0] = producer.input[0]
    consumed = {name for node in model.graph.node for name in node.input}
    consumed |= {output.name for output in model.graph.output}
    unused = [
        node
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.output[0] not in consumed
    ]
    for node in unused:
        model.graph.node.remove(node)
    return model


def pad_after_quantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pad -> QuantizeLinear becomes QuantizeLinear -> Pad with the zero point, in place.

    The channel Pad of align_conv_channels then moves uint8 bytes, not float32: a quarter of
    the memory traffic, and a quarter fewer values to quantize. Padding with the zero point
    is what quantizing the zero padding gives.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes: list[onnx.NodeProto] = []
    moved: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if any(node is quantize for quantize in moved):
            continue
        following = consumers.get(node.output[0], [])
        if not (
            node.op_type == "Pad"
            and node.name.endswith(":channel_padded")
            and len(following) == 1
            and following[0].op_type == "QuantizeLinear"
        ):
            nodes.append(node)
            continue
        quantize = following[0]
        quantized, padded = f"{node.name}:quantized", quantize.output[0]
        quantize.input[0], quantize.output[0] = node.input[0], quantized
        node.input[0], node.output[0] = quantized, padded
        node.input.append(quantize.input[2])  # Pad's constant_value: the zero point
        nodes += [quantize, node]
        moved.append(quantize)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def remove_unused(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing reads (the graph's outputs count as read), in place."""
    while True:
        read = {name for node in model.graph.node for name in node.input}
        read |= {output.name for output in model.graph.output}
        dead = [node for node in model.graph.node if not any(o in read for o in node.output)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    unused = [tensor for tensor in model.graph.initializer if tensor.name not in read]
    for tensor in unused:
        model.graph.initializer.remove(tensor)


def pixels_as_quantized_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """uint8 pixels feed the quantized graph as they are: Cast -> Mul(s) -> QuantizeLinear goes.

    The pixel variant's input p (uint8) becomes p * s (s > 0, the pipeline's input scale, 1/255
    by default), then quantizes with the calibrated scale and zero point. Given instead the
    scale s and zero point 0, that quantization is round(p * s / s) = p: the pixels themselves,
    so the uint8 input is the quantized tensor, and every node that reads its scale and zero
    point dequantizes it to p * s. It is also exact where the calibrated scale (its range
    widened by the headroom) rounded p * s to about 1.25 pixel levels. A Transpose (NHWC
    input) stays, on uint8. In place; any other input chain (mean, std) is left as it is.
    """
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str, op_type: str) -> onnx.NodeProto | None:
        found = consumers.get(name, [])
        ok = len(found) == 1 and found[0].op_type == op_type
        return found[0] if ok and name not in {o.name for o in graph.output} else None

    def scalar(name: str) -> np.ndarray | None:
        tensor = initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    if len(graph.input) != 1 or graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        return model
    pixels = graph.input[0].name
    cast = only_consumer(pixels, "Cast")
    if cast is None:
        return model
    transpose = only_consumer(cast.output[0], "Transpose")
    mul = only_consumer((transpose or cast).output[0], "Mul")
    quantize = None if mul is None else only_consumer(mul.output[0], "QuantizeLinear")
    if mul is None or quantize is None or len(quantize.input) < 3:
        return model
    factor = scalar(mul.input[1])
    scale, zero_point = scalar(quantize.input[1]), scalar(quantize.input[2])
    if (
        factor is None
        or scale is None
        or zero_point is None
        or factor.size != 1
        or scale.size != 1
        or zero_point.dtype != np.uint8
        or not factor.item() > 0
        # Another QuantizeLinear with these names quantizes another tensor with them.
        or sum(n.op_type == "QuantizeLinear" and quantize.input[1] in n.input for n in graph.node)
        != 1
    ):
        return model
    initializers[quantize.input[1]].CopyFrom(
        numpy_helper.from_array(np.full(scale.shape, factor.item(), np.float32), quantize.input[1])
    )
    initializers[quantize.input[2]].CopyFrom(
        numpy_helper.from_array(np.zeros(zero_point.shape, np.uint8), quantize.input[2])
    )
    if transpose is not None:
        # The layout change moves uint8 bytes now, straight from the input.
        transpose.input[0] = pixels
        quantized = transpose.output[0]
    else:
        quantized = pixels
    for node in consumers.get(quantize.output[0], []):
        for index, name in enumerate(node.input):
            if name == quantize.output[0]:
                node.input[index] = quantized
    # Types recorded for the float tensors would now be wrong (the Transpose's is uint8).
    gone = {cast.output[0], mul.output[0], quantize.output[0], quantized}
    for info in [info for info in graph.value_info if info.name in gone]:
        graph.value_info.remove(info)
    for node in (cast, mul, quantize):
        graph.node.remove(node)
    remove_unused(model)
    return model
