"""Pipelines registered once (spec + weight tensors), compiled and warmed, kept by id."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..contract.errors import (
    AlreadyExists,
    Busy,
    FeatmapError,
    InvalidSpec,
    LimitExceeded,
    NotFound,
)
from ..contract.limits import DEFAULT_LIMITS, session_memory
from ..contract.names import PIPELINE_ID_PATTERN, PIPELINE_NAME_PATTERN
from ..contract.ops import (
    layer_costs,
    symbolic_shapes,
)
from ..contract.spec import Pipeline, WeightTensors, content_id, parse_pipeline
from ..contract.tensors import batch_shape
from .batching import BatchingPolicy
from .budget import UNBOUNDED, MemoryBudget
from .runtime import CompiledPipeline, SessionCache
from .security import DEFAULT_TENANT
from .store import DamagedEntry, PipelineStore, StoredEntry, encode_entry
from .weights import check_tensors

log = logging.getLogger("featmap.store")

MAX_WARMUP_SIZE = 4096
# ListPipelines pages: pipelines a reply (when the request names none, and at most), and the
# bytes of store entries one reply reads at most (it verifies them; it compiles none), so that
# no listing costs more than a bounded read, whatever a tenant keeps in the store.
LIST_PAGE_DEFAULT = 100
LIST_PAGE_MAX = 1000
LIST_READ_BYTES = 256 << 20


def output_shapes(pipeline: Pipeline) -> dict[str, list[int | str]]:
    """The requested outputs' per-image shapes, with symbolic dimensions."""
    shapes = symbolic_shapes(pipeline)
    return {name: shapes[name] for name in pipeline.output_names}


@dataclass(frozen=True)
class Described:
    """What GetPipeline and ListPipelines say of a pipeline: from memory, with its compiled
    session, or read from the store and verified without compiling it (compiled None)."""

    pipeline_id: str
    pipeline: Pipeline
    weight_names: tuple[str, ...]
    batching: BatchingPolicy | None  # None: the server's default
    output_shapes: dict[str, list[int | str]]
    compiled: CompiledPipeline | None


@dataclass(frozen=True)
class RegisteredPipeline:
    """A registered pipeline: its compiled session, weights' names, batching and outputs."""

    compiled: CompiledPipeline
    weight_names: tuple[str, ...]
    batching: BatchingPolicy | None  # None: the server's default
    output_shapes: dict[str, list[int | str]]

    @property
    def pipeline_id(self) -> str:
        """The content id: spec and weight tensors."""
        return self.compiled.pipeline_id

    def described(self) -> Described:
        """As GetPipeline and ListPipelines describe it."""
        return Described(
            self.pipeline_id,
            self.compiled.pipeline,
            self.weight_names,
            self.batching,
            self.output_shapes,
            self.compiled,
        )


def smallest_image(pipeline: Pipeline) -> tuple[int, int]:
    """The smallest square image every layer gives a non-empty output for."""
    low, high = 1, MAX_WARMUP_SIZE
    if not _fits(pipeline, high):
        raise InvalidSpec("layers", f"no image up to {high}x{high} gives every layer an output")
    while low < high:  # output sizes grow with the input: bisect
        middle = (low + high) // 2
        low, high = (low, middle) if _fits(pipeline, middle) else (middle + 1, high)
    return low, low


def _fits(pipeline: Pipeline, size: int) -> bool:
    try:
        layer_costs(pipeline, size, size)
    except InvalidSpec:
        return False
    return True


def warm_up(compiled: CompiledPipeline) -> None:
    """Run once on the smallest valid image so the first real request pays no start-up."""
    pipeline = compiled.pipeline
    height, width = smallest_image(pipeline)
    shape = batch_shape(pipeline.input.layout, 1, pipeline.input.channels, height, width)
    compiled.run(np.zeros(shape, dtype=pipeline.input.dtype))


@dataclass(frozen=True)
class _Built:
    """A compiled, warm pipeline not yet kept, with the budget bytes it reserved."""

    registered: RegisteredPipeline
    reserved: int  # registry_bytes reserved for the build (0: it shares a session)
    steady: int  # what keeping it costs once built


class PipelineRegistry:
    """Registered pipelines by tenant and id; registering the same thing again is a no-op.

    Names are aliases within a tenant: a name addresses exactly one pipeline (`resolve` turns a
    name or an id into the id), a pipeline may have several, and a name moves to another
    pipeline only when the registration says `replace`.

    Each tenant sees only its own entries: another tenant's id reads as unknown. Tenants that
    register the same content share one compiled session (each entry keeps its own batching),
    and deleting one tenant's entry leaves the others'. Bounded by a count of entries
    (`max_pipelines`) and by bytes (`budget_bytes`, the `registry_bytes` setting) over all
    tenants: a build reserves its estimated peak first, and each distinct session is charged
    its steady estimate once, however many tenants share it.

    With a `store` (service/store.py), the store is the registry and memory its cache:
    registering writes the entry before answering; a miss in memory reads the entry through
    (verified, compiled, warmed, kept); when memory is full (count or bytes), the least recently
    used compiled entries are evicted, since the store still holds them, instead of refusing.
    Names and the set of ids are re-read from the store when a tenant's view is older than
    `refresh_s` (checked on each call, no background thread): a name moved or a pipeline
    deleted on another replica is seen within `refresh_s`, and a deleted pipeline is not served
    past it. Without a store, entries live in memory only and a full registry refuses.
    """

    def __init__(
        self,
        cache: SessionCache,
        max_pipelines: int,
        budget_bytes: int = UNBOUNDED,
        max_names: int = DEFAULT_LIMITS.max_names_per_pipeline,
        store: PipelineStore | None = None,
        admit: Callable[[StoredEntry], Pipeline] = lambda entry: parse_pipeline(entry.spec_json),
        refresh_s: float = 2.0,
    ) -> None:
        self.cache = cache
        self.max_pipelines = max_pipelines
        self.max_names = max_names
        self.budget = MemoryBudget("registry_bytes", budget_bytes)
        self.store = store
        # Turns a stored spec into an admitted pipeline, under this server's limits.
        self.admit = admit
        self.refresh_s = refresh_s
        # Least recently used first (evicted first when a store holds every entry).
        self._pipelines: OrderedDict[tuple[str, str], RegisteredPipeline] = OrderedDict()
        self._compiling: set[tuple[str, str]] = set()  # entries holding a slot while building
        self._names: dict[tuple[str, str], str] = {}  # (tenant, name) -> pipeline id
        self._lock = threading.Condition()
        # With a store: per tenant, when its view (ids and names) was last read, and its ids.
        self._checked: dict[str, float] = {}
        self._stored: dict[str, set[str]] = {}
        # Entries found damaged, by when: not read again (nor logged again) for refresh_s.
        self._damaged: dict[tuple[str, str], float] = {}
        # Per tenant: store writes, deletes and view refreshes of one tenant, one at a time.
        self._tenant_locks: dict[str, threading.RLock] = {}

    # ------------------------------------------------------------------ registering

    def register(
        self,
        pipeline: Pipeline,
        tensors: WeightTensors,
        batching: BatchingPolicy | None,
        tenant: str = DEFAULT_TENANT,
        name: str | None = None,
        replace: bool = False,
        calibration: np.ndarray | None = None,
        still_wanted: Callable[[], None] | None = None,
        spec_json: str | None = None,
    ) -> RegisteredPipeline:
        """Check the weights, compile and warm the session, and keep it under its content id
        (and `name`, if given: see the class docstring for what `replace` does).

        `calibration`: an int8 pipeline's calibration images, already admitted
        (Extractor.admit_calibration); they are part of the content id. With a store, the
        entry is written whole before this returns, with `spec_json`, the text the pipeline was
        parsed from (default: its canonical JSON): read back, it passes the checks it passed.
        """
        weights = check_tensors(pipeline, tensors)
        pipeline_id = content_id(pipeline, weights, calibration)
        key = (tenant, pipeline_id)
        entry: bytes | None = None
        if self.store is not None:
            text = pipeline.canonical_json() if spec_json is None else spec_json
            entry = encode_entry(StoredEntry(text, weights, calibration, batching))
            self.store.check_room(tenant, pipeline_id, len(entry))  # before compiling anything
            self._view(tenant)  # other replicas' names, for the name check
        if name is not None:
            with self._lock:
                self._check_name_locked(tenant, name, pipeline_id, replace)
        with self._lock:
            known = self._pipelines.get(key)
        if known is not None and known.batching == batching:
            built = _Built(known, 0, 0)
        else:
            built = self._build(key, pipeline, weights, calibration, batching, still_wanted, known)
        try:
            with self._tenant_lock(tenant):
                respelled: list[str] = []
                if name is not None:
                    # Checked again: another registration may have taken the name meanwhile.
                    with self._lock:
                        respelled = self._check_name_locked(tenant, name, pipeline_id, replace)
                if self.store is not None and entry is not None:
                    self.store.put(tenant, pipeline_id, entry)
                    if name is not None:
                        for old in respelled:  # first: it may be the same file as `name`
                            self.store.remove_name(tenant, old)
                        self.store.put_name(tenant, name, pipeline_id)
                with self._lock:
                    registered = self._keep_locked(key, built)
                    if name is not None:
                        for old in respelled:
                            self._names.pop((tenant, old), None)
                        self._names[(tenant, name)] = pipeline_id
        except BaseException:
            with self._lock:
                self._release_locked(key, built.reserved)
            raise
        return registered

    def _release_locked(self, key: tuple[str, str], reserved: int) -> None:
        """A build that is not kept: its slot and bytes go back; waiting readers wake."""
        self._compiling.discard(key)
        self.budget.cancel(reserved)
        self._lock.notify_all()

    def _build(
        self,
        key: tuple[str, str],
        pipeline: Pipeline,
        weights: WeightTensors,
        calibration: np.ndarray | None,
        batching: BatchingPolicy | None,
        still_wanted: Callable[[], None] | None,
        known: RegisteredPipeline | None = None,
    ) -> _Built:
        """Compile (or share) and warm a pipeline, holding a slot and its bytes meanwhile."""
        memory = session_memory(pipeline, None if calibration is None else calibration.shape)
        with self._lock:
            shared = known or self._shared_locked(key[1])
            self._make_room_locked(key)
            reserved = 0 if shared else memory.peak
            if reserved:
                evict = None if self.store is None else self._evict_locked
                self.budget.reserve(reserved, "layers", "registering this pipeline", evict)
            self._compiling.add(key)
        try:
            compiled = (
                shared.compiled
                if shared
                else self.cache.compile(pipeline, weights, calibration, still_wanted=still_wanted)
            )
            warm_up(compiled)
        except BaseException:
            with self._lock:
                self._release_locked(key, reserved)
            raise
        registered = RegisteredPipeline(
            compiled=compiled,
            weight_names=tuple(sorted(weights)),
            batching=batching,
            output_shapes=output_shapes(pipeline),
        )
        return _Built(registered, reserved, memory.steady)

    def _make_room_locked(self, key: tuple[str, str]) -> None:
        """A slot for `key` under max_pipelines: evicting (with a store) or refusing."""
        while key not in self._pipelines:
            taken = len(self._pipelines) + len(self._compiling - {key})
            if taken < self.max_pipelines:
                return
            if self.store is not None and self._evict_locked(any_entry=True):
                continue
            raise LimitExceeded(
                "pipeline",
                f"{len(self._pipelines)} pipelines are registered, the most "
                f"max_registered_pipelines={self.max_pipelines} allows: delete some first",
            )

    def _keep_locked(self, key: tuple[str, str], built: _Built) -> RegisteredPipeline:
        """Keep a built pipeline (settling its reservation); the one kept."""
        registered = built.registered
        self._compiling.discard(key)
        self._lock.notify_all()  # readers waiting for this entry (_read_through)
        self._damaged.pop(key, None)
        meanwhile = self._shared_locked(key[1]) if built.reserved else None
        if meanwhile is not None:
            # Another tenant registered the same content meanwhile: share its session,
            # so that the budget's one charge stays true.
            self.budget.cancel(built.reserved)
            registered = dataclasses.replace(registered, compiled=meanwhile.compiled)
        elif built.reserved:
            self.budget.keep(built.reserved, built.steady)
        self._pipelines[key] = registered
        self._pipelines.move_to_end(key)
        if self.store is not None:
            self._stored.setdefault(key[0], set()).add(key[1])
        return registered

    def _evict_locked(self, any_entry: bool = False) -> int:
        """Drop least recently used entries (the store holds them all) until one frees its
        session's bytes; the bytes freed. `any_entry`: stop after the first entry dropped."""
        while self._pipelines:
            key, removed = self._pipelines.popitem(last=False)
            freed = self._forget_locked(key[1], removed)
            if freed or any_entry:
                return max(freed, 1)
        return 0

    def _forget_locked(self, pipeline_id: str, removed: RegisteredPipeline) -> int:
        """Free the bytes of a session no entry uses any more; the bytes freed."""
        if self._shared_locked(pipeline_id) is not None:
            return 0
        steady = session_memory(removed.compiled.pipeline).steady
        self.budget.free(steady)
        return steady

    def _check_name_locked(
        self, tenant: str, name: str, pipeline_id: str, replace: bool
    ) -> list[str]:
        """Refuse what the name cannot be; the names it replaces (spelled otherwise)."""
        # Names that differ only in case are one name: on a case-insensitive filesystem (macOS,
        # Windows, their volumes) the store keeps them in one file, and one would silently
        # take the other's pipeline. `replace` moves such a name to this spelling.
        folded = name.casefold()
        spelled = [
            n for t, n in self._names if t == tenant and n != name and n.casefold() == folded
        ]
        if spelled and not replace:
            other = spelled[0]
            raise AlreadyExists(
                "name",
                f"{name!r} differs only in case from {other!r}, which names pipeline "
                f"{self._names[(tenant, other)]}: names are unique without regard to case; "
                f"use {other!r}, another name, or register with replace to respell it",
            )
        current = self._names.get((tenant, name))
        if current == pipeline_id:
            return spelled  # already its name: nothing changes but a respelling
        if current is not None and not replace:
            raise AlreadyExists(
                "name",
                f"{name!r} names pipeline {current}, not this one ({pipeline_id}): choose "
                "another name, or register with replace to move the name to this pipeline",
            )
        # Each name is listed in every GetPipeline/ListPipelines reply: bounded per pipeline.
        held = sum(1 for (t, _), i in self._names.items() if t == tenant and i == pipeline_id)
        if held >= self.max_names:
            raise LimitExceeded(
                "name",
                f"pipeline {pipeline_id} has {held} names, the most max_names_per_pipeline="
                f"{self.max_names} allows: register it without a name, or delete it and "
                "register it again under the names you keep",
            )
        return spelled

    # ------------------------------------------------------------------ the store's view

    def _tenant_lock(self, tenant: str) -> threading.RLock:
        with self._lock:
            return self._tenant_locks.setdefault(tenant, threading.RLock())

    def _view(self, tenant: str, force: bool = False) -> None:
        """Re-read the tenant's ids and names from the store when older than refresh_s."""
        if self.store is None:
            return
        if not force and time.monotonic() - self._checked.get(tenant, -math.inf) < self.refresh_s:
            return  # fresh: no lock taken on the way to every extraction
        with self._tenant_lock(tenant):
            now = time.monotonic()
            if not force and now - self._checked.get(tenant, -math.inf) < self.refresh_s:
                return
            ids = self.store.ids(tenant)
            names = self.store.names(tenant)
            with self._lock:
                # `now` was taken before the listing: the view is at least that fresh.
                self._checked[tenant] = now
                self._stored[tenant] = ids
                for alias in [k for k in self._names if k[0] == tenant]:
                    del self._names[alias]
                self._names.update({(tenant, n): i for n, i in names.items() if i in ids})
                for key in [k for k in self._pipelines if k[0] == tenant and k[1] not in ids]:
                    # Deleted on another replica: never served from here again.
                    self._forget_locked(key[1], self._pipelines.pop(key))

    def _read_through(self, tenant: str, pipeline_id: str, field: str) -> RegisteredPipeline:
        """The tenant's stored entry, verified, compiled, warmed and kept; NotFound if absent
        or damaged (logged)."""
        assert self.store is not None
        key = (tenant, pipeline_id)
        missing = NotFound(field, f"no pipeline {pipeline_id!r} is registered")
        if PIPELINE_ID_PATTERN.fullmatch(pipeline_id) is None:
            raise missing
        with self._lock:
            # One read per entry at a time: concurrent misses wait for it instead of reading too.
            while key in self._compiling:
                self._lock.wait()
            registered = self._pipelines.get(key)
            if registered is not None:
                return registered
            seen = self._damaged.get(key)
            if seen is not None and time.monotonic() - seen < self.refresh_s:
                raise missing
            self._compiling.add(key)  # claimed, from the read to the keep
        reserved = 0
        try:
            stored = self.store.get(tenant, pipeline_id)
            if stored is None:
                raise missing
            pipeline, weights = self._verify(stored, pipeline_id)
            built = self._build(key, pipeline, weights, stored.calibration, stored.batching, None)
            reserved = built.reserved
            with self._tenant_lock(tenant), self._lock:
                return self._keep_locked(key, built)
        except DamagedEntry as exc:
            self._skip_damaged(key, exc)
            with self._lock:
                self._release_locked(key, 0)
            raise missing from None
        except BaseException:
            with self._lock:
                self._release_locked(key, reserved)
            raise

    def _skip_damaged(self, key: tuple[str, str], damage: DamagedEntry) -> None:
        """Log a damaged entry, and leave it unread for refresh_s."""
        assert self.store is not None
        tenant, pipeline_id = key
        where = self.store.where(tenant, pipeline_id)
        log.warning("pipeline store: skipped entry %s at %s: %s", pipeline_id, where, damage)
        with self._lock:
            self._damaged[key] = time.monotonic()

    def _verify(self, stored: StoredEntry, pipeline_id: str) -> tuple[Pipeline, WeightTensors]:
        """The entry's admitted pipeline and weights, if its content hashes to its id."""
        try:
            pipeline = self.admit(stored)
            weights = check_tensors(pipeline, stored.tensors)
        except Busy:
            raise  # a budget held by work in flight: the entry may be fine, the caller retries
        except FeatmapError as exc:
            raise DamagedEntry(f"refused as a registration would be: {exc}") from None
        found = content_id(pipeline, weights, stored.calibration)
        if found != pipeline_id:
            raise DamagedEntry(f"its content hashes to {found}, not to its id")
        return pipeline, weights

    # ------------------------------------------------------------------ looking up

    def resolve(self, key: str, tenant: str = DEFAULT_TENANT) -> str:
        """The pipeline id `key` (an id or a name) stands for in the tenant."""
        self._view(tenant)
        with self._lock:
            found = self._names.get((tenant, key))
        if (
            found is None
            and self.store is not None
            and PIPELINE_NAME_PATTERN.fullmatch(key)
            and PIPELINE_ID_PATTERN.fullmatch(key) is None
        ):
            # A name given on another replica since the last refresh: read it now.
            found = self.store.name(tenant, key)
            if found is not None:
                with self._lock:
                    self._names[(tenant, key)] = found
        return found or key

    def names(self, pipeline_id: str, tenant: str = DEFAULT_TENANT) -> list[str]:
        """The tenant's names of a pipeline, sorted."""
        with self._lock:
            return sorted(
                n for (t, n), i in self._names.items() if t == tenant and i == pipeline_id
            )

    def get(
        self, pipeline_id: str, field: str = "pipeline_id", tenant: str = DEFAULT_TENANT
    ) -> RegisteredPipeline:
        """The tenant's registered pipeline by id or name, or NotFound naming `field`."""
        pipeline_id = self.resolve(pipeline_id, tenant)
        with self._lock:
            registered = self._pipelines.get((tenant, pipeline_id))
            if registered is not None:
                self._pipelines.move_to_end((tenant, pipeline_id))
                return registered
        if self.store is None:
            raise NotFound(field, f"no pipeline {pipeline_id!r} is registered")
        return self._read_through(tenant, pipeline_id, field)

    def list(
        self, tenant: str = DEFAULT_TENANT, after: str = "", limit: int = LIST_PAGE_DEFAULT
    ) -> tuple[list[Described], str]:
        """A page of the tenant's pipelines by id, those after `after`, and the id to go on
        after ("" when none remain).

        Pipelines in memory are described as they are; the store's others are read and
        verified but not compiled (nor kept), so that a listing neither costs a compile per
        entry nor evicts anyone's sessions; damaged entries are logged and left out. A page
        holds at most `limit` pipelines and stops once LIST_READ_BYTES were read.
        """
        if self.store is None:
            with self._lock:
                ids = sorted(i for owner, i in self._pipelines if owner == tenant)
        else:
            self._view(tenant)
            with self._lock:
                ids = sorted(self._stored.get(tenant, ()))
        remaining = [i for i in ids if i > after]
        page: list[Described] = []
        read = 0
        for index, pipeline_id in enumerate(remaining):
            if len(page) >= limit or read >= LIST_READ_BYTES:
                return page, remaining[index - 1]  # the last one looked at (kept or skipped)
            with self._lock:
                registered = self._pipelines.get((tenant, pipeline_id))
            if registered is not None:
                page.append(registered.described())
            elif self.store is not None:
                described, size = self._describe_stored(tenant, pipeline_id)
                read += size
                if described is not None:
                    page.append(described)
        return page, ""

    def _describe_stored(self, tenant: str, pipeline_id: str) -> tuple[Described | None, int]:
        """(a stored entry described without compiling it, or None if it is gone or damaged
        (logged); the bytes read)."""
        assert self.store is not None
        key = (tenant, pipeline_id)
        with self._lock:
            seen = self._damaged.get(key)
        if seen is not None and time.monotonic() - seen < self.refresh_s:
            return None, 0  # logged already
        try:
            stored, size = self.store.get_sized(tenant, pipeline_id)
            if stored is None:
                return None, size
            pipeline, weights = self._verify(stored, pipeline_id)
        except DamagedEntry as exc:
            self._skip_damaged(key, exc)
            return None, 0
        described = Described(
            pipeline_id,
            pipeline,
            tuple(sorted(weights)),
            stored.batching,
            output_shapes(pipeline),
            None,
        )
        return described, size

    def delete(self, pipeline_id: str, tenant: str = DEFAULT_TENANT) -> bool:
        """Forget the tenant's pipeline (by id or name) and its names; False if it had none."""
        with self._tenant_lock(tenant):
            self._view(tenant, force=True)  # every replica's names for it
            with self._lock:
                pipeline_id = self._names.get((tenant, pipeline_id), pipeline_id)
                aliases = [k for k, i in self._names.items() if k[0] == tenant and i == pipeline_id]
            stored = False
            if self.store is not None and PIPELINE_ID_PATTERN.fullmatch(pipeline_id):
                stored = self.store.remove(tenant, pipeline_id)
                for _, name in aliases:
                    self.store.remove_name(tenant, name)
            with self._lock:
                removed = self._pipelines.pop((tenant, pipeline_id), None)
                for alias in aliases:
                    self._names.pop(alias, None)
                self._stored.get(tenant, set()).discard(pipeline_id)
                if removed is not None:
                    self._forget_locked(pipeline_id, removed)
            return removed is not None or stored

    def _shared_locked(self, pipeline_id: str) -> RegisteredPipeline | None:
        """Any tenant's entry for `pipeline_id` (they share its session)."""
        return next((r for (_, i), r in self._pipelines.items() if i == pipeline_id), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pipelines)
