"""Image files and encoded images -> uint8 pixels: the one decoder `featmap extract` and the
server share (ExtractRequest.encoded, OIP's "images_encoded").

The rule: Pillow opens the image, reading its header only; its width x height is checked
(max_pixels) before anything is decoded; a JPEG may decode at 1/2, 1/4 or 1/8 scale when a
resize is asked with `draft`; the image is converted to the pipeline's channels (1 -> "L",
3 -> "RGB", 4 -> "RGBA") and resized (bilinear) to `size`; the result is (H, W, C) uint8.

Pillow is imported when an image is first opened, not with the contract: the client library
sends encoded bytes as they are and runs without it. It is in the `cli` extra (the job decodes
locally) and so in `server`.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidSpec, InvalidTensor, LimitExceeded, shorten

if TYPE_CHECKING:
    from PIL.Image import Image

PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# What a decoded image may hold per pixel before it is converted (RGBA, CMYK: 4 bytes), twice:
# the decoded image and its converted or resized copy live at once.
DECODE_BYTES_PER_PIXEL = 8
# Pillow's own messages are short, but they are quoted: never more than this.
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: its format (as Pillow names it) and size."""

    format: str
    height: int
    width: int


def image_mode(channels: int, field: str = "input.channels") -> str:
    """Pillow's mode for a pipeline's channel count; InvalidSpec naming `field` otherwise."""
    mode = PIL_MODES.get(channels)
    if mode is None:
        raise InvalidSpec(field, f"an image has 1, 3 or 4 channels; input.channels={channels}")
    return mode


def _open(
    source: bytes | Path, field: str, formats: Sequence[str] | None, max_pixels: int | None
) -> Image:
    """The image, its header read and its size checked; nothing decoded yet."""
    from PIL import Image, UnidentifiedImageError

    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        image = Image.open(stream, formats=None if formats is None else list(formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (an error past twice its MAX_IMAGE_PIXELS, a warning past it that
        # a warnings filter may raise): either way a header too large to decode.
        raise LimitExceeded(field, f"is a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        kinds = f"a {', '.join(formats)} image" if formats else "an image Pillow reads"
        raise InvalidTensor(field, f"cannot decode image: not {kinds}") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise InvalidTensor(
            field, f"cannot decode image: {shorten(str(exc), MAX_REASON_CHARS)}"
        ) from None
    width, height = image.size
    if max_pixels is not None and height * width > max_pixels:
        image.close()
        raise LimitExceeded(
            field,
            f"its header says {height}x{width} = {height * width} pixels, over "
            f"max_pixels_per_image={max_pixels}",
        )
    return image


def read_image_header(
    source: bytes | Path,
    field: str,
    *,
    formats: Sequence[str] | None = None,
    max_pixels: int | None = None,
) -> ImageHeader:
    """An image's format and size from its header alone (checked as decode_pixels does)."""
    with _open(source, field, formats, max_pixels) as image:
        width, height = image.size
        return ImageHeader(str(image.format), height, width)


def decode_pixels(
    source: bytes | Path,
    channels: int,
    size: tuple[int, int] | None,
    *,
    draft: bool = False,
    formats: Sequence[str] | None = None,
    max_pixels: int | None = None,
    field: str = "image",
) -> np.ndarray:
    """Pixels of an image (a file, or its bytes) as (H, W, C) uint8, by the module's rule.

    `size` (H, W) resizes (bilinear); `draft` lets a JPEG decode at 1/2, 1/4 or 1/8 scale (the
    smallest still at least `size`) before the resize: several times faster for large photos,
    but the pixels differ a little from a full decode's, so it is the caller's choice.
    `formats` limits the formats tried (Pillow's names); `max_pixels` bounds the header's
    width x height before decoding. Errors name `field`: InvalidTensor for what cannot be read
    or decoded, LimitExceeded for an image too large.
    """
    from PIL.Image import Resampling

    mode = image_mode(channels)
    with _open(source, field, formats, max_pixels) as image:
        try:
            if draft and size is not None:
                image.draft(mode, (size[1], size[0]))  # a no-op for anything but JPEG
            image.load()  # Pillow decodes lazily: a truncated file must fail here
            # convert() copies even to the same mode: most photos are RGB already.
            converted = image if image.mode == mode else image.convert(mode)
            if size is not None:
                height, width = size
                converted = converted.resize((width, height), Resampling.BILINEAR)
            # Read out before the file closes (closing releases a loaded image's memory).
            pixels = np.asarray(converted, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
            reason = shorten(str(exc), MAX_REASON_CHARS)
            raise InvalidTensor(field, f"cannot decode image: {reason}") from None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels
