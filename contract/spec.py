"""The pipeline spec: what the user wrote, as pydantic models.

The spec speaks the words users know from Keras/PyTorch (`filters`, `kernel_size`, `stride`,
`padding`, `pool_size`); graph.py translates them to ONNX once. Pure: no I/O, no numpy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import InvalidSpec, listing
from .fields import (
    SOURCE_KINDS,
    BiasSource,
    Count,
    InitSource,
    LayerBase,
    Padding,
    Pads,
    Pair,
    PresetSource,
    SpecFieldError,
    SpecModel,
    TensorSource,
    ValuesSource,
    WeightSource,
    nested_shape,
)
from .names import (
    PIPELINE_ID_PATTERN,
    PIPELINE_NAME_PATTERN,
    check_pipeline_name,
)
from .ops import (
    LAYER_TYPES,
    OPS,
    SPATIAL_OPS,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    GlobalMaxPool2d,
    Layer,
    LeakyRelu,
    MaxPool2d,
    PoolBase,
    Relu,
    walk,
)
from .precision import DEFAULT_MAX_ERROR

# The spec's public names, with the models callers have always found here: the field types and
# weight sources (fields.py), the layer models of the op table (ops.py), the pipeline name rule
# (names.py) and int8's default threshold (precision.py).
__all__ = [
    "DEFAULT_MAX_ERROR",
    "LAYER_TYPES",
    "MAX_LISTED_ERRORS",
    "NO_TENSORS",
    "PIPELINE_ID_PATTERN",
    "PIPELINE_NAME_PATTERN",
    "RESERVED_NAME",
    "SOURCE_KINDS",
    "SPATIAL_OPS",
    "AvgPool2d",
    "BatchNorm",
    "BiasSource",
    "Conv2d",
    "Count",
    "Flatten",
    "GlobalAvgPool2d",
    "GlobalMaxPool2d",
    "InitSource",
    "InputSpec",
    "Layer",
    "LayerBase",
    "LeakyRelu",
    "MaxPool2d",
    "Padding",
    "Pads",
    "Pair",
    "Pipeline",
    "PoolBase",
    "Precision",
    "PresetSource",
    "Relu",
    "SpecFieldError",
    "SpecModel",
    "TensorSource",
    "ValuesSource",
    "WeightSource",
    "WeightTensors",
    "check_pipeline_name",
    "content_id",
    "json_schema",
    "json_schema_text",
    "nested_shape",
    "parse_pipeline",
]


# Layer names become ONNX tensor names; graph-internal tensors use ":" to stay out of their way.
RESERVED_NAME = "images"
# Validation errors described in one message (a spec may have a million).
MAX_LISTED_ERRORS = 16
# How a pipeline computes: float32 throughout, or its graph quantized to int8 (README "int8
# precision"); the int8 error threshold when the spec sets none is precision.DEFAULT_MAX_ERROR.
Precision = Literal["float32", "int8"]


# --------------------------------------------------------------------------- input


class InputSpec(SpecModel):
    """The images the pipeline takes; height and width stay dynamic."""

    channels: Count
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    scale: float | None = None
    mean: float | list[float] | None = None
    std: float | list[float] | None = None

    @field_validator("scale")
    @classmethod
    def _finite_scale(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("scale must be finite")
        return v

    @field_validator("mean", "std")
    @classmethod
    def _finite_stats(cls, v: float | list[float] | None) -> float | list[float] | None:
        values = [v] if isinstance(v, float | int) else (v or [])
        if not all(math.isfinite(x) for x in values):
            raise ValueError("must be finite")
        return v

    @model_validator(mode="after")
    def _per_channel_lengths(self) -> InputSpec:
        for field in ("mean", "std"):
            value = getattr(self, field)
            if isinstance(value, list) and len(value) not in (1, self.channels):
                raise SpecFieldError(
                    field,
                    f"has {len(value)} values; expected 1 or channels={self.channels}",
                )
        if self.std is not None and any(s == 0 for s in self.channel_values(self.std)):
            raise SpecFieldError("std", "must not contain 0")
        return self

    def channel_values(self, value: float | list[float]) -> list[float]:
        """Broadcast a scalar or one-element mean/std to one value per channel."""
        values = [float(value)] if isinstance(value, float | int) else [float(x) for x in value]
        return values * self.channels if len(values) == 1 else values


# --------------------------------------------------------------------------- pipeline


class Pipeline(SpecModel):
    """A pipeline: input description, the layers in order, and the layers to return."""

    input: InputSpec
    layers: Annotated[list[Layer], Field(min_length=1)]
    outputs: list[str] | None = None
    precision: Precision = "float32"
    # int8 only: refuse the pipeline when its measured error exceeds this (default
    # DEFAULT_MAX_ERROR).
    max_error: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None

    @model_serializer(mode="wrap")
    def _leave_out_float32_defaults(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A float32 pipeline dumps as it did before precision existed: the same canonical JSON
        # and pipeline id, and a spec a new client sends is one an older server accepts.
        data = handler(self)
        if isinstance(data, dict):
            if self.precision == "float32":
                data.pop("precision", None)
            if self.max_error is None:
                data.pop("max_error", None)
        return data

    @model_validator(mode="after")
    def _max_error_needs_int8(self) -> Pipeline:
        if self.max_error is not None and self.precision != "int8":
            raise SpecFieldError(
                "max_error", f"is the int8 error threshold; precision is {self.precision!r}"
            )
        return self

    @property
    def int8_max_error(self) -> float:
        """The int8 error threshold: max_error, or DEFAULT_MAX_ERROR when it is unset."""
        return DEFAULT_MAX_ERROR if self.max_error is None else self.max_error

    def with_precision(self, precision: Precision) -> Pipeline:
        """This pipeline computing in `precision` (float32 drops max_error, int8's threshold)."""
        if precision == self.precision:
            return self
        data = {**self.model_dump(mode="json"), "precision": precision}
        if precision == "float32":
            data.pop("max_error", None)
        return parse_pipeline(data)

    @model_validator(mode="after")
    def _check_structure(self) -> Pipeline:
        names = self.layer_names
        explicit: dict[str, int] = {}
        for index, layer in enumerate(self.layers):
            if layer.name is None:
                continue
            if layer.name == RESERVED_NAME:
                raise SpecFieldError(f"layers[{index}].name", f"{RESERVED_NAME!r} names the input")
            if layer.name in explicit:
                raise SpecFieldError(
                    f"layers[{index}].name",
                    f"{layer.name!r} is already the name of layers[{explicit[layer.name]}]",
                )
            explicit[layer.name] = index
        if len(set(names)) != len(names):
            clash = next(n for n in names if names.count(n) > 1)
            index = names.index(clash)
            raise SpecFieldError(
                f"layers[{index}].name",
                f"{clash!r} clashes with the automatic name of another layer (<op>_<index>)",
            )
        for index, name in enumerate(self.outputs or []):
            if name not in names:
                raise SpecFieldError(
                    f"outputs[{index}]",
                    f"{name!r} is not a layer name; layers are {listing(names)}",
                )
        if self.outputs is not None and len(set(self.outputs)) != len(self.outputs):
            raise SpecFieldError("outputs", "names a layer twice")
        if self.outputs == []:
            raise SpecFieldError("outputs", "must name at least one layer (omit it for the last)")
        self._check_channels()
        return self

    def _check_channels(self) -> None:
        # The walk over the op table checks what each layer needs of its input (channels that
        # groups divide, weight values of the right shape, (C, H, W) after no flatten).
        walk(self, check=True)

    @property
    def layer_names(self) -> list[str]:
        """Every layer's name: its own, or `<op>_<index>` when it has none."""
        return [layer.name or f"{layer.op}_{i}" for i, layer in enumerate(self.layers)]

    @property
    def output_names(self) -> list[str]:
        """The layers whose results are returned (default: the last layer)."""
        return list(self.outputs) if self.outputs else [self.layer_names[-1]]

    def canonical_json(self) -> str:
        """Deterministic JSON: defaults and outputs filled in, keys sorted.

        Specs that mean the same (3 vs [3, 3], 1 vs 1.0, padding 0 vs "valid", outputs left out
        vs naming the last layer) give the same text.
        """
        data = {**self.model_dump(mode="json"), "outputs": self.output_names}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def tensor_names(self) -> dict[str, tuple[int, int]]:
        """Weight tensors the spec references: name -> (layer index, its slot: for conv2d 0
        kernel, 1 bias; for batch_norm 0-3 scale, shift, mean, var)."""
        names: dict[str, tuple[int, int]] = {}
        for step in walk(self):
            for slot, weight in enumerate(step.weights):
                if isinstance(weight.source, TensorSource):
                    names.setdefault(weight.source.tensor, (step.index, slot))
        return names

    @functools.cached_property
    def pipeline_id(self) -> str:
        """Content hash of the canonical spec."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- parsing


_LAYER_TAGS = frozenset(OPS)
_SOURCE_TAGS = frozenset(SOURCE_KINDS)


def _field_path(loc: Sequence[int | str]) -> str:
    """('layers', 3, 'conv2d', 'kernel_size') -> 'layers[3].kernel_size'.

    Union tags that pydantic puts in the location (the op, the weight-source kind) are dropped:
    they are not fields the user wrote.
    """
    path = ""
    for i, part in enumerate(loc):
        previous = loc[i - 1] if i else None
        if isinstance(part, int):
            path += f"[{part}]"
        elif (isinstance(previous, int) and part in _LAYER_TAGS) or (
            previous in ("weights", "bias") and part in _SOURCE_TAGS
        ):
            continue
        else:
            path += f".{part}" if path else part
    return path


def _describe(error: Any, root: str) -> tuple[str, str]:
    """(field path, message) for one pydantic error; `root` names the spec as a whole."""
    location = _field_path(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, SpecFieldError):
        # Validators raise paths relative to the model they sit on.
        return (f"{location}.{cause.field}" if location else cause.field), cause.message
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return location, "unknown field"
    if error["type"] == "union_tag_invalid":
        got = error["input"].get("op") if isinstance(error["input"], dict) else None
        return f"{location}.op", f"unknown op {got!r}; expected one of {sorted(_LAYER_TAGS)}"
    if error["type"] == "union_tag_not_found":
        return f"{location}.op", f"missing; expected one of {sorted(_LAYER_TAGS)}"
    return location or root, message


def parse_pipeline(spec: str | bytes | dict[str, Any] | Pipeline) -> Pipeline:
    """Validate a spec (JSON text, dict or model); InvalidSpec names the offending field."""
    if isinstance(spec, Pipeline):
        return spec
    is_text = isinstance(spec, str | bytes)
    try:
        if isinstance(spec, str | bytes):
            return Pipeline.model_validate_json(spec)
        return Pipeline.model_validate(spec)
    except ValidationError as exc:
        problem = _invalid_spec(exc, "spec_json" if is_text else "spec")
    # Raised out here, the error keeps no __context__: pydantic's error holds the whole input
    # (megabytes, if a caller sent megabytes), which should go now, not at the next GC.
    raise problem


def _invalid_spec(exc: ValidationError, root: str) -> InvalidSpec:
    """The InvalidSpec for pydantic's errors: the first names the field, the detail lists a few."""
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return InvalidSpec("spec_json", f"is not valid JSON: {errors[0]['msg']}")
    described = [_describe(e, root) for e in errors[:MAX_LISTED_ERRORS]]
    field, message = described[0]
    detail = "; ".join(f"{f}: {m}" for f, m in described)
    if len(errors) > MAX_LISTED_ERRORS:
        detail += f"; ... ({len(errors) - MAX_LISTED_ERRORS} more errors)"
    return InvalidSpec(field, message, detail=detail)


# Weight tensors sent beside a spec (RegisterPipeline), by the name the spec uses.
WeightTensors = Mapping[str, np.ndarray]
NO_TENSORS: WeightTensors = {}


def content_id(
    pipeline: Pipeline, tensors: WeightTensors = NO_TENSORS, calibration: np.ndarray | None = None
) -> str:
    """The pipeline id: the spec's own id, or a hash of the spec, its weight tensors and (int8)
    the calibration images its ranges and reported error come from."""
    if not tensors and calibration is None:
        return pipeline.pipeline_id
    digest = hashlib.sha256(pipeline.canonical_json().encode())
    for name in sorted(tensors):
        tensor = np.ascontiguousarray(tensors[name], dtype="<f4")
        digest.update(f"\0{name}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.tobytes())
    if calibration is not None:
        # \1, where each tensor starts with \0: no tensor name can stand for the images.
        images = np.ascontiguousarray(calibration, dtype=calibration.dtype.newbyteorder("<"))
        digest.update(f"\1calibration\1{images.dtype.str}\1{list(images.shape)}\1".encode())
        digest.update(images.tobytes())
    return digest.hexdigest()[:32]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline spec."""
    return Pipeline.model_json_schema()


def json_schema_text() -> str:
    """The JSON Schema as text, as committed in proto/featmap/v1/pipeline.schema.json and sent
    in GetServerInfo: indented, keys sorted, ending in a newline."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
