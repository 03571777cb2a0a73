"""Results of `featmap extract` and the files they are written to (.npz, .npy, .parquet).

Every file is written atomically: a temporary file in the destination's folder, then
os.replace, so a failed or interrupted job never leaves a partial output behind.

.npz layout (loads with `np.load(path, allow_pickle=False)`):
    paths             (N,) str   the inputs, one row per image, sorted
    outputs           (K,) str   the pipeline's output names
    <name>            (N, ...)   one array per output, row i for paths[i] -- when all images
                                 gave the same shape
    <name>__<i>       (...)      otherwise (sizes differ without --resize): one array per image
    skipped           (S,) str   inputs skipped with --on-error skip
    skipped_errors    (S,) str   why each was skipped
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import secrets
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, overload

import numpy as np

OUTPUT_SUFFIXES = (".npz", ".npy", ".parquet")
OUTPUT_DTYPE = "<f4"  # every pipeline output is float32


class Rows(Sequence[np.ndarray]):
    """One output's rows, in input order, kept as the blocks they came in: (k, ...) arrays
    whose rows are images' outputs. A job adds each batch's outputs as one block, so that
    nothing afterwards (shapes, bytes, saving) works row by row; indexing and iterating give
    rows, as views. Measured on 10,000 rows of 3,072 features kept as views one by one: 18 ms
    to find them lying one after another again (row_blocks), 25 ms with their dicts and paths.
    """

    __slots__ = ("_ends", "blocks")

    def __init__(self, rows: Iterable[np.ndarray] = ()) -> None:
        self.blocks: list[np.ndarray] = []
        self._ends: list[int] = []  # the row count up to and including each block
        self.extend(rows)

    def append(self, row: np.ndarray) -> None:
        """One image's outputs (without the batch axis)."""
        self.add_block(np.asarray(row)[np.newaxis])

    def add_block(self, block: np.ndarray) -> None:
        """Consecutive images' outputs, (k, ...), kept as they are (a view stays a view)."""
        if len(block):
            self.blocks.append(block)
            self._ends.append(len(self) + len(block))

    def extend(self, rows: Iterable[np.ndarray]) -> None:
        """More rows after these: another Rows' blocks, or rows one by one."""
        if isinstance(rows, Rows):
            for block in rows.blocks:
                self.add_block(block)
        else:
            for row in rows:
                self.append(row)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for block in self.blocks:
            yield from block

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return list(self)[index]
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        block = bisect.bisect_right(self._ends, position)
        return self.blocks[block][position - (self._ends[block - 1] if block else 0)]

    @property
    def nbytes(self) -> int:
        """Bytes of the rows' arrays."""
        return sum(block.nbytes for block in self.blocks)

    def shapes(self) -> set[tuple[int, ...]]:
        """The rows' distinct shapes."""
        return {block.shape[1:] for block in self.blocks}


@dataclass
class Results:
    """Outputs per image, in input order, and the inputs that were skipped."""

    output_names: list[str]
    paths: list[str] = field(default_factory=list)
    outputs: dict[str, Rows] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in self.output_names:
            self.outputs.setdefault(name, Rows())

    def add(self, path: str, outputs: dict[str, np.ndarray]) -> None:
        """One image's outputs (each without the batch axis)."""
        self.paths.append(path)
        for name in self.output_names:
            self.outputs[name].append(outputs[name])

    def add_rows(self, paths: Sequence[str], outputs: dict[str, np.ndarray]) -> None:
        """Consecutive images' outputs, each (len(paths), ...), kept as one block."""
        self.paths.extend(paths)
        for name in self.output_names:
            self.outputs[name].add_block(outputs[name])

    def extend(self, other: Results) -> None:
        """Append another part's rows and skipped inputs."""
        self.paths.extend(other.paths)
        for name in self.output_names:
            self.outputs[name].extend(other.outputs[name])
        self.skipped.extend(other.skipped)

    @property
    def nbytes(self) -> int:
        """Bytes of the outputs' arrays."""
        return sum(rows.nbytes for rows in self.outputs.values())

    def stacked(self, name: str) -> np.ndarray | None:
        """One output as (N, ...) when every image gave the same shape, else None."""
        rows = self.outputs[name]
        if not rows:
            return np.zeros((0,), dtype=np.float32)
        if len(rows.shapes()) != 1:
            return None
        return stacked_rows(rows)


def stacked_rows(rows: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Rows of one shape as one (N, ...) array, copied only where they are not one already."""
    if isinstance(rows, np.ndarray):
        return rows
    blocks = row_blocks(rows)
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def row_blocks(rows: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Rows of one shape as (k, ...) arrays: blocks of rows lying one after another in one
    C-contiguous array (a job's batches, written into rows allocated up front) become one
    view of it, so that saving them copies nothing; any other block stays as it is. The blocks
    are a Rows' own, or one a row (about 2 us a row: 10,000 rows take 18 ms)."""
    blocks = rows.blocks if isinstance(rows, Rows) else [row[np.newaxis] for row in rows]
    joined: list[np.ndarray] = []
    index = 0
    while index < len(blocks):
        first = blocks[index]
        owner = first.base
        end = index + 1
        if (
            isinstance(owner, np.ndarray)
            and owner.dtype == first.dtype
            and owner.flags.c_contiguous
            and first.flags.c_contiguous
        ):
            expected = _address(first) + first.nbytes
            count = len(first)
            while end < len(blocks):
                block = blocks[end]
                if (
                    block.base is not owner
                    or block.dtype != first.dtype
                    or block.shape[1:] != first.shape[1:]
                    or not block.flags.c_contiguous
                    or _address(block) != expected
                ):
                    break
                expected += block.nbytes
                count += len(block)
                end += 1
            if end - index > 1:
                start = (_address(first) - _address(owner)) // first.itemsize
                size = count * math.prod(first.shape[1:])
                flat = owner.reshape(-1)[start : start + size]
                joined.append(flat.reshape(count, *first.shape[1:]))
                index = end
                continue
        joined.append(first)
        index = end
    return joined


def _new_file_beside(destination: Path) -> Path:
    """A new empty file beside `destination`, with the mode open() gives (0o666 less the umask)."""
    # Not tempfile.mkstemp: its files are 0600 whatever the umask, so a result written in a
    # container (or for another user) would be unreadable to everyone but its writer.
    for _ in range(100):
        candidate = destination.parent / f".{destination.name}.{secrets.token_hex(6)}.tmp"
        try:
            handle = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(handle)
        return candidate
    raise FileExistsError(f"no free temporary name beside {destination}")


@contextlib.contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """A temporary path beside `destination` that replaces it on success, vanishes on error."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = _new_file_beside(destination)
    try:
        yield temporary
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


def _write_with(destination: Path, write: Callable[[IO[bytes]], None]) -> None:
    with atomic_path(destination) as temporary, temporary.open("wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def npz_arrays(results: Results) -> dict[str, np.ndarray]:
    """The arrays of the .npz layout described in this module's docstring."""
    arrays: dict[str, np.ndarray] = {
        "paths": np.array(results.paths, dtype=str),
        "outputs": np.array(results.output_names, dtype=str),
        "skipped": np.array([path for path, _ in results.skipped], dtype=str),
        "skipped_errors": np.array([reason for _, reason in results.skipped], dtype=str),
    }
    for name in results.output_names:
        stacked = results.stacked(name)
        if stacked is not None:
            arrays[name] = stacked
        else:
            arrays.update({f"{name}__{i}": a for i, a in enumerate(results.outputs[name])})
    return arrays


def write_npz(results: Results, destination: Path) -> None:
    """Results as .npz (uncompressed: features rarely compress and it would cost time)."""
    arrays = npz_arrays(results)
    _write_with(destination, lambda file: np.savez(file, allow_pickle=False, **arrays))


def read_npz(source: Path) -> Results:
    """Results back from a .npz this module wrote."""
    # Opened here, not by np.load: np.load leaks its file when the archive is damaged.
    with source.open("rb") as file, np.load(file, allow_pickle=False) as archive:
        names = [str(name) for name in archive["outputs"]]
        results = Results(names, paths=[str(path) for path in archive["paths"]])
        for name in names:
            if name in archive.files:
                results.outputs[name] = Rows()
                if len(results.paths):
                    results.outputs[name].add_block(archive[name])
            else:
                results.outputs[name] = Rows(
                    archive[f"{name}__{i}"] for i in range(len(results.paths))
                )
        results.skipped = list(
            zip(
                (str(p) for p in archive["skipped"]),
                (str(r) for r in archive["skipped_errors"]),
                strict=True,
            )
        )
    return results


@dataclass
class _ShardContents:
    paths: list[str]
    skipped: list[tuple[str, str]]
    shapes: dict[str, set[tuple[int, ...]]]


@dataclass
class Contents:
    """What the merged output will hold, noted shard by shard without the arrays themselves.

    The writers below read the arrays back from the shards' part files one part at a time, so
    that memory stays one shard's outputs whatever the job's size; only the paths are kept.
    """

    output_names: list[str]
    skipped_first: list[tuple[str, str]] = field(default_factory=list)
    shards: dict[int, _ShardContents] = field(default_factory=dict)

    def add(self, index: int, results: Results) -> None:
        """Note shard `index`'s rows, skipped inputs and output shapes."""
        shapes = {name: results.outputs[name].shapes() for name in self.output_names}
        self.shards[index] = _ShardContents(list(results.paths), list(results.skipped), shapes)

    def _ordered(self) -> list[_ShardContents]:
        return [self.shards[index] for index in sorted(self.shards)]

    @property
    def paths(self) -> list[str]:
        """Every row's input, in order."""
        return [path for shard in self._ordered() for path in shard.paths]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Skipped inputs and why, in order."""
        return [*self.skipped_first, *(s for shard in self._ordered() for s in shard.skipped)]

    def add_rows(
        self,
        index: int,
        paths: list[str],
        skipped: list[tuple[str, str]],
        shapes: dict[str, set[tuple[int, ...]]],
    ) -> None:
        """Note a shard whose rows are already written (StreamedRows), from what it recorded."""
        self.shards[index] = _ShardContents(list(paths), list(skipped), shapes)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The one per-image shape of an output, when it has rows and they all share it."""
        shapes = set().union(*(shard.shapes[name] for shard in self.shards.values()))
        return shapes.pop() if len(shapes) == 1 else None

    def shapes(self, name: str) -> list[str]:
        """An output's distinct shapes, for an error message."""
        shapes = set().union(*(shard.shapes[name] for shard in self.shards.values()))
        return sorted(str(shape) for shape in shapes)


# What the merge reads a shard from: its part file, or its results still in memory.
Part = Path | Results


def part_rows(part: Part, name: str) -> np.ndarray | Sequence[np.ndarray]:
    """One output's rows of a shard: (n, ...) stacked, or one array per row."""
    if isinstance(part, Results):
        return part.outputs[name]  # blocks of their batches: _write_rows writes them as such
    mapped = _mapped_member(part, f"{name}.npy")
    if mapped is not None:
        return mapped
    with part.open("rb") as file, np.load(file, allow_pickle=False) as archive:
        if name in archive.files:
            return np.asarray(archive[name], dtype=OUTPUT_DTYPE)
        return [archive[f"{name}__{i}"] for i in range(len(archive["paths"]))]


# A zip member's local header: 30 fixed bytes, the name's and the extra field's lengths at 26.
_LOCAL_HEADER = struct.Struct("<4s22xHH")


def _mapped_member(part: Path, member: str) -> np.ndarray | None:
    """A stored (uncompressed) float32 .npy member of a part file, memory-mapped; None when it
    is not one (absent, compressed, another dtype), so that np.load reads it instead.

    The merge reads every part this way: no copy out of the archive and no CRC pass over
    outputs that were just written (or, on --resume, read whole and CRC-checked by
    `PartsDir.reusable` before being reused). The member's declared size is checked against
    the archive's record, so a damaged part cannot map past its member.
    """
    try:
        with zipfile.ZipFile(part) as archive:
            info = archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with part.open("rb") as file:
            file.seek(info.header_offset)
            signature, name_length, extra_length = _LOCAL_HEADER.unpack(
                file.read(_LOCAL_HEADER.size)
            )
            start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            if signature != b"PK\x03\x04":
                return None
            file.seek(start)
            version = np.lib.format.read_magic(file)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(file)
            offset = file.tell()
    except (KeyError, OSError, ValueError, struct.error, zipfile.BadZipFile):
        return None
    size = math.prod(shape) * dtype.itemsize
    if fortran_order or dtype != np.dtype(OUTPUT_DTYPE) or offset + size > start + info.file_size:
        return None
    if size == 0:
        return np.zeros(shape, dtype=OUTPUT_DTYPE)
    return np.memmap(part, dtype=OUTPUT_DTYPE, mode="r", offset=offset, shape=shape)


def part_paths(part: Part) -> list[str]:
    """The rows' inputs of a shard."""
    if isinstance(part, Results):
        return part.paths
    with part.open("rb") as file, np.load(file, allow_pickle=False) as archive:
        return [str(path) for path in archive["paths"]]


def row_bytes(rows: np.ndarray | Sequence[np.ndarray]) -> Iterator[memoryview]:
    """Rows of one shape as the float32 bytes a .npy holds, block by block (row_blocks), each
    copied only where it is not float32 and C-contiguous already."""
    for block in [rows] if isinstance(rows, np.ndarray) else row_blocks(rows):
        contiguous = np.ascontiguousarray(block, dtype=OUTPUT_DTYPE)
        if contiguous.size:
            yield contiguous.reshape(-1).view(np.uint8).data


def _write_rows(out: IO[bytes], rows: np.ndarray | Sequence[np.ndarray]) -> None:
    """Rows of one shape straight into an open .npy whose header promised them."""
    for data in row_bytes(rows):
        out.write(data)


def _npy_header(out: IO[bytes], shape: tuple[int, ...]) -> None:
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(OUTPUT_DTYPE)),
        "fortran_order": False,
        "shape": shape,
    }
    np.lib.format.write_array_header_1_0(out, header)


# Room for a .npy header written last (StreamedRows): the rows go after it as they finish, and
# the header, which names their count, fills the room at the end. A page, so that the rows of a
# memory-mapped load start page-aligned; numpy reads headers of up to 10,000 bytes.
NPY_HEADER_ROOM = 4096
_NPY_MAGIC = b"\x93NUMPY\x01\x00"  # format version 1.0: a header length of 16 bits


def npy_header_in_room(shape: tuple[int, ...]) -> bytes:
    """A float32 .npy header of `shape`, padded with spaces to exactly NPY_HEADER_ROOM bytes
    (numpy pads its own headers the same way, to a multiple of 64)."""
    descr = np.lib.format.dtype_to_descr(np.dtype(OUTPUT_DTYPE))
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    length = NPY_HEADER_ROOM - len(_NPY_MAGIC) - 2
    if len(text) + 1 > length:
        raise ValueError(f"a .npy header for shape {shape} does not fit {NPY_HEADER_ROOM} bytes")
    return _NPY_MAGIC + struct.pack("<H", length) + text.ljust(length - 1) + b"\n"


def one_shape_error(name: str, shapes: Sequence[str]) -> str:
    """Why a .npy cannot hold an output whose rows have different shapes."""
    return (
        f"output {name!r} has different shapes per image ({', '.join(shapes)}): "
        "a .npy holds one array; use --resize or write .npz/.parquet"
    )


def _merge_npz(contents: Contents, parts: Sequence[Part], file: IO[bytes]) -> None:
    """The .npz layout of this module's docstring, each output written part after part."""
    skipped = contents.skipped
    paths = contents.paths
    small = {
        "paths": np.array(paths, dtype=str),
        "outputs": np.array(contents.output_names, dtype=str),
        "skipped": np.array([path for path, _ in skipped], dtype=str),
        "skipped_errors": np.array([reason for _, reason in skipped], dtype=str),
    }
    # What np.savez writes: stored (uncompressed) members named <array>.npy, zip64 allowed.
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:

        def member(name: str) -> IO[bytes]:
            return archive.open(f"{name}.npy", "w", force_zip64=True)

        for name, array in small.items():
            with member(name) as out:
                np.lib.format.write_array(out, array, allow_pickle=False)
        for name in contents.output_names:
            shape = contents.shape(name)
            if shape is not None or not paths:
                with member(name) as out:
                    _npy_header(out, (len(paths), *shape) if shape is not None else (0,))
                    for part in parts:
                        _write_rows(out, part_rows(part, name))
                continue
            index = 0
            for part in parts:
                for row in part_rows(part, name):
                    with member(f"{name}__{index}") as out:
                        np.lib.format.write_array(out, np.asarray(row), allow_pickle=False)
                    index += 1


def _merge_npy(contents: Contents, parts: Sequence[Part], file: IO[bytes]) -> None:
    """The single output as one (N, ...) array, written part after part."""
    (name,) = contents.output_names
    shape = contents.shape(name)
    paths = contents.paths
    _npy_header(file, (len(paths), *shape) if shape is not None else (0,))
    for part in parts:
        _write_rows(file, part_rows(part, name))


def _merge_parquet(
    contents: Contents, parts: Sequence[Part], destination: Path, metadata: dict[str, Any]
) -> None:
    """One row per image: `path`, then one list<float32> column per output, flattened.

    Columns are fixed-size lists when every image gave the same shape; the per-image shape is
    in the schema metadata (`featmap.shapes`), or, when shapes differ, in a `<name>__shape`
    column beside a variable-size list column. One row group per part.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("writing .parquet needs pyarrow: pip install 'featmap[parquet]'") from None
    fields = [pa.field("path", pa.string())]
    shapes: dict[str, list[int] | None] = {}
    for name in contents.output_names:
        shape = contents.shape(name)
        if shape is not None:
            fields.append(pa.field(name, pa.list_(pa.float32(), math.prod(shape))))
            shapes[name] = list(shape)
        else:
            fields.append(pa.field(name, pa.list_(pa.float32())))
            fields.append(pa.field(f"{name}__shape", pa.list_(pa.int32())))
            shapes[name] = None
    schema = pa.schema(fields).with_metadata(
        {
            "featmap.shapes": json.dumps(shapes),
            "featmap.skipped": json.dumps([{"path": p, "error": r} for p, r in contents.skipped]),
            **{f"featmap.{key}": json.dumps(value) for key, value in metadata.items()},
        }
    )
    with atomic_path(destination) as temporary, pq.ParquetWriter(temporary, schema) as writer:
        for part in parts:
            columns: dict[str, Any] = {"path": pa.array(part_paths(part), type=pa.string())}
            for name in contents.output_names:
                rows = part_rows(part, name)
                if shapes[name] is not None:
                    flat = np.ascontiguousarray(stacked_rows(rows), OUTPUT_DTYPE).reshape(-1)
                    columns[name] = pa.FixedSizeListArray.from_arrays(
                        pa.array(flat), math.prod(shapes[name] or [])
                    )
                    continue
                columns[name] = pa.array(
                    [np.asarray(a, dtype=OUTPUT_DTYPE).reshape(-1) for a in rows],
                    type=pa.list_(pa.float32()),
                )
                columns[f"{name}__shape"] = pa.array(
                    [list(np.shape(a)) for a in rows], type=pa.list_(pa.int32())
                )
            writer.write_table(pa.table(columns, schema=schema))


def write_merged(
    contents: Contents, parts: Sequence[Part], destination: Path, metadata: dict[str, Any]
) -> None:
    """The parts merged into the format the destination's extension names, atomically."""
    suffix = destination.suffix.lower()
    if suffix == ".npz":
        _write_with(destination, lambda file: _merge_npz(contents, parts, file))
    elif suffix == ".npy":
        (name,) = contents.output_names
        if contents.paths and contents.shape(name) is None:
            raise ValueError(one_shape_error(name, contents.shapes(name)))
        _write_with(destination, lambda file: _merge_npy(contents, parts, file))
    elif suffix == ".parquet":
        _merge_parquet(contents, parts, destination, metadata)
    else:
        raise ValueError(f"{destination}: output must end in {', '.join(OUTPUT_SUFFIXES)}")
