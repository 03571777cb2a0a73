"""Pipeline spec files (.yaml/.yml/.json) and weight .npz files, read within a byte bound.

One reader for `featmap serve --pipelines` and the commands (`featmap extract --pipeline`...).
It needs PyYAML, NumPy and the spec's models, never onnx: the `[cli]` install uses it too.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npy_format
import yaml

from ..contract.spec import Pipeline, parse_pipeline

YAML_SUFFIXES = (".yaml", ".yml")
SPEC_SUFFIXES = (*YAML_SUFFIXES, ".json")


class SpecFileError(ValueError):
    """The file cannot be read or is not YAML/JSON; the message names the file."""


class _BoundedLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a document of more than `max_nodes` nodes, counting an
    alias (*name) as every node it stands for: a few hundred bytes of nested aliases can stand
    for gigabytes of spec, and every node is at least a byte of the spec's JSON."""

    def __init__(self, text: str, max_nodes: int | None) -> None:
        super().__init__(text)
        self.max_nodes = max_nodes
        self.nodes = 0
        self.sizes: dict[int, int] = {}  # id(anchored node) -> the nodes under it

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.max_nodes is not None:
            added = 1
            if self.check_event(yaml.AliasEvent):
                anchored = self.anchors.get(self.peek_event().anchor)
                added = 0 if anchored is None else self.size(anchored)
            self.nodes += added
            if self.nodes > self.max_nodes:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"its aliases expand past {self.max_nodes} nodes",
                    self.peek_event().start_mark,
                )
        return super().compose_node(parent, index)

    def size(self, node: yaml.Node) -> int:
        """The nodes under `node`, itself included (what an alias of it expands to)."""
        if id(node) not in self.sizes:
            children: list[Any] = []
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            self.sizes[id(node)] = 1 + sum(self.size(child) for child in children)
        return self.sizes[id(node)]


def _load_yaml(text: str, max_nodes: int | None) -> Any:
    """The one document of `text`, within `max_nodes` (as yaml.safe_load, which it is else)."""
    loader = _BoundedLoader(text, max_nodes)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_bounded(path: Path, max_bytes: int | None, setting: str) -> bytes:
    """The bytes of `path`; SpecFileError, naming `setting`, when it holds over `max_bytes`."""
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise SpecFileError(f"{path} is {size} bytes, over {setting}={max_bytes}")
            data = file.read() if max_bytes is None else file.read(max_bytes + 1)
    except OSError as exc:
        raise SpecFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if max_bytes is not None and len(data) > max_bytes:  # it grew since fstat
        raise SpecFileError(f"{path} is over {setting}={max_bytes} bytes")
    return data


def read_spec_file(path: str | Path, max_bytes: int | None = None) -> dict[str, Any]:
    """The spec in a .yaml/.yml or .json file, as a dict (not yet validated).

    `max_bytes`: the file's size bound (the server's max_spec_bytes), checked before reading.
    """
    path = Path(path)
    if path.suffix.lower() not in SPEC_SUFFIXES:
        raise SpecFileError(
            f"{path}: a pipeline file is .yaml, .yml or .json (the extension picks the parser)"
        )
    raw = read_bounded(path, max_bytes, "max_spec_bytes")
    is_yaml = path.suffix.lower() in YAML_SUFFIXES
    try:
        text = raw.decode("utf-8")
        # JSON is YAML too, but a .json file gets JSON's stricter parser and its messages.
        data = _load_yaml(text, max_bytes) if is_yaml else json.loads(text)
    except UnicodeDecodeError:
        raise SpecFileError(f"{path} is not UTF-8 text") from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecFileError(f"{path} is not valid {'YAML' if is_yaml else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise SpecFileError(f"{path}: expected a mapping with 'input' and 'layers' at the top")
    return data


def load_pipeline_file(path: str | Path) -> Pipeline:
    """A validated Pipeline from a spec file; InvalidSpec names the offending field."""
    return parse_pipeline(read_spec_file(path))


def load_weight_tensors(
    path: str | Path, max_bytes: int | None = None, option: str = "--weights"
) -> dict[str, np.ndarray]:
    """Named weight tensors from a .npz file (the names the spec's {"tensor": NAME} uses).

    `max_bytes` bounds the file and its arrays' bytes once unpacked (what a compressed .npz
    declares; zipfile reads no member past its declared size), before any is read.
    SpecFileError, saying `option` and why, when the file cannot be read as one.
    """
    path = Path(path)
    try:
        with path.open("rb") as file, zipfile.ZipFile(file) as archive:
            size = os.fstat(file.fileno()).st_size
            unpacked = sum(info.file_size for info in archive.infolist())
            if max_bytes is not None and max(size, unpacked) > max_bytes:
                raise SpecFileError(
                    f"{option}: {path} holds {size} bytes, {unpacked} unpacked: over "
                    f"max_message_bytes={max_bytes}"
                )
            return {
                info.filename.removesuffix(".npy"): npy_array(
                    archive.read(info), f"{option}: {path}[{info.filename}]"
                )
                for info in archive.infolist()
            }
    except (OSError, zipfile.BadZipFile) as exc:
        raise SpecFileError(f"{option}: cannot read {path}: {exc}") from None


def load_array_file(path: Path, max_bytes: int | None, option: str) -> np.ndarray:
    """The array of a .npy file, its size bounded by `max_bytes` (max_message_bytes)."""
    return npy_array(read_bounded(path, max_bytes, "max_message_bytes"), f"{option}: {path}")


def npy_array(raw: bytes, where: str) -> np.ndarray:
    """The read-only array of .npy bytes, once its header's shape and dtype account for exactly
    the bytes after it (np.load would allocate what a header claims before reading)."""
    file = io.BytesIO(raw)
    try:
        version = npy_format.read_magic(file)
        read_header = {
            (1, 0): npy_format.read_array_header_1_0,
            (2, 0): npy_format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"unknown .npy version {version}")
        shape, fortran_order, dtype = read_header(file)
    except ValueError as exc:
        raise SpecFileError(f"{where} is not a .npy array: {exc}") from None
    data = memoryview(raw)[file.tell() :]
    if dtype.hasobject or data.nbytes != math.prod(shape) * dtype.itemsize:
        raise SpecFileError(
            f"{where}: a {dtype} array of shape {list(shape)} is not the {data.nbytes} bytes "
            "the file holds after its header (object arrays are not read)"
        )
    array = np.frombuffer(data, dtype=dtype)
    return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)
