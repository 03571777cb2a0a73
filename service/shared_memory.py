"""The server side of system shared memory: leased registrations of clients' POSIX segments.

A client on the server's host creates a POSIX shared-memory object, registers it as a named
region (RegisterSharedMemory), and then sends SharedMemoryRef(region, offset, byte_size, owner)
in place of tensor bytes. Registrations are leases per owner: RenewSharedMemory extends them,
and a region whose lease ran out is forgotten on the next registry call.

What a hostile caller cannot do here (README "Threat model"):
- crash the server: segments are never mapped. Bytes are copied in and out with pread/pwrite on
  the segment's descriptor, so a segment the client shrinks after registering gives a short
  read (INVALID_ARGUMENT), where a mapping would have given SIGBUS;
- reach what it does not own: a segment is opened without following links, must be a regular
  file of the server's own user, and its name (like the region's) must carry the prefix derived
  from the caller's owner secret (contract.shared_memory); every use presents the secret
  again, and regions belong to the caller's tenant too. Another owner's region reads as unknown.

The server never creates or unlinks a segment.
"""

from __future__ import annotations

import math
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..contract.errors import InvalidRequest, InvalidTensor, LimitExceeded, NotFound
from ..contract.limits import DeferredBatch
from ..contract.shared_memory import (
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    SECRET_PATTERN,
    SHM_DIRECTORY,
    owner_id,
    segment_prefix,
)
from ..v1 import featmap_pb2 as pb

# Names of regions whose lease expired, kept so that using one says "expired", not "unknown".
MAX_EXPIRED_NAMES = 1024
# One pread/pwrite moves at most this much (Linux moves at most 0x7ffff000 bytes per call).
MAX_CHUNK_BYTES = 1 << 30
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


@dataclass
class _Region:
    """One registration: the descriptor of the client's segment `key`, `byte_size` usable."""

    tenant: str
    name: str
    key: str
    owner: str  # the owner's public id (a hash of its secret)
    byte_size: int
    fd: int
    expires_at: float


class SharedMemoryRegistry:
    """Regions clients registered, by tenant and name; thread-safe.

    Args:
        lease_seconds: a registration expires this long after its last register or renew.
        max_regions: the most regions registered at once, over all owners and tenants.
        clock: seconds, monotonic; injectable for tests.
        directory: where segments live (tests point it elsewhere to see it checked).
    """

    def __init__(
        self,
        lease_seconds: float = 30.0,
        max_regions: int = 64,
        clock: Callable[[], float] = time.monotonic,
        directory: str = SHM_DIRECTORY,
    ) -> None:
        self.lease_seconds = lease_seconds
        self.max_regions = max_regions
        self.directory = directory
        self._clock = clock
        self._lock = threading.Lock()
        self._regions: dict[tuple[str, str], _Region] = {}
        # (tenant, region) -> owner id of leases that ran out
        self._expired: OrderedDict[tuple[str, str], str] = OrderedDict()

    def register(self, tenant: str, secret: str, region: str, key: str, byte_size: int) -> float:
        """Open the caller's segment `key` as `region`; returns the lease in seconds.

        Re-registering one's own region replaces it (how a client points a region at a new,
        bigger segment). Both names must carry the caller's prefix, so no caller can name a
        region or a segment of another owner.
        """
        owner = _owner(secret)
        prefix = segment_prefix(secret)
        _check_name("region", region, prefix)
        _check_name("key", key, prefix)
        if byte_size <= 0:
            raise InvalidRequest("byte_size", f"must be positive, got {byte_size}")
        fd = self._open(key, byte_size)
        try:
            with self._lock:
                now = self._clock()
                self._expire_locked(now)
                existing = self._regions.get((tenant, region))
                if existing is None and len(self._regions) >= self.max_regions:
                    raise LimitExceeded(
                        "region",
                        f"{len(self._regions)} regions are registered; the limit is "
                        f"max_shared_memory_regions={self.max_regions} (unregister some first)",
                    )
                self._regions[(tenant, region)] = _Region(
                    tenant, region, key, owner, byte_size, fd, now + self.lease_seconds
                )
                self._expired.pop((tenant, region), None)
        except BaseException:
            os.close(fd)
            raise
        if existing is not None:
            os.close(existing.fd)  # uses in flight hold duplicates of their own
        return self.lease_seconds

    def unregister(self, tenant: str, secret: str, region: str = "") -> int:
        """Forget the caller's `region`, or every region of its owner when `region` is ""."""
        owner = _owner(secret)
        if region:
            _check_name("region", region, segment_prefix(secret))
        closing: list[_Region] = []
        try:
            with self._lock:
                self._expire_locked(self._clock())
                if not region:
                    mine = (tenant, owner)
                    keys = [k for k, r in self._regions.items() if (r.tenant, r.owner) == mine]
                    closing = [self._regions.pop(k) for k in keys]
                    for k in [k for k, o in self._expired.items() if (k[0], o) == mine]:
                        del self._expired[k]
                    return len(closing)
                if self._expired.get((tenant, region)) == owner:
                    # Forgotten when the lease ran out; unregistering it is a no-op, so a
                    # client's cleanup after a long pause does not fail.
                    del self._expired[(tenant, region)]
                    return 0
                found = self._regions.get((tenant, region))
                # Another owner's region reads as unknown: owners cannot probe each other's names.
                if found is None or found.owner != owner:
                    raise NotFound("region", f"{region!r} is not registered by this owner")
                closing = [self._regions.pop((tenant, region))]
                return 1
        finally:
            for r in closing:
                os.close(r.fd)

    def renew(self, tenant: str, secret: str) -> int:
        """Extend every live lease of the caller's owner by lease_seconds from now; the count."""
        owner = _owner(secret)
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            count = 0
            for r in self._regions.values():
                if (r.tenant, r.owner) == (tenant, owner):
                    r.expires_at = now + self.lease_seconds
                    count += 1
            return count

    def expire(self) -> int:
        """Forget every region whose lease ran out; the count."""
        with self._lock:
            return self._expire_locked(self._clock())

    def images(
        self,
        tenant: str,
        ref: pb.SharedMemoryRef,
        dtype: np.dtype,
        shape: tuple[int, ...],
        field: str,
    ) -> DeferredBatch:
        """The images at `ref`, read (into memory the server owns) once their shape is admitted.

        The ref and its owner are checked now, and again when the bytes are read.
        """
        dtype = np.dtype(dtype)
        expected = math.prod(shape) * dtype.itemsize
        if ref.byte_size != expected:
            raise InvalidTensor(
                f"{field}.byte_size",
                f"is {ref.byte_size}; shape {list(shape)} x {dtype.itemsize} bytes "
                f"({dtype.name}) needs {expected}",
            )
        os.close(self._acquire(tenant, ref, field))  # fail now on a bad ref, before admission

        def read() -> np.ndarray:
            array = np.empty(shape, dtype=dtype)
            fd = self._acquire(tenant, ref, field)
            try:
                _transfer(fd, array, ref.offset, field, write=False)
            finally:
                os.close(fd)
            array.flags.writeable = False
            return array

        return DeferredBatch(tuple(shape), dtype, read)

    def write(
        self,
        tenant: str,
        ref: pb.SharedMemoryRef,
        arrays: Sequence[tuple[str, np.ndarray]],
        field: str,
    ) -> dict[str, pb.SharedMemoryRef]:
        """Write `arrays` one after another from ref.offset, C order, little-endian; where each is.

        Raises InvalidRequest on `{field}.byte_size` with the size needed when they do not fit.
        """
        packed = [(name, _little_endian(array)) for name, array in arrays]
        needed = sum(array.nbytes for _, array in packed)
        if needed > ref.byte_size:
            sizes = ", ".join(f"{name}: {array.nbytes}" for name, array in packed)
            raise InvalidRequest(
                f"{field}.byte_size",
                f"is {ref.byte_size}; the outputs need {needed} bytes ({sizes})",
            )
        fd = self._acquire(tenant, ref, field)
        refs: dict[str, pb.SharedMemoryRef] = {}
        try:
            position = ref.offset
            for name, array in packed:
                _transfer(fd, array, position, field, write=True)
                refs[name] = pb.SharedMemoryRef(
                    region=ref.region, offset=position, byte_size=array.nbytes
                )
                position += array.nbytes
        finally:
            os.close(fd)
        return refs

    def close(self) -> None:
        """Forget every region (uses in flight keep their own descriptors until they end)."""
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
            self._expired.clear()
        for r in regions:
            os.close(r.fd)

    def __len__(self) -> int:
        with self._lock:
            self._expire_locked(self._clock())
            return len(self._regions)

    def _open(self, key: str, byte_size: int) -> int:
        """A descriptor of segment `key`: a regular file of ours, at least `byte_size` long."""
        path = os.path.join(self.directory, key)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise NotFound(
                "key", f"no shared-memory object {key!r} on the server's host (create it first)"
            ) from None
        except PermissionError:
            raise InvalidRequest(
                "key", f"{key!r} is not readable and writable by the server's user"
            ) from None
        except OSError as exc:  # ELOOP: a symbolic link, which is never followed
            raise InvalidRequest("key", f"cannot open {key!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidRequest("key", f"{key!r} is not a shared-memory object")
            if info.st_uid != os.geteuid():
                # Another user's object: the server would act with its own rights on it.
                raise InvalidRequest("key", f"{key!r} is not owned by the server's user")
            if byte_size > info.st_size:
                raise InvalidRequest(
                    "byte_size",
                    f"is {byte_size}, but shared-memory object {key!r} has {info.st_size} bytes",
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _acquire(self, tenant: str, ref: pb.SharedMemoryRef, field: str) -> int:
        """A duplicate descriptor of the caller's region at `ref`, bounds and owner checked.

        A duplicate, so that an unregister (which closes the region's own descriptor) cannot
        pull the file from under a request; the caller closes it.
        """
        owner = _owner(ref.owner, f"{field}.owner")
        with self._lock:
            self._expire_locked(self._clock())
            if not ref.region:
                raise InvalidRequest(f"{field}.region", "is empty")
            found = self._regions.get((tenant, ref.region))
            if found is None or found.owner != owner:
                if self._expired.get((tenant, ref.region)) == owner:
                    raise NotFound(
                        f"{field}.region",
                        f"the lease of {ref.region!r} expired: it was not renewed within "
                        f"{self.lease_seconds:g} s; register it again (RegisterSharedMemory) and "
                        f"call RenewSharedMemory more often than every {self.lease_seconds:g} s",
                    )
                # Another owner's region reads as unknown, as one nobody registered.
                raise NotFound(
                    f"{field}.region",
                    f"{ref.region!r} is not registered by this owner "
                    "(call RegisterSharedMemory first)",
                )
            if ref.offset > found.byte_size:
                raise InvalidRequest(
                    f"{field}.offset",
                    f"{ref.offset} is past the end of region {ref.region!r} "
                    f"({found.byte_size} bytes)",
                )
            if ref.offset + ref.byte_size > found.byte_size:
                raise InvalidRequest(
                    f"{field}.byte_size",
                    f"offset {ref.offset} + byte_size {ref.byte_size} = "
                    f"{ref.offset + ref.byte_size} exceeds region {ref.region!r} "
                    f"({found.byte_size} bytes)",
                )
            return os.dup(found.fd)

    def _expire_locked(self, now: float) -> int:
        keys = [k for k, r in self._regions.items() if r.expires_at <= now]
        for k in keys:
            region = self._regions.pop(k)
            os.close(region.fd)
            self._expired[k] = region.owner
            self._expired.move_to_end(k)
        while len(self._expired) > MAX_EXPIRED_NAMES:
            self._expired.popitem(last=False)
        return len(keys)


def _transfer(fd: int, array: np.ndarray, offset: int, field: str, *, write: bool) -> None:
    """Copy all of `array` from (or to) the segment at `offset`; a short transfer is an error.

    A segment the client shrank (ftruncate) after registering reads short here, where a mapping
    of it would have killed the server with SIGBUS. Writing past its end would grow it back
    instead of failing, so the size is checked before writing.
    """
    if not array.nbytes:
        return
    data = array.data.cast("B")  # C-contiguous: the server's own array, or a packed output
    size = os.fstat(fd).st_size if write else None
    if size is not None and size < offset + data.nbytes:
        raise InvalidRequest(
            f"{field}.region",
            f"the segment has {size} bytes now, fewer than offset {offset} + {data.nbytes}: "
            "it shrank after it was registered",
        )
    done = 0
    while done < data.nbytes:
        chunk = data[done : done + MAX_CHUNK_BYTES]
        moved = (
            os.pwrite(fd, chunk, offset + done) if write else os.preadv(fd, [chunk], offset + done)
        )
        if moved <= 0:
            raise InvalidRequest(
                f"{field}.region",
                f"the segment ended after {offset + done} bytes; {offset + data.nbytes} are "
                "needed: it shrank after it was registered",
            )
        done += moved


def _owner(secret: str, field: str = "owner") -> str:
    """The public id of an owner secret; InvalidRequest unless the secret is well-formed."""
    if SECRET_PATTERN.fullmatch(secret) is None:
        # Never quoted: it is a secret, even when malformed.
        raise InvalidRequest(
            field,
            "must be the client's owner secret: 16 to 128 letters, digits, '_' or '-'",
        )
    return owner_id(secret)


def _check_name(field: str, name: str, prefix: str) -> None:
    """InvalidRequest unless `name` is a safe name that starts with the caller's `prefix`."""
    if not name:
        raise InvalidRequest(field, "is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequest(field, f"has {len(name)} characters; at most {MAX_NAME_LENGTH}")
    if NAME_PATTERN.fullmatch(name) is None:
        raise InvalidRequest(
            field,
            f"{name!r} must be letters, digits, '_', '-' or '.', starting with a letter, "
            "digit or '_' (no slashes)",
        )
    if not name.startswith(prefix):
        raise InvalidRequest(
            field,
            f"{name!r} must start with {prefix!r}, the prefix of the owner secret sent "
            "(featmap.contract.shared_memory.segment_prefix)",
        )


def _little_endian(array: np.ndarray) -> np.ndarray:
    """`array` as C-contiguous little-endian (no copy if it already is)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
