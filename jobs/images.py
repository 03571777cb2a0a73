"""Inputs of `featmap extract`: finding image and array files, decoding them to the spec's input.

Rules, also in `featmap extract --help` and the README:
- Image files (PNG, JPEG, BMP, TIFF) are decoded with Pillow and converted to the pipeline's
  channel count (1 -> "L", 3 -> "RGB", 4 -> "RGBA"; other counts cannot come from an image).
  They stay uint8 pixels, in the pipeline's layout: the job runs them through the pipeline's
  pixel variant (featmap.contract.pixels), which gives the values the pipeline's own rule does.
- `.npy` holds one image, or a batch (N, ...) of them; `.npz` holds exactly one array, one image.
  Arrays are taken as they are: the pipeline's layout ((C, H, W) or (H, W, C); (H, W) when
  channels is 1) and its dtype (float64 is accepted for float32 pipelines, as NumPy's default).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..contract.spec import InputSpec
from ..contract.tensors import from_hwc, single_image_size

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class InputError(Exception):
    """One input cannot be read or does not fit the pipeline; `path` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InputItem:
    """One image to extract: a file, or row `row` of a batch in a .npy file.

    The file is kept as text, not as a Path: a job holds one item per image, and a Path costs
    several times the bytes of its text.
    """

    file: str
    row: int | None = None

    @property
    def path(self) -> Path:
        """The file."""
        return Path(self.file)

    @property
    def key(self) -> str:
        """The name the outputs use for this image: its path, plus [row] inside a batch."""
        return self.file if self.row is None else f"{self.file}[{self.row}]"


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W), both >= 1."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--resize expects HxW, e.g. 224x224; got {text!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"--resize sizes must be >= 1; got {text!r}")
    return height, width


def find_files(paths: Iterable[Path]) -> list[str]:
    """Input files, sorted as paths: folders searched recursively for known suffixes, files
    as given. Kept as text (see InputItem)."""
    found: set[str] = set()
    known = IMAGE_SUFFIXES | ARRAY_SUFFIXES
    for path in paths:
        if path.is_dir():
            found.update(_files_under(str(path), known))
        elif not path.exists():
            # A path given on the command line that is not there is a mistake in the command,
            # file or folder alike: said before any work starts.
            raise ValueError(f"{path}: no such file or folder")
        elif path.suffix.lower() in known:
            found.add(str(path))
        else:
            raise ValueError(f"{path}: not a folder nor a {'/'.join(sorted(known))} file")
    # Path order, part by part, as sorting Paths gives, without a Path (or a list of parts)
    # for each file: with the separator as "\0", below every character, the text compares so.
    return sorted(found, key=lambda file: file.replace(os.sep, "\0"))


def _files_under(folder: str, suffixes: frozenset[str]) -> Iterator[str]:
    """Files with these suffixes under a folder, recursively, as Path.rglob finds them (into
    symlinked folders not) but one entry at a time: rglob holds a folder's entries, and a
    Path for each, at once -- tens of MB for a folder of many thousand images."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                yield from _files_under(entry.path, suffixes)
            elif os.path.splitext(entry.name)[1].lower() in suffixes and entry.is_file():
                yield entry.path


def _array_images(array: np.ndarray, spec: InputSpec) -> int | None:
    """None for one image in the spec's layout, N for a batch of N, else a ValueError."""
    if array.ndim == 2 and spec.channels == 1:
        return None
    if array.ndim == 3:
        return None
    if array.ndim == 4:
        return int(array.shape[0])
    raise ValueError(f"has shape {list(array.shape)}; expected one image or a batch (N, ...)")


def expand(files: Iterable[str], spec: InputSpec) -> tuple[list[InputItem], list[InputError]]:
    """One item per image: a .npy batch gives one per row (its header is read, not its data)."""
    items: list[InputItem] = []
    errors: list[InputError] = []
    for path in files:
        if not path.lower().endswith(".npy"):
            items.append(InputItem(path))
            continue
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            rows = _array_images(array, spec)
        except (OSError, ValueError) as exc:
            errors.append(InputError(path, f"not a readable array: {exc}"))
            continue
        if rows is None:
            items.append(InputItem(path))
        else:
            items.extend(InputItem(path, row) for row in range(rows))
    return items, errors


def decode_image(
    path: Path, spec: InputSpec, resize: tuple[int, int] | None, *, draft: bool = False
) -> np.ndarray:
    """Pixels of an image file as (H, W, C) uint8.

    `draft` lets a JPEG decode at 1/2, 1/4 or 1/8 scale (the smallest still at least `resize`)
    before the bilinear resize: several times faster for large photos, but the pixels differ
    a little from a full decode's, so it is the caller's choice.
    """
    mode = PIL_MODES.get(spec.channels)
    if mode is None:
        raise InputError(
            str(path), f"an image has 1, 3 or 4 channels; input.channels={spec.channels}"
        )
    try:
        with Image.open(path) as image:
            if draft and resize is not None:
                image.draft(mode, (resize[1], resize[0]))  # a no-op for anything but JPEG
            image.load()  # Pillow decodes lazily: a truncated file must fail here
            # convert() copies even to the same mode: most photos are RGB already.
            converted = image if image.mode == mode else image.convert(mode)
            if resize is not None:
                height, width = resize
                converted = converted.resize((width, height), Image.Resampling.BILINEAR)
            # Read out before the file closes (closing releases a loaded image's memory).
            pixels = np.asarray(converted, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InputError(str(path), f"cannot decode image: {exc}") from None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _load_array(item: InputItem, spec: InputSpec) -> np.ndarray:
    """An image from a .npy/.npz file, checked against the spec's layout and dtype."""
    try:
        if item.path.suffix.lower() == ".npz":
            with np.load(item.path, allow_pickle=False) as archive:
                if len(archive.files) != 1:
                    raise ValueError(f"holds {len(archive.files)} arrays; expected exactly one")
                array = archive[archive.files[0]]
        elif item.row is not None:
            # One row of a .npy batch: map the file, or each row would read all of it.
            array = np.array(np.load(item.path, mmap_mode="r", allow_pickle=False)[item.row])
        else:
            array = np.load(item.path, allow_pickle=False)
        if item.row is None and _array_images(array, spec) is not None:
            raise ValueError(f"has shape {list(array.shape)}; expected one image")
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(item.key, f"not a readable array: {exc}") from None
    if array.ndim == 2:
        array = from_hwc(array[:, :, None], spec.layout)  # one channel: where the layout has it
    channels, _, _ = single_image_size(spec.layout, array.shape)
    if channels != spec.channels:
        raise InputError(
            item.key,
            f"shape {list(array.shape)} has {channels} channels in {spec.layout} layout; "
            f"input.channels={spec.channels}",
        )
    if array.dtype == np.float64 and spec.dtype == "float32":
        array = array.astype(np.float32)
    if array.dtype.name != spec.dtype:
        raise InputError(item.key, f"dtype {array.dtype.name} is not input.dtype={spec.dtype}")
    return np.ascontiguousarray(array)


def load_item(
    item: InputItem, spec: InputSpec, resize: tuple[int, int] | None, *, draft: bool = False
) -> np.ndarray:
    """One image without the batch axis, ready to stack with others of its size and dtype.

    An array file gives the pipeline's input as it is; an image file gives its uint8 pixels in
    the pipeline's layout (a view), for the pipeline's pixel variant.
    """
    if not item.path.is_file():
        raise InputError(item.key, "no such file")
    if item.path.suffix.lower() in ARRAY_SUFFIXES:
        return _load_array(item, spec)  # arrays are taken as they are: --resize is for images
    return from_hwc(decode_image(item.path, spec, resize, draft=draft), spec.layout)
