"""System shared memory with real POSIX segments: the server's registry and the client's pool."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import secrets
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import grpc
import numpy as np
import pytest

from featmap.client import AsyncFeatureClient, FeatureClient
from featmap.client.shared_memory import IMAGES, OUTPUTS, SharedMemoryPool
from featmap.contract.errors import InvalidRequest, InvalidTensor, LimitExceeded, NotFound
from featmap.contract.shared_memory import SEGMENT_PREFIX, segment_prefix
from featmap.contract.spec import Pipeline
from featmap.contract.tensors import (
    WIRE_DTYPES,
    wire_dtype,
)
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings
from featmap.service.shared_memory import SharedMemoryRegistry
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc
from tests.conftest import README_SPEC, assert_matches_reference, local

DEV_SHM = "/dev/shm"
needs_dev_shm = pytest.mark.skipif(not os.path.isdir(DEV_SHM), reason="no /dev/shm to inspect")
TENANT = ""
# Owner secrets; names carry only their hash (segment_prefix).
ME = secrets.token_hex(16)
ALICE = secrets.token_hex(16)
BOB = secrets.token_hex(16)


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


SegmentFactory = Callable[..., SharedMemory]


@pytest.fixture
def make_segment() -> Iterator[SegmentFactory]:
    """Bare segments, as a client other than SharedMemoryPool would make them."""
    made: list[SharedMemory] = []

    def make(secret: str = ME, size: int = 4096) -> SharedMemory:
        segment = SharedMemory(
            name=f"{segment_prefix(secret)}{secrets.token_hex(4)}", create=True, size=size
        )
        made.append(segment)
        return segment

    yield make
    for segment in made:
        segment.close()
        segment.unlink()


@pytest.fixture
def segment(make_segment: SegmentFactory) -> SharedMemory:
    """A bare 4096-byte segment of ME's."""
    return make_segment()


def buffer(segment: SharedMemory) -> memoryview:
    assert segment.buf is not None
    return segment.buf


def name(secret: str, suffix: str) -> str:
    """A region name the owner of `secret` may use."""
    return f"{segment_prefix(secret)}{suffix}"


def register(
    registry: SharedMemoryRegistry, suffix: str, key: str, byte_size: int, secret: str = ME
) -> float:
    return registry.register(TENANT, secret, name(secret, suffix), key, byte_size)


def register_all(
    registry: SharedMemoryRegistry,
    pool: SharedMemoryPool,
    registrations: list[tuple[str, str, int]],
) -> None:
    """What the client does with the registrations the pool hands back."""
    for region, key, byte_size in registrations:
        registry.register(TENANT, pool.secret, region, key, byte_size)


def pool_files(pool: SharedMemoryPool) -> list[str]:
    return sorted(f for f in os.listdir(DEV_SHM) if f.startswith(f"featmap_{pool.owner_id}_"))


def ref(suffix: str, offset: int, byte_size: int, secret: str = ME) -> pb.SharedMemoryRef:
    return pb.SharedMemoryRef(
        region=name(secret, suffix) if suffix else "",
        offset=offset,
        byte_size=byte_size,
        owner=secret,
    )


def read(
    registry: SharedMemoryRegistry,
    at: pb.SharedMemoryRef,
    dtype: Any,
    shape: tuple[int, ...],
) -> np.ndarray:
    """What an Extract does with images_region: admit the header, then read."""
    return registry.images(TENANT, at, np.dtype(dtype), shape, "images_region").read()


# Round trips


def test_read_copies_the_images_into_server_memory(
    registry: SharedMemoryRegistry, pool: SharedMemoryPool
) -> None:
    images = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # N, C, H, W
    images_ref, registrations = pool.images_ref(images)
    assert registrations == [(pool.region(IMAGES), registrations[0][1], registrations[0][2])]
    register_all(registry, pool, registrations)

    copy = read(registry, images_ref, "<f4", images.shape)

    assert copy.shape == (2, 3, 4, 5)
    assert copy.dtype == np.float32
    np.testing.assert_array_equal(copy, images)
    assert not copy.flags.writeable
    assert copy.flags.aligned
    # A copy the server owns, never a mapping: the client's next images do not show through,
    # and a segment that shrinks later cannot fault under it.
    pool.images_ref(images + 1)
    np.testing.assert_array_equal(copy, images)


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_every_wire_dtype_round_trips(
    registry: SharedMemoryRegistry, pool: SharedMemoryPool, dtype: str
) -> None:
    images = (np.arange(24) % 200).astype(dtype).reshape(1, 2, 3, 4)
    images_ref, registrations = pool.images_ref(images)
    register_all(registry, pool, registrations)

    copy = read(registry, images_ref, WIRE_DTYPES[wire_dtype(images)], images.shape)

    np.testing.assert_array_equal(copy, images)


def test_read_at_a_misaligned_offset(registry: SharedMemoryRegistry, segment: SharedMemory) -> None:
    values = np.array([1.5, -2.0, 3.25], dtype="<f4")
    buffer(segment)[2:14] = values.tobytes()  # offset 2: not a multiple of 4
    register(registry, "r", segment.name, segment.size)

    copy = read(registry, ref("r", 2, 12), "<f4", (3,))

    np.testing.assert_array_equal(copy, values)
    assert copy.flags.aligned
    assert not copy.flags.writeable


def test_write_packs_outputs_and_the_pool_reads_them(
    registry: SharedMemoryRegistry, pool: SharedMemoryPool
) -> None:
    conv1 = np.arange(2 * 8 * 4 * 4, dtype=np.float32).reshape(2, 8, 4, 4)  # N, C, H, W
    features = np.asfortranarray(np.arange(2 * 8, dtype=">f4").reshape(2, 8))  # any order, endian
    out_ref, registrations = pool.output_ref(conv1.nbytes + features.nbytes)
    register_all(registry, pool, registrations)

    refs = registry.write(
        TENANT, out_ref, [("conv1", conv1), ("features", features)], "output_region"
    )

    # One after another from the ref's offset; the secret never comes back.
    region = pool.region(OUTPUTS)
    assert refs["conv1"] == pb.SharedMemoryRef(region=region, offset=0, byte_size=conv1.nbytes)
    assert refs["features"] == pb.SharedMemoryRef(
        region=region, offset=conv1.nbytes, byte_size=features.nbytes
    )
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
    register(registry, "out", segment.name, segment.size)
    array = np.array([[1, 2], [3, 4]], dtype=np.uint8)

    refs = registry.write(TENANT, ref("out", 100, 10), [("a", array)], "output_region")

    assert refs == {"a": pb.SharedMemoryRef(region=name(ME, "out"), offset=100, byte_size=4)}
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
    region = pool.region(OUTPUTS)
    for bad, message in [
        (pb.SharedMemoryRef(region=region, byte_size=12), r"output_regions\[f\]\.byte_size: is 12"),
        (pb.SharedMemoryRef(region="elsewhere", byte_size=16), r"output_regions\[f\]\.region"),
        (
            pb.SharedMemoryRef(region=region, offset=1 << 40, byte_size=16),
            r"output_regions\[f\]: offset",
        ),
    ]:
        response = pb.ExtractResponse(outputs={"f": tensor}, output_regions={"f": bad})
        with pytest.raises(ValueError, match=message):
            pool.read_outputs(response)


# Validation: every error names its field


@pytest.mark.parametrize("field", ["region", "key"])
@pytest.mark.parametrize("bad", ["", "a/b", "/abc", "..", ".hidden", "-x", "sp ace", "x" * 201])
def test_unsafe_names_are_refused(
    registry: SharedMemoryRegistry, segment: SharedMemory, field: str, bad: str
) -> None:
    arguments = {"region": name(ME, "r"), "key": segment.name, field: bad}
    with pytest.raises(InvalidRequest) as error:
        registry.register(TENANT, ME, byte_size=16, **arguments)
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: ")


@pytest.mark.parametrize("field", ["region", "key"])
def test_names_without_the_owners_prefix_are_refused(
    registry: SharedMemoryRegistry, make_segment: SegmentFactory, field: str
) -> None:
    alices = make_segment(ALICE)
    mine = make_segment(ME)
    arguments = {"region": name(ME, "r"), "key": mine.name}
    # Another owner's names, and names outside featmap's altogether.
    for bad in (alices.name if field == "key" else name(ALICE, "r"), "other_program_segment"):
        with pytest.raises(InvalidRequest, match="must start with") as error:
            registry.register(TENANT, ME, byte_size=16, **{**arguments, field: bad})
        assert error.value.field == field
    assert len(registry) == 0


@pytest.mark.parametrize("secret", ["", "short", "a/b" * 8, "x" * 129, "sp ace" * 4])
def test_malformed_secrets_are_refused_unquoted(
    registry: SharedMemoryRegistry, segment: SharedMemory, secret: str
) -> None:
    with pytest.raises(InvalidRequest) as error:
        registry.register(TENANT, secret, name(ME, "r"), segment.name, 16)
    assert error.value.field == "owner"
    assert not secret or secret not in str(error.value)


@pytest.mark.parametrize("byte_size", [0, -1, 4097])
def test_register_byte_size_must_fit_the_segment(
    registry: SharedMemoryRegistry, segment: SharedMemory, byte_size: int
) -> None:
    with pytest.raises(InvalidRequest, match="byte_size") as error:
        register(registry, "r", segment.name, byte_size)
    assert error.value.field == "byte_size"
    assert len(registry) == 0


def test_register_an_unknown_key(registry: SharedMemoryRegistry) -> None:
    with pytest.raises(NotFound) as error:
        register(registry, "r", name(ME, "no_such_segment"), 16)
    assert error.value.field == "key"


@needs_dev_shm
def test_only_regular_files_of_the_servers_user_are_opened(
    registry: SharedMemoryRegistry, segment: SharedMemory
) -> None:
    # A symbolic link with the owner's prefix, pointing at the owner's own segment: refused
    # all the same (O_NOFOLLOW), so a name can never lead elsewhere.
    link = os.path.join(DEV_SHM, name(ME, "link"))
    os.symlink(os.path.join(DEV_SHM, segment.name), link)
    fifo = os.path.join(DEV_SHM, name(ME, "fifo"))
    os.mkfifo(fifo)
    try:
        for key, says in ((name(ME, "link"), "cannot open"), (name(ME, "fifo"), "not a shared")):
            with pytest.raises(InvalidRequest, match=says) as error:
                register(registry, "r", key, 16)
            assert error.value.field == "key"
    finally:
        os.unlink(link)
        os.unlink(fifo)
    assert len(registry) == 0


def test_reregistering_ones_own_region_replaces_it(
    registry: SharedMemoryRegistry, pool: SharedMemoryPool
) -> None:
    images_ref, registrations = pool.images_ref(np.full((3,), 9, dtype=np.float32))
    register_all(registry, pool, registrations)
    bigger = np.full((4096,), 5, dtype=np.float32)
    bigger_ref, grown = pool.images_ref(bigger)  # a new, bigger segment under the same region

    register_all(registry, pool, grown)

    assert len(registry) == 1
    assert bigger_ref.region == images_ref.region
    np.testing.assert_array_equal(read(registry, bigger_ref, "<f4", bigger.shape), bigger)


def test_read_refs_are_checked(registry: SharedMemoryRegistry, segment: SharedMemory) -> None:
    register(registry, "r", segment.name, 1024)
    cases: list[tuple[pb.SharedMemoryRef, tuple[int, ...], type[Exception], str]] = [
        (ref("", 0, 16), (4,), InvalidRequest, "images_region.region"),
        (ref("nope", 0, 16), (4,), NotFound, "images_region.region"),
        (ref("r", 1025, 0), (0,), InvalidRequest, "images_region.offset"),
        (ref("r", 1020, 16), (4,), InvalidRequest, "images_region.byte_size"),
        (ref("r", 0, 2048), (512,), InvalidRequest, "images_region.byte_size"),
        (ref("r", 0, 12), (4,), InvalidTensor, "images_region.byte_size"),
        (ref("r", 0, 16, secret=BOB), (4,), NotFound, "images_region.region"),
    ]
    for bad, shape, error_type, field in cases:
        with pytest.raises(error_type) as error:
            read(registry, bad, "<f4", shape)
        assert error.value.field == field, bad  # type: ignore[attr-defined]
        assert str(error.value).startswith(f"{field}: ")


def test_byte_size_mismatch_says_what_the_shape_needs(
    registry: SharedMemoryRegistry, segment: SharedMemory
) -> None:
    register(registry, "r", segment.name, 1024)
    with pytest.raises(
        InvalidTensor, match=r"is 12; shape \[1, 4\] x 4 bytes \(float32\) needs 16"
    ):
        read(registry, ref("r", 0, 12), "<f4", (1, 4))


def test_write_refs_are_checked(registry: SharedMemoryRegistry, segment: SharedMemory) -> None:
    register(registry, "out", segment.name, 64)
    outputs = [("a", np.zeros(4, np.float32)), ("b", np.zeros(8, np.float32))]  # 16 + 32 bytes

    with pytest.raises(InvalidRequest, match=r"is 40; the outputs need 48 bytes") as error:
        registry.write(TENANT, ref("out", 0, 40), outputs, "output_region")
    assert error.value.field == "output_region.byte_size"
    with pytest.raises(InvalidRequest) as error:
        registry.write(TENANT, ref("out", 32, 48), outputs, "output_region")
    assert error.value.field == "output_region.byte_size"
    for unknown in (ref("other", 0, 48), ref("out", 0, 48, secret=BOB)):
        with pytest.raises(NotFound) as not_found:
            registry.write(TENANT, unknown, outputs, "output_region")
        assert not_found.value.field == "output_region.region"
    assert bytes(buffer(segment)[:64]) == bytes(64)  # nothing written by a refused request


# Leases


def test_a_lease_expires_unless_renewed(
    registry: SharedMemoryRegistry, segment: SharedMemory, clock: FakeClock
) -> None:
    assert register(registry, "r", segment.name, 16) == 30.0
    clock.now += 29
    read(registry, ref("r", 0, 16), "u1", (16,))
    assert registry.renew(TENANT, ME) == 1
    clock.now += 29  # 58 s after registering, 29 s after renewing
    read(registry, ref("r", 0, 16), "u1", (16,))

    clock.now += 1
    assert registry.expire() == 1

    with pytest.raises(NotFound, match=r"lease of '\w+' expired.*RenewSharedMemory") as error:
        read(registry, ref("r", 0, 16), "u1", (16,))
    assert error.value.field == "images_region.region"
    assert len(registry) == 0
    assert registry.renew(TENANT, ME) == 0
    # Registering again brings it back.
    register(registry, "r", segment.name, 16)
    read(registry, ref("r", 0, 16), "u1", (16,))


def test_expiry_is_lazy_on_any_call(
    registry: SharedMemoryRegistry, segment: SharedMemory, clock: FakeClock
) -> None:
    register(registry, "a", segment.name, 16)
    clock.now += 30
    # The next call of any kind forgets it, without expire().
    register(registry, "b", segment.name, 16)
    assert len(registry) == 1
    # Unregistering an expired region of one's own is a quiet no-op.
    assert registry.unregister(TENANT, ME, name(ME, "a")) == 0


def test_renew_extends_only_the_owners_leases(
    registry: SharedMemoryRegistry, make_segment: SegmentFactory, clock: FakeClock
) -> None:
    alices, bobs = make_segment(ALICE), make_segment(BOB)
    register(registry, "a1", alices.name, 16, ALICE)
    register(registry, "a2", alices.name, 16, ALICE)
    register(registry, "b1", bobs.name, 16, BOB)
    clock.now += 20
    assert registry.renew(TENANT, ALICE) == 2
    clock.now += 20
    assert registry.expire() == 1  # bob's
    assert registry.renew(TENANT, BOB) == 0
    assert len(registry) == 2


# Unregister and limits


def test_unregister_by_owner(registry: SharedMemoryRegistry, make_segment: SegmentFactory) -> None:
    alices, bobs = make_segment(ALICE), make_segment(BOB)
    register(registry, "a1", alices.name, 16, ALICE)
    register(registry, "a2", alices.name, 16, ALICE)
    register(registry, "b1", bobs.name, 16, BOB)

    with pytest.raises(InvalidRequest, match="must start with") as refused:
        registry.unregister(TENANT, ALICE, name(BOB, "b1"))  # not a name alice may use
    assert refused.value.field == "region"
    with pytest.raises(NotFound):
        registry.unregister(TENANT, ALICE, name(ALICE, "nope"))
    with pytest.raises(InvalidRequest) as invalid:
        registry.unregister(TENANT, "")
    assert invalid.value.field == "owner"

    assert registry.unregister(TENANT, ALICE) == 2
    assert registry.unregister(TENANT, ALICE) == 0
    assert len(registry) == 1
    read(registry, ref("b1", 0, 16, secret=BOB), "u1", (16,))
    assert registry.unregister(TENANT, BOB, name(BOB, "b1")) == 1
    assert len(registry) == 0


def test_max_regions(registry: SharedMemoryRegistry, make_segment: SegmentFactory) -> None:
    mine, others = make_segment(ME), make_segment(BOB)
    for n in range(4):
        register(registry, f"r{n}", mine.name, 16)

    with pytest.raises(LimitExceeded, match="limit is max_shared_memory_regions=4") as error:
        register(registry, "r4", others.name, 16, BOB)
    assert error.value.field == "region"
    register(registry, "r3", mine.name, 32)  # replacing does not count twice
    registry.unregister(TENANT, ME, name(ME, "r0"))
    register(registry, "r4", others.name, 16, BOB)


def test_regions_belong_to_their_tenant(
    registry: SharedMemoryRegistry, segment: SharedMemory
) -> None:
    registry.register("acme", ME, name(ME, "r"), segment.name, 16)
    at = ref("r", 0, 16)
    # Even with the owner's secret, another tenant sees nothing.
    with pytest.raises(NotFound):
        registry.images("globex", at, np.dtype("u1"), (16,), "images_region")
    with pytest.raises(NotFound):
        registry.write("globex", at, [("a", np.zeros(16, np.uint8))], "output_region")
    assert registry.renew("globex", ME) == 0
    assert registry.unregister("globex", ME) == 0
    registry.images("acme", at, np.dtype("u1"), (16,), "images_region").read()


# Lifetimes: the client owns its segments; the server holds descriptors, never mappings


def test_closing_the_registry_forgets_every_region(
    registry: SharedMemoryRegistry, pool: SharedMemoryPool
) -> None:
    images = np.linspace(0, 1, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    images_ref, registrations = pool.images_ref(images)
    register_all(registry, pool, registrations)
    pending = registry.images(TENANT, images_ref, np.dtype("<f4"), images.shape, "images_region")

    registry.close()
    registry.close()  # twice is fine

    with pytest.raises(NotFound):  # ownership is checked again when the bytes are read
        pending.read()


def test_unregistering_between_admission_and_read(
    registry: SharedMemoryRegistry, segment: SharedMemory
) -> None:
    buffer(segment)[:4] = b"\x01\x02\x03\x04"
    register(registry, "r", segment.name, 16)
    done = read(registry, ref("r", 0, 4), "u1", (4,))
    pending = registry.images(TENANT, ref("r", 0, 4), np.dtype("u1"), (4,), "images_region")

    assert registry.unregister(TENANT, ME) == 1

    np.testing.assert_array_equal(done, [1, 2, 3, 4])
    with pytest.raises(NotFound):
        pending.read()


@needs_dev_shm
def test_a_server_process_exiting_leaves_the_clients_segment(pool: SharedMemoryPool) -> None:
    images = np.arange(12, dtype=np.uint8).reshape(1, 1, 3, 4)
    images_ref, registrations = pool.images_ref(images)
    ((region, key, byte_size),) = registrations
    # A separate server process that opens the segment, reads it, and exits (once without
    # close()): it must neither unlink the segment nor warn at exit.
    server = textwrap.dedent(
        f"""
        import numpy as np
        from featmap.service.shared_memory import SharedMemoryRegistry
        from featmap.v1 import featmap_pb2 as pb
        for close in (True, False):
            registry = SharedMemoryRegistry()
            registry.register("", {pool.secret!r}, {region!r}, {key!r}, {byte_size})
            ref = pb.SharedMemoryRef(
                region={region!r}, offset=0, byte_size=12, owner={pool.secret!r}
            )
            view = registry.images("", ref, np.dtype("u1"), (1, 1, 3, 4), "images_region").read()
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
    # Still usable: a new server reads the same bytes.
    registry = SharedMemoryRegistry()
    try:
        register_all(registry, pool, registrations)
        np.testing.assert_array_equal(read(registry, images_ref, "u1", images.shape), images)
    finally:
        registry.close()


# The pool


@needs_dev_shm
def test_pool_grows_and_cleans_up(registry: SharedMemoryRegistry) -> None:
    pool = SharedMemoryPool(secret="growtest-" + "0" * 16)
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


@needs_dev_shm
def test_names_show_the_owner_id_never_the_secret(pool: SharedMemoryPool) -> None:
    _, registrations = pool.images_ref(np.ones(4, np.uint8))
    ((region, key, _),) = registrations
    assert pool.secret not in region and pool.secret not in key
    assert pool.owner_id in region and pool.owner_id in key
    assert not [f for f in os.listdir(DEV_SHM) if pool.secret in f]


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


@pytest.mark.parametrize("secret", ["", "a/b" * 8, "..", "x" * 8, "x" * 200])
def test_pool_secret_must_be_well_formed(secret: str) -> None:
    with pytest.raises(ValueError, match="secret"):
        SharedMemoryPool(secret=secret)


def test_pool_refuses_dtypes_the_wire_does_not_carry(pool: SharedMemoryPool) -> None:
    with pytest.raises(InvalidTensor, match="float64"):
        pool.images_ref(np.zeros(4))
    with pytest.raises(ValueError, match="byte_size"):
        pool.output_ref(-1)


@needs_dev_shm
def test_a_dropped_pool_unlinks_its_segments() -> None:
    pool = SharedMemoryPool()
    pool.images_ref(np.ones(4, np.uint8))
    owner_id = pool.owner_id
    del pool
    gc.collect()
    assert not [f for f in os.listdir(DEV_SHM) if f.startswith(f"featmap_{owner_id}_")]


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
                copy = read(registry, images_ref, "<f4", images.shape)
                refs = registry.write(TENANT, out_ref, [("y", copy * 2)], "output_region")
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
    shm_server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    server = shm_server
    images = np.random.default_rng(70).random((3, 3, 20, 24), dtype=np.float32)
    with FeatureClient(local(server), shared_memory=True) as shared:
        for _ in range(2):  # the second request reuses the regions and the output size seen
            outputs = shared.extract(images, README_SPEC)
            assert_matches_reference(outputs, readme_pipeline, images)
            # copied out of the region, so the next request cannot change them under the caller
            assert all(array.flags.writeable for array in outputs.values())
        pipeline_id = shared.register(readme_pipeline)
        assert_matches_reference(shared.extract(images, pipeline_id), readme_pipeline, images)
        assert shared._shared is not None
        secret, owner_id = shared._shared.all[0].pool.secret, shared._shared.all[0].pool.owner_id
        assert server.service.shared_memory.renew(TENANT, secret) == 2  # images and outputs
    # Closing the client unregisters its regions on the server and unlinks its segments.
    assert server.service.shared_memory.renew(TENANT, secret) == 0
    if os.path.isdir(DEV_SHM):
        assert not [n for n in os.listdir(DEV_SHM) if owner_id in n]


def test_outputs_too_big_for_the_region_come_inline(
    shm_server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    small = np.random.default_rng(71).random((1, 3, 8, 8), dtype=np.float32)
    big = np.random.default_rng(72).random((4, 3, 64, 64), dtype=np.float32)
    with FeatureClient(local(shm_server), shared_memory=True) as shared:
        shared.extract(small, README_SPEC)  # sizes the output region for tiny outputs
        # conv1 of 4 x 8 x 64 x 64 floats does not fit: the reply carries it instead
        assert_matches_reference(shared.extract(big, README_SPEC), readme_pipeline, big)


def test_an_expired_lease_is_registered_again(
    shm_server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    images = np.random.default_rng(73).random((2, 3, 16, 16), dtype=np.float32)
    with FeatureClient(local(shm_server), shared_memory=True) as shared:
        shared.extract(images, README_SPEC)
        assert shared._shared is not None
        # What the server does when the lease runs out: the regions are gone.
        shm_server.service.shared_memory.unregister(TENANT, shared._shared.all[0].pool.secret)
        assert_matches_reference(shared.extract(images, README_SPEC), readme_pipeline, images)


def test_extract_iter_keeps_requests_in_flight_each_on_segments_of_its_own(
    shm_server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    rng = np.random.default_rng(74)
    batches = [rng.random((n, 3, 12, 12), dtype=np.float32) for n in (3, 1, 4, 2, 5, 1, 2)]
    with FeatureClient(local(shm_server), shared_memory=True, in_flight=3) as shared:
        results = list(shared.extract_iter(batches, README_SPEC))
        for images, outputs in zip(batches, results, strict=True):
            assert_matches_reference(outputs, readme_pipeline, images)
        assert shared._shared is not None
        transports = shared._shared.all
        assert 1 <= len(transports) <= 3  # no more than the requests in flight
        secrets_used = [transport.pool.secret for transport in transports]
        for secret in secrets_used:  # every transport's images and outputs went by its regions
            assert shm_server.service.shared_memory.renew(TENANT, secret) == 2
    for secret in secrets_used:  # closing unregisters them all
        assert shm_server.service.shared_memory.renew(TENANT, secret) == 0


def test_the_async_client_keeps_requests_in_flight_through_shared_memory(
    shm_server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    rng = np.random.default_rng(75)
    batches = [rng.random((n, 3, 10, 10), dtype=np.float32) for n in (2, 3, 1, 4)]

    async def run() -> tuple[list[dict[str, np.ndarray]], list[str]]:
        async with AsyncFeatureClient(local(shm_server), shared_memory=True, in_flight=2) as c:
            results = [outputs async for outputs in c.extract_iter(batches, README_SPEC)]
            assert c._shared is not None
            owners = [transport.pool.secret for transport in c._shared.all]
            for secret in owners:
                assert shm_server.service.shared_memory.renew(TENANT, secret) == 2
            return results, owners

    results, owners = asyncio.run(run())
    assert 1 <= len(owners) <= 2
    for images, outputs in zip(batches, results, strict=True):
        assert_matches_reference(outputs, readme_pipeline, images)
    for secret in owners:
        assert shm_server.service.shared_memory.renew(TENANT, secret) == 0


def test_the_server_says_whether_it_offers_this_caller_shared_memory(
    shm_server: FeatmapServer, server: FeatmapServer
) -> None:
    with FeatureClient(local(shm_server)) as on_socket:
        assert on_socket.server_info().shared_memory
    with FeatureClient(shm_server.address) as over_tcp:  # the same server, not proven local
        assert not over_tcp.server_info().shared_memory
    with FeatureClient(server.address) as off:  # a server started without it
        assert not off.server_info().shared_memory


def test_a_window_wider_than_the_servers_regions_shrinks_to_them(
    readme_pipeline: Pipeline, tmp_path: Any
) -> None:
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        intra_op_threads=1,
        unix_socket=tmp_path / "featmap.sock",
        shared_memory=True,
        max_shared_memory_regions=4,  # two transports' images and outputs
    )
    rng = np.random.default_rng(76)
    batches = [rng.random((2, 3, 8, 8), dtype=np.float32) for _ in range(12)]
    before = featmap_segments()
    with FeatmapServer(settings) as server:
        assert server.unix_address is not None
        with FeatureClient(server.unix_address, shared_memory=True, in_flight=6) as shared:
            results = list(shared.extract_iter(batches, README_SPEC))
            assert shared._shared is not None
            secrets_kept = [transport.pool.secret for transport in shared._shared.all]
            assert len(secrets_kept) == 2  # the third was refused its regions, and dropped
            for secret in secrets_kept:
                assert server.service.shared_memory.renew(TENANT, secret) == 2
        for images, outputs in zip(batches, results, strict=True):
            assert_matches_reference(outputs, readme_pipeline, images)
        for secret in secrets_kept:
            assert server.service.shared_memory.renew(TENANT, secret) == 0

        async def run() -> tuple[list[dict[str, np.ndarray]], int]:  # the asyncio twin too
            address = server.unix_address
            assert address is not None
            async with AsyncFeatureClient(address, shared_memory=True, in_flight=6) as client:
                outputs = [each async for each in client.extract_iter(batches, README_SPEC)]
                assert client._shared is not None
                return outputs, len(client._shared.all)

        async_results, transports = asyncio.run(run())
        assert transports == 2
        for images, outputs in zip(batches, async_results, strict=True):
            assert_matches_reference(outputs, readme_pipeline, images)
    assert featmap_segments() == before  # the dropped transports' segments went with them


def featmap_segments() -> set[str]:
    """featmap's segments in /dev/shm now (none to see without it)."""
    if not os.path.isdir(DEV_SHM):
        return set()
    return {name for name in os.listdir(DEV_SHM) if name.startswith(SEGMENT_PREFIX)}


@needs_dev_shm
def test_a_full_dev_shm_is_an_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("featmap.client.shared_memory.os.posix_fallocate", full)
    with SharedMemoryPool() as pool:
        with pytest.raises(OSError, match="/dev/shm has no room for 8192 bytes"):
            pool.images_ref(np.zeros((2, 1024), np.float32))
        assert pool_files(pool) == []  # the segment that could not be reserved is gone
        assert pool.registrations() == []


def test_raw_requests_with_bad_regions_name_the_field(shm_server: FeatmapServer) -> None:
    channel = grpc.insecure_channel(local(shm_server))
    stub = pb_grpc.FeatureExtractorStub(channel)
    with SharedMemoryPool() as pool:
        images = np.zeros((1, 3, 8, 8), np.float32)
        ref, registrations = pool.images_ref(images)
        for region, key, size in registrations:
            stub.RegisterSharedMemory(
                pb.RegisterSharedMemoryRequest(
                    region=region, key=key, byte_size=size, owner=pool.secret
                )
            )
        header = pb.Tensor(dtype=pb.FLOAT32, shape=[1, 3, 8, 8])
        cases = [
            # the region's bytes do not match the shape
            (
                pb.SharedMemoryRef(
                    region=ref.region, offset=0, byte_size=ref.byte_size - 4, owner=pool.secret
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "images_region.byte_size",
            ),
            # past the end of the region
            (
                pb.SharedMemoryRef(
                    region=ref.region, offset=1 << 20, byte_size=ref.byte_size, owner=pool.secret
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "images_region.offset",
            ),
            # a region nobody registered
            (
                pb.SharedMemoryRef(
                    region="nobody", offset=0, byte_size=ref.byte_size, owner=pool.secret
                ),
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
        stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(owner=pool.secret))
    channel.close()
