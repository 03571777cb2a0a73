"""`featmap visualize`: image loading, layer choice, tile normalization and the PNG grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from featmap.contract.ops import layer_costs
from featmap.contract.spec import parse_pipeline
from featmap.jobs.visualize import (
    CONSTANT_GREY,
    LABEL_HEIGHT,
    PADDING,
    TITLE_HEIGHT,
    VisualizeError,
    choose_layer,
    grid_layout,
    load_image,
    normalize_map,
    render_grid,
    visualize,
)
from featmap.service.reference import reference_outputs
from tests.test_cli import run_featmap

SOBEL_X = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
SOBEL_Y = [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]
# One grey input, two filters: horizontal and vertical edges of the same picture.
EDGES_SPEC: dict[str, Any] = {
    "input": {"channels": 1},
    "layers": [
        {
            "op": "conv2d",
            "name": "edges",
            "filters": 2,
            "kernel_size": 3,
            "weights": {"values": [[SOBEL_X], [SOBEL_Y]]},
        },
        {"op": "relu", "name": "positive"},
        {"op": "global_max_pool2d", "name": "peak"},
        {"op": "flatten", "name": "flat"},
    ],
}


@pytest.fixture
def square_png(tmp_path: Path) -> Path:
    """32x32 black with a white 12x20 rectangle: vertical and horizontal edges differ."""
    pixels = np.zeros((32, 32), dtype=np.uint8)
    pixels[6:18, 4:24] = 255
    path = tmp_path / "square.png"
    Image.fromarray(pixels).save(path)
    return path


def write_spec(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(spec))
    return path


def test_grid_size_from_tiles_columns_and_padding(square_png: Path, tmp_path: Path) -> None:
    output = tmp_path / "maps.png"
    result = run_featmap(
        "visualize",
        "--pipeline", str(write_spec(tmp_path, EDGES_SPEC)),
        "--image", str(square_png),
        "-o", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "positive" in result.stderr  # the default: the last layer with H x W > 1
    with Image.open(output) as picture:
        assert picture.format == "PNG"
        # 30x30 maps (3x3 valid on 32x32) enlarged 3x to reach 64: 90x90 tiles, 2 columns, 1 row
        assert picture.size == (
            2 * 90 + 3 * PADDING,
            TITLE_HEIGHT + 90 + LABEL_HEIGHT + 2 * PADDING,
        )
        grid = np.asarray(picture.convert("L"))
    layout = grid_layout(2, 30, 30)
    tiles = []
    for channel in range(2):
        x, y = layout.tile_origin(channel)
        tiles.append(grid[y : y + 90, x : x + 90].astype(int))
    assert not np.array_equal(tiles[0], tiles[1])

    # Each tile is its channel's map, normalized on its own and enlarged by nearest neighbour.
    pipeline = parse_pipeline(EDGES_SPEC)
    with Image.open(square_png) as opened:
        images = (np.asarray(opened, dtype=np.float32) / 255)[np.newaxis, np.newaxis]
    expected = reference_outputs(parse_pipeline({**EDGES_SPEC, "outputs": ["positive"]}), images)[
        "positive"
    ][0]
    assert pipeline.output_names == ["flat"]
    for channel, tile in enumerate(tiles):
        want = normalize_map(expected[channel]).repeat(3, axis=0).repeat(3, axis=1).astype(int)
        assert np.abs(tile - want).max() <= 1  # float32 vs float64 rounding at .5


def test_columns_and_scale_flags(square_png: Path, tmp_path: Path) -> None:
    output = tmp_path / "maps.png"
    visualize(parse_pipeline(EDGES_SPEC), square_png, output, "edges", columns=1, scale=6)
    with Image.open(output) as picture:
        # one column of two 180x180 tiles (30x30 maps enlarged 6x)
        width = 180 + 2 * PADDING
        height = TITLE_HEIGHT + 2 * (180 + LABEL_HEIGHT) + 3 * PADDING
        assert picture.size == (width, height)


@pytest.mark.parametrize("layer", ["peak", "flat"])
def test_global_and_flattened_layers_are_refused(
    square_png: Path, tmp_path: Path, layer: str
) -> None:
    result = run_featmap(
        "visualize",
        "--pipeline", str(write_spec(tmp_path, EDGES_SPEC)),
        "--image", str(square_png),
        "--layer", layer,
        "-o", str(tmp_path / "maps.png"),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(f"featmap visualize: error: layer {layer!r}")
    assert not (tmp_path / "maps.png").exists()


def test_unknown_layer_lists_the_layers() -> None:
    pipeline = parse_pipeline(EDGES_SPEC)
    with pytest.raises(VisualizeError, match="layers are"):
        choose_layer(pipeline, layer_costs(pipeline, 8, 8), "nope")


def test_no_spatial_layer() -> None:
    spec = {"input": {"channels": 1}, "layers": [{"op": "global_avg_pool2d"}]}
    pipeline = parse_pipeline(spec)
    with pytest.raises(VisualizeError, match="no layer"):
        choose_layer(pipeline, layer_costs(pipeline, 8, 8), None)


def test_constant_map_is_mid_grey() -> None:
    tile = normalize_map(np.full((4, 5), 3.5, dtype=np.float32))
    assert tile.dtype == np.uint8
    assert (tile == CONSTANT_GREY).all()
    ramp = normalize_map(np.array([[-2.0, 0.0, 2.0]], dtype=np.float32))
    assert ramp.tolist() == [[0, 128, 255]]


def rgb_png(tmp_path: Path) -> Path:
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[1, 2] = (10, 20, 30)
    path = tmp_path / "rgb.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(
    ("input_spec", "shape", "dtype", "pixel"),
    [
        ({"channels": 3}, (1, 3, 4, 6), np.float32, [10 / 255, 20 / 255, 30 / 255]),
        ({"channels": 3, "dtype": "uint8"}, (1, 3, 4, 6), np.uint8, [10, 20, 30]),
        ({"channels": 3, "scale": 0.5}, (1, 3, 4, 6), np.float32, [10, 20, 30]),  # graph scales
        (
            {"channels": 3, "layout": "NHWC"},
            (1, 4, 6, 3),
            np.float32,
            [10 / 255, 20 / 255, 30 / 255],
        ),
        ({"channels": 1, "dtype": "float16"}, (1, 1, 4, 6), np.float16, None),
    ],
)
def test_load_image_matches_the_input_spec(
    tmp_path: Path, input_spec: dict[str, Any], shape: tuple[int, ...], dtype: Any, pixel: Any
) -> None:
    pipeline = parse_pipeline({"input": input_spec, "layers": [{"op": "relu"}]})
    images = load_image(rgb_png(tmp_path), pipeline)
    assert images.shape == shape
    assert images.dtype == dtype
    if pixel is not None:
        got = images[0, 1, 2] if input_spec.get("layout") == "NHWC" else images[0, :, 1, 2]
        np.testing.assert_allclose(got, pixel, rtol=1e-6)
    else:  # grey: Pillow's L = (299 R + 587 G + 114 B) / 1000, then / 255
        assert float(images[0, 0, 0, 0]) == pytest.approx(60 / 255, abs=1e-3)


def test_unsupported_channel_count(tmp_path: Path) -> None:
    pipeline = parse_pipeline({"input": {"channels": 2}, "layers": [{"op": "relu"}]})
    with pytest.raises(VisualizeError, match="channels=2"):
        load_image(rgb_png(tmp_path), pipeline)


def test_narrow_grid_widens_for_its_title(tmp_path: Path) -> None:
    maps = np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4)[0, :1]
    title = "a_rather_long_layer_name (conv2d): 1 x 4 x 4"
    picture = render_grid(maps, title)
    layout = grid_layout(1, 4, 4)  # one 64x64 tile: narrower than the title
    assert layout.width == 64 + 2 * PADDING
    assert picture.size[0] > layout.width
    assert picture.size[1] == layout.height


def test_tensor_weights_need_weights_file(square_png: Path, tmp_path: Path) -> None:
    spec = {
        "input": {"channels": 1},
        "layers": [{"op": "conv2d", "name": "c", "filters": 2, "kernel_size": 3,
                    "weights": {"tensor": "w"}}],
    }  # fmt: skip
    pipeline_path = write_spec(tmp_path, spec)
    output = tmp_path / "maps.png"
    args = ["visualize", "--pipeline", str(pipeline_path), "--image", str(square_png)]
    missing = run_featmap(*args, "-o", str(output))
    assert missing.returncode == 2
    assert missing.stderr.startswith("featmap visualize: error: layers[0].weights.tensor: ")

    weights = tmp_path / "weights.npz"
    np.savez(weights, w=np.array([[SOBEL_X], [SOBEL_Y]], dtype=np.float32))
    given = run_featmap(*args, "--weights", str(weights), "-o", str(output))
    assert given.returncode == 0, given.stderr
    with Image.open(output) as picture:
        layout = grid_layout(2, 30, 30)
        assert picture.size == (layout.width, layout.height)
