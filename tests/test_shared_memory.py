"""System shared memory with real POSIX segments: the server's registry and the client's pool."""

from __future__ import annotations

import gc
import json
import os
import secrets
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import grpc
import numpy as np
import pytest

from featmap.client import FeatureClient
from featmap.client.shared_memory import IMAGES, OUTPUTS, SharedMemoryPool
from featmap.contract.errors import InvalidRequest, InvalidTensor, LimitExceeded, NotFound
from featmap.contract.spec import Pipeline
from featmap.contract.tensors import (
    WIRE_DTYPES,
    wire_dtype,
)
from featmap.service.server import FeatmapServer
from featmap.service.shared_memory import SharedMemoryRegistry
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc
from tests.conftest import README_SPEC, assert_matches_reference

DEV_SHM = "/dev/shm"
needs_dev_shm = pytest.mark.skipif(not os.path.isdir(DEV_SHM), reason="no /dev/shm to inspect")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Iterator[SharedMemoryRegistry]:
    registry = SharedMemoryRegistry(lease_seconds=30.0, max_regions=4, clock=clock)
    yield registry
    registry.close()


@pytest.fixture
def pool() -> Iterator[SharedMemoryPool]:
    with SharedMemoryPool() as pool:
        yield pool


@pytest.fixture
def segment() -> Iterator[SharedMemory]:
    """A bare 4096-byte segment, as a client other than SharedMemoryPool would make it."""
    name = f"featmap_test_{secrets.token_hex(8)}"
    segment = SharedMemory(name=name, create=True, size=4096)
    yield segment
    segment.close()
    segment.unlink()


def buffer(segment: SharedMemory) -> memoryview:
    assert segment.buf is not None
    return segment.buf


def register_all(
    registry: SharedMemoryRegistry,
    pool: SharedMemoryPool,
    registrations: list[tuple[str, str, int]],
) -> None:
    """What the client does with the registrations the pool hands back."""
    for region, key, byte_size in registrations:
        registry.register(region, key, byte_size, pool.owner)


def pool_files(pool: SharedMemoryPool) -> list[str]:
    return sorted(f for f in os.listdir(DEV_SHM) if f.startswith(f"featmap_{pool.owner}_"))


def ref(region: str, offset: int, byte_size: int) -> pb.SharedMemoryRef:
    return pb.SharedMemoryRef(region=region, offset=offset, byte_size=byte_size)


# Round trips


def test_read_is_a_read_only_view_of_the_images(
    registry: SharedMemoryRegistry, pool: SharedMemoryPool
) -> None:
    images = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # N, C, H, W
    images_ref, registrations = pool.images_ref(images)
    assert registrations == [(pool.region(IMAGES), registrations[0][1], registrations[0][2])]
    register_all(registry, pool, registrations)

    view = registry.read(images_ref, np.dtype("<f4"), images.shape, "images_region")

    assert view.shape == (2, 3, 4, 5)
    assert view.dtype == np.float32
    np.testing.assert_array_equal(view, images)
    assert not view.flags.writeable
    # A view, not a copy: the client's next images show through.
    pool.images_ref(images + 1)
    np.testing.assert_array_equal(view, images + 1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_every_wire_dtype_round_trips(
    registry: SharedMemoryRegistry, pool: SharedMemoryPool, dtype: str
) -> None:
    images = (np.arange(24) % 200).astype(dtype).reshape(1, 2, 3, 4)
    images_ref, registrations = pool.images_ref(images)
    register_all(registry, pool, registrations)

    view = registry.read(images_ref, WIRE_DTYPES[wire_dtype(images)], images.shape, "images_region")

    np.testing.assert_array_equal(view, images)


def test_read_at_a_misaligned_offset_copies(
    registry: SharedMemoryRegistry, segment: SharedMemory
) -> None:
    values = np.array([1.5, -2.0, 3.25], dtype="<f4")
    buffer(segment)[2:14] = values.tobytes()  # offset 2: not a multiple of 4
    registry.register("r", segment.name, segment.size, "me")

    view = registry.read(ref("r", 2, 12), np.dtype("<f4"), (3,), "images_region")

    np.testing.assert_array_equal(view, values)
    assert view.flags.aligned
    assert not view.flags.writeable


def test_write_packs_outputs_and_the_pool_reads_them(
    registry: SharedMemoryRegistry, pool: SharedMemoryPool
) -> None:
    conv1 = np.arange(2 * 8 * 4 * 4, dtype=np.float32).reshape(2, 8, 4, 4)  # N, C, H, W
    features = np.asfortranarray(np.arange(2 * 8, dtype=">f4").reshape(2, 8))  # any order, endian
    out_ref, registrations = pool.output_ref(conv1.nbytes + features.nbytes)
    register_all(registry, pool, registrations)

    refs = registry.write(out_ref, [("conv1", conv1), ("features", features)], "output_region")

    # One after another from the ref's offset.
    assert refs["conv1"] == ref(pool.region(OUTPUTS), 0, conv1.nbytes)
    assert refs["features"] == ref(pool.region(OUTPUTS), conv1.nbytes, features.nbytes)
    response = pb.ExtractResponse(
        outputs={
            "conv1": pb.Tensor(dtype=pb.FLOAT32, shape=conv1.shape),
            "features": pb.Tensor(dtype=pb.FLOAT32, shape=features.shape),
        },
        output_regions=refs,
    )
    outputs = pool.read_outputs(response)
    np.testing.assert_array_equal(outputs["conv1"], conv1)
    np.testing.assert_array_equal(outputs["features"], features)
    assert outputs["features"].dtype == np.float32
    assert outputs["conv1"].flags.writeable  # copies: the next request may overwrite the region


def test_write_starts_at_the_ref_offset(
    registry: SharedMemoryRegistry, segment: SharedMemory
) -> None:
    registry.register("out", segment.name, segment.size, "me")
    array = np.array([[1, 2], [3, 4]], dtype=np.uint8)

    refs = registry.write(ref("out", 100, 10), [("a", array)], "output_region")

    assert refs == {"a": ref("out", 100, 4)}
    assert bytes(buffer(segment)[100:104]) == b"\x01\x02\x03\x04"


def test_read_outputs_decodes_outputs_sent_inline(pool: SharedMemoryPool) -> None:
    response = pb.ExtractResponse(
        outputs={"f": pb.Tensor(dtype=pb.UINT8, shape=[2], data=b"\x07\x09")}
    )

    outputs = pool.read_outputs(response)

    np.testing.assert_array_equal(outputs["f"], [7, 9])


def test_read_outputs_checks_the_regions(pool: SharedMemoryPool) -> None:
    pool.output_ref(16)
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=[4])
    for bad, message in [
        (ref(pool.region(OUTPUTS), 0, 12), r"output_regions\[f\]\.byte_size: is 12"),
        (ref("elsewhere", 0, 16), r"output_regions\[f\]\.region"),
        (ref(pool.region(OUTPUTS), 1 << 40, 16), r"output_regions\[f\]: offset"),
    ]:
        response = pb.ExtractResponse(outputs={"f": tensor}, output_regions={"f": bad})
        with pytest.raises(ValueError, match=message):
            pool.read_outputs(response)


# Validation: every error names its field


@pytest.mark.parametrize("field", ["region", "key", "owner"])
@pytest.mark.parametrize("name", ["", "a/b", "/abc", "..", ".hidden", "-x", "sp ace", "x" * 201])
def test_unsafe_names_are_refused(
    registry: SharedMemoryRegistry, segment: SharedMemory, field: str, name: str
) -> None:
    arguments = {"region": "r", "key": segment.name, "byte_size": 16, "owner": "me", field: name}
    with pytest.raises(InvalidRequest) as error:
        registry.register(**arguments)  # type: ignore[arg-type]
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: ")


@pytest.mark.parametrize("byte_size", [0, -1, 4097])
def test_register_byte_size_must_fit_the_segment(
    registry: SharedMemoryRegistry, segment: SharedMemory, byte_size: int
) -> None:
    with pytest.raises(InvalidRequest, match="byte_size") as error:
        registry.register("r", segment.name, byte_size, "me")
    assert error.value.field == "byte_size"
    assert len(registry) == 0


def test_register_an_unknown_key(registry: SharedMemoryRegistry) -> None:
    with pytest.raises(NotFound) as error:
        registry.register("r", "featmap_no_such_segment", 16, "me")
    assert error.value.field == "key"


def test_another_owners_region_name_is_refused(
    registry: SharedMemoryRegistry, segment: SharedMemory
) -> None:
    registry.register("r", segment.name, 16, "alice")
    with pytest.raises(InvalidRequest, match="another client") as error:
        registry.register("r", segment.name, 16, "bob")
    assert error.value.field == "region"


def test_reregistering_ones_own_region_replaces_it(
    registry: SharedMemoryRegistry, segment: SharedMemory, pool: SharedMemoryPool
) -> None:
    buffer(segment)[:4] = np.float32(7).tobytes()
    registry.register("r", segment.name, 16, "me")
    images = np.full((3,), 9, dtype=np.float32)
    _, registrations = pool.images_ref(images)
    (_, key, byte_size) = registrations[0]

    registry.register("r", key, byte_size, "me")

    assert len(registry) == 1
    np.testing.assert_array_equal(
        registry.read(ref("r", 0, 12), np.dtype("<f4"), (3,), "images_region"), images
    )


def test_read_refs_are_checked(registry: SharedMemoryRegistry, segment: SharedMemory) -> None:
    registry.register("r", segment.name, 1024, "me")
    f4 = np.dtype("<f4")
    cases: list[tuple[pb.SharedMemoryRef, tuple[int, ...], type[Exception], str]] = [
        (ref("", 0, 16), (4,), InvalidRequest, "images_region.region"),
        (ref("nope", 0, 16), (4,), NotFound, "images_region.region"),
        (ref("r", 1025, 0), (0,), InvalidRequest, "images_region.offset"),
        (ref("r", 1020, 16), (4,), InvalidRequest, "images_region.byte_size"),
        (ref("r", 0, 2048), (512,), InvalidRequest, "images_region.byte_size"),
        (ref("r", 0, 12), (4,), InvalidTensor, "images_region.byte_size"),
    ]
    for bad, shape, error_type, field in cases:
        with pytest.raises(error_type) as error:
            registry.read(bad, f4, shape, "images_region")
        assert error.value.field == field, bad  # type: ignore[attr-defined]
        assert str(error.value).startswith(f"{field}: ")


def test_byte_size_mismatch_says_what_the_shape_needs(
    registry: SharedMemoryRegistry, segment: SharedMemory
) -> None:
    registry.register("r", segment.name, 1024, "me")
    with pytest.raises(
        InvalidTensor, match=r"is 12; shape \[1, 4\] x 4 bytes \(float32\) needs 16"
    ):
        registry.read(ref("r", 0, 12), np.dtype("<f4"), (1, 4), "images_region")


def test_write_refs_are_checked(registry: SharedMemoryRegistry, segment: SharedMemory) -> None:
    registry.register("out", segment.name, 64, "me")
    outputs = [("a", np.zeros(4, np.float32)), ("b", np.zeros(8, np.float32))]  # 16 + 32 bytes

    with pytest.raises(InvalidRequest, match=r"is 40; the outputs need 48 bytes") as error:
        registry.write(ref("out", 0, 40), outputs, "output_region")
    assert error.value.field == "output_region.byte_size"
    with pytest.raises(InvalidRequest) as error:
        registry.write(ref("out", 32, 48), outputs, "output_region")
    assert error.value.field == "output_region.byte_size"
    with pytest.raises(NotFound) as not_found:
        registry.write(ref("other", 0, 48), outputs, "output_region")
    assert not_found.value.field == "output_region.region"
    assert bytes(buffer(segment)[:64]) == bytes(64)  # nothing written by a refused request


# Leases


def test_a_lease_expires_unless_renewed(
    registry: SharedMemoryRegistry, segment: SharedMemory, clock: FakeClock
) -> None:
    assert registry.register("r", segment.name, 16, "me") == 30.0
    clock.now += 29
    registry.read(ref("r", 0, 16), np.dtype("u1"), (16,), "images_region")
    assert registry.renew("me") == 1
    clock.now += 29  # 58 s after registering, 29 s after renewing
    registry.read(ref("r", 0, 16), np.dtype("u1"), (16,), "images_region")

    clock.now += 1
    assert registry.expire() == 1

    with pytest.raises(NotFound, match=r"lease of 'r' expired.*RenewSharedMemory") as error:
        registry.read(ref("r", 0, 16), np.dtype("u1"), (16,), "images_region")
    assert error.value.field == "images_region.region"
    assert len(registry) == 0
    assert registry.renew("me") == 0
    # Registering again brings it back.
    registry.register("r", segment.name, 16, "me")
    registry.read(ref("r", 0, 16), np.dtype("u1"), (16,), "images_region")


def test_expiry_is_lazy_on_any_call(
    registry: SharedMemoryRegistry, segment: SharedMemory, clock: FakeClock
) -> None:
    registry.register("a", segment.name, 16, "me")
    clock.now += 30
    # The next call of any kind unmaps it, without expire().
    registry.register("b", segment.name, 16, "me")
    assert len(registry) == 1
    # Unregistering an expired region of one's own is a quiet no-op.
    assert registry.unregister("me", "a") == 0


def test_renew_extends_only_the_owners_leases(
    registry: SharedMemoryRegistry, segment: SharedMemory, clock: FakeClock
) -> None:
    registry.register("a1", segment.name, 16, "alice")
    registry.register("a2", segment.name, 16, "alice")
    registry.register("b1", segment.name, 16, "bob")
    clock.now += 20
    assert registry.renew("alice") == 2
    clock.now += 20
    assert registry.expire() == 1  # bob's
    assert registry.renew("bob") == 0
    assert len(registry) == 2


# Unregister and limits


def test_unregister_by_owner(registry: SharedMemoryRegistry, segment: SharedMemory) -> None:
    registry.register("a1", segment.name, 16, "alice")
    registry.register("a2", segment.name, 16, "alice")
    registry.register("b1", segment.name, 16, "bob")

    with pytest.raises(NotFound) as error:
        registry.unregister("alice", "b1")  # someone else's region looks unknown
    assert error.value.field == "region"
    assert "bob" not in str(error.value)
    with pytest.raises(NotFound):
        registry.unregister("alice", "nope")
    with pytest.raises(InvalidRequest) as invalid:
        registry.unregister("")
    assert invalid.value.field == "owner"

    assert registry.unregister("alice") == 2
    assert registry.unregister("alice") == 0
    assert len(registry) == 1
    registry.read(ref("b1", 0, 16), np.dtype("u1"), (16,), "images_region")
    assert registry.unregister("bob", "b1") == 1
    assert len(registry) == 0


def test_max_regions(registry: SharedMemoryRegistry, segment: SharedMemory) -> None:
    for n in range(4):
        registry.register(f"r{n}", segment.name, 16, "me")

    with pytest.raises(LimitExceeded, match="limit is 4") as error:
        registry.register("r4", segment.name, 16, "other")
    assert error.value.field == "region"
    registry.register("r3", segment.name, 32, "me")  # replacing does not count twice
    registry.unregister("me", "r0")
    registry.register("r4", segment.name, 16, "other")


# Lifetimes: the client owns its segments, and views outlive registrations


def test_closing_the_registry_while_a_view_is_alive(
    registry: SharedMemoryRegistry, pool: SharedMemoryPool
) -> None:
    images = np.linspace(0, 1, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    images_ref, registrations = pool.images_ref(images)
    register_all(registry, pool, registrations)
    view = registry.read(images_ref, np.dtype("<f4"), images.shape, "images_region")

    registry.close()
    registry.close()  # twice is fine

    np.testing.assert_array_equal(view, images)  # still mapped: the view holds the mapping
    del view
    gc.collect()  # the last reference goes: unmapped without warnings (filterwarnings=error)


def test_unregistering_while_a_write_target_or_view_is_alive(
    registry: SharedMemoryRegistry, segment: SharedMemory
) -> None:
    buffer(segment)[:4] = b"\x01\x02\x03\x04"
    registry.register("r", segment.name, 16, "me")
    view = registry.read(ref("r", 0, 4), np.dtype("u1"), (4,), "images_region")

    assert registry.unregister("me") == 1

    np.testing.assert_array_equal(view, [1, 2, 3, 4])
    with pytest.raises(NotFound):
        registry.read(ref("r", 0, 4), np.dtype("u1"), (4,), "images_region")


@needs_dev_shm
def test_a_server_process_exiting_leaves_the_clients_segment(pool: SharedMemoryPool) -> None:
    images = np.arange(12, dtype=np.uint8).reshape(1, 1, 3, 4)
    images_ref, registrations = pool.images_ref(images)
    ((region, key, byte_size),) = registrations
    # A separate server process that maps the segment, reads it, and exits (once without
    # close()): a resource_tracker there would unlink the segment and warn at exit.
    server = textwrap.dedent(
        f"""
        import numpy as np
        from featmap.service.shared_memory import SharedMemoryRegistry
        from featmap.v1 import featmap_pb2 as pb
        for close in (True, False):
            registry = SharedMemoryRegistry()
            registry.register({region!r}, {key!r}, {byte_size}, {pool.owner!r})
            ref = pb.SharedMemoryRef(region={region!r}, offset=0, byte_size=12)
            view = registry.read(ref, np.dtype("u1"), (1, 1, 3, 4), "images_region")
            assert view.sum() == 66, view
            if close:
                registry.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", server], capture_output=True, text=True, timeout=30
    )

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert os.path.exists(os.path.join(DEV_SHM, key))
    # Still usable: a new server maps the same bytes.
    registry = SharedMemoryRegistry()
    try:
        registry.register(region, key, byte_size, pool.owner)
        view = registry.read(images_ref, np.dtype("u1"), images.shape, "images_region")
        np.testing.assert_array_equal(view, images)
        del view
    finally:
        registry.close()


# The pool


@needs_dev_shm
def test_pool_grows_and_cleans_up(registry: SharedMemoryRegistry) -> None:
    pool = SharedMemoryPool(owner="growtest")
    small = np.ones((1, 3, 8, 8), np.float32)
    big = np.ones((8, 3, 64, 64), np.float32)

    _, first = pool.images_ref(small)
    _, again = pool.images_ref(small)
    _, grown = pool.images_ref(big)
    _, outputs = pool.output_ref(100)

    assert again == []  # the same segment serves the same size
    assert [r for r, _, _ in first + grown] == [pool.region(IMAGES)] * 2  # same region name
    assert first[0][1] != grown[0][1]  # a new segment
    assert grown[0][2] >= big.nbytes
    assert [r for r, _, _ in outputs] == [pool.region(OUTPUTS)]
    # The outgrown segment is gone; the live ones are what registrations() re-registers.
    assert pool_files(pool) == sorted(key for _, key, _ in grown + outputs)
    assert sorted(pool.registrations()) == sorted(grown + outputs)
    register_all(registry, pool, pool.registrations())

    pool.close()
    pool.close()

    assert pool_files(pool) == []
    with pytest.raises(ValueError, match="closed"):
        pool.images_ref(small)


def test_first_registration_of_a_stale_key_is_not_found(registry: SharedMemoryRegistry) -> None:
    pool = SharedMemoryPool()
    _, first = pool.images_ref(np.ones(4, np.uint8))
    pool.images_ref(np.ones(1 << 20, np.uint8))  # grows: the first segment is unlinked
    try:
        with pytest.raises(NotFound) as error:
            register_all(registry, pool, first)
        assert error.value.field == "key"
    finally:
        pool.close()


@pytest.mark.parametrize("owner", ["", "a/b", "..", "x" * 190])
def test_pool_owner_must_be_a_safe_name(owner: str) -> None:
    with pytest.raises(ValueError, match="owner"):
        SharedMemoryPool(owner=owner)


def test_pool_refuses_dtypes_the_wire_does_not_carry(pool: SharedMemoryPool) -> None:
    with pytest.raises(InvalidTensor, match="float64"):
        pool.images_ref(np.zeros(4))
    with pytest.raises(ValueError, match="byte_size"):
        pool.output_ref(-1)


@needs_dev_shm
def test_a_dropped_pool_unlinks_its_segments() -> None:
    pool = SharedMemoryPool()
    pool.images_ref(np.ones(4, np.uint8))
    owner = pool.owner
    del pool
    gc.collect()
    assert not [f for f in os.listdir(DEV_SHM) if f.startswith(f"featmap_{owner}_")]


def test_threads_sharing_a_pool_take_turns(registry: SharedMemoryRegistry) -> None:
    pool = SharedMemoryPool()
    failures: list[str] = []

    def request(n: int) -> None:
        images = np.full((1, 1, 16, 16), n, np.float32)
        for _ in range(20):
            # One whole request under the pool's lock, as the client does it.
            with pool.lock:
                images_ref, registrations = pool.images_ref(images)
                out_ref, more = pool.output_ref(images.nbytes)
                register_all(registry, pool, registrations + more)
                view = registry.read(images_ref, np.dtype("<f4"), images.shape, "images_region")
                refs = registry.write(out_ref, [("y", view * 2)], "output_region")
                del view
                response = pb.ExtractResponse(
                    outputs={"y": pb.Tensor(dtype=pb.FLOAT32, shape=images.shape)},
                    output_regions=refs,
                )
                if not np.all(pool.read_outputs(response)["y"] == 2 * n):
                    failures.append(f"thread {n} read another thread's output")

    threads = [threading.Thread(target=request, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.close()

    assert failures == []


# --------------------------------------------------------------------------- through a server


def test_client_with_shared_memory_matches_the_reference(
    server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    images = np.random.default_rng(70).random((3, 3, 20, 24), dtype=np.float32)
    with FeatureClient(server.address, shared_memory=True) as shared:
        for _ in range(2):  # the second request reuses the regions and the output size seen
            outputs = shared.extract(images, README_SPEC)
            assert_matches_reference(outputs, readme_pipeline, images)
            # copied out of the region, so the next request cannot change them under the caller
            assert all(array.flags.writeable for array in outputs.values())
        pipeline_id = shared.register(readme_pipeline)
        assert_matches_reference(shared.extract(images, pipeline_id), readme_pipeline, images)
        owner = shared._shared.pool.owner if shared._shared else ""
        assert server.service.shared_memory.renew(owner) == 2  # images and outputs regions
    # Closing the client unregisters its regions on the server and unlinks its segments.
    assert server.service.shared_memory.renew(owner) == 0
    if os.path.isdir(DEV_SHM):
        assert not [n for n in os.listdir(DEV_SHM) if owner and owner in n]


def test_outputs_too_big_for_the_region_come_inline(
    server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    small = np.random.default_rng(71).random((1, 3, 8, 8), dtype=np.float32)
    big = np.random.default_rng(72).random((4, 3, 64, 64), dtype=np.float32)
    with FeatureClient(server.address, shared_memory=True) as shared:
        shared.extract(small, README_SPEC)  # sizes the output region for tiny outputs
        # conv1 of 4 x 8 x 64 x 64 floats does not fit: the reply carries it instead
        assert_matches_reference(shared.extract(big, README_SPEC), readme_pipeline, big)


def test_an_expired_lease_is_registered_again(
    server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    images = np.random.default_rng(73).random((2, 3, 16, 16), dtype=np.float32)
    with FeatureClient(server.address, shared_memory=True) as shared:
        shared.extract(images, README_SPEC)
        assert shared._shared is not None
        # What the server does when the lease runs out: the regions are gone.
        server.service.shared_memory.unregister(shared._shared.pool.owner)
        assert_matches_reference(shared.extract(images, README_SPEC), readme_pipeline, images)


def test_raw_requests_with_bad_regions_name_the_field(server: FeatmapServer) -> None:
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.FeatureExtractorStub(channel)
    with SharedMemoryPool() as pool:
        images = np.zeros((1, 3, 8, 8), np.float32)
        ref, registrations = pool.images_ref(images)
        for region, key, size in registrations:
            stub.RegisterSharedMemory(
                pb.RegisterSharedMemoryRequest(
                    region=region, key=key, byte_size=size, owner=pool.owner
                )
            )
        header = pb.Tensor(dtype=pb.FLOAT32, shape=[1, 3, 8, 8])
        cases = [
            # the region's bytes do not match the shape
            (
                pb.SharedMemoryRef(region=ref.region, offset=0, byte_size=ref.byte_size - 4),
                grpc.StatusCode.INVALID_ARGUMENT,
                "images_region.byte_size",
            ),
            # past the end of the region
            (
                pb.SharedMemoryRef(region=ref.region, offset=1 << 20, byte_size=ref.byte_size),
                grpc.StatusCode.INVALID_ARGUMENT,
                "images_region.offset",
            ),
            # a region nobody registered
            (
                pb.SharedMemoryRef(region="nobody", offset=0, byte_size=ref.byte_size),
                grpc.StatusCode.NOT_FOUND,
                "images_region.region",
            ),
        ]
        for bad_ref, code, field in cases:
            request = pb.ExtractRequest(spec_json=json.dumps(README_SPEC), images=header)
            request.images_region.CopyFrom(bad_ref)
            with pytest.raises(grpc.RpcError) as failure:
                stub.Extract(request)
            error: Any = failure.value
            assert error.code() == code, error.details()
            assert dict(error.trailing_metadata())["featmap-field"] == field
            assert error.details().startswith(field)
        # images sent both inline and in a region: refused, not silently one of the two
        both = pb.ExtractRequest(spec_json=json.dumps(README_SPEC))
        both.images.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[1, 3, 8, 8], data=images.tobytes()))
        both.images_region.CopyFrom(ref)
        with pytest.raises(grpc.RpcError) as failure:
            stub.Extract(both)
        assert dict(failure.value.trailing_metadata())["featmap-field"] == "images.data"  # type: ignore[attr-defined]
        stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(owner=pool.owner))
    channel.close()
