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

import contextlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

OUTPUT_SUFFIXES = (".npz", ".npy", ".parquet")


@dataclass
class Results:
    """Outputs per image, in input order, and the inputs that were skipped."""

    output_names: list[str]
    paths: list[str] = field(default_factory=list)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in self.output_names:
            self.outputs.setdefault(name, [])

    def add(self, path: str, outputs: dict[str, np.ndarray]) -> None:
        """One image's outputs (each without the batch axis)."""
        self.paths.append(path)
        for name in self.output_names:
            self.outputs[name].append(outputs[name])

    def extend(self, other: Results) -> None:
        """Append another part's rows and skipped inputs."""
        self.paths.extend(other.paths)
        for name in self.output_names:
            self.outputs[name].extend(other.outputs[name])
        self.skipped.extend(other.skipped)

    def stacked(self, name: str) -> np.ndarray | None:
        """One output as (N, ...) when every image gave the same shape, else None."""
        arrays = self.outputs[name]
        if not arrays:
            return np.zeros((0,), dtype=np.float32)
        if len({array.shape for array in arrays}) != 1:
            return None
        return np.stack(arrays)


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
                results.outputs[name] = list(archive[name]) if len(results.paths) else []
            else:
                results.outputs[name] = [archive[f"{name}__{i}"] for i in range(len(results.paths))]
        results.skipped = list(
            zip(
                (str(p) for p in archive["skipped"]),
                (str(r) for r in archive["skipped_errors"]),
                strict=True,
            )
        )
    return results


def write_npy(results: Results, destination: Path) -> None:
    """The single output as one (N, ...) array."""
    (name,) = results.output_names
    stacked = results.stacked(name)
    if stacked is None:
        shapes = sorted({str(array.shape) for array in results.outputs[name]})
        raise ValueError(
            f"output {name!r} has different shapes per image ({', '.join(shapes)}): "
            "a .npy holds one array; use --resize or write .npz/.parquet"
        )
    _write_with(destination, lambda file: np.save(file, stacked, allow_pickle=False))


def write_parquet(results: Results, destination: Path, metadata: dict[str, Any]) -> None:
    """One row per image: `path`, then one list<float32> column per output, flattened.

    Columns are fixed-size lists when every image gave the same shape; the per-image shape is
    in the schema metadata (`featmap.shapes`), or, when shapes differ, in a `<name>__shape`
    column beside a variable-size list column.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("writing .parquet needs pyarrow: pip install 'featmap[parquet]'") from None
    columns: dict[str, Any] = {"path": pa.array(results.paths, type=pa.string())}
    shapes: dict[str, list[int] | None] = {}
    for name in results.output_names:
        arrays = results.outputs[name]
        stacked = results.stacked(name)
        if stacked is not None and arrays:
            shape = list(arrays[0].shape)
            flat = pa.array(stacked.reshape(-1).astype(np.float32, copy=False))
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, math.prod(shape))
            shapes[name] = shape
        else:
            columns[name] = pa.array(
                [a.reshape(-1).astype(np.float32, copy=False) for a in arrays],
                type=pa.list_(pa.float32()),
            )
            columns[f"{name}__shape"] = pa.array(
                [list(a.shape) for a in arrays], type=pa.list_(pa.int32())
            )
            shapes[name] = None
    table = pa.table(columns)
    table = table.replace_schema_metadata(
        {
            "featmap.shapes": json.dumps(shapes),
            "featmap.skipped": json.dumps([{"path": p, "error": r} for p, r in results.skipped]),
            **{f"featmap.{key}": json.dumps(value) for key, value in metadata.items()},
        }
    )
    with atomic_path(destination) as temporary:
        pq.write_table(table, temporary)


def write_results(results: Results, destination: Path, metadata: dict[str, Any]) -> None:
    """Results in the format the destination's extension names."""
    suffix = destination.suffix.lower()
    if suffix == ".npz":
        write_npz(results, destination)
    elif suffix == ".npy":
        write_npy(results, destination)
    elif suffix == ".parquet":
        write_parquet(results, destination, metadata)
    else:
        raise ValueError(f"{destination}: output must end in {', '.join(OUTPUT_SUFFIXES)}")
