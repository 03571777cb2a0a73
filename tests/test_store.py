"""The pipeline store: registrations outlive the server and are shared by replicas on one store.

Real servers (in process, and a `featmap serve` subprocess killed with SIGKILL) on one store
directory or one fsspec memory:// store; results checked against the NumPy reference.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from featmap.client import FeatmapRpcError, FeatureClient
from featmap.contract.limits import DEFAULT_LIMITS
from featmap.contract.spec import parse_pipeline
from featmap.oip import grpc_predict_v2_pb2 as oip
from featmap.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from featmap.service.security import DEFAULT_TENANT
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings, default_pipeline_store
from featmap.service.store import (
    LAYOUT,
    DamagedEntry,
    PipelineStore,
    StoredEntry,
    decode_entry,
    encode_entry,
    tenant_key,
)
from featmap.v1 import featmap_pb2 as pb
from featmap.v1 import featmap_pb2_grpc as pb_grpc
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_cli import clean_env, featmap_serve, free_port, run_featmap
from tests.test_registry import TENSOR_SPEC, make_tensors

REFRESH_S = 0.5
TENSOR_PIPELINE = parse_pipeline(TENSOR_SPEC)
README_PIPELINE = parse_pipeline(README_SPEC)


def images(seed: int = 0) -> np.ndarray:
    """Two 3-channel 12x12 float32 images."""
    return np.random.default_rng(seed).standard_normal((2, 3, 12, 12)).astype(np.float32)


def settings(store: str | Path, **overrides: Any) -> ServerSettings:
    """A small server on 127.0.0.1:0 keeping its pipelines in `store`."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "intra_op_threads": 1,
        "grpc_workers": 4,
        "pipeline_store": str(store),
        "store_refresh_s": REFRESH_S,
        **overrides,
    }
    return ServerSettings(**values)


def connect(server: FeatmapServer) -> FeatureClient:
    """A client of `server`."""
    return FeatureClient(server.address, timeout=60)


def code(call: Any) -> grpc.StatusCode:
    """The status a client call fails with."""
    with pytest.raises(FeatmapRpcError) as refused:
        call()
    return refused.value.code


def entry_files(store: Path) -> list[Path]:
    """Every entry file in a store directory."""
    return sorted(store.rglob("*.entry"))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An empty store directory of the test's own."""
    return tmp_path / "store"


@pytest.fixture
def pair(store: Path) -> Iterator[tuple[FeatmapServer, FeatmapServer]]:
    """Two servers, A and B, on one store directory."""
    with FeatmapServer(settings(store)) as a, FeatmapServer(settings(store)) as b:
        yield a, b


# --------------------------------------------------------------------------- replicas, restarts


def test_registered_on_a_served_by_b_and_after_a_restart(
    store: Path, pair: tuple[FeatmapServer, FeatmapServer]
) -> None:
    a, b = pair
    tensors = make_tensors(seed=3)
    batch = images()
    with connect(a) as on_a, connect(b) as on_b:
        pipeline_id = on_a.register(
            TENSOR_SPEC, tensors, name="edges", batching={"max_batch_size": 5}
        )
        # Written whole before the answer: B reads it through, by id and by name.
        assert_matches_reference(on_b.extract(batch, pipeline_id), TENSOR_PIPELINE, batch, tensors)
        assert_matches_reference(on_b.extract(batch, "edges"), TENSOR_PIPELINE, batch, tensors)
        info = on_b.get_pipeline("edges")
        assert (info.pipeline_id, info.names, info.weight_names) == (
            pipeline_id,
            ["edges"],
            ["conv1.b", "conv1.w"],
        )
        assert info.batching["max_batch_size"] == 5  # the policy travels with the entry
        assert [p.pipeline_id for p in on_b.list_pipelines()] == [pipeline_id]
    a.stop()
    with FeatmapServer(settings(store)) as restarted, connect(restarted) as again:
        out = again.extract(batch, "edges")
        assert_matches_reference(out, TENSOR_PIPELINE, batch, tensors)
        assert again.get_pipeline(pipeline_id).names == ["edges"]


def test_deleted_on_b_is_refused_by_a_within_the_bound(
    pair: tuple[FeatmapServer, FeatmapServer],
) -> None:
    a, b = pair
    batch = images(1)
    with connect(a) as on_a, connect(b) as on_b:
        pipeline_id = on_a.register(README_SPEC, name="readme")
        assert_matches_reference(on_a.extract(batch, "readme"), README_PIPELINE, batch)
        on_b.extract(batch, pipeline_id)  # B has it in memory too
        assert on_b.delete_pipeline("readme")
        # The bound: A's view of the store is at most store_refresh_s old once this has passed.
        time.sleep(REFRESH_S)
        for key in (pipeline_id, "readme"):
            assert code(lambda k=key: on_a.extract(batch, k)) == grpc.StatusCode.NOT_FOUND
            assert code(lambda k=key: on_a.get_pipeline(k)) == grpc.StatusCode.NOT_FOUND
        assert on_a.list_pipelines() == []
        # Registering it again brings it back on both.
        assert on_b.register(README_SPEC, name="readme") == pipeline_id
        assert_matches_reference(on_a.extract(batch, "readme"), README_PIPELINE, batch)


def test_a_name_moved_on_b_is_followed_by_a_within_the_bound(
    pair: tuple[FeatmapServer, FeatmapServer],
) -> None:
    a, b = pair
    batch = images(2)
    tensors = make_tensors(seed=4)
    with connect(a) as on_a, connect(b) as on_b:
        on_a.register(README_SPEC, name="current")
        assert_matches_reference(on_a.extract(batch, "current"), README_PIPELINE, batch)
        with pytest.raises(FeatmapRpcError) as taken:
            on_b.register(TENSOR_SPEC, tensors, name="current")  # B sees A's name
        assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS
        moved = on_b.register(TENSOR_SPEC, tensors, name="current", replace=True)
        time.sleep(REFRESH_S)
        assert on_a.get_pipeline("current").pipeline_id == moved
        out = on_a.extract(batch, "current")
        assert_matches_reference(out, TENSOR_PIPELINE, batch, tensors)


def test_the_same_content_registered_on_both_at_once(
    store: Path, pair: tuple[FeatmapServer, FeatmapServer]
) -> None:
    ids: list[str] = []

    def register(server: FeatmapServer) -> None:
        with FeatureClient(server.address, timeout=60) as client:
            ids.append(client.register(TENSOR_SPEC, make_tensors(seed=5), name="same"))

    threads = [threading.Thread(target=register, args=(s,)) for s in pair for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 4 and len(set(ids)) == 1
    [entry] = entry_files(store)
    assert entry.name == f"{ids[0]}.entry"
    assert not [p for p in store.rglob(".*") if p.is_file()]  # no temporary file left
    batch = images(3)
    with FeatmapServer(settings(store)) as fresh, connect(fresh) as client:
        out = client.extract(batch, "same")
    assert_matches_reference(out, TENSOR_PIPELINE, batch, make_tensors(seed=5))


def test_calls_at_once_on_a_replica_that_never_saw_the_pipeline(
    pair: tuple[FeatmapServer, FeatmapServer],
) -> None:
    a, b = pair
    tensors = make_tensors(seed=15)
    with connect(a) as on_a:
        pipeline_id = on_a.register(TENSOR_SPEC, tensors)
    results: dict[int, dict[str, np.ndarray] | BaseException] = {}

    def extract(seed: int) -> None:
        try:
            with connect(b) as on_b:
                results[seed] = on_b.extract(images(seed), pipeline_id)
        except BaseException as exc:  # reported below, with the seed
            results[seed] = exc

    threads = [threading.Thread(target=extract, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed, out in sorted(results.items()):
        assert isinstance(out, dict), (seed, out)
        assert_matches_reference(out, TENSOR_PIPELINE, images(seed), tensors)
    assert len(results) == 8 and len(b.service.registry) == 1


def test_int8_registrations_keep_their_calibration(
    pair: tuple[FeatmapServer, FeatmapServer],
) -> None:
    from tests.test_int8 import CALIBRATION, SPEC

    a, b = pair
    batch = np.random.default_rng(4).random((2, 3, 16, 16), dtype=np.float32)
    with connect(a) as on_a, connect(b) as on_b:
        pipeline_id = on_a.register(SPEC, calibration=CALIBRATION)
        on_b_info = on_b.get_pipeline(pipeline_id)  # calibrated again from the stored images
        assert on_b_info.int8 == on_a.get_pipeline(pipeline_id).int8
        got, want = on_b.extract(batch, pipeline_id), on_a.extract(batch, pipeline_id)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_a_listing_describes_stored_pipelines_without_compiling_them_page_by_page(
    store: Path, pair: tuple[FeatmapServer, FeatmapServer]
) -> None:
    from tests.test_int8 import CALIBRATION, SPEC
    from tests.test_registry import small_spec

    a, b = pair
    specs = [small_spec(seed) for seed in range(5)]
    with connect(a) as on_a, connect(b) as on_b:
        ids = sorted(
            [on_a.register(spec) for spec in specs] + [on_a.register(SPEC, calibration=CALIBRATION)]
        )
        described = {i: on_a.get_pipeline(i) for i in ids}
        # B holds none of them: its listing reads them from the store, compiles none (so
        # evicts nobody's sessions), and says so; the int8 report comes once one is used.
        stub = pb_grpc.FeatureExtractorStub(grpc.insecure_channel(b.address))
        pages, token = [], ""
        while True:
            reply = stub.ListPipelines(pb.ListPipelinesRequest(page_size=2, page_token=token))
            pages.append([info.pipeline_id for info in reply.pipelines])
            token = reply.next_page_token
            if not token:
                break
        assert pages == [ids[0:2], ids[2:4], ids[4:6]]
        listed = on_b.list_pipelines(page_size=4)
        assert [info.pipeline_id for info in listed] == ids
        for info in listed:
            want = described[info.pipeline_id]
            assert not info.loaded and want.loaded
            assert (info.spec, info.outputs, info.weight_names, info.batching, info.precision) == (
                want.spec, want.outputs, want.weight_names, want.batching, want.precision
            )  # fmt: skip
            assert (info.int8 is None) and (want.int8 is None) == (want.precision == "float32")
        int8_id = next(i for i in ids if described[i].precision == "int8")
        batch = np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)
        on_b.extract(batch, int8_id)
        after = {info.pipeline_id: info for info in on_b.list_pipelines()}
        assert [i for i in ids if after[i].loaded] == [int8_id]
        assert after[int8_id].int8 == described[int8_id].int8
        for field, request in (
            ("page_token", pb.ListPipelinesRequest(page_token="../../etc/passwd")),
            ("page_size", pb.ListPipelinesRequest(page_size=-1)),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListPipelines(request)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert dict(refused.value.trailing_metadata())["featmap-field"] == field
        assert [info.pipeline_id for info in on_b.list_pipelines()] == ids  # still serving


def test_a_listing_page_stops_at_its_read_budget(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featmap.service import registry as registry_module
    from tests.test_registry import small_spec

    with FeatmapServer(settings(store)) as a, connect(a) as on_a:
        ids = sorted(on_a.register(small_spec(seed)) for seed in range(3))
    # A fresh server: every entry is read from the store, each more than the whole budget.
    monkeypatch.setattr(registry_module, "LIST_READ_BYTES", 1)
    with FeatmapServer(settings(store)) as b:
        page, after = b.service.registry.list(DEFAULT_TENANT, limit=100)
        assert ([d.pipeline_id for d in page], after) == ([ids[0]], ids[0])
        page, after = b.service.registry.list(DEFAULT_TENANT, after=after, limit=100)
        assert ([d.pipeline_id for d in page], after) == ([ids[1]], ids[1])
        with connect(b) as on_b:
            assert [info.pipeline_id for info in on_b.list_pipelines()] == ids


def test_an_entry_keeps_the_spec_text_that_passed_max_spec_bytes(store: Path) -> None:
    # 12 minimal convs: about 1 KiB as sent, twice that as canonical JSON (defaults filled in).
    layer = {"op": "conv2d", "filters": 3, "kernel_size": 1}
    spec = {
        "input": {"channels": 3},
        "layers": [{**layer, "weights": {"init": "he_normal", "seed": i}} for i in range(12)],
    }
    text = json.dumps(spec, separators=(",", ":"))
    pipeline = parse_pipeline(spec)
    assert len(text) <= 2048 < len(pipeline.canonical_json())
    batch = images(12)
    small = settings(store, max_spec_bytes=2048)
    with (
        FeatmapServer(small) as a,
        FeatmapServer(small) as b,
        connect(a) as on_a,
        connect(b) as on_b,
    ):
        pipeline_id = on_a.register(text)
        assert_matches_reference(on_b.extract(batch, pipeline_id), pipeline, batch)


@pytest.mark.parametrize(
    "bound",
    [
        {"max_registered_pipelines": 1},
        # Each of the two sessions is estimated at just over 1 MiB (contract.limits).
        {"registry_bytes": 2 * 1024 * 1024},
    ],
    ids=["count", "bytes"],
)
def test_a_full_cache_evicts_what_the_store_keeps(store: Path, bound: dict[str, int]) -> None:
    batch = images(5)
    one_kept = settings(store, **bound)
    with FeatmapServer(one_kept) as server, connect(server) as client:
        first = client.register(README_SPEC)
        second = client.register(TENSOR_SPEC, make_tensors(seed=6))
        assert len(server.service.registry) == 1  # the first was evicted, not refused
        assert_matches_reference(client.extract(batch, first), README_PIPELINE, batch)
        out = client.extract(batch, second)
        assert_matches_reference(out, TENSOR_PIPELINE, batch, make_tensors(seed=6))
        assert sorted(p.pipeline_id for p in client.list_pipelines()) == sorted([first, second])


# --------------------------------------------------------------------------- whole or absent


def test_damaged_entries_are_logged_and_skipped(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FeatmapServer(settings(store)) as server, connect(server) as client:
        kept = client.register(README_SPEC)
        flipped = client.register(TENSOR_SPEC, make_tensors(seed=7))
        truncated = client.register(TENSOR_SPEC, make_tensors(seed=8), name="cut")
    files = {p.stem: p for p in entry_files(store)}
    data = bytearray(files[flipped].read_bytes())
    data[len(data) // 2] ^= 0x01
    files[flipped].write_bytes(bytes(data))
    files[truncated].write_bytes(files[truncated].read_bytes()[:-100])
    batch = images(6)
    caplog.set_level(logging.WARNING, logger="featmap.store")
    with FeatmapServer(settings(store)) as fresh, connect(fresh) as client:
        assert [p.pipeline_id for p in client.list_pipelines()] == [kept]
        assert_matches_reference(client.extract(batch, kept), README_PIPELINE, batch)
        for key in (flipped, truncated, "cut"):
            assert code(lambda k=key: client.extract(batch, k)) == grpc.StatusCode.NOT_FOUND
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for damaged in (flipped, truncated):
        assert f"skipped entry {damaged} at {files[damaged]}: its SHA-256 does not match" in logged
    assert kept not in logged


def test_an_entry_whose_content_is_not_its_id_is_skipped(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FeatmapServer(settings(store)) as server, connect(server) as client:
        one = client.register(TENSOR_SPEC, make_tensors(seed=9))
        other = client.register(TENSOR_SPEC, make_tensors(seed=10))
    # A whole, well-formed file under another pipeline's id: its digest is right, its content
    # hash is not.
    paths = {p.stem: p for p in entry_files(store)}
    paths[one].write_bytes(paths[other].read_bytes())
    caplog.set_level(logging.WARNING, logger="featmap.store")
    with FeatmapServer(settings(store)) as fresh, connect(fresh) as client:
        assert code(lambda: client.get_pipeline(one)) == grpc.StatusCode.NOT_FOUND
        assert client.get_pipeline(other).pipeline_id == other
    assert f"skipped entry {one} at {paths[one]}: its content hashes to {other}" in caplog.text


def test_sigkill_mid_registration_leaves_entries_whole_or_absent(tmp_path: Path) -> None:
    store = tmp_path / "store"
    # Big weights (about 13 MB an entry), so that writes take long enough to be caught in.
    spec = {**TENSOR_SPEC, "input": {"channels": 3}}
    spec["layers"] = [dict(spec["layers"][0], filters=512, kernel_size=3), {"op": "relu"}]
    spec["layers"][0]["weights"] = {"tensor": "w"}
    spec["layers"][0].pop("bias")
    spec["outputs"] = ["conv1"]
    shape = (512, 3, 3, 3)
    answered: list[tuple[str, np.ndarray]] = []
    args = ("--port", "0", "--threads", "1", "--pipeline-store", str(store))
    with featmap_serve(*args, env=clean_env(FEATMAP_STORE_REFRESH_S=str(REFRESH_S))) as serving:
        address = f"127.0.0.1:{serving.wait_listening()}"

        def register_many() -> None:
            with FeatureClient(address, timeout=60, retries=0) as client:
                for seed in range(1000):
                    weights = np.random.default_rng(seed).standard_normal(shape) * 1e-3
                    try:
                        pipeline_id = client.register(spec, {"w": weights.astype(np.float32)})
                    except FeatmapRpcError:
                        return  # killed
                    answered.append((pipeline_id, weights.astype(np.float32)))

        registering = threading.Thread(target=register_many, daemon=True)
        registering.start()
        # Kill as a temporary file is being written, once a few entries were answered.
        deadline = time.monotonic() + 60
        caught = False
        while time.monotonic() < deadline and not caught:
            caught = len(answered) >= 2 and any(store.rglob(".*.tmp"))
        serving.process.send_signal(signal.SIGKILL)
        serving.process.wait(timeout=10)
        registering.join(timeout=30)
    assert len(answered) >= 2
    pipeline = parse_pipeline(spec)
    batch = images(7)
    with FeatmapServer(settings(store)) as restarted, connect(restarted) as client:
        listed = {p.pipeline_id for p in client.list_pipelines()}
        # Every answered registration is there, whole; an unanswered one whole or absent.
        assert {i for i, _ in answered} <= listed
        assert len(listed - {i for i, _ in answered}) <= 1
        for pipeline_id, weights in answered[-2:]:
            out = client.extract(batch, pipeline_id)
            assert_matches_reference(out, pipeline, batch, {"w": weights})
    # Only entries are listed: a temporary file of the killed write is never one.
    assert len(entry_files(store)) == len(listed)


# --------------------------------------------------------------------------- bounded and owned


def test_a_full_tenant_is_refused_and_others_are_not(tmp_path: Path) -> None:
    store = tmp_path / "store"
    batch = images(8)
    tokens = "alice:alice-token,bob:bob-token"
    # One README entry (no tensors: a few hundred bytes) fits; two tensor entries do not.
    limited = settings(store, auth_tokens=tokens, store_tenant_bytes=1024)
    with FeatmapServer(limited) as server:
        alice = FeatureClient(server.address, token="alice-token", timeout=60)
        bob = FeatureClient(server.address, token="bob-token", timeout=60)
        with alice, bob:
            alices = alice.register(README_SPEC, name="mine")
            before = sorted(store.rglob("*"))
            with pytest.raises(FeatmapRpcError) as full:
                alice.register(TENSOR_SPEC, make_tensors(seed=11))
            assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "store_tenant_bytes=1024" in full.value.details
            assert sorted(store.rglob("*")) == before  # nothing written
            assert bob.register(README_SPEC, name="mine") == alices  # bob's share is his own
            # Tenants see only their own, through every RPC: bob's delete leaves alice's.
            assert bob.delete_pipeline("mine")
            time.sleep(REFRESH_S)
            assert_matches_reference(alice.extract(batch, "mine"), README_PIPELINE, batch)
            assert [p.names for p in alice.list_pipelines()] == [["mine"]]
            assert bob.list_pipelines() == []
            for call in (
                lambda: bob.get_pipeline(alices),
                lambda: bob.extract(batch, alices),
                lambda: bob.extract(batch, "mine"),
            ):
                assert code(call) == grpc.StatusCode.NOT_FOUND
            with grpc.insecure_channel(server.address) as channel:
                stub = oip_grpc.GRPCInferenceServiceStub(channel)
                request = oip.ModelMetadataRequest(name=alices)
                with pytest.raises(grpc.RpcError) as hidden:
                    stub.ModelMetadata(request, metadata=[("authorization", "Bearer bob-token")])
                assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
                metadata = stub.ModelMetadata(
                    request, metadata=[("authorization", "Bearer alice-token")]
                )
                assert metadata.name == alices
    # Tenant folders are hashes of the tenants' names; folders 0700, files 0600.
    tenants = sorted(p.name for p in (store / LAYOUT).iterdir())
    assert tenants == sorted([tenant_key("alice"), tenant_key("bob")])
    for path in [store, *store.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_a_store_that_cannot_be_written_is_unavailable_and_nothing_is_kept(store: Path) -> None:
    with FeatmapServer(settings(store)) as server, connect(server) as client:
        # The tenant's folder is a file: every write and listing in it fails.
        tenant = store / LAYOUT / tenant_key(DEFAULT_TENANT)
        tenant.parent.mkdir(parents=True)
        tenant.write_bytes(b"")
        with pytest.raises(FeatmapRpcError) as refused:
            client.register(README_SPEC)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert refused.value.field == "pipeline_store"
        assert str(store) not in refused.value.details  # the location stays in the log
        assert len(server.service.registry) == 0


def test_serve_names_a_store_it_cannot_create(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_bytes(b"")
    result = run_featmap("serve", "--port", "0", "--pipeline-store", str(blocked / "store"))
    assert result.returncode == 2
    assert f"pipeline_store='{blocked / 'store'}' cannot be used" in result.stderr


def test_ids_and_names_never_become_paths(store: Path) -> None:
    batch = images(9)
    with FeatmapServer(settings(store)) as server, connect(server) as client:
        for key in ("../../../etc/passwd", "a/b", "..", "%2e%2e"):
            assert code(lambda k=key: client.extract(batch, k)) == grpc.StatusCode.NOT_FOUND
    assert not (store / LAYOUT).exists() or not any((store / LAYOUT).rglob("*.entry"))


# --------------------------------------------------------------------------- the file format


def test_entry_round_trip_and_every_damage_is_named() -> None:
    from tests.test_int8 import CALIBRATION

    tensors = make_tensors(seed=12)
    entry = StoredEntry(TENSOR_PIPELINE.canonical_json(), tensors, CALIBRATION, None)
    data = encode_entry(entry)
    back = decode_entry(data, DEFAULT_LIMITS)
    assert back.spec_json == entry.spec_json and back.batching is None
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(back.tensors[name], tensor)
    assert back.calibration is not None
    np.testing.assert_array_equal(back.calibration, CALIBRATION)
    for damaged, why in (
        (data[:-1], "SHA-256"),
        (data[:10], "not an entry file"),
        (b"x" * len(data), "not an entry file"),
        (data[:40] + bytes([data[40] ^ 1]) + data[41:], "SHA-256"),
    ):
        with pytest.raises(DamagedEntry, match=why):
            decode_entry(damaged, DEFAULT_LIMITS)


def test_store_files_are_read_no_further_than_the_request_limits(tmp_path: Path) -> None:
    limits = DEFAULT_LIMITS
    store = PipelineStore(str(tmp_path), 1 << 40, limits)
    pipeline_id = "0" * 32
    path = tmp_path / store.entry_path("t", pipeline_id)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as big:
        big.truncate(store.entry_limit + 1)  # sparse: no disk used
    with pytest.raises(DamagedEntry, match=f"over the {store.entry_limit}"):
        store.get("t", pipeline_id)


# --------------------------------------------------------------------------- settings, fsspec


def test_the_default_store_is_in_the_user_data_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "/data/here")
    assert default_pipeline_store() == "/data/here/featmap/pipelines"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_pipeline_store() == os.path.expanduser("~/.local/share/featmap/pipelines")
    monkeypatch.delenv("FEATMAP_PIPELINE_STORE")
    assert ServerSettings().pipeline_store == default_pipeline_store()
    assert ServerSettings(pipeline_store="none").pipeline_store is None


def test_an_fsspec_memory_store_is_shared_by_two_servers() -> None:
    pytest.importorskip("fsspec")
    url = f"memory://featmap-{uuid.uuid4().hex}"
    batch = images(10)
    tensors = make_tensors(seed=13)
    with (
        FeatmapServer(settings(url)) as a,
        FeatmapServer(settings(url)) as b,
        connect(a) as on_a,
        connect(b) as on_b,
    ):
        pipeline_id = on_a.register(TENSOR_SPEC, tensors, name="remote")
        out = on_b.extract(batch, "remote")
        assert_matches_reference(out, TENSOR_PIPELINE, batch, tensors)
        assert on_a.delete_pipeline(pipeline_id)
        time.sleep(REFRESH_S)
        assert code(lambda: on_b.extract(batch, "remote")) == grpc.StatusCode.NOT_FOUND


# Where CI puts moto's S3-compatible server, in a venv of its own (.ci/run).
MOTO_SERVER = Path(
    os.environ.get(
        "FEATMAP_MOTO_SERVER", Path(__file__).parent.parent / ".venv-moto" / "bin" / "moto_server"
    )
)


@pytest.fixture
def s3_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An s3:// store URL on a local moto_server, its bucket made; skips where none can run."""
    s3fs = pytest.importorskip("s3fs", reason='s3fs is missing: pip install ".[store-fsspec]"')
    if not MOTO_SERVER.exists():
        pytest.skip(
            f"no moto_server at {MOTO_SERVER}: python3 -m venv .venv-moto && "
            ".venv-moto/bin/pip install 'moto[server]' (or set FEATMAP_MOTO_SERVER)"
        )
    port = free_port()
    command = [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as moto:
        try:
            deadline = time.monotonic() + 20
            while moto.poll() is None and time.monotonic() < deadline:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.1)
            else:
                pytest.skip(f"moto_server did not start on port {port}")
            for variable, value in {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "featmap-test",
                "AWS_SECRET_ACCESS_KEY": "featmap-test",
                "AWS_DEFAULT_REGION": "us-east-1",
            }.items():
                monkeypatch.setenv(variable, value)
            bucket = f"featmap-{uuid.uuid4().hex[:12]}"
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
            yield f"s3://{bucket}/pipelines"
        finally:
            moto.terminate()
            moto.wait(timeout=10)


def test_an_s3_store_on_a_local_s3_server(s3_store: str, caplog: pytest.LogCaptureFixture) -> None:
    import s3fs

    batch = images(11)
    tensors = make_tensors(seed=14)
    caplog.set_level(logging.WARNING, logger="featmap.store")
    with (
        FeatmapServer(settings(s3_store)) as a,
        FeatmapServer(settings(s3_store)) as b,
        connect(a) as on_a,
        connect(b) as on_b,
    ):
        pipeline_id = on_a.register(TENSOR_SPEC, tensors, name="in-s3")
        damaged = on_a.register(README_SPEC)
        assert_matches_reference(on_b.extract(batch, "in-s3"), TENSOR_PIPELINE, batch, tensors)
        # A flipped byte in an object B has not read yet: skipped and logged, never served.
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        [key] = [k for k in fs.find(s3_store) if k.endswith(f"{damaged}.entry")]
        data = bytearray(fs.cat_file(key))
        data[-1] ^= 0x01
        fs.pipe_file(key, bytes(data))
        assert code(lambda: on_b.get_pipeline(damaged)) == grpc.StatusCode.NOT_FOUND
        assert f"skipped entry {damaged} at {s3_store}/" in caplog.text
        assert on_b.delete_pipeline("in-s3")
        time.sleep(REFRESH_S)
        assert code(lambda: on_a.extract(batch, pipeline_id)) == grpc.StatusCode.NOT_FOUND
