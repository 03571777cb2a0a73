"""Hand-worked golden tensors: every number below is worked out by hand, not by a library.

Each case checks the NumPy reference *and* onnxruntime against the same hand value, so a wrong
reference cannot hide a wrong graph (or the other way round). Shapes are (N, C, H, W) unless a
comment says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

import numpy as np
import pytest

from featmap.contract.errors import InvalidSpec
from featmap.contract.ops import layer_costs
from featmap.contract.spec import (
    LAYER_TYPES,
    Pipeline,
    parse_pipeline,
)
from featmap.service.reference import REFERENCE_OPS, reference_outputs, run_reference
from tests.conftest import run_onnx


def pipeline(layers: list[dict[str, Any]], channels: int = 1, **inputs: Any) -> Pipeline:
    """A pipeline over `channels`-channel float32 NCHW images unless `inputs` says otherwise."""
    return parse_pipeline({"input": {"channels": channels, **inputs}, "layers": layers})


def image(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """One single-channel image (1, 1, H, W) from its rows."""
    return np.array(rows, dtype=np.float32)[None, None]


def grid(height: int, width: int) -> np.ndarray:
    """(1, 1, H, W) with pixel (r, c) = r * width + c: every value names its own position."""
    return np.arange(height * width, dtype=np.float32).reshape(1, 1, height, width)


def assert_golden(pipeline: Pipeline, images: np.ndarray, expected: Any) -> None:
    """The last layer's reference and onnxruntime results both equal the hand-worked tensor."""
    want = np.asarray(expected, dtype=np.float64)
    (name,) = pipeline.output_names
    ours = reference_outputs(pipeline, images)[name]
    assert ours.shape == want.shape, f"reference shape {ours.shape} != hand {want.shape}"
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6, err_msg="reference")
    theirs = run_onnx(pipeline, images)[name]
    assert theirs.shape == want.shape, f"onnxruntime shape {theirs.shape} != hand {want.shape}"
    assert theirs.dtype == np.float32
    np.testing.assert_allclose(theirs, want, rtol=1e-6, atol=1e-6, err_msg="onnxruntime")
    assert layer_costs(pipeline, *_spatial_size(pipeline, images))[-1].shape == want.shape[1:]


def _spatial_size(pipeline: Pipeline, images: np.ndarray) -> tuple[int, int]:
    if pipeline.input.layout == "NHWC":
        return images.shape[1], images.shape[2]
    return images.shape[2], images.shape[3]


def conv(kernel: Any, **fields: Any) -> dict[str, Any]:
    """A conv2d layer with literal weights (filters, in_channels/groups, kh, kw)."""
    values = np.asarray(kernel)
    return {
        "op": "conv2d",
        "filters": values.shape[0],
        "kernel_size": list(values.shape[2:]),
        "weights": {"values": values.tolist()},
        **fields,
    }


# --------------------------------------------------------------------------- the registry


def test_every_layer_type_has_a_reference_op() -> None:
    ops = {get_args(t.model_fields["op"].annotation)[0] for t in LAYER_TYPES}
    assert ops == set(REFERENCE_OPS)


# --------------------------------------------------------------------------- textbook pooling

# The textbook 4x4 grid: each 2x2 quadrant pools to one number.
TEXTBOOK = [
    [1, 1, 2, 4],
    [5, 6, 7, 8],
    [3, 2, 1, 0],
    [1, 2, 3, 4],
]


def test_max_pool_textbook_4x4_to_2x2() -> None:
    p = pipeline([{"op": "max_pool2d", "pool_size": 2}])
    # (1, 1, 4, 4) -> (1, 1, 2, 2)
    assert_golden(p, image(TEXTBOOK), [[[[6, 8], [3, 4]]]])


def test_avg_pool_textbook_4x4_to_2x2() -> None:
    p = pipeline([{"op": "avg_pool2d", "pool_size": 2}])
    # (1+1+5+6)/4, (2+4+7+8)/4, (3+2+1+2)/4, (1+0+3+4)/4; (1, 1, 4, 4) -> (1, 1, 2, 2)
    assert_golden(p, image(TEXTBOOK), [[[[3.25, 5.25], [2.0, 2.0]]]])


# --------------------------------------------------------------------------- edges

PREWITT_X = [[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]]


@pytest.mark.parametrize(
    ("weights", "gain"),
    [({"values": [[PREWITT_X]]}, 3), ({"preset": "sobel_x"}, 4)],
    ids=["values", "sobel_x"],
)
@pytest.mark.parametrize("rising", [True, False], ids=["dark_to_bright", "bright_to_dark"])
def test_vertical_edge_kernel_on_step_image(
    weights: dict[str, Any], gain: int, rising: bool
) -> None:
    # (1, 1, 5, 6): columns 0-2 are 0, columns 3-5 are 1 (or the reverse).
    step = [[0, 0, 0, 1, 1, 1]] * 5 if rising else [[1, 1, 1, 0, 0, 0]] * 5
    p = pipeline([{"op": "conv2d", "filters": 1, "kernel_size": 3, "weights": weights}])
    # Cross-correlation: out[:, j] = gain * (x[:, j + 2] - x[:, j]), non-zero only for the two
    # windows that straddle the edge; positive for a rising step (a true convolution, with the
    # kernel flipped, would give the opposite sign). (1, 1, 5, 6) -> valid 3x3 -> (1, 1, 3, 4)
    edge = gain if rising else -gain
    assert_golden(p, image(step), [[[[0, edge, edge, 0]] * 3]])


def test_preset_kernel_sums_over_input_channels() -> None:
    # (1, 2, 3, 4): channel 0 steps up by 1 between columns 1 and 2, channel 1 by 10.
    step = np.array([[[[0, 0, 1, 1]] * 3, [[0, 0, 10, 10]] * 3]], dtype=np.float32)
    p = pipeline(
        [{"op": "conv2d", "filters": 1, "kernel_size": 3, "weights": {"preset": "sobel_x"}}],
        channels=2,
    )
    # Every (filter, channel) slice is sobel_x: 4 * (1 + 10) at both columns. -> (1, 1, 1, 2)
    assert_golden(p, step, [[[[44, 44]]]])


# --------------------------------------------------------------------------- same vs valid


def _identity3(padding: str, stride: int) -> Pipeline:
    layer = {
        "op": "conv2d",
        "filters": 1,
        "kernel_size": 3,
        "stride": stride,
        "padding": padding,
        "weights": {"preset": "identity"},
    }
    return pipeline([layer])


def test_same_keeps_size_and_valid_shrinks() -> None:
    x = grid(7, 9)  # (1, 1, 7, 9)
    # same, stride 1: (1, 1, 7, 9), the identity kernel gives the image back.
    assert_golden(_identity3("same", 1), x, x)
    # valid, stride 1: 7 - 3 + 1 = 5, 9 - 3 + 1 = 7 -> (1, 1, 5, 7), the centre pixels.
    assert_golden(_identity3("valid", 1), x, x[:, :, 1:6, 1:8])


def test_same_with_stride_2_halves_rounding_up() -> None:
    x = grid(7, 9)  # (1, 1, 7, 9)
    # same, stride 2: ceil(7/2) = 4, ceil(9/2) = 5. Total padding (4-1)*2 + 3 - 7 = 2 rows and
    # (5-1)*2 + 3 - 9 = 2 columns, one each side, so window i is centred on pixel 2i.
    expected = [
        [
            [
                [0, 2, 4, 6, 8],
                [18, 20, 22, 24, 26],
                [36, 38, 40, 42, 44],
                [54, 56, 58, 60, 62],
            ]
        ]
    ]
    assert_golden(_identity3("same", 2), x, expected)
    # valid, stride 2: (7-3)//2 + 1 = 3, (9-3)//2 + 1 = 4, centred on pixel 2i + 1.
    assert_golden(
        _identity3("valid", 2), x, [[[[10, 12, 14, 16], [28, 30, 32, 34], [46, 48, 50, 52]]]]
    )


def test_same_odd_padding_goes_bottom_right_for_even_kernel() -> None:
    # (1, 1, 3, 4): pixels 1..12. A 2x2 kernel with stride 1 needs 1 row and 1 column of
    # padding; SAME_UPPER puts it at the bottom and the right.
    x = image([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    top_left_tap = [[1, 0], [0, 0]]
    bottom_right_tap = [[0, 0], [0, 1]]
    p = pipeline([conv([[top_left_tap], [bottom_right_tap]], padding="same")])
    # Filter 0 reads the unpadded pixel itself: the image back (padding at the top/left would
    # shift it down/right instead). Filter 1 reads the pixel below-right: the image shifted
    # up/left with the zero padding showing in the last row and column. -> (1, 2, 3, 4)
    expected = [
        [
            [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]],
            [[6, 7, 8, 0], [10, 11, 12, 0], [0, 0, 0, 0]],
        ]
    ]
    assert_golden(p, x, expected)


@pytest.mark.parametrize("dilation", [1, 2], ids=["auto_pad", "pad_node"])
def test_same_odd_padding_goes_bottom_right_with_stride(dilation: int) -> None:
    x = grid(6, 6)  # (1, 1, 6, 6)
    layer = {
        "op": "conv2d",
        "filters": 1,
        "kernel_size": 3,
        "stride": 2,
        "dilation": dilation,
        "padding": "same",
        "weights": {"preset": "identity"},
    }
    # ceil(6/2) = 3 outputs per axis. Dilation 1: total padding 2*2 + 3 - 6 = 1, all at the
    # bottom/right, window i covers 2i..2i+2 and is centred on 2i + 1. Dilation 2 (extent 5):
    # total 2*2 + 5 - 6 = 3 = 1 top + 2 bottom, window i covers 2i-1..2i+3, centre 2i + 1 again.
    # Padding put top/left instead would centre the windows on 2i: [[0, 2, 4], ...].
    assert_golden(pipeline([layer]), x, [[[[7, 9, 11], [19, 21, 23], [31, 33, 35]]]])


def test_same_with_stride_larger_than_kernel() -> None:
    # 8x8, 2x2 kernel, stride 3: ceil(8/3) = 3 outputs, total padding 2*3 + 2 - 8 = 0; the
    # windows start at 0, 3, 6 and the bottom-right tap reads pixel (3i + 1, 3j + 1).
    p = pipeline([conv([[[[0, 0], [0, 1]]]], stride=3, padding="same")])
    assert_golden(p, grid(8, 8), [[[[9, 12, 15], [33, 36, 39], [57, 60, 63]]]])


def test_same_max_pool_pads_bottom_right() -> None:
    x = image([[1, 2, 3], [4, 5, 6], [7, 8, 9]])  # (1, 1, 3, 3)
    p = pipeline([{"op": "max_pool2d", "pool_size": 2, "stride": 1, "padding": "same"}])
    # One padding row/column at the bottom/right: out[i, j] = max(x[i:i+2, j:j+2]).
    # (Top/left padding would give the image back.)
    assert_golden(p, x, [[[[5, 6, 6], [8, 9, 9], [8, 9, 9]]]])


@pytest.mark.parametrize(
    ("count_include_pad", "expected"),
    [
        # (1+2+4+5)/4, (2+3+5+6)/4, (3+6)/2; (4+5+7+8)/4, 28/4, (6+9)/2; (7+8)/2, (8+9)/2, 9/1
        (False, [[3, 4, 4.5], [6, 7, 7.5], [7.5, 8.5, 9]]),
        # the same sums, always over 4: the SAME padding counts like explicit padding
        (True, [[3, 4, 2.25], [6, 7, 3.75], [3.75, 4.25, 2.25]]),
    ],
)
def test_same_avg_pool_pads_bottom_right(count_include_pad: bool, expected: Any) -> None:
    x = image([[1, 2, 3], [4, 5, 6], [7, 8, 9]])  # (1, 1, 3, 3)
    layer = {
        "op": "avg_pool2d",
        "pool_size": 2,
        "stride": 1,
        "padding": "same",
        "count_include_pad": count_include_pad,
    }
    assert_golden(pipeline([layer]), x, [[expected]])


@pytest.mark.parametrize(
    ("size", "pool", "stride", "expected"),
    [
        # 4x4, pool 3, stride 2: ceil(4/2) = 2, total padding 1*2 + 3 - 4 = 1 at the
        # bottom/right; windows cover rows 0..2 and 2..4 (row 4 padding). Top/left padding
        # would give [[5, 7], [13, 15]].
        ((4, 4), 3, 2, [[10, 11], [14, 15]]),
        # 7x7, pool 2, stride 3 (stride > pool): ceil(7/3) = 3, total 2*3 + 2 - 7 = 1 at the
        # bottom/right; windows rows 0..1, 3..4, 6..7 -> maxima at rows/columns 1, 4, 6.
        ((7, 7), 2, 3, [[8, 11, 13], [29, 32, 34], [43, 46, 48]]),
        # 8x8, pool 2, stride 3: ceil(8/3) = 3, total 2*3 + 2 - 8 = 0 (pixel 7 reaches no
        # window); maxima at rows/columns 1, 4, 7.
        ((8, 8), 2, 3, [[9, 12, 15], [33, 36, 39], [57, 60, 63]]),
    ],
)
def test_same_strided_max_pool(
    size: tuple[int, int], pool: int, stride: int, expected: Any
) -> None:
    p = pipeline([{"op": "max_pool2d", "pool_size": pool, "stride": stride, "padding": "same"}])
    assert_golden(p, grid(*size), [[expected]])


# --------------------------------------------------------------------------- explicit padding


@pytest.mark.parametrize(
    ("count_include_pad", "expected"),
    [
        # divisor = real pixels in the window: 1/1, (1+2)/2, 2/1; (1+3)/2, 10/4, (2+4)/2; ...
        (False, [[1, 1.5, 2], [2, 2.5, 3], [3, 3.5, 4]]),
        # divisor always 4: 1/4, 3/4, 2/4; 4/4, 10/4, 6/4; 3/4, 7/4, 4/4
        (True, [[0.25, 0.75, 0.5], [1, 2.5, 1.5], [0.75, 1.75, 1]]),
    ],
)
def test_avg_pool_explicit_padding_divisor(count_include_pad: bool, expected: Any) -> None:
    x = image([[1, 2], [3, 4]])  # (1, 1, 2, 2)
    layer = {
        "op": "avg_pool2d",
        "pool_size": 2,
        "stride": 1,
        "padding": 1,
        "count_include_pad": count_include_pad,
    }
    # padded 4x4, pool 2, stride 1 -> (1, 1, 3, 3)
    assert_golden(pipeline([layer]), x, [[expected]])


def test_max_pool_padding_never_wins_on_negative_input() -> None:
    x = image([[-1, -2], [-3, -4]])  # (1, 1, 2, 2), every pixel < 0 = the zero padding
    p = pipeline([{"op": "max_pool2d", "pool_size": 2, "stride": 1, "padding": 1}])
    # padded 4x4 -> (1, 1, 3, 3); a corner window holds one real pixel and three padding ones.
    assert_golden(p, x, [[[[-1, -1, -2], [-1, -1, -2], [-3, -3, -4]]]])


def test_max_pool_explicit_asymmetric_padding() -> None:
    x = image([[-1, -2, -3], [-4, -5, -6]])  # (1, 1, 2, 3)
    # [top, left, bottom, right] = [1, 0, 0, 1]: padded 3x4, pool 2, stride 1 -> (1, 1, 2, 3)
    p = pipeline([{"op": "max_pool2d", "pool_size": 2, "stride": 1, "padding": [1, 0, 0, 1]}])
    assert_golden(p, x, [[[[-1, -2, -3], [-1, -2, -3]]]])


# --------------------------------------------------------------------------- ceil_mode


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        # windows rows/cols {0,1}, {2,3}, {4}: max = x[min(2i+1, 4), min(2j+1, 4)]
        ("max_pool2d", [[6, 8, 9], [16, 18, 19], [21, 23, 24]]),
        # (0+1+5+6)/4, (2+3+7+8)/4, (4+9)/2; (10+11+15+16)/4, 60/4, (14+19)/2; (20+21)/2, ...
        ("avg_pool2d", [[3, 5, 6.5], [13, 15, 16.5], [20.5, 22.5, 24]]),
    ],
)
def test_ceil_mode_keeps_the_partial_last_window(op: str, expected: Any) -> None:
    x = grid(5, 5)  # (1, 1, 5, 5), pixel (r, c) = 5r + c
    # pool 2, stride 2: floor gives (5-2)//2 + 1 = 2, ceil gives ceil(3/2) + 1 = 3.
    floor = pipeline([{"op": op, "pool_size": 2}])
    assert_golden(floor, x, [[np.asarray(expected)[:2, :2]]])
    ceil = pipeline([{"op": op, "pool_size": 2, "ceil_mode": True}])
    assert_golden(ceil, x, [[expected]])


@pytest.mark.parametrize(
    ("op", "expected"),
    [("max_pool2d", [1, 3, 5]), ("avg_pool2d", [1, 2.5, 4.5])],
)
def test_ceil_mode_drops_a_window_starting_in_the_end_padding(op: str, expected: Any) -> None:
    x = image([[1, 2, 3, 4, 5]])  # (1, 1, 1, 5)
    layer = {"op": op, "pool_size": [1, 2], "padding": [0, 1, 0, 1], "ceil_mode": True}
    # Width: 5 + 1 + 1 = 7 padded, pool 2, stride 2: ceil((7-2)/2) + 1 = 4 windows would start
    # at -1, 1, 3, 5; the last starts at 5, in the end padding, and PyTorch drops it -> 3.
    # The windows hold pixels [1], [2, 3], [4, 5] (index -1 is padding). -> (1, 1, 1, 3)
    assert_golden(pipeline([layer]), x, [[[expected]]])


@pytest.mark.parametrize(
    ("count_include_pad", "expected"),
    [
        # real pixels only: (1+2)/2, (2+3+4)/3, (4+5+6)/3, 6/1
        (False, [1.5, 3, 5, 6]),
        # PyTorch: the user's padding counts, the columns ceil_mode adds past it do not:
        # (0+1+2)/3, 9/3, 15/3, and the last window {5, 6=pad, 7=past the pad} is 6/2.
        (True, [1, 3, 5, 3]),
    ],
)
def test_ceil_mode_avg_pool_divisor(count_include_pad: bool, expected: Any) -> None:
    x = image([[1, 2, 3, 4, 5, 6]])  # (1, 1, 1, 6)
    layer = {
        "op": "avg_pool2d",
        "pool_size": [1, 3],
        "stride": [1, 2],
        "padding": [0, 1, 0, 1],
        "ceil_mode": True,
        "count_include_pad": count_include_pad,
    }
    # Width 6 + 2 = 8 padded, pool 3, stride 2: ceil((8-3)/2) + 1 = 4 windows at -1, 1, 3, 5
    # (the last starts on pixel 5, a real one, so it stays). -> (1, 1, 1, 4)
    assert_golden(pipeline([layer]), x, [[[expected]]])


# --------------------------------------------------------------------------- conv options


def test_dilation_2() -> None:
    x = grid(5, 5)  # (1, 1, 5, 5), pixel (r, c) = 5r + c
    p = pipeline([conv([[[[1, 2], [3, 4]]]], dilation=2)])
    # Taps at (0,0), (0,2), (2,0), (2,2): 1*x + 2*(x+2) + 3*(x+10) + 4*(x+12) = 10x + 82,
    # x = 5i + j. Extent 3 -> (1, 1, 3, 3).
    assert_golden(p, x, [[[[82, 92, 102], [132, 142, 152], [182, 192, 202]]]])


def test_dilation_per_axis() -> None:
    x = grid(5, 3)  # (1, 1, 5, 3), pixel (r, c) = 3r + c
    p = pipeline([conv([[[[1, 2], [3, 4]]]], dilation=[2, 1])])
    # Taps at (0,0), (0,1), (2,0), (2,1): 1*x + 2*(x+1) + 3*(x+6) + 4*(x+7) = 10x + 48,
    # x = 3i + j. Extent (3, 2) -> (1, 1, 3, 2).
    assert_golden(p, x, [[[[48, 58], [78, 88], [108, 118]]]])


def test_groups_2() -> None:
    # (1, 4, 2, 2): channel c is the constant c + 1.
    x = np.broadcast_to(np.arange(1, 5, dtype=np.float32).reshape(1, 4, 1, 1), (1, 4, 2, 2))
    # weights (2 filters, 4/2 channels, 1, 1): filter 0 sees channels 0, 1; filter 1 sees 2, 3.
    p = pipeline([conv([[[[1]], [[10]]], [[[100]], [[1000]]]], groups=2)], channels=4)
    # 1*1 + 10*2 = 21; 100*3 + 1000*4 = 4300. -> (1, 2, 2, 2)
    assert_golden(p, np.ascontiguousarray(x), [[[[21, 21]] * 2, [[4300, 4300]] * 2]])


def test_depthwise() -> None:
    # (1, 3, 1, 3): channel c holds [1, 2, 3] * 10^c.
    x = np.array([[[[1, 2, 3]], [[10, 20, 30]], [[100, 200, 300]]]], dtype=np.float32)
    # groups == channels == filters: each channel its own [1, 2] row kernel, times 1, 2, 3.
    kernel = [[[[1, 2]]], [[[2, 4]]], [[[3, 6]]]]  # (3, 1, 1, 2)
    p = pipeline([conv(kernel, groups=3)], channels=3)
    # channel 0: 1+4, 2+6; channel 1: 2*(10+40), 2*(20+60); channel 2: 3*(100+400), ...
    assert_golden(p, x, [[[[5, 8]], [[100, 160]], [[1500, 2400]]]])


def test_depthwise_with_channel_multiplier() -> None:
    x = np.array([[[[1, 2, 3]], [[10, 20, 30]]]], dtype=np.float32)  # (1, 2, 1, 3)
    # groups = 2 channels, 4 filters: filters 0, 1 read channel 0; filters 2, 3 read channel 1.
    kernel = [[[[1, 0]]], [[[0, 1]]], [[[-1, 1]]], [[[1, 1]]]]  # (4, 1, 1, 2)
    p = pipeline([conv(kernel, groups=2)], channels=2)
    # left pixel, right pixel, right - left, left + right -> (1, 4, 1, 2)
    assert_golden(p, x, [[[[1, 2]], [[2, 3]], [[10, 10]], [[30, 50]]]])


def test_bias_values() -> None:
    x = image([[1, -1], [0, 2]])  # (1, 1, 2, 2)
    p = pipeline([conv([[[[2]]], [[[-1]]]], bias={"values": [0.5, -3]})])
    # 2x + 0.5 and -x - 3 -> (1, 2, 2, 2)
    assert_golden(p, x, [[[[2.5, -1.5], [0.5, 4.5]], [[-4, -2], [-3, -5]]]])


def test_zero_init_bias_adds_nothing() -> None:
    x = image([[1, -1], [0, 2]])  # (1, 1, 2, 2)
    p = pipeline([conv([[[[3]]]], bias={"init": "zeros"})])
    assert_golden(p, x, [[[[3, -3], [0, 6]]]])


def test_zero_init_weights_with_bias_is_constant() -> None:
    x = grid(4, 4)  # (1, 1, 4, 4)
    layer = {
        "op": "conv2d",
        "filters": 2,
        "kernel_size": 3,
        "weights": {"init": "zeros"},
        "bias": {"values": [7, -2]},
    }
    # valid 3x3 on 4x4 -> (1, 2, 2, 2), every value its filter's bias
    assert_golden(pipeline([layer]), x, [[[[7, 7], [7, 7]], [[-2, -2], [-2, -2]]]])


def test_box_and_gaussian_presets_average() -> None:
    x = image([[0, 0, 0], [0, 9, 0], [0, 0, 0]])  # (1, 1, 3, 3)
    box = pipeline([{"op": "conv2d", "filters": 1, "kernel_size": 3, "weights": {"preset": "box"}}])
    assert_golden(box, x, [[[[1]]]])  # 9 / 9
    # OpenCV default sigma for 3 taps is 0.8; the centre weight of the normalized 1D kernel is
    # 1 / (1 + 2 exp(-1 / (2 * 0.64))): the 2D centre is its square, times 9.
    centre = 1 / (1 + 2 * np.exp(-1 / 1.28))
    gaussian = pipeline(
        [{"op": "conv2d", "filters": 1, "kernel_size": 3, "weights": {"preset": "gaussian"}}]
    )
    assert_golden(gaussian, x, [[[[9 * centre**2]]]])


def test_laplacian_and_sobel_y_presets() -> None:
    x = image([[0, 0, 0], [0, 1, 0], [0, 0, 0]])  # (1, 1, 3, 3), a single bright pixel
    laplacian = {"op": "conv2d", "filters": 1, "kernel_size": 3, "padding": "same"}
    # same padding: the response at each pixel is the kernel tap that lands on the bright one,
    # i.e. the kernel flipped about its centre; the Laplacian is symmetric.
    assert_golden(
        pipeline([{**laplacian, "weights": {"preset": "laplacian"}}]),
        x,
        [[[[0, 1, 0], [1, -4, 1], [0, 1, 0]]]],
    )
    # sobel_y = [[-1, -2, -1], [0, 0, 0], [1, 2, 1]], flipped by cross-correlation.
    assert_golden(
        pipeline([{**laplacian, "weights": {"preset": "sobel_y"}}]),
        x,
        [[[[1, 2, 1], [0, 0, 0], [-1, -2, -1]]]],
    )


# --------------------------------------------------------------------------- activations


def test_relu() -> None:
    x = image([[-2, -0.5, 0, 3]])  # (1, 1, 1, 4)
    assert_golden(pipeline([{"op": "relu"}]), x, [[[[0, 0, 0, 3]]]])


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [(None, [-0.02, -0.005, 0, 3]), (0.1, [-0.2, -0.05, 0, 3]), (0.0, [0, 0, 0, 3])],
    ids=["default_0.01", "0.1", "0"],
)
def test_leaky_relu_alpha(alpha: float | None, expected: list[float]) -> None:
    x = image([[-2, -0.5, 0, 3]])  # (1, 1, 1, 4)
    layer: dict[str, Any] = {"op": "leaky_relu"}
    if alpha is not None:
        layer["alpha"] = alpha
    assert_golden(pipeline([layer]), x, [[[expected]]])


# --------------------------------------------------------------------------- global pools, flatten

# (1, 2, 2, 3): channel 0 is 1..6, channel 1 is -1..-6.
TWO_CHANNELS = np.array([[[[1, 2, 3], [4, 5, 6]], [[-1, -2, -3], [-4, -5, -6]]]], dtype=np.float32)


def test_global_avg_pool() -> None:
    # 21/6 and -21/6 -> (1, 2, 1, 1)
    p = pipeline([{"op": "global_avg_pool2d"}], channels=2)
    assert_golden(p, TWO_CHANNELS, [[[[3.5]], [[-3.5]]]])


def test_global_max_pool() -> None:
    # an all-negative channel's max is its largest negative value -> (1, 2, 1, 1)
    p = pipeline([{"op": "global_max_pool2d"}], channels=2)
    assert_golden(p, TWO_CHANNELS, [[[[6]], [[-1]]]])


def test_flatten_is_row_major_channels_first() -> None:
    # (2, 2, 2, 3) with value 100n + 10c + 3h + w -> (2, 12): c, then h, then w, as
    # torch.flatten(x, 1).
    n, c, h, w = np.meshgrid(range(2), range(2), range(2), range(3), indexing="ij")
    x = (100 * n + 10 * c + 3 * h + w).astype(np.float32)
    p = pipeline([{"op": "flatten"}], channels=2)
    row = [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]
    assert_golden(p, x, [row, [v + 100 for v in row]])


def test_flatten_of_nhwc_input_is_still_channels_first() -> None:
    # NHWC (1, 2, 3, 2) with value 100c + 10h + w: the graph works in NCHW, so the flattened
    # order is c, h, w whatever the input layout. -> (1, 12)
    h, w, c = np.meshgrid(range(2), range(3), range(2), indexing="ij")
    x = (100 * c + 10 * h + w).astype(np.float32)[None]
    p = pipeline([{"op": "flatten"}], channels=2, layout="NHWC")
    assert_golden(p, x, [[0, 1, 2, 10, 11, 12, 100, 101, 102, 110, 111, 112]])


def test_global_pool_then_flatten() -> None:
    p = pipeline([{"op": "global_max_pool2d"}, {"op": "flatten"}], channels=2)
    assert_golden(p, TWO_CHANNELS, [[6, -1]])  # (1, 2, 1, 1) -> (1, 2)


# --------------------------------------------------------------------------- preprocessing

IDENTITY = {"op": "leaky_relu", "alpha": 1.0}  # x for every x: shows the preprocessed input
# (1, 3, 1, 3) uint8: each channel holds the pixels 0, 51, 255.
UINT8_IMAGE = np.array([[[[0, 51, 255]]] * 3], dtype=np.uint8)
NORMALIZE = {"scale": 1 / 255, "mean": [0.5, 0.25, 0.0], "std": [0.5, 0.25, 2.0]}
# x * scale -> 0, 0.2, 1 per channel; then (x - mean) / std:
#   channel 0: (0 - 0.5)/0.5, (0.2 - 0.5)/0.5, (1 - 0.5)/0.5
#   channel 1: (0 - 0.25)/0.25, (0.2 - 0.25)/0.25, (1 - 0.25)/0.25
#   channel 2: 0/2, 0.2/2, 1/2
NORMALIZED = [[[[-1, -0.6, 1]], [[-1, -0.2, 3]], [[0, 0.1, 0.5]]]]


def test_uint8_scale_mean_std() -> None:
    p = pipeline([IDENTITY], channels=3, dtype="uint8", **NORMALIZE)
    assert_golden(p, UINT8_IMAGE, NORMALIZED)


def test_nhwc_gives_the_nchw_result() -> None:
    p = pipeline([IDENTITY], channels=3, dtype="uint8", layout="NHWC", **NORMALIZE)
    # (1, 3, 1, 3) NCHW -> (1, 1, 3, 3) NHWC; the result stays NCHW.
    assert_golden(p, np.ascontiguousarray(UINT8_IMAGE.transpose(0, 2, 3, 1)), NORMALIZED)


def test_nhwc_conv_matches_nchw_transpose() -> None:
    rng = np.random.default_rng(0)
    nchw = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
    layer = {
        "op": "conv2d",
        "filters": 4,
        "kernel_size": 3,
        "padding": "same",
        "weights": {"init": "he_uniform", "seed": 3},
    }
    a = pipeline([layer], channels=3)
    b = pipeline([layer], channels=3, layout="NHWC")
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))  # (2, 5, 6, 3)
    want = reference_outputs(a, nchw)["conv2d_0"]  # (2, 4, 5, 6)
    np.testing.assert_array_equal(reference_outputs(b, nhwc)["conv2d_0"], want)
    np.testing.assert_allclose(run_onnx(b, nhwc)["conv2d_0"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_onnx(a, nchw)["conv2d_0"], want, rtol=1e-5, atol=1e-5)


def test_scalar_mean_std_and_float16_input() -> None:
    # (1, 1, 1, 3) float16: 1, 2.5, -4 are exact in float16.
    x = np.array([[[[1, 2.5, -4]]]], dtype=np.float16)
    p = pipeline([IDENTITY], dtype="float16", scale=2.0, mean=1.0, std=4.0)
    # (2x - 1) / 4
    assert_golden(p, x, [[[[0.25, 1, -2.25]]]])


# --------------------------------------------------------------------------- several layers


def test_run_reference_returns_every_layer(readme_pipeline: Pipeline) -> None:
    x = np.zeros((2, 3, 6, 6), dtype=np.float32)
    results = run_reference(readme_pipeline, x)
    assert list(results) == readme_pipeline.layer_names
    # same conv keeps 6x6; relu; max pool 2 -> 3x3; global average -> 1x1
    assert [r.shape for r in results.values()] == [
        (2, 8, 6, 6),
        (2, 8, 6, 6),
        (2, 8, 3, 3),
        (2, 8, 1, 1),
    ]
    assert list(reference_outputs(readme_pipeline, x)) == ["conv1", "features"]


def test_chain_conv_relu_pool_flatten() -> None:
    x = image([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])  # (1, 1, 4, 4)
    p = parse_pipeline(
        {
            "input": {"channels": 1},
            "layers": [
                # filter 0: x - 7; filter 1: 7 - x -> (1, 2, 4, 4)
                conv([[[[1]]], [[[-1]]]], bias={"values": [-7, 7]}, name="shifted"),
                {"op": "relu"},
                # (1, 2, 2, 2): filter 0 max(x - 7, 0) per quadrant: 0, 1, 7, 9;
                # filter 1 max(7 - x, 0): 6, 4, 0, 0
                {"op": "max_pool2d", "pool_size": 2, "name": "pooled"},
                {"op": "flatten"},  # (1, 8)
            ],
            "outputs": ["pooled", "flatten_3"],
        }
    )
    pooled = [[[[0, 1], [7, 9]], [[6, 4], [0, 0]]]]
    flat = [[0, 1, 7, 9, 6, 4, 0, 0]]
    for results in (reference_outputs(p, x), run_onnx(p, x)):
        np.testing.assert_allclose(results["pooled"], pooled)
        np.testing.assert_allclose(results["flatten_3"], flat)


# --------------------------------------------------------------------------- same_lower


@pytest.mark.parametrize(
    ("padding", "expected"),
    [
        # SAME_UPPER pads bottom/right: the top-left tap sees x itself.
        ("same", [[0, 1, 2], [3, 4, 5], [6, 7, 8]]),
        # SAME_LOWER pads top/left: the top-left tap sees x shifted down and right by one.
        ("same_lower", [[0, 0, 0], [0, 0, 1], [0, 3, 4]]),
    ],
)
def test_same_lower_puts_the_odd_padding_top_left(padding: str, expected: Any) -> None:
    # (1, 1, 3, 3) grid; 2x2 kernel picking its top-left tap, stride 1: total padding 1 per axis.
    p = pipeline([conv([[[[1, 0], [0, 0]]]], padding=padding)])
    assert_golden(p, grid(3, 3), [[expected]])


def test_same_lower_max_pool_pads_top_left() -> None:
    x = -grid(3, 3)  # (1, 1, 3, 3), pixel (r, c) = -(3r + c): the max is the top-left of a window
    p = pipeline([{"op": "max_pool2d", "pool_size": 2, "stride": 1, "padding": "same_lower"}])
    # windows start one row and column up/left (-inf there): max = x[max(r-1, 0), max(c-1, 0)]
    assert_golden(p, x, [[[[0, 0, -1], [0, 0, -1], [-3, -3, -4]]]])


def test_same_lower_strided_avg_pool() -> None:
    x = grid(4, 4)  # (1, 1, 4, 4), pixel (r, c) = 4r + c
    p = pipeline([{"op": "avg_pool2d", "pool_size": 3, "stride": 2, "padding": "same_lower"}])
    # out = ceil(4/2) = 2, total padding (2-1)*2 + 3 - 4 = 1, all of it top/left: windows cover
    # rows -1..1 and 1..3 (same for columns). Real pixels only:
    # (0+1+4+5)/4, (1+2+3+5+6+7)/6, (4+5+8+9+12+13)/6, (5+6+7+9+10+11+13+14+15)/9
    assert_golden(p, x, [[[[2.5, 4], [8.5, 10]]]])


# --------------------------------------------------------------------------- dilated pooling


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        # taps (r, c), (r, c+2), (r+2, c), (r+2, c+2) of pixel 5r + c: the max is the last one
        ("max_pool2d", [[12, 13, 14], [17, 18, 19], [22, 23, 24]]),
        # the mean of the four: 5r + c + (0 + 2 + 10 + 12) / 4
        ("avg_pool2d", [[6, 7, 8], [11, 12, 13], [16, 17, 18]]),
    ],
)
def test_dilated_pooling(op: str, expected: Any) -> None:
    # (1, 1, 5, 5) -> pool 2, dilation 2 (extent 3), stride 1 -> (1, 1, 3, 3)
    p = pipeline([{"op": op, "pool_size": 2, "dilation": 2, "stride": 1}])
    assert_golden(p, grid(5, 5), [[expected]])


@pytest.mark.parametrize(
    ("count_include_pad", "expected"),
    # taps of (0,0): rows/columns -1 and 1 -> only pixel (1,1) = 5 is real; (0,1): 5, 7;
    # (1,0): 5, 13; (1,1): 5, 7, 13, 15. Divided by the real taps, or by all 4.
    [(False, [[5, 6], [9, 10]]), (True, [[1.25, 3], [4.5, 10]])],
)
def test_dilated_avg_pool_with_padding(count_include_pad: bool, expected: Any) -> None:
    x = grid(4, 4)  # (1, 1, 4, 4) padded by 1 -> 6x6; extent 3, stride 2 -> (1, 1, 2, 2)
    layer = {
        "op": "avg_pool2d",
        "pool_size": 2,
        "dilation": 2,
        "stride": 2,
        "padding": 1,
        "count_include_pad": count_include_pad,
    }
    assert_golden(pipeline([layer]), x, [[expected]])


# --------------------------------------------------------------------------- batch_norm

# scale [4, 0.5], shift [1, -1], mean [1, 2], var [3, 0], epsilon 1 -> sqrt(var + eps) = [2, 1]:
# channel 0: (x - 1) / 2 * 4 + 1 = 2x - 1; channel 1: (x - 2) * 0.5 - 1 = 0.5x - 2
BATCH_NORM = {
    "op": "batch_norm",
    "scale": {"values": [4, 0.5]},
    "shift": {"values": [1, -1]},
    "mean": {"values": [1, 2]},
    "var": {"values": [3, 0]},
    "epsilon": 1.0,
}


def test_batch_norm_standalone() -> None:
    x = np.array([[[[1, 3]], [[2, 6]]]], dtype=np.float32)  # (1, 2, 1, 2)
    # channel 0: 2*1 - 1, 2*3 - 1; channel 1: 0.5*2 - 2, 0.5*6 - 2
    assert_golden(pipeline([BATCH_NORM], channels=2), x, [[[[1, 5]], [[-1, 1]]]])


@pytest.mark.parametrize("bias", [None, [0, 1]], ids=["no_bias", "bias"])
def test_batch_norm_after_conv(bias: list[float] | None) -> None:
    x = image([[1, 2]])  # (1, 1, 1, 2)
    fields = {} if bias is None else {"bias": {"values": bias}}
    # 1x1 conv: 2x (+ 0) and x (+ 1): channel 0 [2, 4]; channel 1 [1, 2] or [2, 3]
    p = pipeline([conv([[[[2]]], [[[1]]]], **fields), BATCH_NORM])
    # then 2y - 1: [3, 7]; 0.5y - 2: [-1.5, -1] or [-1, -0.5]
    expected = [[[[3, 7]], [[-1.5, -1]]]] if bias is None else [[[[3, 7]], [[-1, -0.5]]]]
    assert_golden(p, x, expected)


def test_a_dilated_window_wholly_in_the_padding_is_refused() -> None:
    # One row, padded by one above and below; 2 taps 2 apart: rows -1 and 1, both padding.
    pipeline = parse_pipeline({"input": {"channels": 1}, "layers": [
        {"op": "max_pool2d", "pool_size": 2, "dilation": 2, "padding": [1, 0, 1, 0]}]})  # fmt: skip
    with pytest.raises(InvalidSpec) as caught:
        layer_costs(pipeline, 1, 3)
    assert caught.value.field == "layers[0].padding"
    assert "the window at output row 0 lies wholly in the padding" in str(caught.value)
    assert [cost.shape for cost in layer_costs(pipeline, 3, 3)] == [(1, 2, 1)]  # taller: fine
