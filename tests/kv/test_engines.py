"""Sessions belong to the engine that opened them: engines sharing a server, same request ids.

Every engine's scheduler and workers share an engine id that scopes the request ids they
send (``scoped_request_id``), so two engines numbering their requests alike (as every vLLM
engine does) never end, pin or release each other's sessions. The engine id travels on the
wire too (in a worker's registration and a scheduler's lookups), and the server binds each
client to the one it declares first: a worker's retrieve that names another engine's
request id copies the chunks but releases none of that engine's pins. Tested through live
servers over each transport (the harness in ``conftest.py``), then as plain calls on the
state core: the server itself refuses to let a client name another client's session or
prefetch job, or speak for another engine than its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from kvrpc.errors import NotOwner, PayloadValidationError, UnknownJob
from kvrpc.kv import KeyBatch, LoadStoreOp, SchedulerAdapter, WorkerAdapter
from kvrpc.kv import protocols as kv
from kvrpc.kv.client.ops import check_engine_id, scoped_request_id
from kvrpc.kv.server.records import Job
from kvrpc.kv.server.state import KVState

from .conftest import (
    BLOCK,
    CHUNK,
    MODEL,
    OK,
    WORLD,
    Keep,
    KVServer,
    RawClient,
    blocks,
    chunk_hashes,
    lookup_tokens,
    prompt,
    retrieve_all,
    same_blocks,
    store_all,
)
from .test_state import (
    ME,
    OTHER,
    FakeTier,
    end,
    evicted_to_tier,
    hashes,
    lookup,
    lookup_keys,
    make_state,
    pinned,
    pins_of,
    register,
    retrieve,
    spec,
    store,
)

# ------------------------------------------------------------------ the scoping rule


def test_a_scoped_request_id_carries_its_engine_and_none_leaves_it_alone() -> None:
    assert scoped_request_id("engine-a", "req-1") == "engine-a/req-1"
    assert scoped_request_id("engine-a", "req-1") != scoped_request_id("engine-b", "req-1")
    assert scoped_request_id(None, "req-1") == "req-1"
    # Everything before the first "/" is the engine (engine ids hold none, see below), so
    # a "/" in a request id cannot make it another engine's.
    assert scoped_request_id("a", "b/c").split("/", 1) == ["a", "b/c"]


@pytest.mark.parametrize("bad", ["", "a/b"])
def test_an_engine_id_that_could_make_two_engines_ids_collide_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="non-empty string without '/'"):
        check_engine_id(bad)
    assert check_engine_id("0b9c0d7e-uuid") == "0b9c0d7e-uuid"
    assert check_engine_id(None) is None


@pytest.mark.parametrize("bad", ["", "a/b"])
def test_such_an_engine_id_is_refused_at_the_servers_door_too(bad: str) -> None:
    keys = KeyBatch.from_hashes(MODEL, WORLD, None, hashes(1, 1))
    with pytest.raises(PayloadValidationError, match="argument 3"):
        kv.LOOKUP.validate_payload([ME, "r", keys, bad])
    with pytest.raises(ValueError, match="engine_id"):
        spec(engine_id=bad)
    assert kv.LOOKUP.validate_payload([ME, "r", keys, None])[3] is None
    assert spec(engine_id="engine-a").engine_id == "engine-a"


# ------------------------------------------------------------------ two engines, one server


@dataclass
class Engine:
    """An engine's scheduler and its workers (one per rank), all under one engine id."""

    scheduler: SchedulerAdapter
    workers: list[tuple[WorkerAdapter, list[torch.Tensor]]]


def open_engine(
    server: KVServer,
    engine_id: str,
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> Engine:
    """A scheduler and WORLD registered workers of engine ``engine_id`` on ``server``."""
    workers = []
    for rank in range(WORLD):
        worker = opened(WorkerAdapter(server.url, MODEL, WORLD, rank, BLOCK, engine_id=engine_id))
        layers = kv_cache()
        worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
        workers.append((worker, layers))
    scheduler = opened(SchedulerAdapter(server.url, MODEL, WORLD, 0, BLOCK, engine_id=engine_id))
    return Engine(scheduler, workers)


def test_two_engines_looking_up_one_prompt_under_the_same_request_id_each_get_a_session(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    a = open_engine(kv_server, "engine-a", kv_cache, opened)
    b = open_engine(kv_server, "engine-b", kv_cache, opened)
    tokens = prompt(3, seed=1)
    store_all(a.workers, "req-0", LoadStoreOp(blocks(0, 3), token_ids=tokens))

    # Unscoped, the second lookup would name the first one's open session and be refused.
    assert lookup_tokens(a.scheduler, "req-1", token_ids=tokens) == 3 * CHUNK
    assert lookup_tokens(b.scheduler, "req-1", token_ids=tokens) == 3 * CHUNK
    stats = kv_server.stats()
    assert (stats["sessions"], stats["pinned_chunks"]) == (2, 3 * WORLD)

    # B ends "its" req-1: A's session and its pins stay, and A's retrieve still hits.
    b.scheduler.end_session("req-1")
    kv_server.wait_stats("B's session to end", sessions=1)
    assert kv_server.stats()["pinned_chunks"] == 3 * WORLD
    retrieve_all(a.workers, "req-1", LoadStoreOp(blocks(20, 3), token_ids=tokens))
    for worker, layers in a.workers:
        assert worker.get_block_ids_with_load_errors() == set()
        assert same_blocks(layers, blocks(0, 3), blocks(20, 3))
    # A's retrieve released A's pins on what it copied.
    assert kv_server.stats()["pinned_chunks"] == 0
    a.scheduler.end_session("req-1")
    kv_server.wait_stats("A's session to end", sessions=0, pinned_chunks=0)


def test_one_engines_retrieves_frees_and_end_session_never_release_the_others_pins(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    a = open_engine(kv_server, "engine-a", kv_cache, opened)
    b = open_engine(kv_server, "engine-b", kv_cache, opened)
    tokens_a, tokens_b = prompt(3, seed=2), prompt(2, seed=3)
    store_all(a.workers, "req-0", LoadStoreOp(blocks(0, 3), token_ids=tokens_a))
    store_all(b.workers, "req-0", LoadStoreOp(blocks(0, 2), token_ids=tokens_b))

    assert lookup_tokens(a.scheduler, "req-1", token_ids=tokens_a) == 3 * CHUNK
    assert lookup_tokens(b.scheduler, "req-1", token_ids=tokens_b) == 2 * CHUNK
    assert kv_server.stats()["pinned_chunks"] == (3 + 2) * WORLD

    # B's workers retrieve their req-1: the server releases B's pins on what it copied.
    retrieve_all(b.workers, "req-1", LoadStoreOp(blocks(20, 2), token_ids=tokens_b))
    for worker, layers in b.workers:
        assert worker.get_block_ids_with_load_errors() == set()
        assert same_blocks(layers, blocks(0, 2), blocks(20, 2))
    assert kv_server.stats()["pinned_chunks"] == 3 * WORLD
    # B's retrieve of A's prompt under req-1 copies A's chunks (they are on the server) but
    # releases none of A's pins: B's req-1 is another session.
    retrieve_all(b.workers, "req-1", LoadStoreOp(blocks(30, 3), token_ids=tokens_a))
    assert kv_server.stats()["pinned_chunks"] == 3 * WORLD
    # Nor do B's early frees of A's prompt, nor B's end of req-1.
    b.scheduler.free_lookup_locks("req-1", 0, 3 * CHUNK, token_ids=tokens_a)
    b.scheduler.end_session("req-1")
    kv_server.settle(b.scheduler)
    stats = kv_server.stats()
    assert (stats["sessions"], stats["pinned_chunks"]) == (1, 3 * WORLD)

    retrieve_all(a.workers, "req-1", LoadStoreOp(blocks(40, 3), token_ids=tokens_a))
    for worker, layers in a.workers:
        assert worker.get_block_ids_with_load_errors() == set()
        assert same_blocks(layers, blocks(0, 3), blocks(40, 3))
    assert kv_server.stats()["pinned_chunks"] == 0


def test_an_engines_early_free_releases_only_its_own_pins(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    a = open_engine(kv_server, "engine-a", kv_cache, opened)
    b = open_engine(kv_server, "engine-b", kv_cache, opened)
    tokens_a, tokens_b = prompt(2, seed=4), prompt(2, seed=5)
    store_all(a.workers, "req-0", LoadStoreOp(blocks(0, 2), token_ids=tokens_a))
    store_all(a.workers, "req-00", LoadStoreOp(blocks(4, 2), token_ids=tokens_b))
    assert lookup_tokens(a.scheduler, "req-1", token_ids=tokens_a) == 2 * CHUNK
    assert lookup_tokens(b.scheduler, "req-1", token_ids=tokens_b) == 2 * CHUNK

    a.scheduler.free_lookup_locks("req-1", 0, 2 * CHUNK)  # the lookup's own hashes
    kv_server.settle(a.scheduler)
    stats = kv_server.stats()
    assert (stats["sessions"], stats["pinned_chunks"]) == (2, 2 * WORLD)  # B's are left


def test_a_worker_naming_another_engines_request_id_copies_but_releases_none_of_its_pins(
    kv_server: KVServer,
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    a = open_engine(kv_server, "engine-a", kv_cache, opened)
    b = open_engine(kv_server, "engine-b", kv_cache, opened)
    tokens = prompt(3, seed=6)
    store_all(a.workers, "req-0", LoadStoreOp(blocks(0, 3), token_ids=tokens))
    assert lookup_tokens(a.scheduler, "req-1", token_ids=tokens) == 3 * CHUNK
    assert lookup_tokens(b.scheduler, "req-1", token_ids=tokens) == 3 * CHUNK
    # Every chunk is pinned once by each engine's session.
    assert kv_server.stats()["pinned_chunks"] == 3 * WORLD

    # A worker of engine B that names A's request id on the wire, as no adapter does.
    stray = opened(RawClient(kv_server.url, engine_id="engine-b"))
    rank0 = stray.register(0, kv_cache())
    a_request = scoped_request_id("engine-a", "req-1")
    assert rank0.retrieve(a_request, chunk_hashes(3, seed=6), 20) == [OK] * 3
    # Copied (the chunks are the cache's): A's rank 0 bytes are in the stray's blocks...
    a_rank0 = a.workers[0][1]
    assert all(
        torch.equal(
            mine.view(torch.int16)[:, blocks(20, 3)], theirs.view(torch.int16)[:, blocks(0, 3)]
        )
        for mine, theirs in zip(rank0.layers, a_rank0, strict=True)
    )
    # ... but A's session keeps its pins, and so does B's (it named A's, not B's).
    stats = kv_server.stats()
    assert (stats["retrieve_other_engine"], stats["pinned_chunks"]) == (3, 3 * WORLD)
    b.scheduler.end_session("req-1")
    kv_server.wait_stats("B's session to end", sessions=1)
    assert kv_server.stats()["pinned_chunks"] == 3 * WORLD  # A's, all of them

    # A's own workers retrieve what A looked up, and that releases A's pins.
    retrieve_all(a.workers, "req-1", LoadStoreOp(blocks(40, 3), token_ids=tokens))
    for worker, layers in a.workers:
        assert worker.get_block_ids_with_load_errors() == set()
        assert same_blocks(layers, blocks(0, 3), blocks(40, 3))
    stats = kv_server.stats()
    assert (stats["retrieve_other_engine"], stats["pinned_chunks"]) == (3, 0)

    # The stray client speaks for engine B: its lookup may not declare A, nor no engine.
    before = kv_server.stats()["not_owner"]
    for other in ("engine-a", None):
        keys = KeyBatch.from_hashes(MODEL, WORLD, None, chunk_hashes(3, seed=6))
        with pytest.raises(NotOwner, match="speaks for engine 'engine-b'"):
            stray.call(kv.LOOKUP, scoped_request_id(other, "req-9"), keys, other)
    stats = kv_server.stats()
    assert (stats["not_owner"], stats["sessions"]) == (before + 2, 1)


# ------------------------------------------------------------------ the state's own rules


def test_a_lookup_naming_another_clients_open_session_is_refused_and_leaves_its_pins() -> None:
    state = make_state()
    instance = register(state)
    chunk_hashes = hashes(2, 1)
    assert store(state, instance, chunk_hashes) == [None, None]
    assert lookup(state, "r", chunk_hashes) == 2
    assert pins_of(state, instance, chunk_hashes) == [1, 1]

    with pytest.raises(NotOwner, match="another client's open session"):
        lookup(state, "r", chunk_hashes, client=OTHER)
    with pytest.raises(NotOwner, match="another client's open session"):
        lookup(state, "r", hashes(1, 9), client=OTHER)  # whatever it asks for
    assert pins_of(state, instance, chunk_hashes) == [1, 1]
    # Nor can the other client end the session or release its pins: refused, clearly.
    with pytest.raises(NotOwner, match="another client's open session"):
        end(state, "r", client=OTHER)
    with pytest.raises(NotOwner, match="another client's open session"):
        state.release_pins(OTHER, "r", lookup_keys(chunk_hashes), 0.0)
    assert pins_of(state, instance, chunk_hashes) == [1, 1]
    assert state.stats(0)["sessions"] == 1

    # Once its owner ends it, the request id is free for anyone.
    assert end(state, "r") == 2
    assert lookup(state, "r", chunk_hashes, client=OTHER) == 2
    assert pinned(state) == 2


def test_a_client_can_never_name_another_clients_prefetch_job() -> None:
    state = make_state(slots=4, tier=FakeTier())
    instance = register(state)
    chunk_hashes = hashes(2, 1)
    evicted_to_tier(state, instance, chunk_hashes)
    job = lookup(state, "r", chunk_hashes)
    assert isinstance(job, Job)
    state.client(OTHER, 0.0)

    with pytest.raises(UnknownJob):
        state.query_prefetch_status(OTHER, job.id, 0.0)
    # The other client's end of the same request id is refused and drops nothing of the job's.
    with pytest.raises(NotOwner):
        end(state, "r", client=OTHER)
    assert not job.dropped and job.id in state.sessions.jobs

    # The job runs on; its count goes to its owner alone, once.
    for key in (h + instance.suffix for h in chunk_hashes):
        slot = state.sessions.prefetch_slot(job, key)
        assert slot is not None
        state.sessions.prefetched(job, key, slot, True)
    assert state.sessions.finish_prefetch(job) == 2
    with pytest.raises(UnknownJob):
        state.query_prefetch_status(OTHER, job.id, 0.0)
    assert state.query_prefetch_status(ME, job.id, 0.0) == 2
    with pytest.raises(UnknownJob):
        state.query_prefetch_status(ME, job.id, 0.0)
    assert pins_of(state, instance, chunk_hashes) == [1, 1]


def engine_lookup(state: KVState, client: bytes, engine_id: str | None, request_id: str) -> int:
    """A lookup of ``request_id`` by ``client``, declaring ``engine_id``; its count."""
    found = state.lookup(client, request_id, lookup_keys(hashes(2, 1)), 0.0, engine_id=engine_id)
    assert isinstance(found, int)
    return found


WORKER_A, WORKER_B = b"worker-a" * 2, b"worker-b" * 2


def test_a_retrieve_releases_only_the_pins_of_its_own_engines_session() -> None:
    state = make_state(slots=4)
    worker_a = register(state, WORKER_A, engine_id="a")
    worker_b = register(state, WORKER_B, engine_id="b")
    assert (worker_a.engine_id, worker_b.engine_id) == ("a", "b")
    stored = hashes(2, 1)
    assert store(state, worker_a, stored) == [None, None]
    assert engine_lookup(state, ME, "a", "a/r") == 2
    assert engine_lookup(state, OTHER, "b", "b/r") == 2
    assert pins_of(state, worker_a, stored) == [2, 2]

    # B's worker names A's session: copied, every pin stays, each key counted.
    assert retrieve(state, worker_b, "a/r", stored) == [None, None]
    assert pins_of(state, worker_a, stored) == [2, 2]
    assert state.stats(0)["retrieve_other_engine"] == 2
    assert state.stats(0)["retrieves"] == 2  # copied all the same

    # Each engine's worker releases its own engine's session's pins, once.
    assert retrieve(state, worker_a, "a/r", stored[:1]) == [None]
    assert pins_of(state, worker_a, stored) == [1, 2]
    assert retrieve(state, worker_b, "b/r", stored) == [None, None]
    assert pins_of(state, worker_a, stored) == [0, 1]
    # A request id that names no session counts nothing.
    assert retrieve(state, worker_b, "b/never-looked-up", stored) == [None, None]
    assert state.stats(0)["retrieve_other_engine"] == 2
    assert end(state, "a/r") == 1 and pinned(state) == 0


def test_without_engine_ids_a_worker_releases_any_sessions_pins_and_never_a_named_engines() -> None:
    state = make_state(slots=4)
    plain = register(state, WORKER_A)  # no engine id: one engine per server, as before
    labelled = register(state, WORKER_B, engine_id="b")
    stored = hashes(2, 1)
    assert store(state, plain, stored) == [None, None]
    assert engine_lookup(state, ME, None, "r") == 2
    assert engine_lookup(state, OTHER, "b", "b/r") == 2

    # No engine id is an engine of its own: neither side releases the other's pins.
    assert retrieve(state, plain, "b/r", stored) == [None, None]
    assert retrieve(state, labelled, "r", stored) == [None, None]
    assert pins_of(state, plain, stored) == [2, 2]
    assert state.stats(0)["retrieve_other_engine"] == 4
    # Between clients of no engine id the server cannot tell engines apart: any worker of
    # none releases any session of none (request ids must not collide: one engine a server).
    assert retrieve(state, plain, "r", stored) == [None, None]
    assert pins_of(state, plain, stored) == [1, 1]
    assert retrieve(state, labelled, "b/r", stored) == [None, None]
    assert pinned(state) == 0


def test_a_client_speaks_for_the_engine_it_first_declares_and_is_refused_another() -> None:
    state = make_state(slots=4)
    instance = register(state, ME, engine_id="a")
    stored = hashes(2, 1)
    assert store(state, instance, stored) == [None, None]

    for other in ("b", None):
        with pytest.raises(NotOwner, match="speaks for engine 'a'"):
            engine_lookup(state, ME, other, "a/r")
        with pytest.raises(NotOwner, match="speaks for engine 'a'"):
            register(state, ME, engine_id=other)
    stats = state.stats(0)
    assert (stats["not_owner"], stats["sessions"], stats["instances"]) == (4, 0, 1)
    assert pinned(state) == 0
    # Its own engine goes on working, and the session is that engine's.
    assert engine_lookup(state, ME, "a", "a/r") == 2
    assert state.sessions.sessions[(instance.namespace.id, "a/r")].engine_id == "a"
    assert register(state, ME, engine_id="a").engine_id == "a"

    # A keepalive declares nothing: a client first seen by one binds at its first lookup.
    state.client(OTHER, 0.0)
    assert engine_lookup(state, OTHER, None, "r") == 2
    with pytest.raises(NotOwner, match="speaks for engine None"):
        engine_lookup(state, OTHER, "b", "b/r")
    # A client that left and comes back is a new record: it may declare afresh.
    state.drop_client(OTHER)
    assert engine_lookup(state, OTHER, "b", "b/r") == 2
