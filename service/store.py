"""The pipeline store: registrations kept whole in a directory or a bucket that replicas share.

Layout under the store's root (a directory, or an fsspec URL such as `s3://bucket/featmap`):

    v1/<tenant key>/pipelines/<pipeline id>.entry   one registration, written whole
    v1/<tenant key>/names/<name>                    the id the name stands for ("<id>\\n")

The tenant key is a hash of the tenant's name, never the name itself: no tenant name can reach
another tenant's folder or outside the store. Ids are content hashes, so an entry never changes
once written (only its batching policy, which is no part of the id, can be written again) and a
replica's cached copy is always right; names and deletions are what replicas must re-read.

An entry file: ENTRY_MAGIC, a 4-byte big-endian header length, the header (JSON: the spec's and
each tensor's length, dtype and shape, the batching policy), the spec text, the weight tensors
(float32, as the content id hashes them), the int8 calibration images, then the SHA-256 of all
that. Reading one is bounded in bytes before anything is allocated, and a file that fails any
check (digest, lengths, shapes) is `DamagedEntry`: logged and skipped by the registry.

Writes are whole or absent: on a local directory a temporary file, fsync, rename, fsync of the
folder; on an object store a single PUT of the finished object. Folders are 0700, files 0600.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import numpy as np

from ..contract.errors import FeatmapError, LimitExceeded, Unavailable
from ..contract.limits import RequestLimits
from ..contract.names import PIPELINE_ID_PATTERN, PIPELINE_NAME_PATTERN
from ..contract.tensors import WIRE_DTYPES, wire_dtype
from ..contract.wire import check_shape, tensor_view
from .batching import BatchingPolicy

log = logging.getLogger("featmap.store")

LAYOUT = "v1"
ENTRY_MAGIC = b"featmap-pipeline-entry\n"
ENTRY_SUFFIX = ".entry"
DIGEST_BYTES = 32
# The header lists tensor names, dtypes and shapes: small beside the spec that names them.
HEADER_OVERHEAD_BYTES = 64 * 1024
# A name file holds a 32-digit id and a newline.
NAME_FILE_BYTES = 64
# Temporary files a killed writer left behind are removed once this old (a live writer's
# temporary file lives for the seconds one write takes).
STALE_TEMPORARY_S = 3600.0
FSSPEC_EXTRA = 'pip install "featmap[store-fsspec]"'


class DamagedEntry(Exception):
    """A store file that fails a check: never served, logged and skipped."""


P = ParamSpec("P")
R = TypeVar("R")


def reaching(method: Callable[P, R]) -> Callable[P, R]:
    """A store operation whose I/O errors (a full disk, a bucket out of reach) are Unavailable:
    logged here in full, answered to the caller without the store's location."""

    @functools.wraps(method)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except OSError as exc:
            log.error("pipeline store: %s failed: %r", method.__name__, exc)
            raise Unavailable(
                "pipeline_store",
                f"the pipeline store cannot be read or written now ({type(exc).__name__}): "
                "retry shortly",
            ) from None

    return wrapped


def tenant_key(tenant: str) -> str:
    """The folder name of a tenant's entries: a hash, so that no name can steer a path."""
    return hashlib.sha256(b"featmap-tenant\0" + tenant.encode()).hexdigest()[:32]


def max_entry_bytes(limits: RequestLimits) -> int:
    """The largest entry a registration can make: a request's bytes, its float16 weights kept
    as float32 (twice), plus the header; store files are read no further than this."""
    return 2 * limits.max_message_bytes + limits.max_spec_bytes + HEADER_OVERHEAD_BYTES


@dataclass(frozen=True)
class StoredEntry:
    """One registration as the store keeps it."""

    spec_json: str
    tensors: dict[str, np.ndarray]  # float32 weight tensors by name
    calibration: np.ndarray | None  # an int8 pipeline's calibration images
    batching: BatchingPolicy | None


def encode_entry(entry: StoredEntry) -> bytes:
    """An entry's file bytes, digest included."""
    spec = entry.spec_json.encode()
    arrays: list[tuple[str, np.ndarray]] = [
        (name, np.ascontiguousarray(entry.tensors[name], dtype="<f4"))
        for name in sorted(entry.tensors)
    ]
    if entry.calibration is not None:
        code = wire_dtype(entry.calibration, "calibration")
        arrays.append(("", np.ascontiguousarray(entry.calibration, dtype=WIRE_DTYPES[code])))
    batching = entry.batching
    header = {
        "spec_bytes": len(spec),
        # The calibration images are the last array, named "" (no tensor can be: specs name
        # tensors with at least one character).
        "arrays": [[name, wire_dtype(a, "weights"), list(a.shape)] for name, a in arrays],
        "calibration": entry.calibration is not None,
        "batching": None
        if batching is None
        else [batching.enabled, batching.max_batch_size, batching.max_queue_delay_us],
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    parts = [ENTRY_MAGIC, struct.pack(">I", len(head)), head, spec]
    parts += [a.tobytes() for _, a in arrays]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def decode_entry(data: bytes, limits: RequestLimits) -> StoredEntry:
    """The entry in `data`, or DamagedEntry saying what is wrong; arrays are read-only views."""
    start = len(ENTRY_MAGIC) + 4
    if len(data) < start + DIGEST_BYTES or not data.startswith(ENTRY_MAGIC):
        raise DamagedEntry("not an entry file (too short, or no featmap entry header)")
    body, digest = memoryview(data)[:-DIGEST_BYTES], data[-DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise DamagedEntry("its SHA-256 does not match its content (a partial or altered file)")
    (head_size,) = struct.unpack(">I", body[len(ENTRY_MAGIC) : start])
    if head_size > limits.max_spec_bytes + HEADER_OVERHEAD_BYTES or start + head_size > len(body):
        raise DamagedEntry(f"its header claims {head_size} bytes")
    try:
        header = json.loads(bytes(body[start : start + head_size]))
        spec_bytes = int(header["spec_bytes"])
        if not 0 < spec_bytes <= len(body) - start - head_size:
            raise DamagedEntry(f"its spec claims {spec_bytes} bytes")
        spec_end = start + head_size + spec_bytes
        spec_json = bytes(body[start + head_size : spec_end]).decode()
        arrays: list[tuple[str, np.ndarray]] = []
        offset = spec_end
        for name, code, shape in header["arrays"]:
            dtype = WIRE_DTYPES.get(code)
            if dtype is None or not isinstance(name, str):
                raise DamagedEntry(f"array {str(name)[:64]!r} has dtype code {code}")
            field = name or "calibration"
            size = check_shape(tuple(shape), field, dtype.itemsize)
            if offset + size > len(body):
                raise DamagedEntry(f"array {field[:64]!r} runs past the end of the file")
            arrays.append(
                (name, tensor_view(code, tuple(shape), body[offset : offset + size], field))
            )
            offset += size
        if offset != len(body):
            raise DamagedEntry(f"{len(body) - offset} bytes follow the last array")
        batching = header["batching"]
        policy = (
            None
            if batching is None
            else BatchingPolicy(
                enabled=bool(batching[0]),
                max_batch_size=int(batching[1]),
                max_queue_delay_us=int(batching[2]),
            )
        )
        calibration = arrays.pop()[1] if header["calibration"] else None
    except DamagedEntry:
        raise
    except (FeatmapError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise DamagedEntry(f"malformed header: {str(exc)[:200]}") from None
    return StoredEntry(spec_json, dict(arrays), calibration, policy)


class Files(Protocol):
    """Where a store's files live: whole-file reads and writes, listings with sizes."""

    def read(self, path: str, limit: int) -> bytes | None:
        """The file's bytes (None if absent); DamagedEntry when it is over `limit` bytes."""

    def write(self, path: str, data: bytes) -> None:
        """Replace the file with `data`, whole or not at all."""

    def remove(self, path: str) -> bool:
        """Remove the file; False if there was none."""

    def sizes(self, folder: str) -> dict[str, int]:
        """The folder's files (not temporaries) and their sizes; {} if there is no folder."""

    def where(self, path: str) -> str:
        """The file's full path or URL, for log lines."""


class LocalFiles:
    """A store in a local (or network-mounted) directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._folder(root)
        self._sweep()

    def _folder(self, folder: Path) -> None:
        # makedirs' mode is masked by the umask: set 0700 explicitly on what this server made.
        for made in [*reversed(folder.parents), folder]:
            if not made.exists():
                made.mkdir(mode=0o700, exist_ok=True)
                made.chmod(0o700)

    def _sweep(self) -> None:
        """Remove temporary files left by writers killed mid-write, once they are old."""
        now = time.time()
        for temporary in self.root.rglob(".*.tmp"):
            try:
                if now - temporary.stat().st_mtime > STALE_TEMPORARY_S:
                    temporary.unlink()
            except OSError:
                pass  # another replica swept it first

    def where(self, path: str) -> str:
        """The file's path."""
        return str(self.root / path)

    def read(self, path: str, limit: int) -> bytes | None:
        """The file's bytes, checked against `limit` before reading."""
        try:
            with open(self.root / path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size > limit:
                    raise DamagedEntry(f"is {size} bytes, over the {limit} a store file may have")
                data = file.read(limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit:  # grew while read
            raise DamagedEntry(f"is over the {limit} bytes a store file may have")
        return data

    def write(self, path: str, data: bytes) -> None:
        """Temporary file, fsync, rename over the old one, fsync the folder."""
        final = self.root / path
        self._folder(final.parent)
        temporary = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self._sync_folder(final.parent)

    @staticmethod
    def _sync_folder(folder: Path) -> None:
        # The rename is durable once the folder's entry is on disk.
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def remove(self, path: str) -> bool:
        """Unlink the file (and make that durable)."""
        final = self.root / path
        try:
            final.unlink()
        except FileNotFoundError:
            return False
        self._sync_folder(final.parent)
        return True

    def sizes(self, folder: str) -> dict[str, int]:
        """The folder's files and sizes, temporaries (dot files) left out."""
        found: dict[str, int] = {}
        try:
            with os.scandir(self.root / folder) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        found[entry.name] = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue  # removed meanwhile
        except FileNotFoundError:
            return {}
        return found


class FsspecFiles:
    """A store on an object store (or any fsspec file system): one PUT per finished file."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError:
            raise ValueError(
                f"pipeline_store={url!r} needs fsspec (and its backend, e.g. s3fs for s3://): "
                f"{FSSPEC_EXTRA}"
            ) from None
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except ImportError as exc:
            raise ValueError(
                f"pipeline_store={url!r}: {exc} ({FSSPEC_EXTRA} and the backend it names)"
            ) from None
        self.url = url.rstrip("/")
        self.root = root.rstrip("/")

    def _path(self, path: str) -> str:
        return f"{self.root}/{path}"

    def where(self, path: str) -> str:
        """The object's URL."""
        return f"{self.url}/{path}"

    def read(self, path: str, limit: int) -> bytes | None:
        """The object's bytes, its size checked against `limit` first."""
        full = self._path(path)
        self.fs.invalidate_cache(full)  # another replica may have written or removed it
        try:
            size = self.fs.info(full)["size"]
            if size is not None and size > limit:
                raise DamagedEntry(f"is {size} bytes, over the {limit} a store file may have")
            data = self.fs.cat_file(full, start=0, end=limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit:
            raise DamagedEntry(f"is over the {limit} bytes a store file may have")
        return bytes(data)

    def write(self, path: str, data: bytes) -> None:
        """One PUT of the finished object: readers see the old object or the new, never half."""
        self.fs.pipe_file(self._path(path), data)

    def remove(self, path: str) -> bool:
        """Delete the object."""
        try:
            self.fs.rm_file(self._path(path))
        except FileNotFoundError:
            return False
        return True

    def sizes(self, folder: str) -> dict[str, int]:
        """The objects under `folder` and their sizes."""
        full = self._path(folder)
        self.fs.invalidate_cache(full)
        try:
            listed: Sequence[dict[str, Any]] = self.fs.ls(full, detail=True)
        except FileNotFoundError:
            return {}
        return {
            item["name"].rstrip("/").rsplit("/", 1)[-1]: int(item.get("size") or 0)
            for item in listed
            if item.get("type") == "file"
        }


class PipelineStore:
    """Registrations by tenant and id, names by tenant, within each tenant's byte quota.

    Args:
        location: a directory, or an fsspec URL (`s3://`, `gs://`, `memory://`).
        tenant_bytes: each tenant's share of the store (the store_tenant_bytes setting).
        limits: the request limits, which bound every store file read.
    """

    def __init__(self, location: str, tenant_bytes: int, limits: RequestLimits) -> None:
        self.location = location
        try:
            self.files: Files = (
                FsspecFiles(location)
                if "://" in location
                else LocalFiles(Path(location).expanduser())
            )
        except OSError as exc:
            raise ValueError(
                f"pipeline_store={location!r} cannot be used: {exc.strerror or exc} "
                "(--pipeline-store DIR; none: memory only)"
            ) from None
        self.tenant_bytes = tenant_bytes
        self.limits = limits
        self.entry_limit = max_entry_bytes(limits)

    def _folder(self, tenant: str, kind: str) -> str:
        return f"{LAYOUT}/{tenant_key(tenant)}/{kind}"

    def entry_path(self, tenant: str, pipeline_id: str) -> str:
        """Where the tenant's entry for `pipeline_id` lives (ids are checked: no path from junk)."""
        if PIPELINE_ID_PATTERN.fullmatch(pipeline_id) is None:
            raise ValueError(f"{pipeline_id[:64]!r} is not a pipeline id")
        return f"{self._folder(tenant, 'pipelines')}/{pipeline_id}{ENTRY_SUFFIX}"

    def _name_path(self, tenant: str, name: str) -> str:
        if PIPELINE_NAME_PATTERN.fullmatch(name) is None:
            raise ValueError(f"{name[:64]!r} is not a pipeline name")
        return f"{self._folder(tenant, 'names')}/{name}"

    def where(self, tenant: str, pipeline_id: str) -> str:
        """The entry's full path or URL (for log lines)."""
        return self.files.where(self.entry_path(tenant, pipeline_id))

    # ------------------------------------------------------------------ entries

    @reaching
    def ids(self, tenant: str) -> set[str]:
        """The ids of the tenant's entries."""
        return set(self._entry_sizes(tenant))

    def _entry_sizes(self, tenant: str) -> dict[str, int]:
        found = self.files.sizes(self._folder(tenant, "pipelines"))
        return {
            name.removesuffix(ENTRY_SUFFIX): size
            for name, size in found.items()
            if name.endswith(ENTRY_SUFFIX)
            and PIPELINE_ID_PATTERN.fullmatch(name.removesuffix(ENTRY_SUFFIX))
        }

    @reaching
    def check_room(self, tenant: str, pipeline_id: str, size: int) -> None:
        """LimitExceeded naming store_tenant_bytes unless an entry of `size` bytes fits."""
        entries = self._entry_sizes(tenant)
        names = self.files.sizes(self._folder(tenant, "names"))
        # Writing an id again replaces its file: only the difference counts.
        used = sum(entries.values()) + sum(names.values()) - entries.get(pipeline_id, 0)
        if used + size > self.tenant_bytes:
            raise LimitExceeded(
                "pipeline",
                f"storing this pipeline takes {size} bytes; this tenant's pipelines hold "
                f"{used} of store_tenant_bytes={self.tenant_bytes}: delete some first",
            )
        if size > self.entry_limit:
            raise LimitExceeded(
                "pipeline",
                f"storing this pipeline takes {size} bytes, over the {self.entry_limit} a store "
                "entry may have (twice max_message_bytes, plus max_spec_bytes)",
            )

    @reaching
    def put(self, tenant: str, pipeline_id: str, data: bytes) -> None:
        """Write an encoded entry whole, within the tenant's quota (checked again here)."""
        self.check_room(tenant, pipeline_id, len(data))
        self.files.write(self.entry_path(tenant, pipeline_id), data)

    def get(self, tenant: str, pipeline_id: str) -> StoredEntry | None:
        """The tenant's entry for `pipeline_id` (None if absent); DamagedEntry if it fails a
        check. The content id is the registry's to verify (it needs the admitted spec)."""
        return self.get_sized(tenant, pipeline_id)[0]

    @reaching
    def get_sized(self, tenant: str, pipeline_id: str) -> tuple[StoredEntry | None, int]:
        """As get, with the bytes the entry's file held (0 if absent)."""
        data = self.files.read(self.entry_path(tenant, pipeline_id), self.entry_limit)
        return (None, 0) if data is None else (decode_entry(data, self.limits), len(data))

    @reaching
    def remove(self, tenant: str, pipeline_id: str) -> bool:
        """Remove the tenant's entry; False if it had none."""
        return self.files.remove(self.entry_path(tenant, pipeline_id))

    # ------------------------------------------------------------------ names

    @reaching
    def names(self, tenant: str) -> dict[str, str]:
        """The tenant's names and the ids they stand for (unreadable name files are skipped)."""
        found: dict[str, str] = {}
        for name in self.files.sizes(self._folder(tenant, "names")):
            if PIPELINE_NAME_PATTERN.fullmatch(name) is None:
                continue
            pipeline_id = self.name(tenant, name)
            if pipeline_id is not None:
                found[name] = pipeline_id
        return found

    @reaching
    def name(self, tenant: str, name: str) -> str | None:
        """The id a name stands for in the tenant (None if unnamed or unreadable)."""
        path = self._name_path(tenant, name)
        try:
            data = self.files.read(path, NAME_FILE_BYTES)
        except DamagedEntry as exc:
            log.warning(
                "pipeline store: skipped name %r at %s: %s", name, self.files.where(path), exc
            )
            return None
        if data is None:
            return None
        pipeline_id = data.decode("ascii", "replace").strip()
        if PIPELINE_ID_PATTERN.fullmatch(pipeline_id) is None:
            log.warning(
                "pipeline store: skipped name %r at %s: it holds no pipeline id",
                name,
                self.files.where(path),
            )
            return None
        return pipeline_id

    @reaching
    def put_name(self, tenant: str, name: str, pipeline_id: str) -> None:
        """Point the tenant's `name` at `pipeline_id` (written whole)."""
        self.entry_path(tenant, pipeline_id)  # checks the id
        self.files.write(self._name_path(tenant, name), f"{pipeline_id}\n".encode())

    @reaching
    def remove_name(self, tenant: str, name: str) -> None:
        """Forget one of the tenant's names."""
        self.files.remove(self._name_path(tenant, name))


def open_store(
    setting: str | None, tenant_bytes: int, limits: RequestLimits
) -> PipelineStore | None:
    """The store a pipeline_store setting names; None when it is None or "none" (memory only)."""
    if setting is None or setting.strip().lower() == "none":
        return None
    return PipelineStore(setting, tenant_bytes, limits)
