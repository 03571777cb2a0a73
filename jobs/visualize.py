"""`featmap visualize`: one layer's feature maps for one image, drawn as a PNG grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..contract.ops import (
    LayerCost,
    layer_costs,
)
from ..contract.pixels import image_values
from ..contract.spec import (
    NO_TENSORS,
    Pipeline,
    WeightTensors,
    parse_pipeline,
)
from ..contract.tensors import image_size
from ..service.graph import INPUT_NAME, compile_pipeline
from ..service.sessions import CPU, build_session
from ..service.weights import check_tensors
from .images import InputError, decode_image

# Grid geometry in pixels; tests compute the PNG's size from these.
PADDING = 4
LABEL_HEIGHT = 12
TITLE_HEIGHT = 20
# Maps smaller than this (on their longer side) are enlarged by an integer factor.
MIN_TILE = 64
BACKGROUND = 255
INK = 0
CONSTANT_GREY = 128


class VisualizeError(ValueError):
    """The image or layer cannot be visualized as asked."""


@dataclass(frozen=True)
class GridLayout:
    """Where tiles go: `columns` x `rows` tiles of tile_height x tile_width, below a title."""

    channels: int
    columns: int
    rows: int
    tile_height: int
    tile_width: int

    @property
    def width(self) -> int:
        """Width of the tiles with their padding (the picture is wider if its title is)."""
        return self.columns * self.tile_width + (self.columns + 1) * PADDING

    @property
    def height(self) -> int:
        """Height of the whole picture, title row included."""
        tiles = self.rows * (self.tile_height + LABEL_HEIGHT)
        return TITLE_HEIGHT + tiles + (self.rows + 1) * PADDING

    def tile_origin(self, channel: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of a channel's tile."""
        row, column = divmod(channel, self.columns)
        x = PADDING + column * (self.tile_width + PADDING)
        y = TITLE_HEIGHT + PADDING + row * (self.tile_height + LABEL_HEIGHT + PADDING)
        return x, y


def grid_layout(
    channels: int, height: int, width: int, columns: int | None = None, scale: int | None = None
) -> GridLayout:
    """The layout for `channels` maps of height x width (default: a near-square grid)."""
    columns = min(channels, columns or math.ceil(math.sqrt(channels)))
    scale = scale or max(1, math.ceil(MIN_TILE / max(height, width)))
    return GridLayout(
        channels, columns, math.ceil(channels / columns), height * scale, width * scale
    )


def load_image(path: str | Path, pipeline: Pipeline) -> np.ndarray:
    """A batch of one image as the pipeline's input takes it (channels, layout, dtype).

    uint8 pipelines get the raw pixels; float pipelines get pixel / 255 unless the spec sets
    input.scale, which the graph then applies to the raw pixels itself.
    """
    try:
        pixels = decode_image(Path(path), pipeline.input, None)
    except InputError as exc:
        raise VisualizeError(f"cannot read image {path}: {exc.reason}") from None
    return image_values(pixels, pipeline.input)[np.newaxis]


def choose_layer(pipeline: Pipeline, shapes: list[LayerCost], layer: str | None) -> LayerCost:
    """The named layer, or the last one with spatial maps; it must have maps bigger than 1x1."""
    by_name = {shape.name: shape for shape in shapes}
    if layer is None:
        spatial = [s for s in shapes if len(s.shape) == 3 and s.shape[1] * s.shape[2] > 1]
        if not spatial:
            raise VisualizeError("no layer has spatial feature maps (H x W > 1) for this image")
        return spatial[-1]
    if layer not in by_name:
        raise VisualizeError(f"--layer {layer!r} is not a layer; layers are {list(by_name)}")
    chosen = by_name[layer]
    if len(chosen.shape) != 3:
        raise VisualizeError(f"layer {layer!r} ({chosen.op}) is flattened to {chosen.shape}")
    if chosen.shape[1] * chosen.shape[2] == 1:
        raise VisualizeError(
            f"layer {layer!r} ({chosen.op}) has 1x1 maps {chosen.shape}: nothing to draw"
        )
    return chosen


def run_layer(
    pipeline: Pipeline, images: np.ndarray, layer: str, tensors: WeightTensors = NO_TENSORS
) -> np.ndarray:
    """One layer's float32 output for `images`, run in this process by onnxruntime (CPU)."""
    tapped = parse_pipeline({**pipeline.model_dump(mode="json"), "outputs": [layer]})
    model = compile_pipeline(tapped, check_tensors(tapped, tensors))
    session = build_session(model.SerializeToString(), [CPU], threads=0, spinning=True)
    (output,) = session.run([layer], {INPUT_NAME: images})
    return np.asarray(output)


def normalize_map(feature_map: np.ndarray) -> np.ndarray:
    """A map scaled to uint8 0..255 by its own min and max; a constant map is mid grey."""
    values = np.nan_to_num(feature_map.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high - low <= 0:
        return np.full(values.shape, CONSTANT_GREY, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def render_grid(
    maps: np.ndarray, title: str, columns: int | None = None, scale: int | None = None
) -> Image.Image:
    """(C, H, W) maps as a grayscale grid, one labelled tile per channel, under a title.

    The size is grid_layout's, widened where the title is wider than the tiles.
    """
    channels, height, width = maps.shape
    layout = grid_layout(channels, height, width, columns, scale)
    # A grid narrower than its title (one or two small tiles) widens to show the whole title.
    title_width = math.ceil(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(title))
    width = max(layout.width, title_width + 2 * PADDING)
    picture = Image.new("L", (width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    draw.text((PADDING, PADDING), title, fill=INK)
    for channel in range(channels):
        tile = Image.fromarray(normalize_map(maps[channel])).resize(
            (layout.tile_width, layout.tile_height), Image.Resampling.NEAREST
        )
        x, y = layout.tile_origin(channel)
        picture.paste(tile, (x, y))
        draw.text((x, y + layout.tile_height + 1), str(channel), fill=INK)
    return picture


def visualize(
    pipeline: Pipeline,
    image_path: str | Path,
    output_path: str | Path,
    layer: str | None = None,
    columns: int | None = None,
    scale: int | None = None,
    tensors: WeightTensors = NO_TENSORS,
) -> LayerCost:
    """Run the pipeline on one image and write the chosen layer's maps as a PNG grid.

    `tensors` are the weights the spec names as {"tensor": NAME}.
    """
    images = load_image(image_path, pipeline)
    _, height, width = image_size(pipeline.input.layout, images.shape)
    shapes = layer_costs(pipeline, height, width)
    chosen = choose_layer(pipeline, shapes, layer)
    maps = run_layer(pipeline, images, chosen.name, tensors)[0]
    channels, height, width = chosen.shape
    title = f"{chosen.name} ({chosen.op}): {channels} x {height} x {width}"
    render_grid(maps, title, columns, scale).save(output_path, format="PNG")
    return chosen
