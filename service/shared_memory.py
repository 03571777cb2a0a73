"""The server side of system shared memory: leased registrations of clients' POSIX segments.

A client on the server's host creates a POSIX shared-memory object, registers it as a named
region (RegisterSharedMemory), and then sends SharedMemoryRef(region, offset, byte_size) in
place of tensor bytes. Registrations are leases per owner: RenewSharedMemory extends them,
and a region whose lease ran out is unmapped on the next registry call.

The server only maps what the client created; it never creates or unlinks a segment.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from featmap.contract.errors import InvalidRequest, InvalidTensor, LimitExceeded, NotFound
from featmap.contract.shared_memory import MAX_NAME_LENGTH, NAME_PATTERN
from featmap.v1 import featmap_pb2 as pb

try:
    import _posixshmem
except ImportError:  # Windows: no POSIX shared memory; register() says so
    _posixshmem = None  # type: ignore[assignment]

# Names of regions whose lease expired, kept so that using one says "expired", not "unknown".
MAX_EXPIRED_NAMES = 1024


@dataclass
class _Region:
    """One registration: the client's segment `key`, mapped for `byte_size` bytes."""

    name: str
    key: str
    owner: str
    byte_size: int
    mapping: mmap.mmap
    expires_at: float


class SharedMemoryRegistry:
    """Regions clients registered, by name; thread-safe.

    Args:
        lease_seconds: a registration expires this long after its last register or renew.
        max_regions: the most regions registered at once, over all owners.
        clock: seconds, monotonic; injectable for tests.
    """

    def __init__(
        self,
        lease_seconds: float = 30.0,
        max_regions: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease_seconds = lease_seconds
        self.max_regions = max_regions
        self._clock = clock
        self._lock = threading.Lock()
        self._regions: dict[str, _Region] = {}
        self._expired: OrderedDict[str, str] = OrderedDict()  # region -> owner

    def register(self, region: str, key: str, byte_size: int, owner: str) -> float:
        """Map the client's segment `key` as `region`; returns the lease in seconds.

        Re-registering one's own region replaces it (how a client points a region at a new,
        bigger segment); a region name another owner holds is refused.
        """
        _check_name("region", region)
        _check_name("key", key)
        _check_name("owner", owner)
        if byte_size <= 0:
            raise InvalidRequest("byte_size", f"must be positive, got {byte_size}")
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            existing = self._regions.get(region)
            if existing is not None and existing.owner != owner:
                raise InvalidRequest(
                    "region", f"{region!r} is already registered by another client"
                )
            if existing is None and len(self._regions) >= self.max_regions:
                raise LimitExceeded(
                    "region",
                    f"{len(self._regions)} regions are registered; the limit is "
                    f"{self.max_regions} (unregister some first)",
                )
            mapping = _attach(key, byte_size)
            if existing is not None:
                _unmap(existing)
            self._regions[region] = _Region(
                region, key, owner, byte_size, mapping, now + self.lease_seconds
            )
            self._expired.pop(region, None)
        return self.lease_seconds

    def unregister(self, owner: str, region: str = "") -> int:
        """Unmap `owner`'s `region`, or every region of `owner` when `region` is ""; the count."""
        _check_name("owner", owner)
        if region:
            _check_name("region", region)
        with self._lock:
            self._expire_locked(self._clock())
            if not region:
                names = [name for name, r in self._regions.items() if r.owner == owner]
                for name in names:
                    _unmap(self._regions.pop(name))
                for name in [name for name, o in self._expired.items() if o == owner]:
                    del self._expired[name]
                return len(names)
            if self._expired.get(region) == owner:
                # Already unmapped when the lease ran out; unregistering it is a no-op, so a
                # client's cleanup after a long pause does not fail.
                del self._expired[region]
                return 0
            found = self._regions.get(region)
            # Another owner's region reads as unknown: owners cannot probe each other's names.
            if found is None or found.owner != owner:
                raise NotFound("region", f"{region!r} is not registered by owner {owner!r}")
            _unmap(self._regions.pop(region))
            return 1

    def renew(self, owner: str) -> int:
        """Extend every live lease of `owner` by lease_seconds from now; the count."""
        _check_name("owner", owner)
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            count = 0
            for r in self._regions.values():
                if r.owner == owner:
                    r.expires_at = now + self.lease_seconds
                    count += 1
            return count

    def expire(self) -> int:
        """Unmap every region whose lease ran out; the count."""
        with self._lock:
            return self._expire_locked(self._clock())

    def read(
        self, ref: pb.SharedMemoryRef, dtype: np.dtype, shape: tuple[int, ...], field: str
    ) -> np.ndarray:
        """A read-only view of `shape` x `dtype` at `ref` (copied only if misaligned for dtype).

        The view keeps the mapping alive on its own: the region may be unregistered, expire or
        the registry close while a request still uses it.
        """
        dtype = np.dtype(dtype)
        if any(d < 0 for d in shape):
            raise InvalidTensor(f"{field}.byte_size", f"shape {list(shape)} has a negative size")
        expected = math.prod(shape) * dtype.itemsize
        if ref.byte_size != expected:
            raise InvalidTensor(
                f"{field}.byte_size",
                f"is {ref.byte_size}; shape {list(shape)} x {dtype.itemsize} bytes "
                f"({dtype.name}) needs {expected}",
            )
        with self._lock:
            found = self._lookup_locked(ref, field)
            # Made under the lock: once the view exists, a concurrent unregister cannot unmap.
            view = np.frombuffer(
                found.mapping, dtype=dtype, count=expected // dtype.itemsize, offset=ref.offset
            )
        view = view.reshape(shape)
        if not view.flags.aligned:
            # NumPy copes with misaligned data, but kernels (and onnxruntime) may not; an
            # aligned copy is the safe answer for an offset the client chose badly.
            view = view.copy()
        view.flags.writeable = False  # the client's images are not the server's to change
        return view

    def write(
        self, ref: pb.SharedMemoryRef, arrays: Sequence[tuple[str, np.ndarray]], field: str
    ) -> dict[str, pb.SharedMemoryRef]:
        """Pack `arrays` one after another from ref.offset, C order, little-endian; where each went.

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
        with self._lock:
            found = self._lookup_locked(ref, field)
            # Pin the bytes under the lock (see read); the copies run outside it.
            target = np.frombuffer(found.mapping, dtype=np.uint8, count=needed, offset=ref.offset)
        refs: dict[str, pb.SharedMemoryRef] = {}
        position = 0
        for name, array in packed:
            destination = target[position : position + array.nbytes]
            destination.view(array.dtype).reshape(array.shape)[...] = array
            refs[name] = pb.SharedMemoryRef(
                region=ref.region, offset=ref.offset + position, byte_size=array.nbytes
            )
            position += array.nbytes
        return refs

    def close(self) -> None:
        """Unmap every region (views still in use keep theirs until they are dropped)."""
        with self._lock:
            for r in self._regions.values():
                _unmap(r)
            self._regions.clear()
            self._expired.clear()

    def __len__(self) -> int:
        with self._lock:
            self._expire_locked(self._clock())
            return len(self._regions)

    def _lookup_locked(self, ref: pb.SharedMemoryRef, field: str) -> _Region:
        self._expire_locked(self._clock())
        if not ref.region:
            raise InvalidRequest(f"{field}.region", "is empty")
        found = self._regions.get(ref.region)
        if found is None:
            if ref.region in self._expired:
                raise NotFound(
                    f"{field}.region",
                    f"the lease of {ref.region!r} expired: it was not renewed within "
                    f"{self.lease_seconds:g} s; register it again (RegisterSharedMemory) and "
                    f"call RenewSharedMemory more often than every {self.lease_seconds:g} s",
                )
            raise NotFound(
                f"{field}.region",
                f"{ref.region!r} is not registered (call RegisterSharedMemory first)",
            )
        if ref.offset > found.byte_size:
            raise InvalidRequest(
                f"{field}.offset",
                f"{ref.offset} is past the end of region {ref.region!r} ({found.byte_size} bytes)",
            )
        if ref.offset + ref.byte_size > found.byte_size:
            raise InvalidRequest(
                f"{field}.byte_size",
                f"offset {ref.offset} + byte_size {ref.byte_size} = "
                f"{ref.offset + ref.byte_size} exceeds region {ref.region!r} "
                f"({found.byte_size} bytes)",
            )
        return found

    def _expire_locked(self, now: float) -> int:
        names = [name for name, r in self._regions.items() if r.expires_at <= now]
        for name in names:
            region = self._regions.pop(name)
            _unmap(region)
            self._expired[name] = region.owner
            self._expired.move_to_end(name)
        while len(self._expired) > MAX_EXPIRED_NAMES:
            self._expired.popitem(last=False)
        return len(names)


def _check_name(field: str, name: str) -> None:
    """InvalidRequest unless `name` is a safe region, key or owner name."""
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


def _attach(key: str, byte_size: int) -> mmap.mmap:
    """Map the first `byte_size` bytes of the client's POSIX shared-memory object `key`.

    Not SharedMemory(name=key, create=False): on Python < 3.13 attaching registers the segment
    with this process's resource_tracker, which unlinks the client's segment when the server
    exits (and warns about a "leak"). Unregistering right after attaching is no cure: the
    tracker keeps a set, so in a process that also created the segment (a client and server in
    one process, as in tests) it forgets the creator's registration and fails with KeyError at
    the creator's unlink. And SharedMemory.__del__ raises BufferError while a view is alive.
    A bare mmap has neither problem: it unmaps itself when the last view is gone.
    """
    if _posixshmem is None:
        raise InvalidRequest("key", "shared memory needs a POSIX server host")
    try:
        fd = _posixshmem.shm_open("/" + key, os.O_RDWR, 0o600)
    except FileNotFoundError:
        raise NotFound(
            "key", f"no shared-memory object {key!r} on the server's host (create it first)"
        ) from None
    except PermissionError:
        raise InvalidRequest(
            "key", f"{key!r} is not readable and writable by the server's user"
        ) from None
    except OSError as exc:
        raise InvalidRequest("key", f"cannot open {key!r}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if byte_size > size:
            raise InvalidRequest(
                "byte_size", f"is {byte_size}, but shared-memory object {key!r} has {size} bytes"
            )
        # The mapping holds its own descriptor; ours can go at once.
        return mmap.mmap(fd, byte_size)
    finally:
        os.close(fd)


def _unmap(region: _Region) -> None:
    """Unmap now, or, while a view still uses the region, when the last view is dropped."""
    # BufferError: a request still holds a view. Dropping our reference is enough then: the
    # view keeps the mmap object alive, and CPython unmaps it when the view goes, silently.
    with contextlib.suppress(BufferError):
        region.mapping.close()


def _little_endian(array: np.ndarray) -> np.ndarray:
    """`array` as C-contiguous little-endian (no copy if it already is)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
