"""`featmap import`: an ONNX conv stack -> a featmap spec and its weights as named tensors.

The graph must be one chain from its image input to the output (or to `until`): each layer
node reads the one before it. Constant subgraphs (torch's Pad amounts: Constant,
ConstantOfShape, Concat, Reshape, Slice, Transpose, Cast ...) are evaluated with
onnx.reference and their results used as constants. What converts:

    Conv                    conv2d: pads, auto_pad (NOTSET, VALID, SAME_UPPER, SAME_LOWER),
                            strides, dilations, group, bias
    BatchNormalization      batch_norm (inference form; featmap folds it into the conv before it)
    Relu, LeakyRelu         relu, leaky_relu
    MaxPool, AveragePool    max_pool2d, avg_pool2d: pads, auto_pad, strides, dilations,
                            ceil_mode, count_include_pad
    GlobalAveragePool, GlobalMaxPool, Flatten (axis 1), Identity (dropped)
    Pad (constant mode, right before a Conv or pool): merged into its pads. Accepted:
        before Conv: value 0, the Conv's auto_pad NOTSET or VALID;
        before MaxPool: value -inf, or 0 when the layer before is a relu (its output is >= 0,
            so a 0 never beats a real pixel and every window keeps one); ceil_mode 0;
        before AveragePool: value 0, ceil_mode 0, the pool's own pads 0 or counted
            (count_include_pad 1): the result counts all padding (count_include_pad true).
    Mul, Div, Sub, Add by constants (one value or one per channel) right after the input: the
    input's scale, or mean and std.

Anything else is OnnxImportError naming the node, its op type and what featmap can do instead.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ..contract.errors import FeatmapError
from ..contract.fields import NAME_PATTERN
from ..contract.spec import RESERVED_NAME, parse_pipeline
from ..service.weights import check_tensors

AUTO_PADS = {"SAME_UPPER": "same", "SAME_LOWER": "same_lower", "VALID": "valid"}
POOLS = {"MaxPool": "max_pool2d", "AveragePool": "avg_pool2d"}
ELEMENTWISE = {"Relu": "relu", "LeakyRelu": "leaky_relu"}
GLOBAL_POOLS = {"GlobalAveragePool": "global_avg_pool2d", "GlobalMaxPool": "global_max_pool2d"}
NORMALISATION_OPS = ("Mul", "Div", "Sub", "Add")
SUPPORTED = (
    "Conv, BatchNormalization, Relu, LeakyRelu, MaxPool, AveragePool, GlobalAveragePool, "
    "GlobalMaxPool, Flatten, Identity, a constant Pad before a conv or pool, and Sub/Div or "
    "Mul/Add by constants right after the input"
)
# What featmap offers instead of an op it does not have.
INSTEAD: dict[str, str] = {
    "Gemm": "featmap's layers end at flatten: cut the graph before it with --until and fit "
    "the head on the features",
    "MatMul": "featmap's layers end at flatten: cut the graph before it with --until",
    "Softmax": "cut the graph before the classifier with --until",
    "Add": "featmap runs one chain of layers (no residual additions): cut the graph before "
    "it with --until",
    "Concat": "featmap runs one chain of layers (no concatenated branches): cut the graph "
    "before it with --until",
    "Sigmoid": "featmap's activations are relu and leaky_relu",
    "Tanh": "featmap's activations are relu and leaky_relu",
    "Clip": "featmap's activations are relu and leaky_relu (ReLU6 is not one)",
    "Reshape": "flatten is featmap's only reshape (torch.flatten(x, 1)); cut before it with "
    "--until",
    "Dropout": "export the model in eval mode (torch: model.eval()), which leaves dropout out",
}


class OnnxImportError(ValueError):
    """The ONNX model holds something featmap's spec cannot; the message names the node."""


@dataclass
class ImportedPipeline:
    """A featmap spec (JSON-able) and the named float32 tensors it refers to as {"tensor": ...}."""

    spec: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def _describe(node: onnx.NodeProto) -> str:
    return f"node {node.name or node.output[0]!r} ({node.op_type})"


def _fail(node: onnx.NodeProto, problem: str, instead: str | None = None) -> OnnxImportError:
    hint = instead or INSTEAD.get(node.op_type)
    if hint is None:
        hint = f"featmap converts {SUPPORTED}; cut the graph before it with --until"
    return OnnxImportError(f"{_describe(node)}: {problem}; {hint}")


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


@dataclass
class _PendingPad:
    """A constant Pad waiting to merge into the conv or pool after it."""

    node: onnx.NodeProto
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    value: float


@dataclass
class _Importer:
    """The conversion's state while walking the chain."""

    model: onnx.ModelProto
    constants: dict[str, np.ndarray]
    layers: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # the node of each layer
    # The input's normalisation so far, y = x * a + b (one value, or one per channel).
    affine: tuple[np.ndarray, np.ndarray] = (np.ones(1), np.zeros(1))
    channels: int | None = None
    pending: _PendingPad | None = None
    names: set[str] = field(default_factory=lambda: {RESERVED_NAME})

    def constant(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
        name = node.input[index] if index < len(node.input) else ""
        if name not in self.constants:
            raise _fail(node, f"its {what} ({name!r}) is not a constant featmap can evaluate")
        return self.constants[name]

    def layer_name(self, node: onnx.NodeProto) -> str:
        """A spec name for the node's layer: its node name (or output) made legal and unique."""
        raw = node.name or node.output[0]
        name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", raw).lstrip("/.-0123456789") or node.op_type
        name = name[:120]
        candidate, count = name, 1
        while candidate in self.names or not re.fullmatch(NAME_PATTERN, candidate):
            count += 1
            candidate = f"{name}_{count}"
        self.names.add(candidate)
        return candidate

    def add(self, node: onnx.NodeProto, layer: dict[str, Any]) -> None:
        self.layers.append({"name": self.layer_name(node), **layer})
        self.nodes.append(node)

    def tensor(self, layer_name: str, field_name: str, value: np.ndarray) -> dict[str, str]:
        name = f"{layer_name}.{field_name}"
        self.tensors[name] = np.ascontiguousarray(value, dtype=np.float32)
        return {"tensor": name}


def _spatial_padding(node: onnx.NodeProto, attributes: dict[str, Any]) -> str | list[int]:
    auto_pad = attributes.get("auto_pad", "NOTSET")
    if auto_pad in AUTO_PADS:
        return AUTO_PADS[auto_pad]
    if auto_pad != "NOTSET":
        raise _fail(node, f"auto_pad {auto_pad!r} is not an ONNX padding")
    pads = [int(p) for p in attributes.get("pads", [0, 0, 0, 0])]
    if len(pads) != 4 or min(pads) < 0:
        raise _fail(node, f"pads {pads} are not 2-D non-negative pads")
    return pads


def _pair(node: onnx.NodeProto, attributes: dict[str, Any], name: str) -> list[int] | None:
    value = attributes.get(name)
    if value is None:
        return None
    if len(value) != 2:
        raise _fail(node, f"{name}={list(value)}: featmap is 2-D (NCHW images)")
    return [int(v) for v in value]


def _merge_pad(
    state: _Importer,
    node: onnx.NodeProto,
    padding: str | list[int],
    accepts: bool,
    rule: str,
) -> str | list[int]:
    """The node's padding with the pending Pad's amounts added (OnnxImportError if it cannot)."""
    pending, state.pending = state.pending, None
    if pending is None:
        return padding
    if isinstance(padding, str) and padding != "valid":
        accepts = False
        rule = f"auto_pad {padding!r} depends on the padded size"
    if not accepts:
        raise _fail(
            pending.node,
            f"a Pad of {pending.value} before {_describe(node)} cannot merge into it: {rule}",
            "featmap pads inside its conv and pool layers only",
        )
    own = [0, 0, 0, 0] if isinstance(padding, str) else padding
    return [a + b for a, b in zip(own, pending.pads, strict=True)]


def _conv(state: _Importer, node: onnx.NodeProto) -> None:
    attributes = _attributes(node)
    weights = state.constant(node, 1, "weight")
    if weights.ndim != 4:
        raise _fail(node, f"its weight has shape {weights.shape}: featmap convs are 2-D")
    kernel = _pair(node, attributes, "kernel_shape") or list(weights.shape[2:])
    if kernel != list(weights.shape[2:]):
        raise _fail(node, f"kernel_shape {kernel} disagrees with its weight {weights.shape}")
    padding = _spatial_padding(node, attributes)
    pending = state.pending
    padding = _merge_pad(
        state, node, padding, pending is None or pending.value == 0, "only a Pad of 0 is a conv's"
    )
    groups = int(attributes.get("group", 1))
    if state.channels is None:
        state.channels = weights.shape[1] * groups
    name = state.layer_name(node)
    layer: dict[str, Any] = {
        "name": name,
        "op": "conv2d",
        "filters": int(weights.shape[0]),
        "kernel_size": kernel,
        "stride": _pair(node, attributes, "strides") or [1, 1],
        "padding": padding,
        "dilation": _pair(node, attributes, "dilations") or [1, 1],
        "groups": groups,
        "weights": state.tensor(name, "weight", weights),
    }
    if len(node.input) > 2 and node.input[2]:
        layer["bias"] = state.tensor(name, "bias", state.constant(node, 2, "bias"))
    state.layers.append(layer)
    state.nodes.append(node)


def _pool(state: _Importer, node: onnx.NodeProto) -> None:
    attributes = _attributes(node)
    if len(node.output) > 1 and node.output[1]:
        raise _fail(node, "its Indices output is used", "featmap's max pool returns values")
    if attributes.get("storage_order", 0):
        raise _fail(node, "storage_order 1 is for its Indices output")
    kernel = _pair(node, attributes, "kernel_shape")
    if kernel is None:
        raise _fail(node, "it has no 2-D kernel_shape")
    padding = _spatial_padding(node, attributes)
    ceil = bool(attributes.get("ceil_mode", 0))
    op = POOLS[node.op_type]
    count_include_pad = bool(attributes.get("count_include_pad", 0))
    pending = state.pending
    if op == "max_pool2d":
        after_relu = bool(state.layers) and state.layers[-1]["op"] == "relu"
        accepts = pending is None or (
            not ceil and (pending.value == -math.inf or (pending.value == 0 and after_relu))
        )
        rule = "a max pool takes a Pad of -inf, or of 0 after a relu, without ceil_mode"
    else:
        own_pads = padding == "valid" or (not isinstance(padding, str) and not any(padding))
        accepts = pending is None or (
            pending.value == 0 and not ceil and (own_pads or count_include_pad)
        )
        rule = "an average pool takes a Pad of 0 without ceil_mode, its own pads counted"
        if pending is not None:
            count_include_pad = True
    padding = _merge_pad(state, node, padding, accepts, rule)
    merged = [] if isinstance(padding, str) else padding
    if pending is not None and any(p >= k for p, k in zip(merged, kernel * 2, strict=False)):
        raise _fail(
            pending.node,
            f"the pool's padding {list(padding)} is as large as the window {kernel} with it",
            "featmap's (and onnxruntime's) pools pad less than the window",
        )
    layer: dict[str, Any] = {
        "op": op,
        "pool_size": kernel,
        "stride": _pair(node, attributes, "strides") or [1, 1],
        "padding": padding,
        "dilation": _pair(node, attributes, "dilations") or [1, 1],
        "ceil_mode": ceil,
    }
    if op == "avg_pool2d":
        layer["count_include_pad"] = count_include_pad
    state.add(node, layer)


def _batch_norm(state: _Importer, node: onnx.NodeProto) -> None:
    attributes = _attributes(node)
    if attributes.get("training_mode", 0) or any(node.output[1:]):
        raise _fail(node, "it is in training mode", "export the model in eval mode")
    name = state.layer_name(node)
    layer: dict[str, Any] = {"name": name, "op": "batch_norm"}
    for index, spec_field in enumerate(("scale", "shift", "mean", "var"), start=1):
        value = state.constant(node, index, spec_field)
        layer[spec_field] = state.tensor(name, spec_field, value.reshape(-1))
    layer["epsilon"] = float(attributes.get("epsilon", 1e-5))
    if state.channels is None:
        state.channels = int(state.tensors[f"{name}.scale"].size)
    state.layers.append(layer)
    state.nodes.append(node)


def _pad(state: _Importer, node: onnx.NodeProto) -> None:
    attributes = _attributes(node)
    mode = attributes.get("mode", "constant")
    if mode != "constant":
        raise _fail(node, f"mode {mode!r}", "featmap pads with zeros (conv) or -inf (max pool)")
    if "pads" in attributes:  # opset < 11
        pads = [int(p) for p in attributes["pads"]]
        value = float(attributes.get("value", 0.0))
    else:
        pads = [int(p) for p in state.constant(node, 1, "pads").reshape(-1)]
        has_value = len(node.input) > 2 and node.input[2]
        value = float(state.constant(node, 2, "value").reshape(-1)[0]) if has_value else 0.0
        if len(node.input) > 3 and node.input[3]:
            axes = [int(a) % 4 for a in state.constant(node, 3, "axes").reshape(-1)]
            full = [0] * 8
            for i, axis in enumerate(axes):
                full[axis], full[axis + 4] = pads[i], pads[i + len(axes)]
            pads = full
    if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
        raise _fail(node, f"pads {pads} are not non-negative pads of H and W of an NCHW image")
    if state.pending is not None:
        raise _fail(node, "it follows another Pad")
    state.pending = _PendingPad(node, (pads[2], pads[3], pads[6], pads[7]), value)


def _per_channel(node: onnx.NodeProto, value: np.ndarray) -> np.ndarray:
    """A constant broadcast against NCHW images as one value, or one per channel."""
    if value.size == 1:
        return value.astype(np.float64).reshape(1)
    # (C, 1, 1) and (1, C, 1, 1) follow the channels; (C,) would follow the width.
    axis = {3: 0, 4: 1}.get(value.ndim)
    if axis is None or any(d != 1 for i, d in enumerate(value.shape) if i != axis):
        raise _fail(node, f"its constant of shape {list(value.shape)} is not per channel")
    return value.astype(np.float64).reshape(-1)


def _normalise(state: _Importer, node: onnx.NodeProto, head: str) -> None:
    """x * c, x / c, x - c, x + c by a constant right after the input: y = x * a + b so far."""
    operands = list(node.input)
    if node.op_type in ("Mul", "Add") and operands[1] == head:
        operands.reverse()  # c * x, c + x
    if operands[0] != head or operands[1] not in state.constants:
        raise _fail(node, "only x - c, x + c, x * c and x / c by a constant c are the input's")
    c = _per_channel(node, state.constants[operands[1]])
    a, b = state.affine
    match node.op_type:
        case "Mul":
            a, b = a * c, b * c
        case "Div":
            a, b = a / c, b / c
        case "Sub":
            b = b - c
        case _:
            b = b + c
    if not np.all(np.isfinite(a)) or not np.all(a != 0) or not np.all(np.isfinite(b)):
        raise _fail(node, "the input's normalisation is no longer (x * scale - mean) / std")
    state.affine = (a, b)


def _input_normalisation(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """y = x * a + b as the spec's input fields: scale alone when uniform without offset, else
    (x - mean) / std with mean = -b / a, std = 1 / a."""
    if not b.any() and len(set(a.tolist())) == 1:
        return {} if a[0] == 1 else {"scale": _float32(a[0])}
    fields: dict[str, Any] = {}
    mean, std = -b / a, 1.0 / a
    if mean.any():
        fields["mean"] = [_float32(v) for v in mean] if mean.size > 1 else _float32(mean[0])
    if (std != 1).any():
        fields["std"] = [_float32(v) for v in std] if std.size > 1 else _float32(std[0])
    return fields


def _float32(value: Any) -> float:
    """The shortest decimal of the float32 featmap computes with (0.4, not 0.4000000059604645)."""
    return float(str(np.float32(value)))


def _evaluate(model: onnx.ModelProto, node: onnx.NodeProto, inputs: list[np.ndarray]) -> list[Any]:
    """The outputs of a node whose inputs are all constants, by onnx.reference."""
    names = [name for name in node.input if name]
    graph = helper.make_graph(
        [node],
        "constant",
        [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape
            )
            for name, value in zip(names, inputs, strict=True)
        ],
        [onnx.ValueInfoProto(name=name) for name in node.output if name],
    )
    single = helper.make_model(graph, opset_imports=list(model.opset_import))
    single.ir_version = model.ir_version
    return list(ReferenceEvaluator(single).run(None, dict(zip(names, inputs, strict=True))))


def _target(model: onnx.ModelProto, until: str | None) -> str:
    """The tensor the pipeline ends at: `until` (a node or tensor name) or the model's output."""
    graph = model.graph
    if until is None:
        outputs = [o.name for o in graph.output]
        if len(outputs) != 1:
            raise OnnxImportError(
                f"the model has {len(outputs)} outputs ({outputs}): pick one with --until"
            )
        return outputs[0]
    for node in graph.node:
        if node.name == until:
            return node.output[0]
    if any(until in node.output for node in graph.node):
        return until
    raise OnnxImportError(f"no node or output of the model is named {until!r}")


def _needed(graph: onnx.GraphProto, target: str) -> list[onnx.NodeProto]:
    """The nodes the target depends on, in graph order."""
    wanted, needed = {target}, []
    for node in reversed(graph.node):
        if wanted & set(node.output):
            needed.append(node)
            wanted |= {name for name in node.input if name}
    return needed[::-1]


def _input_channels(graph: onnx.GraphProto, initializers: set[str]) -> tuple[str, int | None]:
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise OnnxImportError(f"featmap takes one image input; the model has {names}")
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise OnnxImportError(f"input {inputs[0].name!r} is {kind}; featmap imports float")
    dims = tensor_type.shape.dim
    if tensor_type.HasField("shape") and len(dims) != 4:
        raise OnnxImportError(
            f"input {inputs[0].name!r} has {len(dims)} dimensions; featmap takes NCHW"
        )
    channels = dims[1].dim_value if len(dims) == 4 and dims[1].HasField("dim_value") else None
    return inputs[0].name, channels


def import_onnx(path: str | Path, until: str | None = None) -> ImportedPipeline:
    """An ONNX conv stack as a featmap spec and its named weight tensors.

    Args:
        path: the .onnx file.
        until: a node name or tensor name to end at (default: the model's only output).

    Returns:
        The spec (a JSON-able dict, validated) and the float32 tensors it names.

    Raises:
        OnnxImportError naming the node, its op type and what featmap can do instead.
    """
    try:
        model = onnx.load(str(path))
    except DecodeError as exc:
        raise OnnxImportError(f"{path} is not an ONNX model: {exc}") from None
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    head, channels = _input_channels(graph, set(constants))
    target = _target(model, until)
    state = _Importer(model, constants, channels=channels)
    for node in _needed(graph, target):
        inputs = [name for name in node.input if name]
        if all(name in constants for name in inputs):
            try:
                values = _evaluate(model, node, [constants[name] for name in inputs])
            except Exception as exc:  # onnx.reference's errors have no common base
                raise _fail(node, f"evaluating this constant failed: {exc}") from None
            constants.update(
                (name, np.asarray(value))
                for name, value in zip([o for o in node.output if o], values, strict=False)
            )
            continue
        data = [name for name in inputs if name not in constants]
        if data != [head]:
            raise _fail(node, f"it reads {data}, where featmap's chain is at {head!r}")
        if state.pending is not None and node.op_type not in ("Conv", *POOLS):
            raise _fail(
                state.pending.node,
                f"featmap merges a Pad only into the conv or pool right after it, not into "
                f"{_describe(node)}",
            )
        _convert(state, node, head)
        head = node.output[0]
    if state.pending is not None:
        raise _fail(state.pending.node, "nothing after it to merge into", "cut the graph after it")
    if not state.layers:
        raise OnnxImportError(f"no layer before {target!r}: nothing to import")
    if state.channels is None:
        raise OnnxImportError("the input's channels are unknown (dimension 1 is symbolic)")
    spec: dict[str, Any] = {
        "input": {"channels": state.channels, **_input_normalisation(*state.affine)},
        "layers": state.layers,
    }
    _check(state, spec)
    return ImportedPipeline(spec, state.tensors)


def _convert(state: _Importer, node: onnx.NodeProto, head: str) -> None:
    op = node.op_type
    attributes = _attributes(node)
    if op in NORMALISATION_OPS and not state.layers:
        _normalise(state, node, head)
    elif op == "Conv":
        _conv(state, node)
    elif op in POOLS:
        _pool(state, node)
    elif op == "BatchNormalization":
        _batch_norm(state, node)
    elif op == "Pad":
        _pad(state, node)
    elif op == "Relu":
        state.add(node, {"op": "relu"})
    elif op == "LeakyRelu":
        state.add(node, {"op": "leaky_relu", "alpha": float(attributes.get("alpha", 0.01))})
    elif op in GLOBAL_POOLS:
        state.add(node, {"op": GLOBAL_POOLS[op]})
    elif op == "Flatten":
        if attributes.get("axis", 1) != 1:
            raise _fail(node, f"axis {attributes['axis']}", "featmap flattens from axis 1")
        state.add(node, {"op": "flatten"})
    elif op == "Identity":
        return
    else:
        raise _fail(node, "featmap has no such layer")


def _check(state: _Importer, spec: dict[str, Any]) -> None:
    """The spec and tensors validate as featmap's; else OnnxImportError naming the node."""
    try:
        check_tensors(parse_pipeline(spec), state.tensors)
    except FeatmapError as exc:
        match = re.match(r"layers\[(\d+)\]", exc.field or "")
        if match is None:
            raise OnnxImportError(f"the converted spec is invalid: {exc}") from None
        node = state.nodes[int(match.group(1))]
        raise _fail(node, f"featmap refuses it: {exc}", "see the README's spec") from None


@contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


def weights_path(spec_path: str | Path) -> Path:
    """Where the tensors of a spec file go: the same name with .npz."""
    return Path(spec_path).with_suffix(".npz")


def write_imported(imported: ImportedPipeline, spec_path: str | Path) -> Path:
    """Write the spec (YAML) and its tensors (.npz beside it); return the .npz's path.

    Both are written to temporary files first and renamed into place together.
    """
    spec_path = Path(spec_path)
    npz = weights_path(spec_path)
    with _temporary_beside(spec_path) as spec_tmp, _temporary_beside(npz) as npz_tmp:
        spec_tmp.write_text(yaml.safe_dump(imported.spec, sort_keys=False), encoding="utf-8")
        savez: Any = np.savez  # numpy's stubs read **arrays as its keyword options
        with npz_tmp.open("wb") as file:
            savez(file, **imported.tensors)
        os.replace(npz_tmp, npz)
        os.replace(spec_tmp, spec_path)
    return npz
