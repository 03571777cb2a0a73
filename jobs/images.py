"""Inputs of `featmap extract`: finding image and array files, decoding them to the spec's input.

Rules, also in `featmap extract --help` and the README:
- Image files (PNG, JPEG, WebP, BMP, TIFF) are decoded with Pillow, by the decoder the server
  uses for encoded images (featmap.contract.images), and converted to the pipeline's channel
  count (1 -> "L", 3 -> "RGB", 4 -> "RGBA"; other counts cannot come from an image).
  They stay uint8 pixels, in the pipeline's layout: the job runs them through the pipeline's
  pixel variant (featmap.contract.pixels), which gives the values the pipeline's own rule does.
- `.npy` holds one image, or a batch (N, ...) of them; `.npz` holds exactly one array, one image.
  Arrays are taken as they are: the pipeline's layout ((C, H, W) or (H, W, C); (H, W) when
  channels is 1) and its dtype (float64 is accepted for float32 pipelines, as NumPy's default).
- IDX files (`*-idx3-ubyte`, `*.idx`, gzipped or not; featmap.jobs.idx) hold a batch of ubyte
  images, (N, H, W) for one channel or (N, ...) in the pipeline's layout: uint8 pixels, run
  through the pixel variant as image files are.
- The rows of a batch file are read as batches (ArrayFiles.rows: a slice of the mapped or
  decompressed file, checked once), never one row at a time.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.errors import FeatmapError
from ..contract.images import PIL_MODES, decode_pixels, read_image_header
from ..contract.limits import DEFAULT_LIMITS, ENCODED_FORMATS
from ..contract.pixels import PIXEL_DTYPE
from ..contract.spec import InputSpec
from ..contract.tensors import from_hwc, single_image_size
from .idx import is_idx_name, load_idx, read_header

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
# Image files a job may send to a server as they are (contract.limits.ENCODED_FORMATS); others
# (BMP, TIFF) are decoded here and sent as pixels.
ENCODED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})


@dataclass(frozen=True)
class EncodedRule:
    """Which image files go to a server as they are: at most `max_bytes` each, in one of
    `formats` (Pillow's names). A job takes both from the server it sends to (GetServerInfo's
    limits), so that what it sends and what that server takes cannot drift apart."""

    max_bytes: int = DEFAULT_LIMITS.max_encoded_image_bytes
    formats: tuple[str, ...] = ENCODED_FORMATS

    @staticmethod
    def of_server(limits: Mapping[str, Any]) -> EncodedRule:
        """The rule of a server's limits (ServerInfo.limits); defaults where it names none."""
        default = EncodedRule()
        return EncodedRule(
            int(limits.get("max_encoded_image_bytes", default.max_bytes)),
            tuple(limits.get("encoded_formats", default.formats)),
        )


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """An image file's bytes, for the server to decode; `height` x `width` is the size it
    will have (the resize, else its header's)."""

    data: bytes
    height: int
    width: int


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


def is_idx(file: str) -> bool:
    """Whether a file is taken as IDX (by its name: see featmap.jobs.idx)."""
    return is_idx_name(os.path.basename(file))


def is_batch_file(file: str) -> bool:
    """Whether a file may hold a batch of images: .npy or IDX."""
    return file.lower().endswith(".npy") or is_idx(file)


def arrays_only(paths: Iterable[Path]) -> bool:
    """Whether every input is a file of arrays (.npy, .npz, IDX, by name), nothing to decode;
    a folder may hold anything."""
    return all(
        os.path.splitext(path.name)[1].lower() in ARRAY_SUFFIXES or is_idx_name(path.name)
        for path in paths
    )


def _known(name: str, suffixes: frozenset[str]) -> bool:
    return os.path.splitext(name)[1].lower() in suffixes or is_idx_name(name)


def find_files(paths: Iterable[Path]) -> list[str]:
    """Input files, sorted as paths: folders searched recursively for known suffixes (and IDX
    names), files as given. Kept as text (see InputItem)."""
    found: set[str] = set()
    known = IMAGE_SUFFIXES | ARRAY_SUFFIXES
    for path in paths:
        if path.is_dir():
            found.update(_files_under(str(path), known))
        elif not path.exists():
            # A path given on the command line that is not there is a mistake in the command,
            # file or folder alike: said before any work starts.
            raise ValueError(f"{path}: no such file or folder")
        elif _known(path.name, known):
            found.add(str(path))
        else:
            kinds = "/".join(sorted(known))
            raise ValueError(f"{path}: not a folder nor a {kinds} or IDX (*-ubyte, *.idx) file")
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
            elif _known(entry.name, suffixes) and entry.is_file():
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


def _idx_images(shape: tuple[int, ...]) -> int:
    """N for an IDX batch of images: (N, H, W), or (N, ...) in the pipeline's layout."""
    if len(shape) in (3, 4):
        return shape[0]
    raise ValueError(
        f"holds an IDX array of shape {list(shape)}; expected images (N, H, W) or (N, ...) "
        "in the pipeline's layout (a 1-D IDX file holds labels)"
    )


def batch_rows(path: str, spec: InputSpec) -> int | None:
    """Images in a .npy or IDX file (None: a .npy of one image), from its header alone."""
    if is_idx(path):
        header, _ = read_header(Path(path))
        return _idx_images(header.shape)
    return _array_images(np.load(path, mmap_mode="r", allow_pickle=False), spec)


def expand(files: Iterable[str], spec: InputSpec) -> tuple[list[InputItem], list[InputError]]:
    """One item per image: a .npy or IDX batch gives one per row (its header is read, not its
    data)."""
    items: list[InputItem] = []
    errors: list[InputError] = []
    for path in files:
        if not is_batch_file(path):
            items.append(InputItem(path))
            continue
        try:
            rows = batch_rows(path, spec)
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
    """Pixels of an image file as (H, W, C) uint8, by the decoder the server uses for encoded
    images (featmap.contract.images): the same pixels whether a job decodes or its server does.
    """
    try:
        return decode_pixels(path, spec.channels, resize, draft=draft, field=str(path))
    except FeatmapError as exc:
        raise InputError(str(path), exc.message) from None


def _as_input(batch: np.ndarray, spec: InputSpec, name: str, *, pixels: bool) -> np.ndarray:
    """A batch (N, ...) of images from an array file as the runner takes it, checked.

    `pixels` (IDX): uint8 pixels, for the pipeline's pixel variant. Otherwise (.npy/.npz)
    the pipeline's own dtype, float64 accepted for float32.
    """
    return _fed(_checked_batch(batch, spec, name, pixels=pixels), spec)


def _checked_batch(batch: np.ndarray, spec: InputSpec, name: str, *, pixels: bool) -> np.ndarray:
    """`batch` (N, ...) in the spec's layout (a view: one channel axis added where the file has
    none), or InputError naming `name` when its channels or dtype cannot be the input."""
    if batch.ndim == 3:
        # One channel per image: the axis goes where the layout has it.
        batch = batch[:, None] if spec.layout == "NCHW" else batch[:, :, :, None]
    channels, _, _ = single_image_size(spec.layout, batch.shape[1:])
    if channels != spec.channels:
        raise InputError(
            name,
            f"shape {list(batch.shape[1:])} has {channels} channels in {spec.layout} layout; "
            f"input.channels={spec.channels}",
        )
    if pixels:
        if batch.dtype.name != PIXEL_DTYPE:
            raise InputError(
                name, f"IDX images are ubyte pixels (type 0x08); this file holds {batch.dtype}"
            )
    elif batch.dtype.name != spec.dtype and not _float64_for_float32(batch, spec):
        raise InputError(name, f"dtype {batch.dtype.name} is not input.dtype={spec.dtype}")
    return batch


def _float64_for_float32(batch: np.ndarray, spec: InputSpec) -> bool:
    """Float64 arrays (NumPy's default) are taken for a float32 input, converted."""
    return batch.dtype == np.float64 and spec.dtype == "float32"


def _fed(batch: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A checked batch as the runner takes it: its own contiguous float32 for float64 rows."""
    if _float64_for_float32(batch, spec):
        return batch.astype(np.float32)
    return np.ascontiguousarray(batch)


@dataclass(frozen=True)
class _BatchFile:
    """A batch file opened and checked once: its images (N, ...) in the spec's layout (mapped
    where it can be), or why none of them can be used."""

    images: np.ndarray | None
    error: InputError | None


class ArrayFiles:
    """The batch files (.npy, IDX) a job reads rows from, opened and checked once each.

    .npy and plain IDX files are mapped; a gzipped IDX file is decompressed once. The last
    `keep` files stay open (inputs are read in order, so one is enough but for the file
    boundary). Safe to use from the decode threads. A job has one input spec, so a file's
    checks against it hold for all its rows.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._open: OrderedDict[str, _BatchFile] = OrderedDict()
        self._lock = threading.Lock()

    def array(self, file: str) -> np.ndarray:
        """The whole file's array (mapped where it can be), as the file holds it."""
        if is_idx(file):
            return load_idx(file)
        return np.load(file, mmap_mode="r", allow_pickle=False)

    def _opened(self, file: str, spec: InputSpec) -> _BatchFile:
        # Under the lock: two threads must not decompress the same gzipped file twice.
        with self._lock:
            opened = self._open.get(file)
            if opened is not None:
                self._open.move_to_end(file)
                return opened
            try:
                array = self.array(file)
                idx = is_idx(file)
                if idx:
                    _idx_images(array.shape)
                elif _array_images(array, spec) is None:
                    raise ValueError(f"has shape {list(array.shape)}; expected a batch (N, ...)")
                # A plain ndarray view of the mapping: slicing an np.memmap runs Python code.
                images = _checked_batch(np.asarray(array), spec, file, pixels=idx)
                opened = _BatchFile(images, None)
            except (OSError, ValueError, EOFError) as exc:
                opened = _BatchFile(None, InputError(file, f"not a readable array: {exc}"))
            except InputError as exc:
                opened = _BatchFile(None, exc)
            self._open[file] = opened
            while len(self._open) > self.keep:
                self._open.popitem(last=False)
            return opened

    def rows(self, file: str, start: int, stop: int, spec: InputSpec) -> np.ndarray:
        """Rows start..stop-1 of a batch file as one batch the runner takes: a read-only view
        of the mapped file where it holds the input's dtype, else a converted copy.

        InputError names the file: what is wrong is wrong for every row of it.
        """
        opened = self._opened(file, spec)
        if opened.error is not None:
            raise opened.error
        assert opened.images is not None
        return _fed(opened.images[start:stop], spec)


def _load_array(item: InputItem, spec: InputSpec, arrays: ArrayFiles | None) -> np.ndarray:
    """An image from a .npy/.npz/IDX file, checked against the spec's layout and dtype."""
    if item.row is not None:
        try:
            return (arrays or ArrayFiles()).rows(item.file, item.row, item.row + 1, spec)[0]
        except InputError as exc:
            raise InputError(item.key, exc.reason) from None
    try:
        if item.path.suffix.lower() == ".npz":
            with np.load(item.path, allow_pickle=False) as archive:
                if len(archive.files) != 1:
                    raise ValueError(f"holds {len(archive.files)} arrays; expected exactly one")
                array = archive[archive.files[0]]
        else:
            array = np.load(item.path, allow_pickle=False)
        if _array_images(array, spec) is not None:
            raise ValueError(f"has shape {list(array.shape)}; expected one image")
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(item.key, f"not a readable array: {exc}") from None
    return _as_input(array[None], spec, item.key, pixels=False)[0]


def load_item(
    item: InputItem,
    spec: InputSpec,
    resize: tuple[int, int] | None,
    *,
    draft: bool = False,
    arrays: ArrayFiles | None = None,
) -> np.ndarray:
    """One image without the batch axis, ready to stack with others of its size and dtype.

    An array file gives the pipeline's input as it is (an IDX file: its uint8 pixels); an
    image file gives its uint8 pixels in the pipeline's layout (a view), for the pipeline's
    pixel variant. `arrays` keeps batch files open between calls (else each call opens the
    file again).
    """
    if not item.path.is_file():
        raise InputError(item.key, "no such file")
    if item.row is not None or item.path.suffix.lower() in ARRAY_SUFFIXES:
        return _load_array(item, spec, arrays)  # arrays are taken as is: --resize is for images
    return from_hwc(decode_image(item.path, spec, resize, draft=draft), spec.layout)


def load_encoded(
    item: InputItem,
    spec: InputSpec,
    resize: tuple[int, int] | None,
    rule: EncodedRule = EncodedRule(),
) -> EncodedImage | None:
    """An image file's bytes and size (from its header: nothing is decoded), for a server to
    decode; None for anything else, or a file the server would not take as it is (over
    `rule`'s bytes, not of its formats, a header Pillow cannot read): load_item decodes that
    one here, and says what is wrong if it cannot."""
    if item.row is not None or item.path.suffix.lower() not in ENCODED_SUFFIXES:
        return None
    path = item.path
    try:
        if path.stat().st_size > rule.max_bytes:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return encoded_image(data, str(path), spec, resize, rule)


def encoded_image(
    data: bytes,
    name: str,
    spec: InputSpec,
    resize: tuple[int, int] | None,
    rule: EncodedRule = EncodedRule(),
) -> EncodedImage | None:
    """An image file's bytes as the server would take them (see load_encoded), else None."""
    if spec.channels not in PIL_MODES:
        return None  # decode_image says why, for every image
    if len(data) > rule.max_bytes:
        return None
    try:
        header = read_image_header(data, name, formats=rule.formats)
    except FeatmapError:
        return None
    height, width = resize or (header.height, header.width)
    return EncodedImage(data, height, width)
