"""The 2x2 block rewrite: a few-channel conv and its 2x2 max pool run on blocks of pixels.

Such a conv followed by a 2x2 max pool (the standard pipeline's first block) runs on 2x2 blocks
of pixels as channels, its pool a max over channel groups (pooled_convs_on_blocks): the same
integers and bytes out, the block in ~0.6x the time. The model then holds onnxruntime contrib
ops (com.microsoft QLinearConv, NhwcMaxPool), which int8 sessions run anyway: they are
CPU-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .passes import (
    CONV_CHANNEL_MULTIPLE,
    CONV_FILTER_MULTIPLE,
    CONV_MIN_FILTERS,
    node_attributes,
    remove_unused,
)

# A pooled conv is run on 2x2 blocks of pixels (pooled_convs_on_blocks) when it has at most
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
    """The chain around `conv` that pooled_convs_on_blocks rewrites, or None."""

    def only_consumer(name: str, op_type: str) -> onnx.NodeProto | None:
        following = consumers.get(name, [])
        if name in outputs or len(following) != 1 or following[0].op_type != op_type:
            return None
        return following[0]

    def array(name: str) -> np.ndarray | None:
        tensor = initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    attributes = node_attributes(conv)
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
    pool_attributes = node_attributes(pool)
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
    # A channel Pad (align_conv_channels) folds into the block Pad.
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


def pooled_convs_on_blocks(model: onnx.ModelProto) -> onnx.ModelProto:
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
    remove_unused(model)
    if not any(opset.domain == CONTRIB_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return model
