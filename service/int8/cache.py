"""Quantized models kept on disk with their reports, by content id: a repeat job quantizes nothing.

An entry's key (quantized_key) is a hash of everything that changes the quantized bytes or the
report: the pipeline's content id (spec, weight tensors, calibration images), the int8
settings with the weight bits decided, the CPU's int8 class, the onnx and onnxruntime
versions, and the source of featmap's graph builder and quantizer. An entry is one file,
`<key>.int8`: a magic line, the SHA-256 of the rest, then the report (an Int8Report message)
and the model's bytes. Writers write a private temporary file, fsync it and rename it over the
entry, so that concurrent writers of one key leave one whole entry and readers never see half
of one. A reader checks the size (at most `max_entry_bytes`) before reading and the checksum
after: a damaged or foreign entry is logged and treated as missing, and the next quantization
replaces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from ...contract.limits import DEFAULT_LIMITS, MIB
from ...contract.precision import QuantizationReport, report_from_message, report_message
from ...v1 import featmap_pb2 as pb
from .cpu import Int8Settings, cpu_int8_support

log = logging.getLogger(__name__)

# Set to a folder, the default cache folder of `featmap extract` (XDG_CACHE_HOME/featmap, else
# ~/.cache/featmap, when unset); "none" turns the cache off.
CACHE_DIR_VARIABLE = "FEATMAP_CACHE_DIR"
NO_CACHE = "none"
ENTRY_MAGIC = b"featmap-int8-entry-v1\n"
ENTRY_SUFFIX = ".int8"
_DIGEST_BYTES = 32
_REPORT_LENGTH = struct.Struct("<I")
# The largest pipeline the limits admit holds max_parameters float32 weights: its int8 model
# is smaller (a byte a weight, plus scales and the first layer's block kernel).
DEFAULT_MAX_ENTRY_BYTES = 4 * DEFAULT_LIMITS.max_parameters + 16 * MIB
# The code whose changes change the quantized bytes for the same pipeline and settings.
_QUANTIZER_SOURCES = (
    Path(__file__).parent,
    Path(__file__).parent.parent / "graph.py",
    Path(__file__).parent.parent / "weights.py",
)


def default_cache_dir() -> Path | None:
    """The user's featmap cache folder: FEATMAP_CACHE_DIR, else $XDG_CACHE_HOME/featmap, else
    ~/.cache/featmap; None when FEATMAP_CACHE_DIR says "none"."""
    configured = os.environ.get(CACHE_DIR_VARIABLE, "").strip()
    if configured:
        return None if configured.lower() == NO_CACHE else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "featmap"


def _quantizer_digest() -> str:
    """A hash of featmap's graph builder and quantizer source (sorted, by relative name)."""
    digest = hashlib.sha256()
    for source in _QUANTIZER_SOURCES:
        files = sorted(source.glob("*.py")) if source.is_dir() else [source]
        for file in files:
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def quantized_key(pipeline_id: str, settings: Int8Settings, cpu: str | None = None) -> str:
    """The cache key of a pipeline's int8 model quantized with `settings` on this CPU."""
    cpu = cpu or cpu_int8_support()
    parts = {
        "pipeline": pipeline_id,
        "settings": asdict(settings.for_cpu(cpu)),
        "cpu": cpu,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "quantizer": _quantizer_digest(),
    }
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CachedModel:
    """An int8 model's bytes and the report measured when it was quantized."""

    model_bytes: bytes
    report: QuantizationReport


@dataclass
class QuantizedModelCache:
    """int8 models in a folder, by quantized_key (see the module docstring)."""

    folder: Path
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES

    def path(self, key: str) -> Path:
        """Where the entry of `key` lives."""
        return self.folder / f"{key}{ENTRY_SUFFIX}"

    def load(self, key: str) -> CachedModel | None:
        """The entry of `key`; None when there is none, or it is damaged: then logged, and the
        caller's next quantization replaces it."""
        path = self.path(key)
        try:
            found = self._read(path)
        except FileNotFoundError:
            return None
        if isinstance(found, str):
            log.warning("int8 cache: ignoring %s (%s); quantizing again", path, found)
            return None
        return found

    def _read(self, path: Path) -> CachedModel | str:
        """An entry, or why it cannot be used; FileNotFoundError when there is none."""
        try:
            with path.open("rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size > self.max_entry_bytes:
                    return f"{size} bytes exceed {self.max_entry_bytes}"
                content = file.read(self.max_entry_bytes + 1)
        except FileNotFoundError:
            raise
        except OSError as exc:
            return f"unreadable: {exc.strerror}"
        header = len(ENTRY_MAGIC) + _DIGEST_BYTES
        if len(content) < header + _REPORT_LENGTH.size or not content.startswith(ENTRY_MAGIC):
            return "not a featmap int8 entry"
        digest, body = content[len(ENTRY_MAGIC) : header], content[header:]
        if hashlib.sha256(body).digest() != digest:
            return "checksum mismatch"
        (report_bytes,) = _REPORT_LENGTH.unpack_from(body)
        start = _REPORT_LENGTH.size
        try:
            message = pb.Int8Report.FromString(body[start : start + report_bytes])
        except Exception as exc:  # a checksummed entry of another build's message
            return f"its report does not parse: {type(exc).__name__}"
        return CachedModel(body[start + report_bytes :], report_from_message(message))

    def store(self, key: str, model_bytes: bytes, report: QuantizationReport) -> Path | None:
        """Write the entry of `key` atomically; its path, or None when the folder refuses."""
        report_bytes = report_message(report).SerializeToString()
        body = _REPORT_LENGTH.pack(len(report_bytes)) + report_bytes + model_bytes
        path = self.path(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{key}.", dir=self.folder)
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(ENTRY_MAGIC + hashlib.sha256(body).digest() + body)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as exc:
            # A read-only or full disk costs the next job a quantization, not this one its run.
            log.warning("int8 cache: could not write %s: %s", path, exc)
            return None
        return path
