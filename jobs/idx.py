"""IDX files (MNIST's and Fashion-MNIST's format), gzipped or not, read as NumPy arrays.

The format: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
0x0D float, 0x0E double), the number of dimensions d, then d big-endian uint32 sizes, then
the data, big-endian, row-major. Images are idx3 ubyte: (N, H, W).

The header is checked against the file before anything is allocated: the sizes' product
times the item size must be exactly the bytes after the header (a plain file's size; for a
gzipped file, the size its gzip trailer records, and at most what deflate can expand the
compressed bytes to), so a hostile header is an IdxError naming the file, never a huge
allocation. A plain file is mapped (np.memmap: pages are read when used); a gzipped one is
decompressed once, streamed into an array of the checked size.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDX_TYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
MAX_DIMS = 8
# Deflate expands at most 1032:1 (RFC 1951's longest match per bit); with the gzip trailer's
# size (modulo 2**32) this bounds what a gzipped header may claim.
DEFLATE_MAX_RATIO = 1032
GZIP_MAGIC = b"\x1f\x8b"
# LeCun's and Zalando's names (train-images-idx3-ubyte[.gz]) and the plain .idx suffix.
IDX_NAME = re.compile(r"(-idx\d+-ubyte|\.idx\d*)(\.gz)?$", re.IGNORECASE)
_CHUNK = 1 << 20


class IdxError(ValueError):
    """An IDX file cannot be read; the message names the file."""


@dataclass(frozen=True)
class IdxHeader:
    """What an IDX header says: the data's dtype (big-endian) and shape, and where it starts."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def data_bytes(self) -> int:
        """The bytes the header promises after itself."""
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def is_idx_name(name: str) -> bool:
    """Whether a file's name says IDX: `*-idx3-ubyte`, `*.idx`, either with `.gz`."""
    return IDX_NAME.search(name) is not None


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(2) == GZIP_MAGIC


def parse_header(head: bytes, path: Path) -> IdxHeader:
    """The header at the start of `head` (the file's first bytes, decompressed)."""
    if len(head) < 4:
        raise IdxError(f"{path}: {len(head)} bytes: too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", head[:4])
    if zero != 0:
        raise IdxError(f"{path}: not an IDX file (magic {head[:4].hex()}: expected 0000xxdd)")
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_TYPES)
        raise IdxError(f"{path}: IDX type code 0x{code:02X} is none of {known}")
    if not 1 <= ndim <= MAX_DIMS:
        raise IdxError(f"{path}: IDX header says {ndim} dimensions; expected 1 to {MAX_DIMS}")
    end = 4 + 4 * ndim
    if len(head) < end:
        raise IdxError(f"{path}: the header's {ndim} sizes need {end} bytes; the file has less")
    shape = struct.unpack(f">{ndim}I", head[4:end])
    return IdxHeader(np.dtype(IDX_TYPES[code]), tuple(shape), end)


def _checked(header: IdxHeader, available: int, path: Path, what: str) -> IdxHeader:
    """The header, when the bytes it promises are exactly the `available` ones."""
    if header.data_bytes != available:
        shape = "x".join(map(str, header.shape))
        raise IdxError(
            f"{path}: the IDX header promises {shape} {header.dtype.name} "
            f"({header.data_bytes} bytes) but {what} {available} bytes of data"
        )
    return header


def read_header(path: Path) -> tuple[IdxHeader, bool]:
    """The file's header, checked against its size, and whether it is gzipped."""
    if _is_gzip(path):
        return _gzip_header(path), True
    with path.open("rb") as file:
        head = file.read(4 + 4 * MAX_DIMS)
    header = parse_header(head, path)
    return _checked(header, path.stat().st_size - header.offset, path, "the file holds"), False


def _gzip_header(path: Path) -> IdxHeader:
    """A gzipped file's header, with its data size bounded by the compressed size and trailer."""
    compressed = path.stat().st_size
    try:
        with gzip.open(path, "rb") as file:
            head = file.read(4 + 4 * MAX_DIMS)
        with path.open("rb") as raw:
            raw.seek(-4, os.SEEK_END)
            (recorded,) = struct.unpack("<I", raw.read(4))  # ISIZE: size modulo 2**32
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxError(f"{path}: not a readable gzip file: {exc}") from None
    header = parse_header(head, path)
    total = header.offset + header.data_bytes
    if total > DEFLATE_MAX_RATIO * compressed:
        raise IdxError(
            f"{path}: the IDX header promises {header.data_bytes} bytes of data; "
            f"{compressed} gzipped bytes cannot hold that many"
        )
    if total % 2**32 != recorded:
        raise IdxError(
            f"{path}: the IDX header promises {total} bytes in all; "
            f"the gzip trailer records {recorded} (modulo 2**32)"
        )
    return header


def load_idx(path: Path | str) -> np.ndarray:
    """The file's data as an array of the header's shape and dtype (read-only).

    Plain files are mapped, gzipped ones decompressed into memory; IdxError for anything
    that does not match its header.
    """
    path = Path(path)
    header, gzipped = read_header(path)
    if not gzipped:
        if header.data_bytes == 0:
            return np.zeros(header.shape, dtype=header.dtype)
        mapped = np.memmap(path, dtype=header.dtype, mode="r", offset=header.offset)
        return mapped.reshape(header.shape)
    data = np.empty(header.data_bytes, dtype=np.uint8)
    view = memoryview(data.data)
    filled = 0
    try:
        with gzip.open(path, "rb") as file:
            file.seek(header.offset)
            while filled < header.data_bytes:
                count = file.readinto(view[filled : filled + _CHUNK])
                if not count:
                    break
                filled += count
            extra = len(file.read(1))
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxError(f"{path}: not a readable gzip file: {exc}") from None
    if filled != header.data_bytes or extra:
        raise IdxError(
            f"{path}: the IDX header promises {header.data_bytes} bytes of data; "
            f"the gzip stream holds {'more' if extra else filled}"
        )
    data.flags.writeable = False
    return data.view(header.dtype).reshape(header.shape)
