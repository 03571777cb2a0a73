"""float32 ONNX model -> int8 ONNX model, and how far the int8 results are from float32.

onnxruntime's static quantization does the work: QDQ format, per-channel symmetric int8
weights, uint8 activations calibrated by min/max over the calibration images. What is ours:

- Which ops quantize (QUANTIZED_OP_TYPES): those with integer kernels on onnxruntime's CPU
  provider, which it then runs fused (QLinearConv, uint8 MaxPool, QLinearAveragePool, ...). The
  input pre-processing (Cast, Transpose, scale/mean/std), GlobalMaxPool and the int64 shape
  arithmetic of SAME padding stay float: they have no integer kernel, and a Quantize/Dequantize
  pair around them would only add work and error. A few nodes must stay float because their
  int8 form computes something else (_float_nodes).
- A dense conv whose input channels are not a multiple of 4 (the RGB first layer) gets zero
  channels and zero kernel slices appended: MLAS's fast symmetric int8 conv needs multiples of
  4; without it the 3-channel first conv takes 1.5x as long in int8 as in float32 (with it,
  about as long: a 3-channel conv is bound by memory and bookkeeping, not arithmetic).
- Such a few-channel conv followed by a 2x2 max pool (the standard pipeline's first block) then
  runs on 2x2 blocks of pixels as channels, its pool a max over channel groups
  (_pooled_convs_on_blocks): the same integers and bytes out, the block in ~0.6x the time. The
  model then holds onnxruntime contrib ops (com.microsoft QLinearConv, NhwcMaxPool), which
  int8 sessions run anyway: they are CPU-only.
- The calibrated ranges get headroom (Int8Settings) and are rounded up to a coarse grid
  before the scales are chosen: images a little brighter or sharper than the calibration set
  are not clipped, and last-bit differences between CPUs' float32 calibration runs give the
  same bytes.
- The weights are 8-bit where the CPU has int8 dot products and 7-bit elsewhere, where 8-bit
  products saturate (featmap.service.int8_cpu).

The error is measured, never promised: `quantize_with_report` runs both models on the
calibration images and `measure_error` compares them output by output (batch by batch:
ErrorMeasure). The report's types and the threshold check are the contract's
(featmap.contract.precision): clients read them too. `quantize_pipeline` is what the session
cache, `featmap summary` and `featmap export-onnx` call for an int8 spec.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from featmap.contract.errors import InvalidTensor
from featmap.contract.limits import (
    CALIBRATION_BATCH,
    DEFAULT_CALIBRATION_SIZE,
    SYNTHETIC_CALIBRATION,
)
from featmap.contract.precision import OutputError, QuantizationReport
from featmap.contract.spec import NO_TENSORS, Pipeline, WeightTensors, content_id
from featmap.service.graph import compile_pipeline
from featmap.service.int8_cpu import (
    DEFAULT_SETTINGS,
    WEIGHT_BITS_PROPERTY,
    Int8Settings,
    check_runs_here,
    cpu_int8_support,
)
from featmap.service.weights import uniform

# Ops quantized to int8/uint8; every other op keeps float32 (see the module docstring).
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
# The calibration set when the user sends none (see synthetic_calibration), at
# DEFAULT_CALIBRATION_SIZE; the calibration runs CALIBRATION_BATCH images at a time (min/max
# does not depend on how the images are batched, and small batches bound the calibration
# session's memory whatever the number of images). The contract's memory estimates count them.
DEFAULT_CALIBRATION_IMAGES = SYNTHETIC_CALIBRATION
# Calibrated ranges, widened by Int8Settings.headroom, are rounded up to this many significant
# bits (at most 1/128 wider).
RANGE_BITS = 8
# MLAS's symmetric int8 conv kernels take input channels in multiples of this, and at least 16
# filters in multiples of 8 (AVX2; 4 on AVX-512).
CONV_CHANNEL_MULTIPLE = 4
CONV_MIN_FILTERS = 16
CONV_FILTER_MULTIPLE = 8
PRECISION_PROPERTY = "featmap.precision"

_ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
_INPUT_DTYPES: dict[int, np.dtype[Any]] = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.UINT8: np.dtype(np.uint8),
}


@dataclass(frozen=True)
class QuantizedModel:
    """An int8 model and the error it was measured to have."""

    model: onnx.ModelProto
    report: QuantizationReport


def model_properties(model: onnx.ModelProto) -> dict[str, str]:
    """A model's metadata properties."""
    return {p.key: p.value for p in model.metadata_props}


def check_int8_model_runs_here(model: onnx.ModelProto) -> None:
    """Unsupported when an int8 model's weights would be inexact on this CPU (check_runs_here).

    A model quantized here always runs here; one quantized elsewhere (read from a file or a
    store) may hold 8-bit weights that this CPU's kernels saturate. A model without the
    property is float32, or was not made by featmap.
    """
    weight_bits = model_properties(model).get(WEIGHT_BITS_PROPERTY)
    if weight_bits is not None:
        check_runs_here(int(weight_bits))


def _input_info(model: onnx.ModelProto) -> tuple[str, np.dtype[Any], list[int]]:
    """(name, dtype, static dims with 0 for symbolic ones) of the model's single input."""
    (graph_input,) = model.graph.input
    tensor_type = graph_input.type.tensor_type
    dims = [d.dim_value for d in tensor_type.shape.dim]
    return graph_input.name, _INPUT_DTYPES[tensor_type.elem_type], dims


def _check_calibration(model: onnx.ModelProto, calibration: np.ndarray) -> None:
    """Calibration images must be a non-empty batch the model takes, and finite."""
    _, dtype, dims = _input_info(model)
    if calibration.dtype != dtype:
        raise InvalidTensor(
            "calibration.dtype", f"calibration images are {calibration.dtype}; the input is {dtype}"
        )
    fits = calibration.ndim == len(dims) and all(
        want in (0, got) for want, got in zip(dims, calibration.shape, strict=True)
    )
    if not fits or calibration.shape[0] == 0 or calibration.size == 0:
        shape = tuple(d or "?" for d in dims)
        raise InvalidTensor(
            "calibration.shape",
            f"calibration images have shape {calibration.shape}; the input takes {shape}",
        )
    if dtype.kind == "f" and not np.isfinite(calibration).all():
        raise InvalidTensor("calibration.data", "calibration images contain NaN or Inf")


class _Batches(CalibrationDataReader):
    """Feeds the calibration images to onnxruntime's calibrator, CALIBRATION_BATCH at a time."""

    def __init__(
        self,
        input_name: str,
        image_sets: Sequence[np.ndarray],
        still_wanted: Callable[[], None] | None = None,
    ) -> None:
        # The model's height and width are dynamic: each set may have its own image size.
        self._batches: Iterator[np.ndarray] = (
            images[start : start + CALIBRATION_BATCH]
            for images in image_sets
            for start in range(0, len(images), CALIBRATION_BATCH)
        )
        self._input_name = input_name
        self._still_wanted = still_wanted

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as session inputs, or None when done (Abandoned: nobody waits)."""
        if self._still_wanted is not None:
            self._still_wanted()
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _align_conv_channels(model: onnx.ModelProto) -> onnx.ModelProto:
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
            and _attributes(node).get("group", 1) == 1
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


def _float_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that must stay float32 because their int8 form computes something else.

    - A Relu whose input is also a pipeline output (a tap before the activation): onnxruntime
      gives the Relu's input the Relu's output range [0, max] (adjust_tensor_ranges counts the
      input's consumers, not graph outputs), which clips the tapped values at 0.
    - An AveragePool with both ceil_mode and count_include_pad: QLinearAveragePool counts the
      cells ceil_mode adds past the padding, which the float op and our semantics never do.
    - A Conv with an all-zero filter: its weight scale is a dummy 1.0, so its int32 bias is
      quantized in steps of the input's scale, and a bias below half a step becomes 0.
    """
    outputs = {output.name for output in model.graph.output}
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}

    def must_stay_float(node: onnx.NodeProto) -> bool:
        attributes = _attributes(node)
        if node.op_type == "Relu":
            return node.input[0] in outputs
        if node.op_type == "AveragePool":
            return bool(attributes.get("ceil_mode", 0) and attributes.get("count_include_pad", 0))
        if node.op_type == "Conv" and node.input[1] in initializers:
            kernel = numpy_helper.to_array(initializers[node.input[1]])
            return not kernel.reshape(len(kernel), -1).any(axis=1).all()
        return False

    return [node.name for node in model.graph.node if must_stay_float(node)]


def _shapes_from_quantized(model: onnx.ModelProto) -> onnx.ModelProto:
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


def _pad_after_quantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pad -> QuantizeLinear becomes QuantizeLinear -> Pad with the zero point, in place.

    The channel Pad of _align_conv_channels then moves uint8 bytes, not float32: a quarter of
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


# A pooled conv is run on 2x2 blocks of pixels (_pooled_convs_on_blocks) when it has at most
# this many input channels: a few-channel conv is bound by per-pixel bookkeeping, not by the
# multiply-adds the blocks add ((2 * (k // 2 + 1) / k)^2: 1.8x for 3x3).
BLOCK_CONV_MAX_CHANNELS = CONV_CHANNEL_MULTIPLE
# ... and at most this many filters: a wider conv is bound by its multiply-adds again, and the
# block kernel (7x the weights for 3x3; at most 256 KiB, twice that once onnxruntime has
# packed it) stays within the 1 MiB a kept int8 session is charged beyond its 2 bytes a weight.
BLOCK_CONV_MAX_FILTERS = 256
# Kernel heights and widths: a 1x1 conv would do 4x the multiply-adds (no taps to share
# between a block's pixels); past 7 the kernel is no longer the cheap part.
BLOCK_CONV_KERNELS = range(2, 8)
CONTRIB_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class _PooledConv:
    """A uint8 tensor -> DQ -> Conv -> Q -> DQ -> MaxPool 2x2/2 -> Q chain in a QDQ model."""

    source: str  # the uint8 NCHW tensor the conv reads (before any channel Pad)
    channel_extra: int  # zero-point channels a channel Pad appends to `source`
    input_scale: str
    input_zero_point: str
    kernel: np.ndarray  # int8 (filters, channels, kh, kw)
    kernel_scale: np.ndarray  # float32 (filters,)
    bias: np.ndarray | None  # int32 (filters,)
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    output_scale: str
    output_zero_point: str
    output: str  # the pooled uint8 NCHW tensor
    removed: tuple[onnx.NodeProto, ...]  # the Conv ... pooled Q nodes this replaces


def _match_pooled_conv(
    conv: onnx.NodeProto,
    producers: Mapping[str, onnx.NodeProto],
    consumers: Mapping[str, list[onnx.NodeProto]],
    initializers: Mapping[str, onnx.TensorProto],
    outputs: set[str],
) -> _PooledConv | None:
    """The chain around `conv` that _pooled_convs_on_blocks rewrites, or None."""

    def only_consumer(name: str, op_type: str) -> onnx.NodeProto | None:
        following = consumers.get(name, [])
        if name in outputs or len(following) != 1 or following[0].op_type != op_type:
            return None
        return following[0]

    def array(name: str) -> np.ndarray | None:
        tensor = initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    attributes = _attributes(conv)
    if (
        attributes.get("group", 1) != 1
        or any(s != 1 for s in attributes.get("strides", [1, 1]))
        or any(d != 1 for d in attributes.get("dilations", [1, 1]))
        or attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")
    ):
        return None
    x_dq, w_dq = (producers.get(name) for name in conv.input[:2])
    b_dq = producers.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if x_dq is None or w_dq is None or len(x_dq.input) < 3:
        return None
    if x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
        return None
    kernel, kernel_scale = array(w_dq.input[0]), array(w_dq.input[1])
    kernel_zero = array(w_dq.input[2]) if len(w_dq.input) > 2 else None
    if (
        kernel is None
        or kernel_scale is None
        or kernel.dtype != np.int8
        or kernel.ndim != 4
        or (kernel_zero is not None and kernel_zero.any())
        or kernel.shape[1] > BLOCK_CONV_MAX_CHANNELS
        or not all(k in BLOCK_CONV_KERNELS for k in kernel.shape[2:])
        or kernel.shape[0] > BLOCK_CONV_MAX_FILTERS
        or (4 * kernel.shape[0]) < CONV_MIN_FILTERS
        or (4 * kernel.shape[0]) % CONV_FILTER_MULTIPLE
    ):
        return None
    bias = None
    if b_dq is not None:
        bias = array(b_dq.input[0]) if b_dq.op_type == "DequantizeLinear" else None
        if bias is None or bias.dtype != np.int32:
            return None
    pads = attributes.get("pads", [0, 0, 0, 0])
    input_scale, input_zero_point = array(x_dq.input[1]), array(x_dq.input[2])
    if input_scale is None or input_zero_point is None or input_scale.size != 1:
        return None
    # The conv's output and its MaxPool, each through a uint8 Quantize/Dequantize pair.
    y_q = only_consumer(conv.output[0], "QuantizeLinear")
    y_dq = only_consumer(y_q.output[0], "DequantizeLinear") if y_q else None
    pool = only_consumer(y_dq.output[0], "MaxPool") if y_dq else None
    pool_q = only_consumer(pool.output[0], "QuantizeLinear") if pool else None
    if y_q is None or y_dq is None or pool is None or pool_q is None or len(pool.output) != 1:
        return None
    pool_attributes = _attributes(pool)
    if (
        list(pool_attributes.get("kernel_shape", [])) != [2, 2]
        or list(pool_attributes.get("strides", [1, 1])) != [2, 2]
        or any(pool_attributes.get("pads", [0, 0, 0, 0]))
        or any(d != 1 for d in pool_attributes.get("dilations", [1, 1]))
        or pool_attributes.get("ceil_mode", 0)
        or pool_attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")
    ):
        return None
    quantizations = [node.input[1:3] for node in (y_q, y_dq, pool_q)]
    output_type = array(y_q.input[2]) if len(y_q.input) > 2 else None
    if any(q != quantizations[0] for q in quantizations) or output_type is None:
        return None
    if output_type.dtype != np.uint8 or input_zero_point.dtype != np.uint8:
        return None
    # A channel Pad (_align_conv_channels) folds into the block Pad.
    source, channel_extra = x_dq.input[0], 0
    channel_pad = producers.get(source)
    if channel_pad is not None and channel_pad.name.endswith(":channel_padded"):
        channel_pads = array(channel_pad.input[1])
        if channel_pads is not None and channel_pad.input[2] == x_dq.input[2]:
            source, channel_extra = channel_pad.input[0], int(channel_pads[5])
    return _PooledConv(
        source=source,
        channel_extra=channel_extra,
        input_scale=x_dq.input[1],
        input_zero_point=x_dq.input[2],
        kernel=kernel,
        kernel_scale=np.broadcast_to(kernel_scale, kernel.shape[:1]).astype(np.float32),
        bias=bias,
        pads=(int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3])),
        output_scale=y_q.input[1],
        output_zero_point=y_q.input[2],
        output=pool_q.output[0],
        removed=(conv, y_q, y_dq, pool, pool_q),
    )


def block_kernel(kernel: np.ndarray) -> np.ndarray:
    """A stride-1 conv kernel (M, C, kh, kw) as one on 2x2 blocks: (4M, 4C, kh//2+1, kw//2+1).

    Output channel g*M + m, g = 2*dy + dx, is filter m at the pixel (dy, dx) of its output block;
    input channel (2*sy + sx)*C + c is channel c of the pixel (sy, sx) of an input block. Every
    other weight is zero, so each output sums the same products as the original conv.
    """
    filters, channels, height, width = kernel.shape
    blocked = np.zeros(
        (4 * filters, 4 * channels, height // 2 + 1, width // 2 + 1), dtype=kernel.dtype
    )
    for dy in range(2):
        for dx in range(2):
            rows = slice((2 * dy + dx) * filters, (2 * dy + dx + 1) * filters)
            for ky in range(height):
                by, sy = divmod(dy + ky, 2)
                for kx in range(width):
                    bx, sx = divmod(dx + kx, 2)
                    start = (2 * sy + sx) * channels
                    blocked[rows, start : start + channels, by, bx] = kernel[:, :, ky, kx]
    return blocked


def _block_conv_nodes(
    chain: _PooledConv, name: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers computing chain.output from chain.source on 2x2 blocks.

    Pad (the conv's own top/left padding, the channel alignment, and at the bottom/right what
    makes whole blocks: computed from the input's size, which the model leaves dynamic) ->
    NHWC -> 2x2 blocks as channels -> QLinearConv -> the max over each block's four pixels
    (NhwcMaxPool over the four channel groups) -> NCHW. For every image size the contract
    admits (each layer's output at least one pixel: layer_costs); below that onnxruntime
    refuses the block conv where the plain graph would pool an empty map.
    """
    filters, channels, height, width = chain.kernel.shape
    top, left, bottom, right = chain.pads
    constants = {
        "hw_start": np.array([2], np.int64),
        "hw_end": np.array([4], np.int64),
        "window": np.array([top + bottom - height + 1, left + right - width + 1], np.int64),
        "two": np.array(2, np.int64),
        "extra_blocks": np.array([height // 2, width // 2], np.int64),
        "start_pads": np.array([top, left], np.int64),
        "fixed_pads": np.array([0, 0, top, left, 0, chain.channel_extra], np.int64),
        "w_start": np.array([1], np.int64),
        "w_end": np.array([2], np.int64),
        "rows_head": np.array([-1, 2], np.int64),
        "pair_channels": np.array([2 * channels], np.int64),
        "batch": np.array([-1], np.int64),
        "block_channels": np.array([4 * channels], np.int64),
        "group_shape": np.array([0, -1, 4, filters], np.int64),
        "filters": np.array([filters], np.int64),
        "kernel": block_kernel(chain.kernel),
        "kernel_scale": np.tile(chain.kernel_scale, 4),
        "kernel_zero_point": np.zeros(4 * filters, np.int8),
    }
    if chain.bias is not None:
        constants["bias"] = np.tile(chain.bias, 4)
    c = {key: f"{name}:{key}" for key in constants}
    initializers = [numpy_helper.from_array(value, c[key]) for key, value in constants.items()]

    def t(suffix: str) -> str:
        return f"{name}:{suffix}"

    def node(op_type: str, inputs: list[str], output: str, **attributes: Any) -> onnx.NodeProto:
        domain = CONTRIB_DOMAIN if op_type in ("QLinearConv", "NhwcMaxPool") else ""
        return helper.make_node(op_type, inputs, [output], name=output, domain=domain, **attributes)

    conv_inputs = [t("blocks"), chain.input_scale, chain.input_zero_point, c["kernel"]]
    conv_inputs += [c["kernel_scale"], c["kernel_zero_point"]]
    conv_inputs += [chain.output_scale, chain.output_zero_point]
    if chain.bias is not None:
        conv_inputs.append(c["bias"])
    block_height, block_width = height // 2 + 1, width // 2 + 1
    nodes = [
        # pooled = (size + pads - kernel + 1) // 2 output blocks, which read
        # pooled + kernel // 2 input blocks: the bottom/right pad makes that many (or crops).
        node("Shape", [chain.source], t("shape")),
        node("Slice", [t("shape"), c["hw_start"], c["hw_end"]], t("hw")),
        node("Add", [t("hw"), c["window"]], t("conv_hw")),
        node("Div", [t("conv_hw"), c["two"]], t("pooled_hw")),
        node("Add", [t("pooled_hw"), c["extra_blocks"]], t("blocks_hw")),
        node("Mul", [t("blocks_hw"), c["two"]], t("padded_hw")),
        node("Sub", [t("padded_hw"), c["start_pads"]], t("end_hw")),
        node("Sub", [t("end_hw"), t("hw")], t("end_pads")),
        node("Concat", [c["fixed_pads"], t("end_pads")], t("pads"), axis=0),
        node("Pad", [chain.source, t("pads"), chain.input_zero_point], t("padded")),
        # (N, C, 2Hb, 2Wb) -> (N, 2Hb, 2Wb, C) -> (N*Hb, 2, Wb, 2C) -> (N*Hb, Wb, 2, 2C)
        # -> (N, Hb, Wb, 4C): each 2x2 block's pixels as channels, (sy, sx, c) order.
        node("Transpose", [t("padded")], t("nhwc"), perm=[0, 2, 3, 1]),
        node("Slice", [t("blocks_hw"), c["w_start"], c["w_end"]], t("blocks_w")),
        node(
            "Concat", [c["rows_head"], t("blocks_w"), c["pair_channels"]], t("rows_shape"), axis=0
        ),
        node("Reshape", [t("nhwc"), t("rows_shape")], t("rows")),
        node("Transpose", [t("rows")], t("row_blocks"), perm=[0, 2, 1, 3]),
        node(
            "Concat", [c["batch"], t("blocks_hw"), c["block_channels"]], t("blocks_shape"), axis=0
        ),
        node("Reshape", [t("row_blocks"), t("blocks_shape")], t("blocks")),
        node(
            "QLinearConv",
            conv_inputs,
            t("conv"),
            channels_last=1,
            kernel_shape=[block_height, block_width],
            pads=[0, 0, 0, 0],
            strides=[1, 1],
            dilations=[1, 1],
            group=1,
        ),
        # (N, Hp, Wp, 4M) -> (N, Hp*Wp, 4, M): the max over the 4 groups is the 2x2 max pool.
        node("Reshape", [t("conv"), c["group_shape"]], t("groups")),
        node("NhwcMaxPool", [t("groups")], t("pooled"), kernel_shape=[1, 4], strides=[1, 4]),
        node("Concat", [c["batch"], t("pooled_hw"), c["filters"]], t("pooled_shape"), axis=0),
        node("Reshape", [t("pooled"), t("pooled_shape")], t("pooled_nhwc")),
        node("Transpose", [t("pooled_nhwc")], chain.output, perm=[0, 3, 1, 2]),
    ]
    return nodes, initializers


def _pooled_convs_on_blocks(model: onnx.ModelProto) -> onnx.ModelProto:
    """A few-channel stride-1 conv followed by a 2x2/2 max pool runs on 2x2 blocks, in place.

    The conv computes each pixel's output from few channels (3 for RGB), and onnxruntime's
    int8 conv then spends its time per output pixel (an indirection entry per kernel tap,
    a requantization per pixel), not in the multiply-adds. On 2x2 blocks of pixels as channels
    (block_kernel), the same conv has a quarter of the output pixels with four times the
    channels, and the max pool that follows becomes a max over the four channel groups: the
    same integers, the same bytes out, in about 0.6x the time (scripts/int8_speed.py).
    """
    producers = {name: node for node in model.graph.node for name in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    outputs = {output.name for output in model.graph.output}
    chains = [
        chain
        for node in model.graph.node
        if node.op_type == "Conv"
        and (chain := _match_pooled_conv(node, producers, consumers, initializers, outputs))
    ]
    if not chains:
        return model
    replacing = {chain.output: chain for chain in chains}
    removed = {id(node) for chain in chains for node in chain.removed}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        chain = replacing.get(node.output[0])
        if chain is not None:
            conv_name = chain.removed[0].name
            block_nodes, block_initializers = _block_conv_nodes(chain, f"{conv_name}:blocks")
            nodes += block_nodes
            model.graph.initializer.extend(block_initializers)
        elif id(node) not in removed:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _remove_unused(model)
    if not any(opset.domain == CONTRIB_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return model


def _remove_unused(model: onnx.ModelProto) -> None:
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


def _round_up(value: float, bits: int) -> float:
    """`value` rounded away from zero to `bits` significant bits."""
    if value == 0 or not math.isfinite(value):
        return value
    mantissa, exponent = math.frexp(abs(value))
    return math.copysign(math.ldexp(math.ceil(mantissa * 2**bits) / 2**bits, exponent), value)


def _widen_ranges(cache: Path, headroom: float) -> None:
    """Widen onnxruntime's calibration cache (JSON) by `headroom`, rounded up, in place."""
    ranges = json.loads(cache.read_text())
    for tensor in ranges["data"].values():
        for end in ("lowest", "highest"):
            values = tensor[end]["data"]
            tensor[end]["data"] = [_round_up(v * headroom, RANGE_BITS) for v in values]
    cache.write_text(json.dumps(ranges, sort_keys=True))


def quantize_int8(
    model: onnx.ModelProto,
    calibration: np.ndarray | Sequence[np.ndarray],
    *,
    settings: Int8Settings = DEFAULT_SETTINGS,
    still_wanted: Callable[[], None] | None = None,
) -> onnx.ModelProto:
    """The int8 version of a float32 model, calibrated on `calibration`.

    Args:
        model: a compiled pipeline (one input, float32 outputs); it is not modified.
        calibration: a batch of images as the model's input takes them (dtype, layout), or
            several batches (each may have its own image size): the ranges cover them all.
        settings: how to quantize; the defaults are the measured best here, with the
            weight bits this CPU computes exactly (Int8Settings.for_cpu).
        still_wanted: called before each calibration batch; what it raises stops the work.

    Returns:
        A model with the same input and outputs and the metadata properties
        featmap.precision=int8 and featmap.int8_weight_bits. The same model, images, settings
        (weight bits decided) and onnxruntime version give the same bytes.
    """
    settings = settings.for_cpu()
    image_sets = [calibration] if isinstance(calibration, np.ndarray) else list(calibration)
    if not image_sets:
        raise InvalidTensor("calibration", "no calibration images")
    for images in image_sets:
        _check_calibration(model, images)
    input_name, _, _ = _input_info(model)
    prepared = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's stays as is
    if settings.align_channels:
        prepared = _align_conv_channels(prepared)
    options: dict[str, Any] = {
        "quant_format": _FORMATS[settings.quant_format],
        "op_types_to_quantize": list(QUANTIZED_OP_TYPES),
        "nodes_to_exclude": [*_float_nodes(prepared), *settings.keep_float],
        "per_channel": settings.per_channel,
        # onnxruntime's reduce_range is 7-bit weights (activations keep their 8 bits).
        "reduce_range": settings.weight_bits == 7,
        "activation_type": _ACTIVATION_TYPES[settings.activation_type],
        "weight_type": QuantType.QInt8,
        "calibrate_method": CalibrationMethod.MinMax,
        "extra_options": {
            "WeightSymmetric": True,
            "ActivationSymmetric": settings.symmetric_activations,
        },
    }
    with tempfile.TemporaryDirectory(prefix="featmap-int8-") as scratch:
        # onnxruntime's quantization tools work on files: given a ModelProto, they save it with
        # external data (quantize_static even converts the caller's proto in place), which
        # quant_pre_process then fails to read back. Plain files in a private folder avoid both.
        directory = Path(scratch)
        onnx.save(prepared, str(directory / "float32.onnx"))
        # Shape inference (onnx) and basic graph optimization (onnxruntime); symbolic shape
        # inference would need sympy and only helps transformers.
        quant_pre_process(
            str(directory / "float32.onnx"),
            str(directory / "preprocessed.onnx"),
            skip_symbolic_shape=True,
        )
        # Calibrate (this first pass also quantizes, with the raw ranges: thrown away), widen the
        # cached ranges, then quantize from the cache without running the model again.
        cache = directory / "ranges.json"
        quantize_static(
            str(directory / "preprocessed.onnx"),
            str(directory / "raw.onnx"),
            _Batches(input_name, image_sets, still_wanted),
            calibration_cache_path=str(cache),
            **options,
        )
        _widen_ranges(cache, settings.headroom)
        quantize_static(
            str(directory / "preprocessed.onnx"),
            str(directory / "int8.onnx"),
            None,
            calibration_cache_path=str(cache),
            **options,
        )
        quantized = onnx.load(str(directory / "int8.onnx"))
    quantized = _pad_after_quantize(_shapes_from_quantized(quantized))
    if settings.pooled_conv_blocks:
        quantized = _pooled_convs_on_blocks(quantized)
    properties = model_properties(quantized)
    properties[PRECISION_PROPERTY] = "int8"
    properties[WEIGHT_BITS_PROPERTY] = str(settings.weight_bits)
    helper.set_model_props(quantized, dict(sorted(properties.items())))
    return quantized


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """A CPU session of `model` with `threads` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _run_batches(
    model: onnx.ModelProto, images: np.ndarray, threads: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every output of `model`, CALIBRATION_BATCH images at a time."""
    session = _session(model, threads)
    input_name, _, _ = _input_info(model)
    names = [output.name for output in model.graph.output]
    for start in range(0, len(images), CALIBRATION_BATCH):
        results = session.run(names, {input_name: images[start : start + CALIBRATION_BATCH]})
        yield dict(zip(names, results, strict=True))


def run_model(
    model: onnx.ModelProto, images: np.ndarray, *, threads: int = 0
) -> dict[str, np.ndarray]:
    """Every output of `model` for `images` on onnxruntime's CPU provider, batch by batch."""
    names = [output.name for output in model.graph.output]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for outputs in _run_batches(model, images, threads):
        for name in names:
            parts[name].append(outputs[name])
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _cosines(reference: np.ndarray, approximate: np.ndarray) -> np.ndarray:
    """Per-image cosine similarity of two (N, ...) arrays, in float64."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = approximate.reshape(len(approximate), -1).astype(np.float64)
    dots = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    # All zero on both sides is agreement; all zero on one side only is no similarity at all.
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    return np.where(both_zero, 1.0, np.clip(cosine, -1.0, 1.0))


@dataclass
class _Running:
    """One output's error so far: the largest |difference| and |float32|, the smallest cosine."""

    max_abs_error: float = 0.0
    scale: float = 0.0
    cosine: float = 1.0


class ErrorMeasure:
    """measure_error over batches of images, in the memory of one batch of outputs.

    Maxima and the per-image cosines do not depend on how the images are batched: the errors
    are the same numbers measure_error gives on all the outputs at once.
    """

    def __init__(self) -> None:
        self._outputs: dict[str, _Running] = {}

    def add(
        self, float_outputs: Mapping[str, np.ndarray], int8_outputs: Mapping[str, np.ndarray]
    ) -> None:
        """Compare one batch's outputs (same names, shapes, batch first)."""
        if float_outputs.keys() != int8_outputs.keys():
            raise ValueError(f"outputs differ: {sorted(float_outputs)} vs {sorted(int8_outputs)}")
        for name, reference in float_outputs.items():
            approximate = int8_outputs[name]
            if reference.shape != approximate.shape:
                raise ValueError(f"shapes differ: {reference.shape} vs {approximate.shape}")
            running = self._outputs.setdefault(name, _Running())
            # A few images at a time: the float64 differences of a whole output can be
            # gigabytes (a full-resolution tap over hundreds of images).
            for start in range(0, len(reference), CALIBRATION_BATCH):
                a = reference[start : start + CALIBRATION_BATCH]
                b = approximate[start : start + CALIBRATION_BATCH]
                difference = np.abs(b.astype(np.float64) - a.astype(np.float64))
                largest = float(difference.max(initial=0.0))
                running.max_abs_error = max(running.max_abs_error, largest)
                running.scale = max(running.scale, float(np.abs(a).max(initial=0.0)))
                running.cosine = min(running.cosine, float(_cosines(a, b).min(initial=1.0)))

    def errors(self) -> dict[str, OutputError]:
        """Per output, the OutputError of everything added."""
        return {
            name: OutputError(
                cosine=running.cosine,
                max_error=(
                    running.max_abs_error / running.scale
                    if running.scale > 0
                    else (math.inf if running.max_abs_error else 0.0)
                ),
                max_abs_error=running.max_abs_error,
            )
            for name, running in self._outputs.items()
        }


def output_error(reference: np.ndarray, approximate: np.ndarray) -> OutputError:
    """The OutputError of `approximate` against `reference` (same shape, batch first)."""
    measure = ErrorMeasure()
    measure.add({"output": reference}, {"output": approximate})
    return measure.errors()["output"]


def measure_error(
    float_outputs: Mapping[str, np.ndarray], int8_outputs: Mapping[str, np.ndarray]
) -> dict[str, OutputError]:
    """Per output, how far int8 is from float32 on the same images (see OutputError)."""
    measure = ErrorMeasure()
    measure.add(float_outputs, int8_outputs)
    return measure.errors()


def _synthetic_image(index: int, channels: int, height: int, width: int, seed: int) -> np.ndarray:
    """Image `index` of synthetic_calibration, (channels, height, width) in [0, 1], float64."""
    if index < 2:
        return np.full((channels, height, width), float(index))  # black, white
    stream = seed * 1_000_003 + index  # one PCG64 stream per image: memory stays per image
    if index % 2:
        return uniform(stream, channels * height * width).reshape(channels, height, width)
    # Amplitude 1/f over the 2D frequency plane (photographs' spectrum); no DC term.
    frequency = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    frequency[0, 0] = np.inf
    numbers = uniform(stream, (channels + 1) * frequency.size + 2)
    phases = numbers[:-2].reshape(channels + 1, *frequency.shape)
    fields = np.fft.irfft2(np.exp(2j * np.pi * phases) / frequency, s=(height, width))
    low = fields.min(axis=(1, 2), keepdims=True)
    high = fields.max(axis=(1, 2), keepdims=True)
    fields = (fields - low) / np.where(high > low, high - low, 1.0)
    # Photographs' channels are strongly correlated: a shared field plus a weaker own one.
    image = (fields[:1] + 0.35 * fields[1:]) / 1.35
    contrast = 0.3 + 0.7 * numbers[-2]
    return image * contrast + numbers[-1] * (1.0 - contrast)


def synthetic_calibration(
    model: onnx.ModelProto,
    *,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    size: tuple[int, int] = DEFAULT_CALIBRATION_SIZE,
    pixel_max: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Seeded images for a model's input that span what pixels can do.

    Image 0 is black and image 1 white (the brightness extremes a smoothing pipeline sees);
    then odd images are uniform noise, every pixel and channel independent (the sharpest
    local contrast an edge filter sees), and even ones colour 1/f noise, the spectrum of
    photographs, at a random contrast and brightness (natural structure). A white pixel is
    `pixel_max`: None means 255 for uint8 input and 1.0 (pixel / 255) for float input. The
    numbers come from PCG64's raw stream, the same on every machine and NumPy version.
    """
    _, dtype, dims = _input_info(model)
    if len(dims) != 4 or not (dims[1] or dims[3]):
        raise ValueError(f"not an image input: dims {dims}")
    channels_last = dims[1] == 0  # channels are the one static axis: 1 (NCHW) or 3 (NHWC)
    channels = dims[3] if channels_last else dims[1]
    height, width = size
    white = pixel_max if pixel_max is not None else (255.0 if dtype == np.uint8 else 1.0)
    shape = (height, width, channels) if channels_last else (channels, height, width)
    images = np.empty((count, *shape), dtype)
    for index in range(count):
        image = _synthetic_image(index, channels, height, width, seed)
        # Whole 1/255 steps, as pixels are: a last-bit difference in the FFT cannot change them.
        values = np.round(image * 255.0) * (white / 255.0)
        images[index] = values.transpose(1, 2, 0) if channels_last else values
    return images


def _image_size(model: onnx.ModelProto, images: np.ndarray) -> tuple[int, int]:
    """(height, width) of a batch the model takes."""
    _, _, dims = _input_info(model)
    height_axis = 1 if dims[1] == 0 else 2  # NHWC: channels are the static last axis
    return images.shape[height_axis], images.shape[height_axis + 1]


def quantize_with_report(
    model: onnx.ModelProto,
    calibration: np.ndarray | None = None,
    *,
    add_synthetic: bool = True,
    pixel_max: float | None = None,
    settings: Int8Settings = DEFAULT_SETTINGS,
    threads: int = 0,
    still_wanted: Callable[[], None] | None = None,
) -> QuantizedModel:
    """Quantize `model` for images like `calibration`, and measure its error on them.

    The ranges come from `calibration` and, with `add_synthetic` (always when there is no
    calibration), from synthetic_calibration at the same image size: its black, white and
    noise images cover images darker, brighter or sharper than the user's, which would
    otherwise clip (scripts/int8_speed.py --calibration: up to 47 % error instead of 1 %), for
    a slightly coarser resolution. The error is measured on `calibration`, or on the
    synthetic images when there is none: both models run on them and every output is
    compared. `pixel_max` is for the synthetic images (see synthetic_calibration).
    `still_wanted` is called between batches of images; what it raises stops the work.
    """
    if calibration is not None:
        _check_calibration(model, calibration)
    size = DEFAULT_CALIBRATION_SIZE if calibration is None else _image_size(model, calibration)
    synthetic = (
        synthetic_calibration(model, size=size, pixel_max=pixel_max)
        if calibration is None or add_synthetic
        else None
    )
    image_sets = [images for images in (calibration, synthetic) if images is not None]
    quantized = quantize_int8(model, image_sets, settings=settings, still_wanted=still_wanted)
    measured = image_sets[0]
    # Batch by batch, both models side by side: memory stays a batch of outputs.
    measure = ErrorMeasure()
    for float_outputs, int8_outputs in zip(
        _run_batches(model, measured, threads),
        _run_batches(quantized, measured, threads),
        strict=True,
    ):
        measure.add(float_outputs, int8_outputs)
        if still_wanted is not None:
            still_wanted()
    errors = measure.errors()
    report = QuantizationReport(
        errors=errors,
        calibration_images=0 if calibration is None else len(calibration),
        synthetic_images=0 if synthetic is None else len(synthetic),
        cpu=cpu_int8_support(),
        weight_bits=int(model_properties(quantized)[WEIGHT_BITS_PROPERTY]),
    )
    return QuantizedModel(model=quantized, report=report)


def quantize_pipeline(
    pipeline: Pipeline,
    tensors: WeightTensors = NO_TENSORS,
    calibration: np.ndarray | None = None,
    *,
    threads: int = 0,
    settings: Int8Settings = DEFAULT_SETTINGS,
    still_wanted: Callable[[], None] | None = None,
) -> QuantizedModel:
    """A pipeline's compiled graph quantized to int8, with its report (not yet checked).

    Float pixels are 0..1 unless input.scale is set: then raw 0..255 values, as `featmap
    extract` sends them (the synthetic images follow the same rule). The model's
    featmap.pipeline_id names its content, calibration images included.
    """
    pixel_max = 255.0 if pipeline.input.scale is not None else None
    quantized = quantize_with_report(
        compile_pipeline(pipeline, tensors),
        calibration,
        pixel_max=pixel_max,
        threads=threads,
        settings=settings,
        still_wanted=still_wanted,
    )
    properties = model_properties(quantized.model)
    properties["featmap.pipeline_id"] = content_id(pipeline, tensors, calibration)
    helper.set_model_props(quantized.model, dict(sorted(properties.items())))
    return quantized
