"""The client side of system shared memory: one images and one outputs segment per pool.

For a server on the same host, reached on its Unix socket (`unix:<path>`, a server started with
--unix-socket and --shared-memory): the images are copied into a POSIX shared-memory segment
instead of the request, and the server writes the outputs into another, so neither travels
through gRPC. The pool creates and unlinks the segments; the server only reads and writes them.
The pool's owner secret goes with every call and never into a name: names carry its hash.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import secrets
import threading
import time
import weakref
from multiprocessing.shared_memory import SharedMemory
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from ..contract.shared_memory import SECRET_PATTERN, SHM_DIRECTORY, owner_id, segment_prefix
from ..contract.tensors import WIRE_DTYPES, wire_dtype
from ..contract.wire import decode_tensor
from ..v1 import featmap_pb2 as pb
from .messages import FeatmapRpcError
from .protocol import Call, Steps
from .retry import with_retries

# (region, key, byte_size): what RegisterSharedMemory must be told, with the pool's secret.
Registration = tuple[str, str, int]
IMAGES = "images"
OUTPUTS = "outputs"
# gRPC targets of Unix domain sockets ("unix:/path" or "unix:///path"): where shared memory is.
UNIX_TARGET_PREFIX = "unix:"


class SharedMemoryPool:
    """Reused shared-memory segments for one client, named `featmap_{owner_id}_{n}`.

    One images segment and one outputs segment, each replaced by a bigger one when a request
    needs more. Every request therefore uses the same bytes: hold `lock` from images_ref until
    read_outputs has returned, so that concurrent requests from several threads take turns
    (for parallel requests, use one pool per thread). Each method also takes `lock` itself.

    Args:
        secret: the owner secret sent with every shared-memory call (RegisterSharedMemory's
            `owner`, SharedMemoryRef.owner); random (128 bits) if None. Keep it private:
            whoever holds it may use this pool's regions on the server.
    """

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secrets.token_hex(16) if secret is None else secret
        if SECRET_PATTERN.fullmatch(self.secret) is None:
            raise ValueError(
                "the owner secret must be 16 to 128 letters, digits, '_' or '-' (it is sent, "
                "never shown in names)"
            )
        self.owner_id = owner_id(self.secret)  # public: what names in /dev/shm show
        # Reentrant so that a caller holding it for a whole request can call the methods.
        self.lock = threading.RLock()
        self._segments: dict[str, SharedMemory] = {}  # IMAGES / OUTPUTS -> segment
        self._created = 0
        # Unlinks the segments if the pool is dropped or the interpreter exits without close().
        self._finalizer = weakref.finalize(self, _release, self._segments)

    def region(self, role: str) -> str:
        """The region name of the IMAGES or OUTPUTS segment (stable while segments grow)."""
        return f"{segment_prefix(self.secret)}{role}"

    def images_ref(self, images: np.ndarray) -> tuple[pb.SharedMemoryRef, list[Registration]]:
        """Copy `images` (a float32, float16 or uint8 array) into the images region.

        Returns:
            The ref for ExtractRequest.images_region, and the registrations the server does not
            know yet (empty unless the segment was created or grown).
        """
        array = np.asarray(images)
        dtype = WIRE_DTYPES[wire_dtype(array)]  # InvalidTensor for dtypes the wire does not carry
        with self.lock:
            segment, registrations = self._ensure(IMAGES, array.nbytes)
            target = np.ndarray(array.shape, dtype=dtype, buffer=_buffer(segment))
            target[...] = array  # C order, little-endian, whatever `images` was
            # Drop the view now: a live export would make the segment's close() fail.
            del target
            ref = pb.SharedMemoryRef(
                region=self.region(IMAGES), offset=0, byte_size=array.nbytes, owner=self.secret
            )
        return ref, registrations

    def output_ref(self, byte_size: int) -> tuple[pb.SharedMemoryRef, list[Registration]]:
        """A ref to `byte_size` bytes of the outputs region, and registrations as images_ref."""
        if byte_size < 0:
            raise ValueError(f"byte_size must not be negative, got {byte_size}")
        with self.lock:
            _, registrations = self._ensure(OUTPUTS, byte_size)
            ref = pb.SharedMemoryRef(
                region=self.region(OUTPUTS), offset=0, byte_size=byte_size, owner=self.secret
            )
        return ref, registrations

    def read_outputs(self, response: pb.ExtractResponse) -> dict[str, np.ndarray]:
        """Copies of the outputs the server wrote to the region; outputs sent inline are decoded."""
        outputs: dict[str, np.ndarray] = {}
        with self.lock:
            for name, tensor in response.outputs.items():
                if name in response.output_regions:
                    field = f"output_regions[{name}]"
                    outputs[name] = self._copy_out(tensor, response.output_regions[name], field)
                else:
                    outputs[name] = decode_tensor(tensor, f"outputs.{name}")
        return outputs

    def registrations(self) -> list[Registration]:
        """Every live registration: what to register again after a server restart or lost lease."""
        with self.lock:
            return [
                (self.region(role), segment.name, segment.size)
                for role, segment in self._segments.items()
            ]

    def close(self) -> None:
        """Close and unlink every segment; unregister the owner on the server first."""
        with self.lock:
            self._finalizer()

    def _ensure(self, role: str, byte_size: int) -> tuple[SharedMemory, list[Registration]]:
        """The `role` segment, replaced by a bigger one if it holds less than `byte_size`."""
        if not self._finalizer.alive:
            raise ValueError("the shared-memory pool is closed")
        current = self._segments.get(role)
        if current is not None and current.size >= byte_size:
            return current, []
        # Doubling keeps slowly growing batches from re-registering on every request.
        size = max(byte_size, 2 * current.size if current is not None else 0, 1)
        size = math.ceil(size / mmap.PAGESIZE) * mmap.PAGESIZE
        segment = self._create(size)
        if current is not None:
            # The server may still map the old segment; unlinking only removes its name, and
            # registering the new key under the same region makes the server drop the old one.
            current.close()
            current.unlink()
        self._segments[role] = segment
        return segment, [(self.region(role), segment.name, segment.size)]

    def _create(self, size: int) -> SharedMemory:
        """A new segment with the next unused name of this pool, its pages reserved."""
        while True:
            self._created += 1
            try:
                segment = SharedMemory(
                    name=f"{segment_prefix(self.secret)}{self._created}", create=True, size=size
                )
            except FileExistsError:
                continue  # left by an earlier process with the same owner
            try:
                _reserve(segment)
            except OSError:
                segment.close()
                segment.unlink()
                raise
            return segment

    def _copy_out(self, tensor: pb.Tensor, ref: pb.SharedMemoryRef, field: str) -> np.ndarray:
        """A copy of the output at `ref`, checked against the tensor's dtype and shape."""
        dtype = WIRE_DTYPES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"{field}: dtype {tensor.dtype} is not FLOAT32, FLOAT16 or UINT8")
        shape = tuple(tensor.shape)
        expected = math.prod(shape) * dtype.itemsize
        if ref.byte_size != expected:
            raise ValueError(
                f"{field}.byte_size: is {ref.byte_size}; shape {list(shape)} x "
                f"{dtype.itemsize} bytes needs {expected}"
            )
        segment = next(
            (s for role, s in self._segments.items() if self.region(role) == ref.region), None
        )
        if segment is None:
            raise ValueError(f"{field}.region: {ref.region!r} is not a region of this pool")
        if ref.offset + ref.byte_size > segment.size:
            raise ValueError(
                f"{field}: offset {ref.offset} + byte_size {ref.byte_size} exceeds region "
                f"{ref.region!r} ({segment.size} bytes)"
            )
        view = np.frombuffer(
            _buffer(segment), dtype=dtype, count=math.prod(shape), offset=ref.offset
        )
        return view.reshape(shape).copy()

    def __enter__(self) -> SharedMemoryPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class SharedMemoryTransport:
    """Extract through a client's shared-memory regions: what to send, and what came back.

    `extract` is the whole sequence, which the clients drive (blocking or asyncio), holding
    their lock until it has returned, since every request reuses the same segments.
    """

    def __init__(self) -> None:
        self.pool = SharedMemoryPool()
        self.lease_seconds = 0.0
        self.renewed = 0.0
        self.output_bytes_per_image = 0
        self.served = False  # an Extract through it has been answered

    def extract(
        self,
        stub: Any,
        images: np.ndarray,
        message: pb.ExtractRequest,
        timeout: float | None,
        retries: int = 0,
    ) -> Steps[dict[str, np.ndarray]]:
        """Extract through the regions with `stub` (blocking or grpc.aio), as an exchange (see
        protocol.py): register what the server does not know yet, renew the lease when due,
        send the request (again, up to `retries` times, while the server is busy or
        unavailable: retry.with_retries), and when the server lost the regions (a lease ran
        out, a restart) register every one again and send it once more. The caller holds its
        lock throughout.
        """
        registrations, request = self.prepare(images, message)
        for registration in registrations:
            reply = yield Call(stub.RegisterSharedMemory, registration, timeout)
            self.registered(reply.lease_seconds)
        renewal = self.renewal()
        if renewal is not None:
            yield Call(stub.RenewSharedMemory, renewal, timeout)
        try:
            response = yield from with_retries(stub.Extract, request, retries, timeout)
        except grpc.RpcError as exc:  # grpc.aio.AioRpcError is one
            call: Any = exc
            if not self.lease_lost(call.code(), call.details() or ""):
                raise
            for registration in self.reregistrations():
                reply = yield Call(stub.RegisterSharedMemory, registration, timeout)
                self.registered(reply.lease_seconds)
            response = yield from with_retries(stub.Extract, request, retries, timeout)
        return self.finish(response, len(images))

    def prepare(
        self, images: np.ndarray, message: pb.ExtractRequest
    ) -> tuple[list[pb.RegisterSharedMemoryRequest], pb.ExtractRequest]:
        """Copy `images` into the images region; the registrations to send first, the request."""
        images_ref, registrations = self.pool.images_ref(images)
        # Sized from the last reply; a region too small makes the server answer inline.
        wanted = max(1 << 16, self.output_bytes_per_image * len(images))
        output_ref, more = self.pool.output_ref(wanted)
        request = pb.ExtractRequest()
        request.CopyFrom(message)
        header = pb.Tensor(dtype=wire_dtype(images), shape=images.shape)  # type: ignore[arg-type]
        request.images.CopyFrom(header)
        request.images_region.CopyFrom(images_ref)
        request.output_region.CopyFrom(output_ref)
        return self._requests(registrations + more), request

    def _requests(self, registrations: list[Registration]) -> list[pb.RegisterSharedMemoryRequest]:
        return [
            pb.RegisterSharedMemoryRequest(
                region=region, key=key, byte_size=byte_size, owner=self.pool.secret
            )
            for region, key, byte_size in registrations
        ]

    def registered(self, lease_seconds: float) -> None:
        """Note a registration's lease (it renews every region of the owner)."""
        self.lease_seconds = lease_seconds
        self.renewed = time.monotonic()

    def renewal(self) -> pb.RenewSharedMemoryRequest | None:
        """A renewal to send now, when a third of the lease has passed since the last one."""
        # Renewed on use; a client idle past its lease re-registers on NOT_FOUND instead.
        if self.lease_seconds and time.monotonic() - self.renewed > self.lease_seconds / 3:
            self.renewed = time.monotonic()
            return pb.RenewSharedMemoryRequest(owner=self.pool.secret)
        return None

    @staticmethod
    def lease_lost(code: object, details: str) -> bool:
        """Whether an Extract failed because the server no longer has a region of ours."""
        return str(getattr(code, "name", code)) == "NOT_FOUND" and "region" in details

    def reregistrations(self) -> list[pb.RegisterSharedMemoryRequest]:
        """Every region again, after a lost lease or a server restart."""
        return self._requests(self.pool.registrations())

    def finish(self, response: pb.ExtractResponse, images: int) -> dict[str, np.ndarray]:
        """The outputs (copied out of the region, or decoded inline), remembering their size."""
        outputs = self.pool.read_outputs(response)
        self.served = True
        total = sum(array.nbytes for array in outputs.values())
        self.output_bytes_per_image = max(self.output_bytes_per_image, -(-total // images))
        return outputs

    def unregistration(self) -> pb.UnregisterSharedMemoryRequest:
        """The request that unregisters every region of this client."""
        return pb.UnregisterSharedMemoryRequest(owner=self.pool.secret)

    def close(self) -> None:
        """Unlink the segments (after the clients sent `unregistration`, best effort)."""
        self.pool.close()


class SharedMemoryTransports:
    """A client's transports: each carries one request at a time (its segments are reused),
    and there are as many as the requests the client has had in flight at once.

    Not thread-safe: the clients call `take` and `give` under a lock (or condition) of theirs,
    and wait for a `give` when `take` has none to give.
    """

    def __init__(self) -> None:
        self.all = [SharedMemoryTransport()]
        self._free = list(self.all)
        # How many the server holds regions for, once it refused another's (see refused).
        self.most = math.inf

    def take(self, most: int) -> SharedMemoryTransport | None:
        """A free transport, or a new one while there are fewer than `most` and every one
        has served (the window grows one proven transport at a time, so that new ones do not
        race each other for the server's last regions); else None."""
        if self._free:
            return self._free.pop()
        if len(self.all) < min(most, self.most) and all(t.served for t in self.all):
            self.all.append(SharedMemoryTransport())
            return self.all[-1]
        return None

    def refused(self, transport: SharedMemoryTransport, error: FeatmapRpcError) -> bool:
        """Whether the server refused `transport`'s regions for its own limit
        (max_shared_memory_regions) before it ever served, while there are others: then it
        is dropped, no more than those are made, and its request goes on one of them. The
        caller unregisters and closes it; any other refusal is the caller's to raise."""
        if (
            transport.served
            or len(self.all) < 2
            or error.code != grpc.StatusCode.RESOURCE_EXHAUSTED
            or error.field != "region"
        ):
            return False
        self.all.remove(transport)
        self.most = len(self.all)
        return True

    def give(self, transport: SharedMemoryTransport) -> None:
        """`transport`'s request is done: it is free again."""
        self._free.append(transport)

    def close(self) -> None:
        """Unlink every transport's segments (after the clients sent their unregistrations)."""
        for transport in self.all:
            transport.close()


def _reserve(segment: SharedMemory) -> None:
    """Allocate the segment's pages now (where /dev/shm is the segments' folder): a full
    /dev/shm (64 MiB in a container by default) is then an OSError here, where writing the
    images through the mapping would have killed the process with SIGBUS."""
    path = os.path.join(SHM_DIRECTORY, segment.name)
    if not os.path.isdir(SHM_DIRECTORY):
        return
    handle = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.posix_fallocate(handle, 0, segment.size)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"shared memory: {SHM_DIRECTORY} has no room for {segment.size} bytes "
            f"({exc.strerror}); give it more (docker run --shm-size) or send inline",
        ) from None
    finally:
        os.close(handle)


def _buffer(segment: SharedMemory) -> memoryview:
    """The segment's bytes (only closed segments have none, and the pool keeps none)."""
    assert segment.buf is not None
    return segment.buf


def _release(segments: dict[str, SharedMemory]) -> None:
    """Close and unlink `segments` (a finalizer: it must not refer to the pool)."""
    for segment in segments.values():
        segment.close()
        # Someone may have removed it already; then there is nothing left to clean.
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()
    segments.clear()
