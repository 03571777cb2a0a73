"""Weight sources -> the concrete float32 numbers the user asked for.

Both the graph builder and the NumPy reference take their kernels from here: this module *is*
the meaning of `values`, `init` and `preset`, and its tests pin that meaning by hand.
"""

from __future__ import annotations

import math

import numpy as np

from ..contract.errors import InvalidSpec, InvalidTensor, listing
from ..contract.ops import OPS, WeightSlot, walk
from ..contract.spec import (
    NO_TENSORS,
    InitSource,
    LayerBase,
    Pipeline,
    PresetSource,
    TensorSource,
    ValuesSource,
    WeightTensors,
)

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
SOBEL_Y = SOBEL_X.T.copy()
LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)


# One layer's weight tensors as float32, by the spec field that names each (conv2d: "weights",
# the kernel (filters, in_channels/groups, kh, kw), and "bias" (filters,) when it has one).
LayerWeights = dict[str, np.ndarray]


def uniform(seed: int, count: int) -> np.ndarray:
    """`count` doubles in [0, 1) from PCG64(seed)'s raw stream, which NumPy keeps stable.

    Generator.normal() and friends may change between NumPy releases; the raw bit stream and
    this conversion (top 53 bits) do not, so an `init` gives the same numbers everywhere.
    """
    raw = np.random.PCG64(seed).random_raw(count)
    return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def standard_normal(seed: int, count: int) -> np.ndarray:
    """`count` N(0, 1) samples by Box-Muller over `uniform(seed, ...)`."""
    pairs = (count + 1) // 2
    u = uniform(seed, 2 * pairs).reshape(2, pairs)
    radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u in (0, 1]: log never sees 0
    angle = 2.0 * np.pi * u[1]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


def initializer(
    source: InitSource, shape: tuple[int, ...], fan_in: int, fan_out: int
) -> np.ndarray:
    """Keras/PyTorch initializers (normal ones untruncated, as torch.nn.init)."""
    count = math.prod(shape)
    match source.init:
        case "zeros":
            values = np.zeros(count)
        case "he_normal":
            values = standard_normal(source.seed, count) * math.sqrt(2.0 / fan_in)
        case "he_uniform":
            limit = math.sqrt(6.0 / fan_in)
            values = (2.0 * uniform(source.seed, count) - 1.0) * limit
        case "glorot_normal":
            values = standard_normal(source.seed, count) * math.sqrt(2.0 / (fan_in + fan_out))
        case "glorot_uniform":
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            values = (2.0 * uniform(source.seed, count) - 1.0) * limit
    return values.reshape(shape)


def gaussian_1d(size: int, sigma: float | None) -> np.ndarray:
    """Normalized 1D Gaussian; default sigma as OpenCV's getGaussianKernel.

    ValueError when float64 cannot compute it: 2·sigma² overflows or underflows to 0, or every
    tap underflows (a tiny sigma with an even size, whose centre is between two taps).
    """
    if sigma is None:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    with np.errstate(over="ignore", under="ignore"):
        denominator = 2 * np.float64(sigma) ** 2
    if not 0 < denominator < np.inf:
        raise ValueError(f"2·sigma² {'overflows' if denominator else 'underflows'} float64")
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    with np.errstate(under="ignore"):  # far taps of a narrow kernel are 0, as they should be
        g = np.exp(-(offsets**2) / denominator)
    total = g.sum()
    if not total > 0:
        raise ValueError(f"every one of its {size} taps underflows to 0 in float64")
    return g / total


def preset_kernel(source: PresetSource, kernel_size: tuple[int, int]) -> np.ndarray:
    """The 2D (kh, kw) kernel of a preset."""
    kh, kw = kernel_size
    match source.preset:
        case "sobel_x":
            return SOBEL_X
        case "sobel_y":
            return SOBEL_Y
        case "laplacian":
            return LAPLACIAN
        case "gaussian":
            return np.outer(gaussian_1d(kh, source.sigma), gaussian_1d(kw, source.sigma))
        case "box":
            return np.full((kh, kw), 1.0 / (kh * kw))
        case "identity":
            kernel = np.zeros((kh, kw))
            kernel[kh // 2, kw // 2] = 1.0
            return kernel


def check_presets(pipeline: Pipeline) -> None:
    """InvalidSpec naming `layers[i].weights.sigma` for a gaussian float64 cannot compute."""
    for step in walk(pipeline):
        for slot in step.weights:
            source = slot.source
            if not isinstance(source, PresetSource) or source.preset != "gaussian":
                continue
            for size in set(slot.shape[-2:]):
                try:
                    gaussian_1d(size, source.sigma)
                except ValueError as exc:
                    raise InvalidSpec(
                        f"{step.where}.{slot.field}.sigma",
                        f"{source.sigma} gives no finite {size}-tap gaussian: {exc}",
                    ) from None


def weight_tensor(slot: WeightSlot, tensors: WeightTensors = NO_TENSORS) -> np.ndarray:
    """The float32 numbers of one weight slot (whose source is set)."""
    source = slot.source
    if isinstance(source, ValuesSource):
        values = np.asarray(source.values, dtype=np.float64)
    elif isinstance(source, TensorSource):
        values = tensors[source.tensor]
    elif isinstance(source, InitSource):
        values = initializer(source, slot.shape, slot.fan_in, slot.fan_out)
    else:
        # Every (filter, input channel) slice is the 2D kernel: each output channel applies it
        # to the sum of its group's input channels (per channel when groups == channels).
        kh, kw = slot.shape[-2:]
        values = np.broadcast_to(preset_kernel(source, (kh, kw)), slot.shape)
    return np.ascontiguousarray(values, dtype=np.float32)


def layer_weights(
    layer: LayerBase, in_channels: int, tensors: WeightTensors = NO_TENSORS
) -> LayerWeights:
    """The float32 weight tensors of one layer fed `in_channels` channels, by field."""
    return {
        slot.field: weight_tensor(slot, tensors)
        for slot in OPS[layer.op].weights(layer, in_channels)
        if slot.source is not None
    }


def pipeline_weights(
    pipeline: Pipeline, tensors: WeightTensors = NO_TENSORS
) -> dict[int, LayerWeights]:
    """The weight tensors of every layer that takes any, keyed by layer index."""
    weights: dict[int, LayerWeights] = {}
    for step in walk(pipeline):
        if step.weights:
            weights[step.index] = layer_weights(step.layer, step.in_shape[0], tensors)
            step.entry.check_weights(step.layer, weights[step.index], step.where)
    return weights


def expected_tensor_shapes(pipeline: Pipeline) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape each referenced weight tensor must have, with the spec field that references it."""
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for step in walk(pipeline):
        for slot in step.weights:
            source = slot.source
            if isinstance(source, TensorSource):
                field = f"{step.where}.{slot.field}.tensor"
                known = shapes.get(source.tensor)
                if known is not None and known[0] != slot.shape:
                    raise InvalidSpec(
                        field,
                        f"{source.tensor!r} is used with shape {slot.shape} here and {known[0]} "
                        f"at {known[1]}",
                    )
                shapes.setdefault(source.tensor, (slot.shape, field))
    return shapes


def check_tensors(pipeline: Pipeline, tensors: WeightTensors) -> dict[str, np.ndarray]:
    """The weight tensors as float32, checked against what the spec references.

    Every referenced tensor must be present with the right shape and finite values, and every
    tensor sent must be referenced: nothing is ignored silently.
    """
    expected = expected_tensor_shapes(pipeline)
    for name in tensors:
        if name not in expected:
            raise InvalidTensor(
                f"weights[{name!r}]",
                f"is not referenced by the spec (it references {listing(sorted(expected))})",
            )
    checked: dict[str, np.ndarray] = {}
    for name, (shape, field) in expected.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise InvalidSpec(
                field,
                f"{name!r} is not among the weight tensors sent ({listing(sorted(tensors))}); "
                "tensor weights are sent with RegisterPipeline",
            )
        if tensor.dtype.kind != "f":
            raise InvalidTensor(f"weights[{name!r}].dtype", f"{tensor.dtype} is not a float type")
        if tuple(tensor.shape) != shape:
            raise InvalidTensor(
                f"weights[{name!r}].shape", f"is {list(tensor.shape)}; {field} needs {list(shape)}"
            )
        as_float32 = np.ascontiguousarray(tensor, dtype=np.float32)
        if as_float32.size and not np.isfinite(as_float32).all():
            raise InvalidTensor(f"weights[{name!r}].data", "contains NaN or Inf")
        checked[name] = as_float32
    return checked
