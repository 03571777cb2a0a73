"""PipelineRegistry without gRPC: content ids, tensor weights against the reference, errors that
name the field, limits, warm-up image sizes and symbolic output shapes."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from types import CodeType
from typing import Any

import numpy as np
import pytest

from featmap.contract.errors import (
    FeatmapError,
    InvalidSpec,
    InvalidTensor,
    LimitExceeded,
    NotFound,
)
from featmap.contract.ops import (
    layer_costs,
    symbolic_shapes,
)
from featmap.contract.spec import (
    NO_TENSORS,
    Pipeline,
    WeightTensors,
    content_id,
    parse_pipeline,
)
from featmap.service.batching import BatchingPolicy
from featmap.service.registry import PipelineRegistry, smallest_image, warm_up
from featmap.service.runtime import CPU, CompiledPipeline, SessionCache
from featmap.service.weights import check_tensors
from tests.conftest import README_SPEC, assert_matches_reference

# conv1 (3 -> 4, 3x3 same, tensor kernel and bias) -> relu -> conv2 (4 -> 2, 1x1, seeded init)
TENSOR_SPEC: dict[str, Any] = {
    "input": {"channels": 3},
    "layers": [
        {
            "op": "conv2d",
            "name": "conv1",
            "filters": 4,
            "kernel_size": 3,
            "padding": "same",
            "weights": {"tensor": "conv1.w"},
            "bias": {"tensor": "conv1.b"},
        },
        {"op": "relu"},
        {
            "op": "conv2d",
            "name": "conv2",
            "filters": 2,
            "kernel_size": 1,
            "weights": {"init": "he_normal", "seed": 3},
        },
    ],
    "outputs": ["conv1", "conv2"],
}
KERNEL_SHAPE = (4, 3, 3, 3)  # (filters, in_channels, kh, kw)


def make_tensors(seed: int = 0, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """conv1.w (4, 3, 3, 3) and conv1.b (4,) for TENSOR_SPEC."""
    rng = np.random.default_rng(seed)
    return {
        "conv1.w": rng.standard_normal(KERNEL_SHAPE).astype(dtype),
        "conv1.b": rng.standard_normal(4).astype(dtype),
    }


def normal(*shape: int, seed: int = 0) -> np.ndarray:
    """float32 N(0, 1) images."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def cache() -> SessionCache:
    """One real onnxruntime session cache (CPU, one thread) for the module."""
    return SessionCache(8, [CPU], intra_op_threads=1)


@pytest.fixture
def registry(cache: SessionCache) -> PipelineRegistry:
    """A fresh registry over the shared cache, room for 8 pipelines."""
    return PipelineRegistry(cache, max_pipelines=8)


@pytest.fixture(scope="module")
def tensor_pipeline() -> Pipeline:
    """TENSOR_SPEC validated."""
    return parse_pipeline(TENSOR_SPEC)


# --------------------------------------------------------------------------- ids


def test_register_is_idempotent(registry: PipelineRegistry, tensor_pipeline: Pipeline) -> None:
    first = registry.register(tensor_pipeline, make_tensors(), None)
    again = registry.register(parse_pipeline(json.dumps(TENSOR_SPEC)), make_tensors(), None)
    assert again.pipeline_id == first.pipeline_id
    assert again is first  # the same entry, not a second compile
    assert len(registry) == 1
    assert [r.pipeline_id for r in registry.list()[0]] == [first.pipeline_id]


def test_weight_tensors_change_the_id(
    registry: PipelineRegistry, tensor_pipeline: Pipeline
) -> None:
    tensors = make_tensors()
    nudged = {**tensors, "conv1.b": tensors["conv1.b"] + np.float32(1e-3)}
    ids = {
        registry.register(tensor_pipeline, tensors, None).pipeline_id,
        registry.register(tensor_pipeline, make_tensors(seed=1), None).pipeline_id,
        registry.register(tensor_pipeline, nudged, None).pipeline_id,
    }
    assert len(ids) == 3 == len(registry)
    # The spec alone (as an inline Extract would name it) is none of them.
    assert tensor_pipeline.pipeline_id not in ids


def test_id_without_tensors_is_the_inline_spec_id(registry: PipelineRegistry) -> None:
    pipeline = parse_pipeline(README_SPEC)
    registered = registry.register(pipeline, {}, None)
    assert registered.pipeline_id == pipeline.pipeline_id
    assert registered.weight_names == ()


def test_float16_tensors_give_the_float32_id(
    registry: PipelineRegistry, tensor_pipeline: Pipeline
) -> None:
    # Weights are float32 inside: float16 values sent as float16 or as float32 are one pipeline.
    half = make_tensors(dtype=np.float16)
    as_float32 = {name: array.astype(np.float32) for name, array in half.items()}
    assert (
        registry.register(tensor_pipeline, half, None).pipeline_id
        == registry.register(tensor_pipeline, as_float32, None).pipeline_id
    )
    assert len(registry) == 1


def test_ids_agree_between_registries(cache: SessionCache, tensor_pipeline: Pipeline) -> None:
    other_cache = SessionCache(2, [CPU], intra_op_threads=1)
    one = PipelineRegistry(cache, 4).register(tensor_pipeline, make_tensors(), None)
    two = PipelineRegistry(other_cache, 4).register(tensor_pipeline, make_tensors(), None)
    assert one.pipeline_id == two.pipeline_id
    assert one.compiled.model_bytes == two.compiled.model_bytes


CHILD_ID = """
import json, sys
import numpy as np
from featmap.contract.spec import parse_pipeline
from featmap.service.weights import check_tensors
from featmap.contract.spec import content_id
pipeline = parse_pipeline(sys.argv[1])
rng = np.random.default_rng(0)
tensors = {
    "conv1.w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
    "conv1.b": rng.standard_normal(4).astype(np.float32),
}
print(content_id(pipeline, check_tensors(pipeline, tensors)))
"""


def test_ids_are_stable_across_processes(
    registry: PipelineRegistry, tensor_pipeline: Pipeline
) -> None:
    # A content hash, not id() or hash(): another interpreter with another hash seed agrees.
    registered = registry.register(tensor_pipeline, make_tensors(), None)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD_ID, json.dumps(TENSOR_SPEC)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert child.stdout.strip() == registered.pipeline_id
    assert len(registered.pipeline_id) == 32
    int(registered.pipeline_id, 16)  # hex


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tensor_weights_match_the_reference(
    registry: PipelineRegistry, tensor_pipeline: Pipeline, dtype: type
) -> None:
    tensors = make_tensors(seed=2, dtype=dtype)
    registered = registry.register(tensor_pipeline, tensors, None)
    assert registered.weight_names == ("conv1.b", "conv1.w")
    images = normal(2, 3, 11, 9)
    outputs = registered.compiled.run(images)
    assert outputs["conv1"].shape == (2, 4, 11, 9)  # 'same' keeps 11x9
    assert outputs["conv2"].shape == (2, 2, 11, 9)
    assert_matches_reference(outputs, tensor_pipeline, images, tensors)


def test_shared_tensor_used_twice_with_one_shape(registry: PipelineRegistry) -> None:
    # Weight tying: the same 3 -> 3 kernel in two layers is one tensor.
    layer = {"op": "conv2d", "filters": 3, "kernel_size": 3, "weights": {"tensor": "tied"}}
    pipeline = parse_pipeline({"input": {"channels": 3}, "layers": [layer, {"op": "relu"}, layer]})
    tensors = {"tied": normal(3, 3, 3, 3, seed=4)}
    registered = registry.register(pipeline, tensors, None)
    assert registered.weight_names == ("tied",)
    images = normal(1, 3, 10, 10, seed=5)
    outputs = registered.compiled.run(images)
    assert outputs["conv2d_2"].shape == (1, 3, 6, 6)  # 10 -> 8 -> 6
    assert_matches_reference(outputs, pipeline, images, tensors)


def test_registered_entry_describes_outputs(registry: PipelineRegistry) -> None:
    registered = registry.register(parse_pipeline(README_SPEC), {}, None)
    assert registered.output_shapes == {
        "conv1": ["N", 8, "H", "W"],
        "features": ["N", 8, 1, 1],
    }
    assert registered.batching is None  # the server's default


# --------------------------------------------------------------------------- bad weights


def spec_with_weights(weights: dict[str, Any], bias: dict[str, Any] | None = None) -> Pipeline:
    """TENSOR_SPEC with conv1's weights (and bias) replaced."""
    conv1 = {**TENSOR_SPEC["layers"][0], "weights": weights}
    conv1.pop("bias")
    if bias is not None:
        conv1["bias"] = bias
    return parse_pipeline({**TENSOR_SPEC, "layers": [conv1, *TENSOR_SPEC["layers"][1:]]})


TWO_SHAPES = parse_pipeline(
    {
        "input": {"channels": 3},
        "layers": [
            {"op": "conv2d", "filters": 4, "kernel_size": 3, "weights": {"tensor": "w"}},
            {"op": "conv2d", "filters": 4, "kernel_size": 1, "weights": {"tensor": "w"}},
        ],
    }
)
NAN_KERNEL = np.zeros(KERNEL_SHAPE, np.float32)
NAN_KERNEL[1, 2, 0, 0] = np.nan
INF_KERNEL = np.zeros(KERNEL_SHAPE, np.float16)
INF_KERNEL[0, 0, 0, 0] = np.inf

BAD_WEIGHTS = [
    pytest.param(
        spec_with_weights({"tensor": "conv1.w"}, bias={"tensor": "conv1.b"}),
        {"conv1.w": np.zeros(KERNEL_SHAPE, np.float32)},
        InvalidSpec,
        "layers[0].bias.tensor",
        "'conv1.b' is not among the weight tensors sent",
        id="missing-bias",
    ),
    pytest.param(
        parse_pipeline(TENSOR_SPEC),
        {},
        InvalidSpec,
        "layers[0].weights.tensor",
        "'conv1.w' is not among",
        id="missing-all",
    ),
    pytest.param(
        spec_with_weights({"tensor": "conv1.w"}),
        {"conv1.w": np.zeros(KERNEL_SHAPE, np.float32), "x": np.zeros(4, np.float32)},
        InvalidTensor,
        "weights['x']",
        "not referenced by the spec",
        id="unreferenced",
    ),
    pytest.param(
        parse_pipeline(README_SPEC),
        {"x": np.zeros(4, np.float32)},
        InvalidTensor,
        "weights['x']",
        "references []",
        id="unreferenced-no-tensor-spec",
    ),
    pytest.param(
        spec_with_weights({"tensor": "conv1.w"}),
        {"conv1.w": np.zeros((4, 3, 3), np.float32)},
        InvalidTensor,
        "weights['conv1.w'].shape",
        "is [4, 3, 3]; layers[0].weights.tensor needs [4, 3, 3, 3]",
        id="wrong-rank",
    ),
    pytest.param(
        spec_with_weights({"tensor": "conv1.w"}),
        {"conv1.w": np.zeros((4, 3, 5, 5), np.float32)},
        InvalidTensor,
        "weights['conv1.w'].shape",
        "needs [4, 3, 3, 3]",
        id="wrong-kernel-size",
    ),
    pytest.param(
        spec_with_weights({"tensor": "conv1.w"}),
        {"conv1.w": np.zeros(KERNEL_SHAPE, np.uint8)},
        InvalidTensor,
        "weights['conv1.w'].dtype",
        "uint8 is not a float type",
        id="uint8",
    ),
    pytest.param(
        spec_with_weights({"tensor": "conv1.w"}),
        {"conv1.w": NAN_KERNEL},
        InvalidTensor,
        "weights['conv1.w'].data",
        "NaN or Inf",
        id="nan",
    ),
    pytest.param(
        spec_with_weights({"tensor": "conv1.w"}),
        {"conv1.w": INF_KERNEL},
        InvalidTensor,
        "weights['conv1.w'].data",
        "NaN or Inf",
        id="inf-float16",
    ),
    pytest.param(
        TWO_SHAPES,
        {"w": np.zeros((4, 3, 3, 3), np.float32)},
        InvalidSpec,
        "layers[1].weights.tensor",
        "'w' is used with shape (4, 4, 1, 1) here and (4, 3, 3, 3) at layers[0].weights.tensor",
        id="one-name-two-shapes",
    ),
]


@pytest.mark.parametrize(("pipeline", "tensors", "error", "field", "says"), BAD_WEIGHTS)
def test_bad_weights_name_the_field(
    registry: PipelineRegistry,
    pipeline: Pipeline,
    tensors: dict[str, np.ndarray],
    error: type[FeatmapError],
    field: str,
    says: str,
) -> None:
    with pytest.raises(error) as failure:
        registry.register(pipeline, tensors, None)
    assert failure.value.field == field, failure.value
    assert str(failure.value).startswith(f"{field}: "), failure.value
    assert says in str(failure.value), failure.value
    assert len(registry) == 0  # nothing half-registered


# --------------------------------------------------------------------------- limits and lookups


def small_spec(seed: int) -> Pipeline:
    """A one-conv pipeline whose id depends on `seed`."""
    weights = {"init": "he_normal", "seed": seed}
    layer = {"op": "conv2d", "filters": 1, "kernel_size": 1, "weights": weights}
    return parse_pipeline({"input": {"channels": 1}, "layers": [layer]})


def test_max_registered_pipelines(cache: SessionCache) -> None:
    registry = PipelineRegistry(cache, max_pipelines=2)
    first = registry.register(small_spec(0), {}, None)
    registry.register(small_spec(1), {}, None)
    with pytest.raises(LimitExceeded) as failure:
        registry.register(small_spec(2), {}, None)
    assert failure.value.field == "pipeline"
    assert "max_registered_pipelines=2" in str(failure.value)
    assert failure.value.status_code.name == "RESOURCE_EXHAUSTED"
    # At the limit, a pipeline already registered is still fine (and changes nothing).
    assert registry.register(small_spec(0), {}, None) is first
    # Deleting one makes room.
    assert registry.delete(first.pipeline_id)
    registry.register(small_spec(2), {}, None)
    assert len(registry) == 2


class GatedCache(SessionCache):
    """A SessionCache whose first compile() holds until released: a registration in flight."""

    def __init__(self) -> None:
        super().__init__(8, [CPU], intra_op_threads=1)
        self.compiling = threading.Event()
        self.release = threading.Event()

    def compile(
        self,
        pipeline: Pipeline,
        tensors: WeightTensors = NO_TENSORS,
        calibration: np.ndarray | None = None,
        *,
        still_wanted: Callable[[], None] | None = None,
    ) -> CompiledPipeline:
        if not self.compiling.is_set():
            self.compiling.set()
            assert self.release.wait(timeout=30)
        return super().compile(pipeline, tensors, calibration, still_wanted=still_wanted)


def test_max_registered_pipelines_counts_registrations_in_flight() -> None:
    cache = GatedCache()
    registry = PipelineRegistry(cache, max_pipelines=1)
    first = threading.Thread(target=registry.register, args=(small_spec(10), {}, None))
    first.start()
    try:
        assert cache.compiling.wait(timeout=30)
        # The first one holds the only slot while its session builds: a second is refused
        # rather than both passing the count and ending up two over a limit of one.
        with pytest.raises(LimitExceeded):
            registry.register(small_spec(11), {}, None)
    finally:
        cache.release.set()
        first.join(timeout=30)
    assert [r.pipeline_id for r in registry.list()[0]] == [small_spec(10).pipeline_id]


def test_registration_that_fails_frees_its_slot(cache: SessionCache) -> None:
    registry = PipelineRegistry(cache, max_pipelines=1)
    too_big = pipeline_of(conv([1024, 1], dilation=[5, 1]))  # no warm-up image fits
    with pytest.raises(InvalidSpec):
        registry.register(too_big, {}, None)
    registry.register(small_spec(12), {}, None)
    assert len(registry) == 1


def test_get_unknown_is_not_found(registry: PipelineRegistry) -> None:
    with pytest.raises(NotFound) as failure:
        registry.get("0" * 32)
    assert failure.value.field == "pipeline_id"
    assert "'00000000000000000000000000000000'" in str(failure.value)
    with pytest.raises(NotFound) as named:
        registry.get("nope", field="pipeline")
    assert named.value.field == "pipeline"


def test_delete(registry: PipelineRegistry, tensor_pipeline: Pipeline) -> None:
    registered = registry.register(tensor_pipeline, make_tensors(), None)
    assert registry.get(registered.pipeline_id) is registered
    assert registry.delete(registered.pipeline_id) is True
    assert registry.delete(registered.pipeline_id) is False
    assert len(registry) == 0 and registry.list() == ([], "")
    with pytest.raises(NotFound):
        registry.get(registered.pipeline_id)
    # Registering again after a delete gives the same id.
    assert registry.register(tensor_pipeline, make_tensors(), None).pipeline_id == (
        registered.pipeline_id
    )


def test_list_is_sorted_by_id(registry: PipelineRegistry) -> None:
    ids = [registry.register(small_spec(seed), {}, None).pipeline_id for seed in range(4)]
    assert [r.pipeline_id for r in registry.list()[0]] == sorted(ids)


def test_batching_override_is_kept_and_replaced(
    registry: PipelineRegistry, tensor_pipeline: Pipeline
) -> None:
    policy = BatchingPolicy(enabled=False, max_batch_size=4, max_queue_delay_us=0)
    first = registry.register(tensor_pipeline, make_tensors(), policy)
    assert registry.get(first.pipeline_id).batching == policy
    # The same pipeline with another policy: still one entry, same id and session, new policy.
    other = BatchingPolicy(enabled=True, max_batch_size=8, max_queue_delay_us=100)
    second = registry.register(tensor_pipeline, make_tensors(), other)
    assert second.pipeline_id == first.pipeline_id
    assert second.compiled is first.compiled
    assert registry.get(first.pipeline_id).batching == other
    assert len(registry) == 1


# --------------------------------------------------------------------------- warm-up image size


def conv(kernel_size: Any, **fields: Any) -> dict[str, Any]:
    """A 2-filter conv2d layer with zero weights."""
    return {
        "op": "conv2d",
        "filters": 2,
        "kernel_size": kernel_size,
        "weights": {"init": "zeros"},
        **fields,
    }


def pool(pool_size: Any, **fields: Any) -> dict[str, Any]:
    """A max_pool2d layer."""
    return {"op": "max_pool2d", "pool_size": pool_size, **fields}


def pipeline_of(*layers: dict[str, Any]) -> Pipeline:
    """A 1-channel pipeline of `layers`."""
    return parse_pipeline({"input": {"channels": 1}, "layers": list(layers)})


SMALLEST_IMAGES = [
    # 6 -> conv 5 valid -> 2 -> pool 2 -> 1; 5 -> 1 -> pool 2 has no window
    pytest.param([conv(5), pool(2)], 6, id="conv5-pool2"),
    pytest.param([{"op": "relu"}], 1, id="relu"),
    pytest.param([conv(3, padding="same"), {"op": "global_avg_pool2d"}], 1, id="same"),
    # the README: 'same' conv keeps 1x1 but pool 2 needs 2x2
    pytest.param(README_SPEC["layers"], 2, id="readme"),
    # dilation 2: a 3x3 kernel spans 5 pixels
    pytest.param([conv(3, dilation=2)], 5, id="dilated"),
    # 7 -> (7 - 3) // 2 + 1 = 3 -> conv 3 -> 1; 6 -> 2 -> none
    pytest.param([conv(3, stride=2), conv(3)], 7, id="strided-then-conv"),
    # explicit padding 1: a 1x1 image is padded to 3x3
    pytest.param([conv(3, padding=1)], 1, id="padded"),
    # each axis on its own: kernel [1, 7] needs 7 columns, the square image is 7x7
    pytest.param([conv([1, 7])], 7, id="wide-kernel"),
    # pool 3 with padding 1 fits a 1x1 image padded to 3x3
    pytest.param([pool(3, padding=1)], 1, id="padded-pool"),
    # conv 3 valid -> pool 2 (stride 2) -> conv 3 valid: (n - 2) // 2 >= 3 -> n >= 8
    pytest.param([conv(3), pool(2), conv(3)], 8, id="conv-pool-conv"),
]


@pytest.mark.parametrize(("layers", "size"), SMALLEST_IMAGES)
def test_smallest_image(layers: list[dict[str, Any]], size: int) -> None:
    pipeline = pipeline_of(*layers)
    assert smallest_image(pipeline) == (size, size)
    layer_costs(pipeline, size, size)  # fits
    if size > 1:
        with pytest.raises(InvalidSpec):
            layer_costs(pipeline, size - 1, size - 1)


def test_smallest_image_none_fits() -> None:
    # A 1024-tap kernel dilated by 5 spans 5116 pixels: more than any warm-up image.
    pipeline = pipeline_of(conv([1024, 1], dilation=[5, 1]))
    with pytest.raises(InvalidSpec) as failure:
        smallest_image(pipeline)
    assert failure.value.field == "layers"


def test_warm_up_runs_nhwc_and_uint8(cache: SessionCache) -> None:
    spec = {
        "input": {"channels": 3, "layout": "NHWC", "dtype": "uint8", "scale": 1 / 255},
        "layers": [conv(5), pool(2)],
    }
    pipeline = parse_pipeline(spec)
    warm_up(cache.compile(pipeline))  # a (1, 6, 6, 3) uint8 image: must not raise


# --------------------------------------------------------------------------- symbolic shapes


@functools.cache
def compiled_dim(dim: str) -> CodeType:
    """A symbolic dim's text as Python code (the grid below evaluates each one many times)."""
    return compile(dim, dim, "eval")


def evaluate(dim: int | str, height: int, width: int) -> int:
    """A symbolic dim such as 'floor((H-1)/2)' or '4*(H-2)*(W-2)' for concrete H and W."""
    if isinstance(dim, int):
        return dim
    names = {"H": height, "W": width, "ceil": math.ceil, "floor": math.floor, "min": min}
    return int(eval(compiled_dim(dim), {"__builtins__": {}}, names))


SYMBOLIC = [
    pytest.param(
        README_SPEC["layers"],
        3,
        {
            "conv1": ["N", 8, "H", "W"],
            "relu_1": ["N", 8, "H", "W"],
            "max_pool2d_2": ["N", 8, "floor(H/2)", "floor(W/2)"],
            "features": ["N", 8, 1, 1],
        },
        id="readme",
    ),
    pytest.param(
        [conv(3, padding="same", stride=2)],
        1,
        {"conv2d_0": ["N", 2, "ceil(H/2)", "ceil(W/2)"]},
        id="same-stride-2",
    ),
    pytest.param(
        [conv(3), {"op": "relu"}],
        1,
        {"conv2d_0": ["N", 2, "H-2", "W-2"], "relu_1": ["N", 2, "H-2", "W-2"]},
        id="valid",
    ),
    pytest.param(
        [conv([5, 1], padding=[1, 0, 1, 0])],
        1,
        {"conv2d_0": ["N", 2, "H-2", "W"]},
        id="explicit",
    ),
    pytest.param(
        [pool(3, stride=2, ceil_mode=True)],
        1,
        {"max_pool2d_0": ["N", 1, "ceil((H-1)/2)", "ceil((W-1)/2)"]},
        id="ceil-mode",
    ),
    pytest.param(
        [conv(3), conv(3)],
        1,
        {"conv2d_0": ["N", 2, "H-2", "W-2"], "conv2d_1": ["N", 2, "H-4", "W-4"]},
        id="offsets-fold",
    ),
    pytest.param(
        [conv(3), pool(2)],
        1,
        {
            "conv2d_0": ["N", 2, "H-2", "W-2"],
            "max_pool2d_1": ["N", 2, "floor((H-2)/2)", "floor((W-2)/2)"],
        },
        id="valid-then-pool",
    ),
    pytest.param(
        [conv(3), conv(3, padding="same", stride=2)],
        1,
        {
            "conv2d_0": ["N", 2, "H-2", "W-2"],
            "conv2d_1": ["N", 2, "ceil((H-2)/2)", "ceil((W-2)/2)"],
        },
        id="valid-then-same-stride-2",
    ),
    pytest.param(
        [conv(3, dilation=2), {"op": "flatten"}],
        1,
        {"conv2d_0": ["N", 2, "H-4", "W-4"], "flatten_1": ["N", "2*(H-4)*(W-4)"]},
        id="dilated-flatten",
    ),
    pytest.param(
        [{"op": "global_max_pool2d"}, {"op": "flatten"}],
        1,
        {"global_max_pool2d_0": ["N", 1, 1, 1], "flatten_1": ["N", 1]},
        id="global-flatten",
    ),
]


@pytest.mark.parametrize(("layers", "channels", "expected"), SYMBOLIC)
def test_symbolic_shapes(
    layers: list[dict[str, Any]], channels: int, expected: dict[str, list[int | str]]
) -> None:
    pipeline = parse_pipeline({"input": {"channels": channels}, "layers": layers})
    shapes = symbolic_shapes(pipeline)
    assert shapes == expected
    # Each symbol evaluates to layer_costs' concrete size, for a few image sizes.
    for height, width in ((13, 13), (16, 21), (40, 17)):
        for concrete in layer_costs(pipeline, height, width):
            symbolic = shapes[concrete.name]
            got = tuple(evaluate(dim, height, width) for dim in symbolic[1:])
            assert got == concrete.shape, (concrete.name, symbolic, height, width)


def test_check_tensors_and_content_id_are_the_registry_id(
    registry: PipelineRegistry, tensor_pipeline: Pipeline
) -> None:
    tensors = make_tensors()
    expected = content_id(tensor_pipeline, check_tensors(tensor_pipeline, tensors))
    assert registry.register(tensor_pipeline, tensors, None).pipeline_id == expected


def test_symbolic_ceil_mode_without_padding_drops_a_window_past_the_input() -> None:
    pipeline = pipeline_of(pool(2, stride=3, ceil_mode=True))
    symbolic = symbolic_shapes(pipeline)["max_pool2d_0"]
    (concrete,) = layer_costs(pipeline, 3, 3)
    assert concrete.shape == (1, 1, 1)  # a second window would start at 3, past the 3 pixels
    assert evaluate(symbolic[2], 3, 3) == 1, symbolic


GRID_LAYERS = [
    {"op": "relu"},
    *(conv(k, stride=s, padding=p) for k in (1, 2, 3) for s in (1, 2) for p in (0, 1, "same")),
    conv(3, dilation=2),
    *(pool(k, stride=s) for k in (2, 3) for s in (1, 2, 3)),
    *(pool(k, stride=s, padding=1, ceil_mode=True) for k in (2, 3) for s in (1, 2, 3)),
    *(pool(k, stride=s, ceil_mode=True) for k in (2, 3) for s in (1, 2, 3)),
]


def test_symbolic_shapes_evaluate_to_infer_shapes() -> None:
    # Every pair of layers from the grid, every square image size from 1 to 16 that fits.
    checked = 0
    for first in GRID_LAYERS:
        for second in GRID_LAYERS:
            pipeline = pipeline_of(first, second)
            shapes = symbolic_shapes(pipeline)
            for size in range(1, 17):
                try:
                    concrete = layer_costs(pipeline, size, size)
                except InvalidSpec:
                    continue
                for layer in concrete:
                    symbolic = shapes[layer.name]
                    got = tuple(evaluate(dim, size, size) for dim in symbolic[1:])
                    assert got == layer.shape, (first, second, symbolic, size)
                    checked += 1
    assert checked > 5_000
