"""The KV server's state core as specifications: plain calls, no server, no event loop, no I/O.

Every rule of :class:`~kvrpc.kv.server.state.KVState` and its
:class:`~kvrpc.kv.server.sessions.SessionBook` is checked here by calling their methods the way
the I/O shell does (begin a store, "copy", settle it), with the clock given as an argument:
what a lookup pins and until when, what a full pool evicts or refuses, what a prefetch job
loads and pins, when a client's lease runs out, which registrations and batches are refused,
and how pool keys are named. The shell's part (byte copies, mappings, the real disk tier, the
transports, the adapters) is tested through live servers in ``test_service.py``.

The KV caches are the service tests' shape, described rather than allocated: two layers of
``[2, 64, 4, 1, 8]`` float16 (64 blocks of 4 tokens), chunks of 8 tokens, so 2 blocks and
512 bytes per chunk; pools of a few unpinned 512-byte slots.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvrpc.errors import KVConfigError, KVError, NotOwner, UnknownInstance, UnknownJob
from kvrpc.kv.cuda_ipc import CudaIPCWrapper
from kvrpc.kv.keys import KeyBatch
from kvrpc.kv.layout import KVLayout, LayoutKind
from kvrpc.kv.outcomes import (
    ALREADY_STORED,
    BEING_STORED,
    NO_FREE_SLOT,
    NOT_IN_CACHE,
    KeyFailure,
    KeyStatus,
    copy_failed,
)
from kvrpc.kv.protocols import KVCacheRegistration
from kvrpc.kv.server import poolkeys
from kvrpc.kv.server.pool import ChunkPool
from kvrpc.kv.server.records import Instance, Job
from kvrpc.kv.server.state import KVState, batch_problems
from kvrpc.kv.shm import SharedTensorRef

MODEL = "test-model"
BLOCK = 4
CHUNK = 8
BPC = CHUNK // BLOCK  # blocks per chunk
NUM_BLOCKS = 64
LAYOUT = KVLayout(LayoutKind.PAGED, 2, (2, NUM_BLOCKS, BLOCK, 1, 8), "float16")
SLOT = LAYOUT.chunk_nbytes(BPC)  # 512 bytes: one pool slot
TIMEOUT = 10.0  # seconds of silence after which a client is dropped
ME = b"client-1" * 2
OTHER = b"client-2" * 2
MISSING = NOT_IN_CACHE
NO_SLOT = NO_FREE_SLOT


class FakeTier:
    """A lower tier for the state: only ``contains``, a set of keys.

    It stands in for the disk tier's in-memory index, which is all the state core asks of a
    tier; the real tier (files, saves, loads) is tested in ``tests/kv/test_disk.py`` and
    through servers in ``test_service.py``.
    """

    def __init__(self) -> None:
        self.keys: set[bytes] = set()

    def contains(self, key: bytes) -> bool:
        return key in self.keys


# ------------------------------------------------------------------ helpers


def hashes(chunks: int, seed: int) -> list[bytes]:
    """``chunks`` distinct 32-byte chunk hashes, different per seed."""
    return [hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(chunks)]


def make_state(slots: int = 4, *, tier: FakeTier | None = None) -> KVState:
    """A state with a pool of ``slots`` chunk slots (the shell makes it at the first register)."""
    state = KVState(chunk_size=CHUNK, client_timeout=TIMEOUT, tier=tier)
    state.set_pool(ChunkPool(slots * SLOT, SLOT, pin_memory=False))
    return state


def pool_of(state: KVState) -> ChunkPool:
    assert state.pool is not None
    return state.pool


def shm_refs(layout: KVLayout = LAYOUT, count: int | None = None) -> list[SharedTensorRef]:
    """Refs to shared tensors that never exist: the state only counts them."""
    n = layout.num_layers if count is None else count
    return [
        SharedTensorRef(f"kvrpc-state-test-{i}", 0, layout.shape, layout.dtype) for i in range(n)
    ]


def cuda_wrappers(count: int = 2) -> list[CudaIPCWrapper]:
    """Made-up CUDA IPC descriptions of GPU layers, never opened: the state only counts them."""
    layer = CudaIPCWrapper(
        device_uuid="GPU-00000000-0000-0000-0000-000000000000",
        shape=LAYOUT.shape,
        dtype=LAYOUT.dtype,
        handle=b"\x01" * 66,
        storage_size=2 * NUM_BLOCKS * BLOCK * 8 * 2,
        storage_offset=0,
        ref_counter_handle=b"\x02" * 66,
        ref_counter_offset=0,
        event_handle=b"\x03" * 64,
        event_sync_required=True,
    )
    return [layer] * count


def spec(worker_id: int = 0, **fields: Any) -> KVCacheRegistration:
    """A registration of rank ``worker_id``; by default inline, world size 1, the tests' layout."""
    values: dict[str, Any] = {
        "model_name": MODEL,
        "world_size": 1,
        "worker_id": worker_id,
        "block_size": BLOCK,
        "mode": "inline",
        "layout": LAYOUT,
    }
    if "model" in fields:
        fields["model_name"] = fields.pop("model")
    values.update(fields)
    return KVCacheRegistration(**values)


def register(
    state: KVState, client: bytes = ME, worker_id: int = 0, *, now: float = 0.0, **fields: Any
) -> Instance:
    """What the shell does for ``kv.register_kv_cache``: check, (map,) add."""
    registration = spec(worker_id, **fields)
    per_chunk, chunk_nbytes = state.check_registration(client, registration, now)
    return state.add_instance(client, registration, per_chunk, chunk_nbytes)


def two_ranks(state: KVState) -> tuple[Instance, Instance]:
    """Ranks 0 and 1 of a world of two, registered by the same client."""
    return register(state, worker_id=0, world_size=2), register(state, worker_id=1, world_size=2)


def keys_for(instance: Instance, chunk_hashes: list[bytes]) -> KeyBatch:
    """The worker-side key batch of ``instance``'s rank."""
    ns = instance.namespace
    return KeyBatch.from_hashes(ns.model_name, ns.world_size, instance.worker_id, chunk_hashes)


def lookup_keys(chunk_hashes: list[bytes], *, world_size: int = 1, model: str = MODEL) -> KeyBatch:
    """The scheduler-side key batch (no worker id)."""
    return KeyBatch.from_hashes(model, world_size, None, chunk_hashes)


def rows(chunks: int, first: int = 0) -> torch.Tensor:
    """Block-id rows ``[chunks, BPC]`` from block ``first`` on."""
    return torch.arange(first, first + chunks * BPC, dtype=torch.int64).view(chunks, BPC)


def store(state: KVState, instance: Instance, chunk_hashes: list[bytes]) -> list[KeyFailure | None]:
    """A store whose copy succeeds; its write-through saves (if any) end at once."""
    plan = state.begin_store(instance, keys_for(instance, chunk_hashes), rows(len(chunk_hashes)))
    assert plan.waiting == []
    saves = state.settle_store(plan, None)
    if saves:
        assert isinstance(state.tier, FakeTier)
        state.tier.keys.update(key for key, _ in saves)
        state.saved(saves)
    return plan.results


def retrieve(
    state: KVState,
    instance: Instance,
    request_id: str,
    chunk_hashes: list[bytes],
    *,
    error: KeyFailure | None = None,
) -> list[KeyFailure | None]:
    """A retrieve for ``request_id`` whose copy ends with ``error`` (None: it succeeds)."""
    n = len(chunk_hashes)
    plan = state.begin_retrieve(
        instance, [request_id] * n, keys_for(instance, chunk_hashes), rows(n, 32)
    )
    state.settle_retrieve(plan, error)
    return plan.results


def lookup(
    state: KVState,
    request_id: str,
    chunk_hashes: list[bytes],
    *,
    client: bytes = ME,
    world_size: int = 1,
    model: str = MODEL,
    now: float = 0.0,
) -> int | Job:
    keys = lookup_keys(chunk_hashes, world_size=world_size, model=model)
    return state.lookup(client, request_id, keys, now)


def count(state: KVState, request_id: str, chunk_hashes: list[bytes], **options: Any) -> int:
    """A lookup that must answer a count (no prefetch job)."""
    answer = lookup(state, request_id, chunk_hashes, **options)
    assert isinstance(answer, int), f"expected a count, got a job {answer!r}"
    return answer


def probe(state: KVState, chunk_hashes: list[bytes], *, world_size: int = 1) -> int:
    """How many leading chunks are present, leaving no pins behind."""
    found = count(state, "probe", chunk_hashes, world_size=world_size)
    state.end_session(ME, MODEL, world_size, "probe", 0.0)
    return found


def end(state: KVState, request_id: str, *, world_size: int = 1, client: bytes = ME) -> int:
    return state.end_session(client, MODEL, world_size, request_id, 0.0)


def slot_of(state: KVState, instance: Instance, chunk_hash: bytes) -> int | None:
    """The slot holding ``chunk_hash`` of ``instance``'s rank, None if it is not in L1."""
    return pool_of(state).lookup(chunk_hash + instance.suffix)


def pinned(state: KVState) -> int:
    """How many slots hold a pin."""
    return pool_of(state).pinned_slots


def pins_of(state: KVState, instance: Instance, chunk_hashes: list[bytes]) -> list[int]:
    """The pin count of each chunk's slot on ``instance``'s rank; every chunk must be in L1."""
    slots = [slot_of(state, instance, h) for h in chunk_hashes]
    assert None not in slots, "a chunk is not in L1"
    return [pool_of(state).pins(slot) for slot in slots if slot is not None]


def evicted_to_tier(state: KVState, instance: Instance, chunk_hashes: list[bytes]) -> None:
    """Store ``chunk_hashes`` (written through to the tier), then push them out of L1."""
    assert store(state, instance, chunk_hashes) == [None] * len(chunk_hashes)
    filler = hashes(pool_of(state).num_slots, seed=999)
    assert store(state, instance, filler) == [None] * len(filler)
    assert all(slot_of(state, instance, h) is None for h in chunk_hashes)
    assert isinstance(state.tier, FakeTier)
    assert all(state.tier.contains(h + instance.suffix) for h in chunk_hashes)


def prefetching(request_id: str = "r") -> tuple[KVState, Instance, list[bytes], Job]:
    """Two chunks stored, written through and evicted from L1: a lookup's prefetch job for them."""
    state = make_state(slots=4, tier=FakeTier())
    instance = register(state)
    chunk_hashes = hashes(2, 1)
    evicted_to_tier(state, instance, chunk_hashes)
    job = lookup(state, request_id, chunk_hashes)
    assert isinstance(job, Job)
    return state, instance, chunk_hashes, job


# ------------------------------------------------------------------ client leases


def test_expire_drops_only_clients_silent_past_the_timeout() -> None:
    state = make_state()
    state.client(ME, now=0.0)
    state.client(OTHER, now=5.0)

    assert state.expire(now=TIMEOUT) == []  # silent for exactly the timeout: not past it
    assert set(state.clients) == {ME, OTHER}
    state.expire(now=TIMEOUT + 1.0)
    assert set(state.clients) == {OTHER}
    assert state.counters.clients_expired == 1
    state.expire(now=5.0 + TIMEOUT)
    assert set(state.clients) == {OTHER}
    state.expire(now=5.0 + TIMEOUT + 0.001)
    assert state.clients == {}
    assert state.stats(0)["clients_expired"] == 2


def test_keepalive_renews_the_lease() -> None:
    state = make_state()
    instance = register(state, now=0.0)
    for now in (8.0, 16.0, 24.0):
        state.client(ME, now)  # what kv.keepalive does
        assert state.expire(now=now + TIMEOUT - 0.5) == []
    assert state.expire(now=24.0 + TIMEOUT) == []
    assert instance.id in state.instances
    # Every call renews the lease, not only keepalives: here a lookup.
    count(state, "r", hashes(1, 1), now=30.0)
    assert state.expire(now=30.0 + TIMEOUT) == []
    assert state.expire(now=30.0 + TIMEOUT + 0.5) == [instance]
    assert instance.closed and state.instances == {}


def test_a_silent_client_loses_its_instances_sessions_pins_and_jobs() -> None:
    tier = FakeTier()
    state = make_state(slots=4, tier=tier)
    instance = register(state, now=0.0)
    keeper = register(state, OTHER, now=0.0)  # the same rank, registered by another client
    a, b = hashes(2, 1), hashes(2, 2)
    evicted_to_tier(state, instance, a)
    assert store(state, instance, b) == [None, None]
    assert isinstance(lookup(state, "ra", a), Job)  # a prefetch job nobody asks about
    assert count(state, "rb", b) == 2
    assert (len(state.sessions.sessions), len(state.sessions.jobs), pinned(state)) == (2, 1, 2)

    state.client(OTHER, now=TIMEOUT)
    closed = state.expire(now=TIMEOUT + 1.0)

    assert closed == [instance] and instance.closed
    assert list(state.instances) == [keeper.id] and list(state.clients) == [OTHER]
    assert (state.sessions.sessions, state.sessions.jobs, pinned(state)) == ({}, {}, 0)
    stats = state.stats(0)
    assert (stats["instances"], stats["clients"], stats["clients_expired"]) == (1, 1, 1)
    with pytest.raises(UnknownInstance):  # a client that comes back is a new one
        state.instance(ME, instance.id, TIMEOUT + 1.0, "inline")


def test_goodbye_releases_all_a_client_owns_at_once_without_counting_an_expiry() -> None:
    state = make_state()
    instance = register(state)
    assert store(state, instance, hashes(2, 1)) == [None, None]
    assert count(state, "r", hashes(2, 1)) == 2

    assert state.drop_client(ME) == [instance]  # what kv.goodbye does

    assert (state.clients, state.instances, state.sessions.sessions) == ({}, {}, {})
    assert pinned(state) == 0 and state.counters.clients_expired == 0
    assert state.drop_client(ME) == []


def test_a_dropped_clients_job_loads_nothing_more() -> None:
    state, _, _, job = prefetching()
    first = state.sessions.prefetch_slot(job, job.to_load[0])  # a load in flight...
    assert first is not None

    state.drop_client(ME)

    assert job.dropped
    state.sessions.prefetched(job, job.to_load[0], first, ok=True)  # ...ends after the drop
    assert pool_of(state).pins(first) == 0  # kept in L1, pinned for nobody
    assert state.sessions.prefetch_slot(job, job.to_load[1]) is None
    assert state.sessions.finish_prefetch(job) == 0
    assert (pinned(state), state.sessions.jobs) == (0, {})


@pytest.mark.parametrize(
    ("call", "refusal"),
    [
        ("a copy on its old instance", UnknownInstance),
        ("an unregister of its old instance", None),
        ("a status query of its old job", UnknownJob),
        ("an end of its old session", 0),
        ("a release of its old pins", 0),
        ("a lookup with a worker id", KVError),
        ("a registration of a rank past the world size", KVError),
    ],
)
def test_an_expired_clients_refused_call_leaves_no_client_record(call: str, refusal: Any) -> None:
    state, instance, a, job = prefetching()
    assert state.expire(now=TIMEOUT + 1.0) == [instance]
    later = TIMEOUT + 2.0
    calls: dict[str, Callable[[], object]] = {
        "a copy on its old instance": lambda: state.instance(ME, instance.id, later, "inline"),
        "an unregister of its old instance": lambda: state.unregister(ME, instance.id, later),
        "a status query of its old job": lambda: state.query_prefetch_status(ME, job.id, later),
        "an end of its old session": lambda: state.end_session(ME, MODEL, 1, "r", later),
        "a release of its old pins": lambda: state.release_pins(ME, "r", lookup_keys(a), later),
        "a lookup with a worker id": lambda: state.lookup(ME, "r", keys_for(instance, a), later),
        "a registration of a rank past the world size": lambda: state.check_registration(
            ME, spec(worker_id=1), later
        ),
    }

    if isinstance(refusal, type):
        with pytest.raises(refusal):
            calls[call]()
    else:
        assert calls[call]() == refusal

    # A record would own nothing, and expire again with a warning and a second count.
    assert (state.clients, state.stats(0)["clients"]) == ({}, 0)


def test_a_client_id_is_at_least_8_bytes() -> None:
    state = make_state()
    with pytest.raises(KVError, match="at least 8 random bytes"):
        state.client(b"short", 0.0)
    with pytest.raises(KVError, match="at least 8 random bytes"):
        state.check_registration(b"1234567", spec(), 0.0)
    assert state.clients == {}


# ------------------------------------------------------------------ registration


def test_a_worker_id_not_below_the_world_size_is_refused() -> None:
    state = make_state()
    with pytest.raises(KVError, match="worker id 2 is not below world size 2"):
        state.check_registration(ME, spec(2, world_size=2), 0.0)


def test_a_block_size_other_than_the_layouts_is_refused() -> None:
    state = make_state()
    with pytest.raises(KVConfigError, match="blocks of 4 tokens, but block size 8 was given"):
        state.check_registration(ME, spec(block_size=8), 0.0)


def test_a_chunk_size_that_is_not_a_multiple_of_the_block_size_is_refused() -> None:
    state = make_state()
    layout = KVLayout(LayoutKind.PAGED, 2, (2, NUM_BLOCKS, 3, 1, 8), "float16")
    with pytest.raises(KVConfigError, match="not a multiple of block_size 3"):
        state.check_registration(ME, spec(block_size=3, layout=layout), 0.0)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"mode": "shm", "tensors": shm_refs(count=1)}, "layout has 2 layers but 1 tensors"),
        ({"mode": "shm"}, "layout has 2 layers but 0 tensors"),
        ({"mode": "cuda_ipc", "cuda_tensors": cuda_wrappers(3)}, "but 3 CUDA tensors"),
    ],
    ids=["shm-too-few", "shm-none", "cuda-too-many"],
)
def test_one_tensor_per_layer_is_registered(fields: dict[str, Any], says: str) -> None:
    state = make_state()
    with pytest.raises(KVConfigError, match=says):
        state.check_registration(ME, spec(**fields), 0.0)
    assert state.check_registration(ME, spec(mode="shm", tensors=shm_refs()), 0.0) == (BPC, SLOT)
    cuda = spec(mode="cuda_ipc", cuda_tensors=cuda_wrappers(2))
    assert state.check_registration(ME, cuda, 0.0) == (BPC, SLOT)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        (
            {"mode": "shm", "tensors": shm_refs(), "cuda_tensors": cuda_wrappers()},
            "only the cuda_ipc",
        ),
        ({"mode": "inline", "cuda_tensors": cuda_wrappers()}, "only the cuda_ipc"),
        (
            {"mode": "cuda_ipc", "tensors": shm_refs(), "cuda_tensors": cuda_wrappers()},
            "registers CUDA tensors, not shared ones",
        ),
        ({"mode": "inline", "tensors": shm_refs()}, "inline transfer mode registers no tensors"),
    ],
    ids=["cuda-in-shm", "cuda-in-inline", "shared-in-cuda_ipc", "shared-in-inline"],
)
def test_tensors_of_another_transfer_mode_are_refused(fields: dict[str, Any], says: str) -> None:
    state = make_state()
    with pytest.raises(KVError, match=says):
        state.check_registration(ME, spec(**fields), 0.0)
    assert state.namespaces == {} and state.instances == {}


@pytest.mark.parametrize(
    "layout",
    [
        KVLayout(LayoutKind.PAGED, 2, (2, NUM_BLOCKS, BLOCK, 2, 4), "float16"),  # same bytes
        KVLayout(LayoutKind.PAGED, 2, (2, NUM_BLOCKS, BLOCK, 1, 8), "bfloat16"),  # same bytes
        KVLayout(LayoutKind.PAGED_HND, 2, (2, NUM_BLOCKS, 1, BLOCK, 8), "float16"),
        KVLayout(LayoutKind.PAGED, 1, (2, NUM_BLOCKS, BLOCK, 1, 8), "float16"),
    ],
    ids=["heads", "dtype", "kind", "layers"],
)
def test_another_chunk_form_is_refused(layout: KVLayout) -> None:
    state = make_state()
    register(state, world_size=2)
    with pytest.raises(KVConfigError, match="must share a layout"):
        state.check_registration(OTHER, spec(1, world_size=2, layout=layout), 0.0)
    # Another model, or the same model at another world size, is another namespace.
    assert state.check_registration(OTHER, spec(0, model="other", layout=layout), 0.0)[0] == BPC
    assert state.check_registration(OTHER, spec(0, world_size=4, layout=layout), 0.0)[0] == BPC


def test_another_block_count_shares_the_namespace_and_finds_the_chunks() -> None:
    state = make_state()
    small = register(state)
    stored = hashes(2, 1)
    assert store(state, small, stored) == [None, None]
    state.drop_client(ME)  # the engine restarts with a bigger KV cache around the same chunks

    bigger = dataclasses.replace(LAYOUT, shape=(2, 4 * NUM_BLOCKS, BLOCK, 1, 8))
    big = register(state, OTHER, layout=bigger, mode="shm", tensors=shm_refs(bigger))

    assert big.namespace is small.namespace and big.suffix == small.suffix
    assert count(state, "r", stored, client=OTHER) == 2
    assert retrieve(state, big, "r", stored) == [None, None]
    beyond = rows(1, first=NUM_BLOCKS + 10)  # outside the small cache, inside the big one
    assert batch_problems(big, keys_for(big, stored[:1]), beyond, retrieve=True) == [None]
    # The id is the same in a fresh server too, so the disk tier's files are found again.
    assert register(make_state(), layout=bigger).namespace.id == small.namespace.id


def test_a_layout_whose_chunks_outgrow_the_slots_is_refused() -> None:
    state = make_state()
    register(state)  # the first registration sized the slots: 512 bytes
    wider = KVLayout(LayoutKind.PAGED, 2, (2, NUM_BLOCKS, BLOCK, 2, 8), "float16")
    with pytest.raises(KVConfigError, match="run a server per model shape"):
        state.check_registration(ME, spec(model="wide", layout=wider), 0.0)
    narrower = KVLayout(LayoutKind.PAGED, 2, (2, NUM_BLOCKS, BLOCK, 1, 4), "float16")
    assert state.check_registration(ME, spec(model="narrow", layout=narrower), 0.0)[1] == SLOT // 2


def test_two_registrations_checked_together_are_checked_again_when_added() -> None:
    state = make_state()
    first = spec(0, world_size=2)
    second = spec(1, world_size=2, layout=dataclasses.replace(LAYOUT, dtype="bfloat16"))
    # Both pass the door before either is added (their tensors are mapped meanwhile).
    checked = [state.check_registration(c, s, 0.0) for c, s in ((ME, first), (OTHER, second))]
    state.add_instance(ME, first, *checked[0])
    with pytest.raises(KVConfigError, match="must share a layout"):
        state.add_instance(OTHER, second, *checked[1])
    assert len(state.instances) == 1


def test_a_client_that_left_while_registering_is_not_added() -> None:
    state = make_state()
    registration = spec()
    per_chunk, chunk_nbytes = state.check_registration(ME, registration, 0.0)
    state.drop_client(ME)
    with pytest.raises(KVError, match="said goodbye or went silent while registering"):
        state.add_instance(ME, registration, per_chunk, chunk_nbytes)
    assert state.instances == {}


def test_the_state_is_made_with_a_positive_chunk_size_and_adopts_one_pool() -> None:
    with pytest.raises(KVConfigError, match="at least 1 token"):
        KVState(chunk_size=0, client_timeout=TIMEOUT)
    state = make_state()
    with pytest.raises(KVError, match="the pool is made once"):
        state.set_pool(ChunkPool(SLOT, SLOT))


def test_an_instance_names_its_namespace_and_rank_in_its_pool_keys() -> None:
    state = make_state()
    rank1 = register(state, worker_id=1, world_size=2)
    ns_id = poolkeys.namespace_id(MODEL, 2, BLOCK, LAYOUT)
    assert rank1.namespace.id == ns_id
    assert rank1.suffix == poolkeys.worker_suffix(ns_id, 1)
    assert rank1.namespace.suffixes == [poolkeys.worker_suffix(ns_id, w) for w in (0, 1)]
    assert (rank1.blocks_per_chunk, rank1.chunk_nbytes) == (BPC, SLOT)


# ------------------------------------------------------------------ instances


def test_an_instance_serves_only_its_own_client_until_it_unregisters() -> None:
    state = make_state()
    instance = register(state)
    assert state.instance(ME, instance.id, 0.0, "inline") is instance
    with pytest.raises(UnknownInstance):
        state.instance(OTHER, instance.id, 0.0, "inline")
    with pytest.raises(UnknownInstance):
        state.instance(ME, instance.id ^ 1, 0.0, "inline")
    with pytest.raises(NotOwner, match="another client's KV cache"):
        state.unregister(OTHER, instance.id, 0.0)
    assert not instance.closed

    assert state.unregister(ME, instance.id, 0.0) is instance

    assert instance.closed  # copies not yet started must not start
    assert state.unregister(ME, instance.id, 0.0) is None
    with pytest.raises(UnknownInstance):
        state.instance(ME, instance.id, 0.0, "inline")


@pytest.mark.parametrize(
    ("fields", "asked", "says"),
    [
        (
            {"mode": "shm", "tensors": shm_refs()},
            ("cuda_ipc",),
            r"registered in the shm transfer mode: use kv\.store / kv\.retrieve",
        ),
        ({"mode": "inline"}, ("cuda_ipc",), r"inline transfer mode: use kv\.store / kv\.retrieve"),
        (
            {"mode": "cuda_ipc", "cuda_tensors": cuda_wrappers()},
            ("shm", "inline"),
            r"cuda_ipc transfer mode: use kv\.store_cuda / kv\.retrieve_cuda",
        ),
    ],
    ids=["shm", "inline", "cuda_ipc"],
)
def test_a_copy_in_another_mode_than_the_registered_one_is_refused_naming_the_mode(
    fields: dict[str, Any], asked: tuple[str, ...], says: str
) -> None:
    state = make_state()
    instance = register(state, **fields)
    with pytest.raises(KVError, match=says) as refused:
        state.instance(ME, instance.id, 0.0, *asked)
    assert type(refused.value) is KVError
    assert state.instance(ME, instance.id, 0.0, fields["mode"]) is instance


# ------------------------------------------------------------------ stores


def test_a_lookup_during_a_store_sees_none_or_all_of_it() -> None:
    state = make_state(slots=8)
    instance = register(state)
    stored = hashes(4, 1)
    plan = state.begin_store(instance, keys_for(instance, stored), rows(4))
    assert len(plan.reserved) == 4  # reserved: the shell copies into these slots now

    assert count(state, "during", stored) == 0
    assert retrieve(state, instance, "during", stored) == [MISSING] * 4
    assert state.stats(0)["chunks"] == 0

    assert state.settle_store(plan, None) == []

    assert count(state, "after", stored) == 4
    assert retrieve(state, instance, "after", stored) == [None] * 4
    assert (state.counters.stores, state.stats(0)["chunks"]) == (4, 4)


def test_checksums_folded_after_the_commit_are_added_to_the_chunks_still_there() -> None:
    state = make_state(slots=4)
    instance = register(state)
    stored = hashes(3, 1)
    plan = state.begin_store(instance, keys_for(instance, stored), rows(3))
    fills = state.fills(plan)  # read while the slots fill, as the shell does
    state.settle_store(plan, None)  # committed before its checksums were folded
    pool = pool_of(state)
    slots = [slot for _, slot in plan.reserved]
    assert [pool.checksum(slot) for slot in slots] == [None] * 3
    # One chunk is dropped and its slot taken by another before the folds end.
    assert pool.remove(stored[1] + instance.suffix)
    other = hashes(1, 9)
    store(state, instance, other)
    assert slot_of(state, instance, other[0]) == slots[1]

    assert state.add_checksums(plan, fills, [11, 22, 33]) == 2

    assert pool.checksum(slot_of(state, instance, stored[0])) == 11  # type: ignore[arg-type]
    assert pool.checksum(slot_of(state, instance, stored[2])) == 33  # type: ignore[arg-type]
    assert slot_of(state, instance, stored[1]) is None
    counts = state.stats(0)
    assert (counts["checksums_late"], counts["checksums_missed"]) == (2, 1)


def test_checksums_whose_fold_failed_are_counted_missed_and_leave_the_chunks_as_they_are() -> None:
    state = make_state(slots=4)
    instance = register(state)
    plan = state.begin_store(instance, keys_for(instance, hashes(2, 1)), rows(2))
    fills = state.fills(plan)
    state.settle_store(plan, None)

    assert state.add_checksums(plan, fills, None) == 0

    assert [pool_of(state).checksum(slot) for _, slot in plan.reserved] == [None, None]
    assert state.stats(0)["checksums_missed"] == 2
    assert state.stats(0)["chunks"] == 2


def test_a_second_store_of_a_key_is_refused_and_keeps_the_first_copy() -> None:
    state = make_state()
    instance = register(state)
    first, second = hashes(1, 1), hashes(1, 2)
    assert store(state, instance, first) == [None]
    slot = slot_of(state, instance, first[0])

    assert store(state, instance, first) == [ALREADY_STORED]
    filling = state.begin_store(instance, keys_for(instance, second), rows(1))
    assert store(state, instance, second) == [BEING_STORED]
    state.settle_store(filling, None)

    assert slot_of(state, instance, first[0]) == slot
    assert state.counters.store_duplicates == 2
    assert (state.counters.stores, state.stats(0)["chunks"]) == (2, 2)


def test_a_failed_copy_aborts_the_stores_slots_and_writes_nothing_through() -> None:
    tier = FakeTier()
    state = make_state(tier=tier)
    instance = register(state)
    stored = hashes(2, 1)
    plan = state.begin_store(instance, keys_for(instance, stored), rows(2))

    assert state.settle_store(plan, copy_failed("bus error")) == []

    assert plan.results == [copy_failed("bus error")] * 2
    assert plan.results[0] == KeyFailure(KeyStatus.COPY_FAILED, "copy failed: bus error")
    assert pool_of(state).free_slots == 4 and state.saving == 0 and tier.keys == set()
    assert state.counters.stores == 0 and probe(state, stored) == 0
    assert store(state, instance, stored) == [None, None]  # the keys are free to store again


def test_an_abandoned_store_frees_its_slots_unwritten() -> None:
    state = make_state()
    instance = register(state)
    stored = hashes(2, 1)
    plan = state.begin_store(instance, keys_for(instance, stored), rows(2))

    state.abandon_store(plan)  # cancelled: its copies ended after the reply went

    assert pool_of(state).free_slots == 4 and probe(state, stored) == 0
    assert store(state, instance, stored) == [None, None]  # not "being stored"


def test_a_full_pool_evicts_the_least_recently_used_unpinned_chunk() -> None:
    state = make_state(slots=4)
    instance = register(state)
    a, b, c = hashes(2, 1), hashes(2, 2), hashes(2, 3)
    assert store(state, instance, a) == [None, None]
    assert store(state, instance, b) == [None, None]
    assert retrieve(state, instance, "use", a) == [None, None]  # a use: a is now newer than b

    assert store(state, instance, c) == [None, None]

    assert (probe(state, a), probe(state, b), probe(state, c)) == (2, 0, 2)
    stats = state.stats(0)
    assert (stats["evictions"], stats["chunks"], stats["bytes_free"]) == (2, 4, 0)
    assert retrieve(state, instance, "gone", b) == [MISSING] * 2


def test_a_pinned_chunk_is_never_evicted_and_its_last_unpin_makes_it_the_newest() -> None:
    state = make_state(slots=4)
    instance = register(state)
    a, b, c, d = (hashes(2, seed) for seed in (1, 2, 3, 4))
    assert store(state, instance, a) == [None, None]
    assert count(state, "ra", a) == 2  # the oldest, but pinned from here on
    for more in (b, c, d):
        assert store(state, instance, more) == [None, None]
        assert slot_of(state, instance, a[0]) is not None
    assert state.stats(0)["evictions"] == 4  # b, then c

    assert end(state, "ra") == 2  # a is now the most recently used
    assert store(state, instance, b) == [None, None]  # evicts d, not a

    assert (probe(state, a), probe(state, d), probe(state, b)) == (2, 0, 2)


def test_a_pinned_full_pool_refuses_stores() -> None:
    state = make_state(slots=4)
    instance = register(state)
    a, b, c = hashes(2, 1), hashes(2, 2), hashes(2, 3)
    assert store(state, instance, a) == [None, None]
    assert store(state, instance, b) == [None, None]
    assert count(state, "ra", a) == 2 and count(state, "rb", b) == 2
    slots = [slot_of(state, instance, h) for h in a + b]

    assert store(state, instance, c) == [NO_SLOT] * 2

    stats = state.stats(0)
    assert (stats["store_refused"], stats["chunks"], stats["evictions"]) == (2, 4, 0)
    assert stats["pinned_chunks"] == 4
    assert [slot_of(state, instance, h) for h in a + b] == slots  # the pinned chunks stay
    assert end(state, "ra") == 2
    assert store(state, instance, c) == [None, None]


def test_a_full_pool_waits_for_saves_instead_of_refusing() -> None:
    tier = FakeTier()
    state = make_state(slots=2, tier=tier)
    instance = register(state)
    a, b = hashes(2, 1), hashes(2, 2)
    first = state.begin_store(instance, keys_for(instance, a), rows(2))
    saves = state.settle_store(first, None)
    assert [key for key, _ in saves] == [h + instance.suffix for h in a]
    assert (state.saving, pinned(state)) == (2, 2)  # pinned while the tier reads them

    second = state.begin_store(instance, keys_for(instance, b), rows(2))
    assert (second.waiting, second.reserved, second.results) == ([0, 1], [], [None, None])
    assert state.reserve(second) is False  # the saves still pin every slot

    tier.keys.update(key for key, _ in saves)
    state.saved(saves)
    assert (state.saving, pinned(state)) == (0, 0)
    assert state.reserve(second) is True
    assert (second.waiting, len(second.reserved)) == ([], 2)
    state.settle_store(second, None)
    assert second.results == [None, None] and state.counters.store_refused == 0
    assert probe(state, b) == 2 and state.stats(0)["evictions"] == 2


def test_a_store_writes_through_only_what_the_tier_lacks_pinned_until_saved() -> None:
    tier = FakeTier()
    state = make_state(tier=tier)
    instance = register(state)
    stored = hashes(2, 1)
    tier.keys.add(stored[0] + instance.suffix)
    plan = state.begin_store(instance, keys_for(instance, stored), rows(2))

    saves = state.settle_store(plan, None)

    assert saves == [(stored[1] + instance.suffix, plan.reserved[1][1])]
    assert pool_of(state).pins(saves[0][1]) == 1 and state.saving == 1
    state.saved(saves)
    assert pool_of(state).pins(saves[0][1]) == 0 and state.saving == 0
    # Without a tier nothing is written through.
    untiered = make_state()
    other = register(untiered)
    plan = untiered.begin_store(other, keys_for(other, stored), rows(2))
    assert untiered.settle_store(plan, None) == [] and untiered.saving == 0


# ------------------------------------------------------------------ retrieves


def test_a_retrieve_pins_its_slots_during_the_copy() -> None:
    state = make_state(slots=2)
    instance = register(state)
    a, b = hashes(2, 1), hashes(2, 2)
    assert store(state, instance, a) == [None, None]
    plan = state.begin_retrieve(instance, ["r", "r"], keys_for(instance, a), rows(2, 32))
    assert [slot for _, slot in plan.found] == [slot_of(state, instance, h) for h in a]
    assert pinned(state) == 2

    assert store(state, instance, b) == [NO_SLOT] * 2  # nothing the copy reads is evicted

    state.settle_retrieve(plan, None)
    assert plan.results == [None, None]
    assert (pinned(state), state.counters.retrieves) == (0, 2)
    assert store(state, instance, b) == [None, None]


def test_a_retrieve_of_an_evicted_key_says_it_is_not_in_the_cache() -> None:
    state = make_state(slots=2)
    instance = register(state)
    old, new = hashes(2, 1), hashes(2, 2)
    assert store(state, instance, old) == [None, None]
    assert store(state, instance, new) == [None, None]

    assert retrieve(state, instance, "r", old + new) == [MISSING] * 2 + [None, None]

    stats = state.stats(0)
    assert (stats["retrieve_misses"], stats["retrieves"]) == (2, 2)


def test_a_failed_retrieve_copy_says_so_and_leaves_the_sessions_pins() -> None:
    state = make_state()
    instance = register(state)
    stored = hashes(2, 1)
    assert store(state, instance, stored) == [None, None]
    assert count(state, "r", stored) == 2

    assert (
        retrieve(state, instance, "r", stored, error=copy_failed("bad address"))
        == [copy_failed("bad address")] * 2
    )

    assert pinned(state) == 2 and state.counters.retrieves == 0
    assert retrieve(state, instance, "r", stored) == [None, None]
    assert pinned(state) == 0


def test_an_abandoned_retrieve_unpins_its_slots_and_the_session_keeps_its_pins() -> None:
    state = make_state()
    instance = register(state)
    stored = hashes(2, 1)
    assert store(state, instance, stored) == [None, None]
    assert count(state, "r", stored) == 2
    plan = state.begin_retrieve(instance, ["r", "r"], keys_for(instance, stored), rows(2, 32))
    slots = [slot for _, slot in plan.found]
    assert [pool_of(state).pins(slot) for slot in slots] == [2, 2]

    state.abandon_retrieve(plan)  # cancelled: its copies ended after the reply went

    assert [pool_of(state).pins(slot) for slot in slots] == [1, 1]
    assert end(state, "r") == 2 and pinned(state) == 0


def test_a_retrieve_takes_one_request_id_per_key() -> None:
    state = make_state()
    instance = register(state)
    with pytest.raises(KVError, match="2 keys but 1 request ids"):
        state.begin_retrieve(instance, ["r"], keys_for(instance, hashes(2, 1)), rows(2))


def test_a_retrieve_releases_its_requests_pin_for_its_rank_only() -> None:
    state = make_state(slots=8)
    rank0, rank1 = two_ranks(state)
    stored = hashes(3, 1)
    assert store(state, rank0, stored) == [None] * 3
    assert store(state, rank1, stored) == [None] * 3
    assert count(state, "r", stored, world_size=2) == 3
    assert pinned(state) == 6

    assert retrieve(state, rank0, "another-request", stored) == [None] * 3
    assert pinned(state) == 6
    assert retrieve(state, rank0, "r", stored) == [None] * 3
    assert pinned(state) == 3
    assert pins_of(state, rank1, stored) == [1, 1, 1]
    assert retrieve(state, rank1, "r", stored) == [None] * 3
    assert pinned(state) == 0
    assert state.stats(0)["sessions"] == 1  # the session stays open, holding nothing
    assert end(state, "r", world_size=2) == 0


# ------------------------------------------------------------------ batch checks


def test_block_ids_out_of_range_refuse_only_their_keys() -> None:
    state = make_state()
    instance = register(state, mode="shm", tensors=shm_refs())
    stored = hashes(3, 1)
    ids = rows(3)
    ids[1, 1] = NUM_BLOCKS
    outside = f"is outside this KV cache's 0..{NUM_BLOCKS - 1}"

    def bad(block: int) -> KeyFailure:
        return KeyFailure(KeyStatus.BAD_BLOCK_ID, f"block id {block} {outside}")

    plan = state.begin_store(instance, keys_for(instance, stored), ids)

    assert plan.results == [None, bad(NUM_BLOCKS), None]
    assert [i for i, _ in plan.reserved] == [0, 2]
    state.settle_store(plan, None)
    ids[1, 1] = -2  # -1 is SKIP_BLOCK in a retrieve; anything lower is out of range
    plan = state.begin_retrieve(instance, ["r"] * 3, keys_for(instance, stored), ids)
    assert plan.results == [None, bad(-2), None]
    assert [i for i, _ in plan.found] == [0, 2]
    state.settle_retrieve(plan, None)
    assert pinned(state) == 0


def test_a_block_marked_skip_is_allowed_only_in_a_retrieve() -> None:
    state = make_state()
    instance = register(state, mode="shm", tensors=shm_refs())
    keys = keys_for(instance, hashes(1, 1))
    target = rows(1, BPC)
    target[0, 0] = -1  # the engine holds this block's tokens itself

    assert batch_problems(instance, keys, target, retrieve=True) == [None]
    assert batch_problems(instance, keys, target, retrieve=False) == [
        KeyFailure(
            KeyStatus.BAD_BLOCK_ID, f"block id -1 is outside this KV cache's 0..{NUM_BLOCKS - 1}"
        )
    ]


@pytest.mark.parametrize(
    "ids",
    [rows(2).view(-1), rows(2).to(torch.int32), rows(3), torch.zeros(2, 3, dtype=torch.int64)],
    ids=["flat", "int32", "more-rows", "wider-rows"],
)
def test_block_ids_of_the_wrong_shape_or_dtype_refuse_the_whole_batch(ids: torch.Tensor) -> None:
    state = make_state()
    instance = register(state, mode="shm", tensors=shm_refs())
    keys = keys_for(instance, hashes(2, 1))
    with pytest.raises(KVError, match=r"int64 tensor of shape \[2, 2\]"):
        state.begin_store(instance, keys, ids)
    with pytest.raises(KVError, match=r"int64 tensor of shape \[2, 2\]"):
        state.begin_retrieve(instance, ["r", "r"], keys, ids)
    assert pool_of(state).free_slots == 4 and pinned(state) == 0


def test_keys_of_another_model_world_size_or_rank_are_refused_per_key() -> None:
    state = make_state()
    instance = register(state, worker_id=0, world_size=2)
    stored = hashes(2, 1)
    for model, world_size in (("other-model", 2), (MODEL, 4)):
        keys = KeyBatch.from_hashes(model, world_size, 0, stored)
        says = f"keys are for model {model!r} world size {world_size}"
        plan = state.begin_store(instance, keys, rows(2))
        assert len(plan.results) == 2
        assert all(r and r.status is KeyStatus.WRONG_NAMESPACE for r in plan.results)
        assert all(r and says in r.detail for r in plan.results)
        assert plan.reserved == []
        retrieving = state.begin_retrieve(instance, ["r", "r"], keys, rows(2))
        assert all(r and r.status is KeyStatus.WRONG_NAMESPACE for r in retrieving.results)
        assert all(r and says in r.detail for r in retrieving.results)
    rank1 = KeyBatch.from_hashes(MODEL, 2, 1, stored)
    plan = state.begin_store(instance, rank1, rows(2))
    assert (
        plan.results
        == [KeyFailure(KeyStatus.WRONG_WORKER, "keys carry worker id 1, this instance is worker 0")]
        * 2
    )
    assert state.counters.stores == 0 and pool_of(state).free_slots == 4


def test_the_inline_mode_takes_no_block_ids() -> None:
    state = make_state()
    instance = register(state)  # inline: the chunk bytes travel in the messages
    keys = keys_for(instance, hashes(2, 1))
    nothing = torch.empty(0, dtype=torch.int64)
    assert batch_problems(instance, keys, nothing, retrieve=False) == [None, None]
    plan = state.begin_store(instance, keys, nothing)
    assert len(plan.reserved) == 2


# ------------------------------------------------------------------ lookups and sessions


def test_lookup_counts_only_leading_chunks_present_on_every_rank() -> None:
    state = make_state(slots=16)
    rank0, rank1 = two_ranks(state)
    stored = hashes(3, 1)
    assert store(state, rank0, stored) == [None] * 3
    assert count(state, "only-rank-0", stored, world_size=2) == 0

    assert store(state, rank1, stored[:2]) == [None] * 2
    assert count(state, "rank-1-has-two", stored, world_size=2) == 2
    assert store(state, rank1, stored) == [ALREADY_STORED] * 2 + [None]
    assert count(state, "both", stored, world_size=2) == 3
    # A longer prompt with the same start matches the stored prefix; another start, none.
    assert count(state, "longer", stored + hashes(2, 2), world_size=2) == 3
    assert count(state, "other", hashes(3, 3), world_size=2) == 0
    # Only a leading run counts: a gap on one rank ends it there.
    gap = hashes(3, 4)
    assert store(state, rank0, gap) == [None] * 3
    assert store(state, rank1, [gap[0], gap[2]]) == [None] * 2
    assert count(state, "gap", gap, world_size=2) == 1
    counters = state.counters
    assert (counters.lookups, counters.hits, counters.misses) == (6, 9, 11)


def test_a_lookup_before_any_registration_counts_misses_and_opens_no_session() -> None:
    empty = KVState(chunk_size=CHUNK, client_timeout=TIMEOUT)  # no pool yet
    assert count(empty, "r", hashes(3, 1)) == 0
    state = make_state()
    register(state)
    assert count(state, "r", hashes(2, 1), model="unknown-model") == 0
    assert (empty.counters.misses, state.counters.misses) == (3, 2)
    assert empty.sessions.sessions == {} and state.sessions.sessions == {}
    assert end(empty, "r") == 0


def test_lookup_pins_matched_chunks_until_the_session_ends() -> None:
    state = make_state(slots=4)
    instance = register(state)
    a, b = hashes(2, 1), hashes(2, 2)
    assert store(state, instance, a) == [None, None]

    assert count(state, "ra", a) == 2

    assert (pinned(state), state.stats(0)["sessions"]) == (2, 1)
    assert pins_of(state, instance, a) == [1, 1]
    assert store(state, instance, b) == [None, None]
    assert store(state, instance, hashes(2, 3)) == [None, None]  # evicts b, never a
    assert probe(state, a) == 2 and probe(state, b) == 0
    assert end(state, "ra") == 2
    assert end(state, "ra") == 0  # already ended
    assert state.stats(0)["sessions"] == 0 and pinned(state) == 0
    assert end(state, "ra", world_size=3) == 0  # no such namespace


def test_a_lookup_again_for_the_same_request_replaces_its_pins() -> None:
    state = make_state(slots=4)
    instance = register(state)
    a, b = hashes(2, 1), hashes(2, 2)
    assert store(state, instance, a) == [None, None]
    assert store(state, instance, b) == [None, None]
    assert count(state, "r", a) == 2

    assert count(state, "r", b[:1]) == 1

    assert (pinned(state), state.stats(0)["sessions"]) == (1, 1)
    assert pins_of(state, instance, a) == [0, 0]
    assert end(state, "r") == 1


def test_only_the_client_that_opened_a_session_can_end_it() -> None:
    state = make_state(slots=4)
    instance = register(state)
    stored = hashes(2, 1)
    assert store(state, instance, stored) == [None, None]
    assert count(state, "r", stored) == 2

    with pytest.raises(NotOwner, match="another client's open session"):
        end(state, "r", client=OTHER)  # not its session: refused, it releases nothing

    assert (pinned(state), state.stats(0)["sessions"]) == (2, 1)
    assert retrieve(state, instance, "r", stored[:1]) == [None]  # the session still works
    assert end(state, "r") == 1 and pinned(state) == 0


def test_pins_are_released_exactly_once_by_retrieve_release_pins_and_end_session() -> None:
    state = make_state(slots=8)
    rank0, rank1 = two_ranks(state)
    stored = hashes(3, 1)
    assert store(state, rank0, stored) == [None] * 3
    assert store(state, rank1, stored) == [None] * 3
    assert count(state, "r", stored, world_size=2) == 3

    def pins() -> list[int]:
        return pins_of(state, rank0, stored) + pins_of(state, rank1, stored)

    assert pins() == [1, 1, 1, 1, 1, 1]
    assert retrieve(state, rank0, "r", stored[:1]) == [None]
    assert pins() == [0, 1, 1, 1, 1, 1]
    release = lookup_keys(stored[:2], world_size=2)
    with pytest.raises(NotOwner):  # not its session
        state.release_pins(OTHER, "r", release, 0.0)
    assert state.release_pins(ME, "r", release, 0.0) == 3  # rank 0's chunk 0 was released
    assert pins() == [0, 0, 1, 0, 0, 1]
    assert state.release_pins(ME, "r", release, 0.0) == 0
    assert retrieve(state, rank1, "r", stored[:2]) == [None, None]
    assert pins() == [0, 0, 1, 0, 0, 1]
    assert state.stats(0)["sessions"] == 1  # release_pins leaves the session open

    assert end(state, "r", world_size=2) == 2

    assert pins() == [0] * 6
    assert end(state, "r", world_size=2) == 0
    assert retrieve(state, rank0, "r", stored) == [None] * 3
    assert pins() == [0] * 6 and pinned(state) == 0


def test_a_lookup_or_a_release_with_a_worker_id_is_refused() -> None:
    state = make_state()
    instance = register(state)
    keys = keys_for(instance, hashes(1, 1))
    with pytest.raises(KVError, match="no worker id"):
        state.lookup(ME, "r", keys, 0.0)
    with pytest.raises(KVError, match="no worker id"):
        state.release_pins(ME, "r", keys, 0.0)
    assert state.sessions.sessions == {}


def test_unregistering_a_rank_releases_only_its_pins() -> None:
    state = make_state(slots=8)
    a0 = register(state, ME, 0, model="model-a", world_size=2)
    a1 = register(state, ME, 1, model="model-a", world_size=2)
    b0 = register(state, OTHER, 0, model="model-b")
    on_a, on_b = hashes(2, 1), hashes(2, 2)
    for instance, stored in ((a0, on_a), (a1, on_a), (b0, on_b)):
        assert store(state, instance, stored) == [None, None]
    assert count(state, "ra", on_a, model="model-a", world_size=2) == 2
    assert count(state, "rb", on_b, client=OTHER, model="model-b") == 2
    assert pinned(state) == 6

    assert state.unregister(ME, a0.id, 0.0) is a0  # nobody can retrieve a's rank-0 chunks now

    assert pinned(state) == 4
    assert pins_of(state, a0, on_a) == [0, 0]
    assert pins_of(state, a1, on_a) == [1, 1]
    assert retrieve(state, b0, "rb", on_b) == [None, None]
    assert state.end_session(ME, "model-a", 2, "ra", 0.0) == 2  # rank 1's, released once


def test_a_rank_registered_twice_keeps_its_pins_while_one_instance_remains() -> None:
    state = make_state()
    first, second = register(state, ME), register(state, OTHER)
    assert first.namespace is second.namespace and first.suffix == second.suffix
    stored = hashes(2, 1)
    assert store(state, first, stored) == [None, None]
    assert count(state, "r", stored) == 2

    state.unregister(ME, first.id, 0.0)
    assert pinned(state) == 2  # the other instance of rank 0 may still retrieve them
    state.drop_client(OTHER)
    assert pinned(state) == 0


# ------------------------------------------------------------------ prefetch jobs


def load_all(state: KVState, job: Job) -> list[int]:
    """What the shell's prefetch does when every load succeeds; returns the slots loaded."""
    loaded = []
    for key in job.to_load:
        slot = state.sessions.prefetch_slot(job, key)
        if slot is not None:
            state.sessions.prefetched(job, key, slot, ok=True)
            loaded.append(slot)
    state.sessions.finish_prefetch(job)
    return loaded


def test_a_lookup_of_chunks_only_in_the_tier_starts_a_job_that_loads_and_pins_them() -> None:
    tier = FakeTier()
    state = make_state(slots=4, tier=tier)
    instance = register(state)
    a = hashes(2, 1)
    evicted_to_tier(state, instance, a)

    job = lookup(state, "r", a)

    assert isinstance(job, Job) and len(job.id) >= 16
    assert (job.owner, job.to_load, job.total) == (ME, [h + instance.suffix for h in a], 2)
    assert state.query_prefetch_status(ME, job.id, 0.0) is None  # still running
    for key in job.to_load:
        slot = state.sessions.prefetch_slot(job, key)
        assert slot is not None
        state.sessions.prefetched(job, key, slot, ok=True)
        assert pool_of(state).pins(slot) == 1  # at once: the next load cannot evict it
    assert state.sessions.finish_prefetch(job) == 2
    assert state.query_prefetch_status(ME, job.id, 0.0) == 2
    stats = state.stats(0)
    assert (stats["prefetch_jobs"], stats["prefetch_jobs_open"], stats["prefetched"]) == (1, 0, 2)
    assert pinned(state) == 2  # the loaded chunks wait for their retrieve
    assert retrieve(state, instance, "r", a) == [None, None]
    assert pinned(state) == 0


def test_query_prefetch_status_answers_exactly_once_and_only_to_the_jobs_client() -> None:
    state, _, _, job = prefetching()
    with pytest.raises(UnknownJob):
        state.query_prefetch_status(OTHER, job.id, 0.0)
    with pytest.raises(UnknownJob):
        state.query_prefetch_status(ME, "no-such-job", 0.0)
    load_all(state, job)

    assert state.query_prefetch_status(ME, job.id, 0.0) == 2  # the stranger took nothing
    with pytest.raises(UnknownJob):
        state.query_prefetch_status(ME, job.id, 0.0)  # its count was taken
    assert state.clients[ME].jobs == set()


def test_a_lookup_loads_only_what_memory_lacks_and_stops_where_the_tier_does() -> None:
    tier = FakeTier()
    state = make_state(slots=8, tier=tier)
    rank0, rank1 = two_ranks(state)
    wanted = hashes(3, 1)
    assert store(state, rank0, wanted) == [None] * 3  # rank 0's chunks are in memory (and tier)
    tier.keys.update(h + rank1.suffix for h in wanted[:2])  # rank 1's first two in the tier only

    job = lookup(state, "r", wanted, world_size=2)

    assert isinstance(job, Job)
    assert job.to_load == [h + rank1.suffix for h in wanted[:2]]
    assert job.prefix == b"".join(wanted[:2]) and job.total == 3
    assert pinned(state) == 2  # rank 0's part of the two chunks, pinned by the lookup
    assert len(load_all(state, job)) == 2
    assert job.result == 2 and pinned(state) == 4
    counters = state.counters
    assert (counters.hits, counters.misses, counters.prefetched) == (2, 1, 2)
    assert end(state, "r", world_size=2) == 4 and pinned(state) == 0


def test_a_superseded_prefetch_pins_nothing() -> None:
    tier = FakeTier()
    state = make_state(slots=4, tier=tier)
    instance = register(state)
    a, b = hashes(2, 1), hashes(4, 2)
    assert store(state, instance, a) == [None, None]
    assert store(state, instance, b) == [None] * 4  # a is in the tier only now
    job = lookup(state, "r", a)
    assert isinstance(job, Job)
    key = job.to_load[0]
    slot = state.sessions.prefetch_slot(job, key)  # a load in flight...
    assert slot is not None

    assert count(state, "r", b[2:]) == 2  # ...when a new lookup of the request replaces it

    assert job.dropped and state.sessions.jobs == {}
    state.sessions.prefetched(job, key, slot, ok=True)
    assert pool_of(state).pins(slot) == 0
    assert state.sessions.prefetch_slot(job, job.to_load[1]) is None
    assert state.sessions.finish_prefetch(job) == 0
    assert (state.stats(0)["sessions"], pinned(state)) == (1, 2)  # b[2:] only
    with pytest.raises(UnknownJob):
        state.query_prefetch_status(ME, job.id, 0.0)
    assert end(state, "r") == 2


def test_an_ended_sessions_job_is_forgotten_and_pins_nothing() -> None:
    state, _, _, job = prefetching("slow")

    assert end(state, "slow") == 0  # the scheduler gave up waiting (a polling timeout)

    stats = state.stats(0)
    assert (stats["prefetch_jobs"], stats["prefetch_jobs_open"], stats["sessions"]) == (1, 0, 0)
    assert load_all(state, job) == []
    assert job.result == 0 and pinned(state) == 0
    with pytest.raises(UnknownJob):
        state.query_prefetch_status(ME, job.id, 0.0)


@pytest.mark.parametrize("drop", ["client left", "request ended"])
def test_a_dropped_job_counts_no_hits_or_misses(drop: str) -> None:
    state, _, _, job = prefetching()
    slot = state.sessions.prefetch_slot(job, job.to_load[0])  # a load in flight...
    assert slot is not None

    if drop == "client left":
        state.drop_client(ME)
    else:
        assert end(state, "r") == 0
    state.sessions.prefetched(job, job.to_load[0], slot, ok=True)  # ...ends after the drop

    assert state.sessions.finish_prefetch(job) == 0
    # Nobody is told this lookup's outcome, so it is neither a hit nor a miss; the load did
    # happen (its chunk stays in L1), so it is counted as prefetched.
    counters = state.counters
    assert (counters.lookups, counters.hits, counters.misses, counters.prefetched) == (1, 0, 0, 1)


def test_a_failed_load_frees_its_slot_and_the_count_stops_there() -> None:
    state, _, _, job = prefetching()
    failed = state.sessions.prefetch_slot(job, job.to_load[0])
    assert failed is not None
    state.sessions.prefetched(job, job.to_load[0], failed, ok=False)
    assert pool_of(state).lookup(job.to_load[0]) is None
    loaded = state.sessions.prefetch_slot(job, job.to_load[1])
    assert loaded is not None
    state.sessions.prefetched(job, job.to_load[1], loaded, ok=True)

    assert state.sessions.finish_prefetch(job) == 0

    assert (state.counters.hits, state.counters.misses, state.counters.prefetched) == (0, 2, 1)
    assert pool_of(state).lookup(job.to_load[1]) == loaded  # kept in L1 for later lookups
    assert pinned(state) == 0 and end(state, "r") == 0  # but past the count: not pinned


def test_a_prefetch_keeps_pins_only_on_the_chunks_it_counts() -> None:
    tier = FakeTier()
    state = make_state(slots=8, tier=tier)
    rank0, rank1 = two_ranks(state)
    wanted = hashes(3, 1)
    assert store(state, rank0, wanted) == [None] * 3  # rank 0's chunks are in memory
    tier.keys.update(h + rank1.suffix for h in wanted)  # rank 1's in the tier only
    job = lookup(state, "r", wanted, world_size=2)
    assert isinstance(job, Job) and pinned(state) == 3  # rank 0's part, pinned by the lookup
    # Rank 1's chunk 1 fails to load; its chunks 0 and 2 load.
    for key, ok in zip(job.to_load, (True, False, True), strict=True):
        slot = state.sessions.prefetch_slot(job, key)
        assert slot is not None
        state.sessions.prefetched(job, key, slot, ok)

    assert state.sessions.finish_prefetch(job) == 1

    # The engine retrieves only the leading chunk: pins past it would wait for end_session.
    assert pins_of(state, rank0, wanted) == [1, 0, 0]
    assert pins_of(state, rank1, wanted[:1] + wanted[2:]) == [1, 0]
    assert end(state, "r", world_size=2) == 2 and pinned(state) == 0


def test_a_prefetch_finds_no_room_in_a_pinned_pool_and_counts_what_is_there() -> None:
    tier = FakeTier()
    state = make_state(slots=4, tier=tier)
    instance = register(state)
    a, b = hashes(2, 1), hashes(4, 2)
    assert store(state, instance, a) == [None, None]
    assert store(state, instance, b) == [None] * 4
    assert count(state, "holder", b) == 4  # every slot pinned by another request
    job = lookup(state, "r", a)
    assert isinstance(job, Job)

    assert load_all(state, job) == []

    assert job.result == 0 and state.counters.prefetched == 0 and pinned(state) == 4


def test_a_prefetch_skips_a_chunk_stored_meanwhile_and_counts_it() -> None:
    state, instance, a, job = prefetching()
    assert store(state, instance, a[:1]) == [None]  # a worker stored chunk 0 again meanwhile

    assert len(load_all(state, job)) == 1

    assert job.result == 2 and state.counters.prefetched == 1
    assert end(state, "r") == 2


def test_without_a_tier_a_lookup_answers_a_count_and_never_a_job() -> None:
    state = make_state(slots=2)
    instance = register(state)
    a, b = hashes(2, 1), hashes(2, 2)
    assert store(state, instance, a) == [None, None]
    assert store(state, instance, b) == [None, None]
    assert count(state, "r", a) == 0
    assert state.counters.prefetch_jobs == 0 and state.sessions.jobs == {}


# ------------------------------------------------------------------ stats and clear


def test_stats_report_the_counters_the_pool_and_the_tables() -> None:
    empty = KVState(chunk_size=CHUNK, client_timeout=TIMEOUT)
    before = empty.stats(cpu_buffer_bytes=1 << 20)
    assert (before["chunks"], before["bytes_free"], before["slot_bytes"]) == (0, 1 << 20, 0)
    state = make_state(slots=4)
    instance = register(state)
    assert store(state, instance, hashes(3, 1)) == [None] * 3
    assert count(state, "r", hashes(3, 1)) == 3

    stats = state.stats(0)

    assert stats["chunk_size"] == CHUNK and stats["slot_bytes"] == SLOT
    assert (stats["chunks"], stats["bytes_used"], stats["bytes_free"]) == (3, 3 * SLOT, SLOT)
    assert (stats["pinned_chunks"], stats["sessions"], stats["clients"]) == (3, 1, 1)
    assert (stats["instances"], stats["stores"], stats["hits"], stats["lookups"]) == (1, 3, 3, 1)


def test_clear_drops_only_unpinned_chunks() -> None:
    state = make_state(slots=4)
    instance = register(state)
    a, b = hashes(2, 1), hashes(2, 2)
    assert store(state, instance, a) == [None, None]
    assert store(state, instance, b) == [None, None]
    assert count(state, "r", a) == 2

    assert state.clear() == 2

    assert probe(state, b) == 0 and state.stats(0)["chunks"] == 2
    assert retrieve(state, instance, "r", a) == [None, None]
    assert KVState(chunk_size=CHUNK, client_timeout=TIMEOUT).clear() == 0


# ------------------------------------------------------------------ pool keys


def test_namespace_id_is_stable_and_ignores_only_the_block_count() -> None:
    ns_id = poolkeys.namespace_id(MODEL, 2, BLOCK, LAYOUT)

    assert len(ns_id) == poolkeys.NAMESPACE_ID_SIZE == 8
    # Stable across runs and versions: a disk tier's files are named with it.
    assert ns_id.hex() == "1a8639ff0b3916c4"
    described = b"2:4:paged:2:[2, 0, 4, 1, 8]:float16:test-model"
    assert ns_id == hashlib.sha256(described).digest()[:8]
    for num_blocks in (1, 2, 1000):
        resized = dataclasses.replace(LAYOUT, shape=(2, num_blocks, BLOCK, 1, 8))
        assert poolkeys.namespace_id(MODEL, 2, BLOCK, resized) == ns_id
    others = [
        poolkeys.namespace_id("other-model", 2, BLOCK, LAYOUT),
        poolkeys.namespace_id(MODEL, 4, BLOCK, LAYOUT),
        poolkeys.namespace_id(MODEL, 2, 2 * BLOCK, LAYOUT),
        poolkeys.namespace_id(MODEL, 2, BLOCK, dataclasses.replace(LAYOUT, num_layers=3)),
        poolkeys.namespace_id(MODEL, 2, BLOCK, dataclasses.replace(LAYOUT, dtype="bfloat16")),
        poolkeys.namespace_id(MODEL, 2, BLOCK, dataclasses.replace(LAYOUT, shape=(2, 64, 4, 2, 4))),
        poolkeys.namespace_id(
            MODEL, 2, BLOCK, KVLayout(LayoutKind.PAGED_HND, 2, (2, 64, 1, 4, 8), "float16")
        ),
    ]
    assert len({ns_id, *others}) == 1 + len(others)


def test_chunk_form_is_the_layout_without_its_block_count() -> None:
    form = poolkeys.chunk_form(LAYOUT)
    assert form == ("paged", 2, (2, 0, BLOCK, 1, 8), "float16")
    bigger = dataclasses.replace(LAYOUT, shape=(2, 512, BLOCK, 1, 8))
    assert poolkeys.chunk_form(bigger) == form
    mla = KVLayout(LayoutKind.MLA, 3, (NUM_BLOCKS, BLOCK, 16), "bfloat16")
    assert poolkeys.chunk_form(mla) == ("mla", 3, (0, BLOCK, 16), "bfloat16")


@pytest.mark.parametrize("worker_id", [0, 1, 255, 256, 65535])
def test_a_pool_key_is_the_hash_the_namespace_and_the_worker(worker_id: int) -> None:
    ns_id = poolkeys.namespace_id(MODEL, 2, BLOCK, LAYOUT)
    chunk_hashes = hashes(3, 1)
    suffix = poolkeys.worker_suffix(ns_id, worker_id)
    assert suffix == ns_id + worker_id.to_bytes(2, "little")

    keys = poolkeys.pool_keys(b"".join(chunk_hashes), suffix)

    assert keys == [h + ns_id + worker_id.to_bytes(2, "little") for h in chunk_hashes]
    assert all(len(key) == poolkeys.POOL_KEY_SIZE == 42 for key in keys)
    assert [poolkeys.worker_of(key) for key in keys] == [worker_id] * 3
    assert poolkeys.chunk_hashes(b"".join(chunk_hashes)) == chunk_hashes
    assert poolkeys.pool_keys(b"", suffix) == [] and poolkeys.chunk_hashes(b"") == []


@pytest.mark.parametrize("count", [1, 128, 1024, 1025, 5000])
def test_a_batch_of_any_size_splits_into_its_hashes_in_order(count: int) -> None:
    # Batches up to 1,024 keys are cut by a cached Struct, larger ones by slicing.
    chunk_hashes = hashes(count, count)
    split = poolkeys.chunk_hashes(b"".join(chunk_hashes))
    assert split == chunk_hashes and all(type(h) is bytes for h in split)


# ------------------------------------------------------------------ a remote tier


class Remote:
    """A remote tier's breaker as the state sees it: only ``available`` (the shell asks it)."""

    def __init__(self) -> None:
        self.up = True

    def available(self) -> bool:
        return self.up


def test_a_lookup_past_l1_hands_the_rest_to_an_available_remote_tier_pinning_what_l1_has() -> None:
    remote = Remote()
    state = KVState(chunk_size=CHUNK, client_timeout=TIMEOUT, remote=remote)
    state.set_pool(ChunkPool(16 * SLOT, SLOT, pin_memory=False))
    rank0, rank1 = two_ranks(state)
    prompt_hashes = hashes(4, 60)
    assert store(state, rank0, prompt_hashes[:3]) == [None] * 3
    assert store(state, rank1, prompt_hashes[:1]) == [None]
    job = lookup(state, "r", prompt_hashes, world_size=2)
    assert isinstance(job, Job) and job.to_load == []
    ns = rank0.namespace
    # Chunk 0 is local on both ranks; chunks 1-2 lack rank 1 only, chunk 3 both ranks.
    assert job.remote == [
        [prompt_hashes[1] + ns.ranks[1]],
        [prompt_hashes[2] + ns.ranks[1]],
        [prompt_hashes[3] + ns.ranks[0], prompt_hashes[3] + ns.ranks[1]],
    ]
    assert job.prefix == b"".join(prompt_hashes)
    assert state.pool is not None and state.pool.pinned_slots == 4  # L1's 2 + 2 of rank 0
    # Nothing came from the remote tier: the job counts the local run, releasing the rest.
    assert state.sessions.finish_prefetch(job) == 1
    assert state.pool.pinned_slots == 2
    remote.up = False  # skipped: the lookup answers at once, as without a remote tier
    assert count(state, "r2", prompt_hashes, world_size=2) == 1


def test_a_lookup_of_a_request_id_another_client_holds_open_is_refused_and_changes_nothing() -> (
    None
):
    state = make_state(slots=8)
    instance = register(state)
    stored = hashes(2, 61)
    assert store(state, instance, stored) == [None, None]
    assert count(state, "shared-id", stored) == 2
    with pytest.raises(KVError, match="another client's open session"):
        lookup(state, "shared-id", stored, client=OTHER)
    assert state.pool is not None and state.pool.pinned_slots == 2
    assert state.end_session(ME, MODEL, 1, "shared-id", 0.0) == 2
