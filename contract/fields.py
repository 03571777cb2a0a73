"""The spec's building blocks: the model base, its field types (counts, pairs, padding) and the
weight sources a layer's tensors come from.

spec.py (the pipeline) and ops.py (the op table, whose entries hold the layer models) both build
on these. Pure: no I/O, no numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PlainValidator,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)

# Strict: JSON `true` is not a count. The upper bounds are sanity bounds on what any conv
# framework accepts; the server's configurable limits (parameters, pixels) sit below them.
MAX_CHANNELS = 65536
MAX_WINDOW = 1024
Count = Annotated[int, Field(strict=True, ge=1, le=MAX_CHANNELS)]


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _pair(value: Any) -> tuple[int, int]:
    pair = (value, value) if _is_count(value, 1) else value
    if isinstance(pair, list | tuple) and len(pair) == 2 and all(_is_count(v, 1) for v in pair):
        if max(pair) > MAX_WINDOW:
            raise ValueError(f"must be at most {MAX_WINDOW} on each axis; got {value!r}")
        return (pair[0], pair[1])
    raise ValueError(f"must be an int >= 1 or [h, w] of ints >= 1; got {value!r}")


def _padding_or_pads(value: Any) -> str | tuple[int, int, int, int]:
    if value in ("same", "same_lower", "valid"):
        return str(value)
    pads = (value,) * 4 if _is_count(value, 0) else value
    if isinstance(pads, list | tuple) and len(pads) == 4 and all(_is_count(p, 0) for p in pads):
        if max(pads) > MAX_WINDOW:
            raise ValueError(f"must be at most {MAX_WINDOW} on each side; got {value!r}")
        # Zero padding on every side is "valid": one meaning, one spelling, one pipeline id.
        return "valid" if max(pads) == 0 else (pads[0], pads[1], pads[2], pads[3])
    raise ValueError(
        "must be 'same', 'same_lower', 'valid', an int >= 0 or [top, left, bottom, right]; "
        f"got {value!r}"
    )


def _as_list(value: tuple[int, ...]) -> Any:
    # Not `list` itself: pydantic inspects a serializer's signature for each field it serves,
    # 0.1 ms for a builtin's against 0.01 ms for a function's (3 ms of every import).
    return list(value)


# Spatial pairs are written as an int (both axes) or [h, w] and stored as (h, w), so that
# `3` and `[3, 3]` are the same spec (and the same pipeline id).
Pair = Annotated[
    tuple[int, int],
    PlainValidator(_pair),
    PlainSerializer(_as_list),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1},
                    "minItems": 2,
                    "maxItems": 2,
                },
            ]
        }
    ),
]
# Explicit padding is an int (all sides) or [top, left, bottom, right] (the ONNX `pads` order),
# stored as the 4-tuple. `same` is ONNX's SAME_UPPER (TF's SAME), `same_lower` ONNX's SAME_LOWER:
# the same total padding, its odd pixel at the top/left instead of the bottom/right.
Pads = tuple[int, int, int, int]
SAME_PADDINGS = ("same", "same_lower")
Padding = Annotated[
    Literal["same", "same_lower", "valid"] | Pads,
    PlainValidator(_padding_or_pads),
    PlainSerializer(lambda v: v if isinstance(v, str) else list(v)),
    WithJsonSchema(
        {
            "anyOf": [
                {"enum": ["same", "same_lower", "valid"]},
                {"type": "integer", "minimum": 0},
                {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0},
                    "minItems": 4,
                    "maxItems": 4,
                },
            ]
        }
    ),
]
# Layer names become ONNX tensor names; graph-internal tensors use ":" to stay out of their way.
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-/]{0,127}$"


class SpecModel(BaseModel):
    """Base of every spec model: unknown fields are errors and models are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SpecFieldError(ValueError):
    """A cross-field check failed; `field` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- weight sources


class ValuesSource(SpecModel):
    """Literal numbers, nested lists in (filters, in_channels/groups, kh, kw) order."""

    values: list[Any]

    @field_validator("values")
    @classmethod
    def _as_floats(cls, values: list[Any]) -> list[Any]:
        # 1 and 1.0 are the same weight: store floats so both give the same canonical JSON.
        def as_float(v: Any) -> Any:
            if isinstance(v, list):
                return [as_float(x) for x in v]
            if isinstance(v, int | float) and not isinstance(v, bool):
                return float(v)
            return v  # left for the shape check to report with its path

        return [as_float(v) for v in values]


class InitSource(SpecModel):
    """A seeded random (or zero) initializer, deterministic across machines."""

    init: Literal["he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "zeros"]
    seed: Annotated[int, Field(strict=True, ge=0, lt=2**63)] = 0


class PresetSource(SpecModel):
    """A classic 2D kernel copied into every (filter, input channel) slice."""

    preset: Literal["sobel_x", "sobel_y", "laplacian", "gaussian", "box", "identity"]
    # Gaussian only; default follows OpenCV: 0.3 * ((k - 1) / 2 - 1) + 0.8 per axis.
    # Finite; whether the kernel it gives is finite too depends on the size (admission checks).
    sigma: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _sigma_only_for_gaussian(self) -> PresetSource:
        if self.sigma is not None and self.preset != "gaussian":
            raise SpecFieldError(
                "sigma", f"applies only to the gaussian preset, not {self.preset!r}"
            )
        return self


class TensorSource(SpecModel):
    """A weight tensor sent beside the spec to RegisterPipeline, by name."""

    tensor: Annotated[str, Field(min_length=1, max_length=256)]


SOURCE_KINDS: dict[str, type[SpecModel]] = {
    "values": ValuesSource,
    "init": InitSource,
    "preset": PresetSource,
    "tensor": TensorSource,
}


def _source_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        keys = SOURCE_KINDS.keys() & value.keys()
        return keys.pop() if len(keys) == 1 else None
    return next((kind for kind, cls in SOURCE_KINDS.items() if isinstance(value, cls)), None)


WeightSource: TypeAlias = Annotated[
    Annotated[ValuesSource, Tag("values")]
    | Annotated[InitSource, Tag("init")]
    | Annotated[PresetSource, Tag("preset")]
    | Annotated[TensorSource, Tag("tensor")],
    Discriminator(
        _source_kind,
        custom_error_type="weight_source",
        custom_error_message="expected exactly one of 'values', 'init', 'preset' or 'tensor'",
    ),
]
BiasSource: TypeAlias = Annotated[
    Annotated[ValuesSource, Tag("values")]
    | Annotated[InitSource, Tag("init")]
    | Annotated[TensorSource, Tag("tensor")],
    Discriminator(
        _source_kind,
        custom_error_type="bias_source",
        custom_error_message="expected exactly one of 'values', 'init' or 'tensor'",
    ),
]


class LayerBase(SpecModel):
    """Fields every layer has."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    if TYPE_CHECKING:
        # Each layer model sets it as a Literal: the op's name, its tag in the Layer union.
        op: str


FIXED_PRESET_SIZES = {"sobel_x": (3, 3), "sobel_y": (3, 3), "laplacian": (3, 3)}


def nested_shape(values: Any) -> tuple[int, ...] | None:
    """Shape of a rectangular nested list of numbers, or None if ragged or not numeric."""
    if isinstance(values, bool):
        return None
    if isinstance(values, int | float):
        return ()
    if not isinstance(values, list) or not values:
        return None
    shapes = {nested_shape(v) for v in values}
    if len(shapes) != 1 or None in shapes:
        return None
    (inner,) = shapes
    assert inner is not None
    return (len(values), *inner)


def flat_numbers(values: Any) -> list[float]:
    """The numbers of a nested list, flattened."""
    if isinstance(values, list):
        return [x for v in values for x in flat_numbers(v)]
    return [float(values)]
