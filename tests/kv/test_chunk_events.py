"""What the state core tells the event hub, as specifications: plain calls, no server.

A :class:`~kvrpc.kv.server.state.KVState` with a real pool, observed by
:class:`~kvrpc.kv.server.chunk_events.ChunkEvents`, stores, evicts, drops and clears the
way the I/O shell has it do; the hub's events must say exactly that, in that order. The
tiers' own events (a real disk tier, a real Redis) and the whole served path are in
``test_events_service.py``.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvrpc.kv.outcomes import copy_failed
from kvrpc.kv.server.chunk_events import ChunkEvents
from kvrpc.kv.server.events import Event, EventKind, Subscription
from kvrpc.kv.server.observer import Enumerable
from kvrpc.kv.server.state import KVState

from .test_state import (
    CHUNK,
    MODEL,
    FakeTier,
    hashes,
    keys_for,
    make_state,
    pool_of,
    register,
    rows,
    store,
    two_ranks,
)

K = EventKind


class ListedTier(FakeTier):
    """The state's fake tier, which can also list its keys as the disk tier does."""

    def held_keys(self) -> Iterable[bytes]:
        return sorted(self.keys)


def observed(slots: int = 4, tier: FakeTier | None = None) -> tuple[KVState, ChunkEvents]:
    state = make_state(slots, tier=tier)
    events = ChunkEvents(state, disk=tier if isinstance(tier, Enumerable) else None)
    state.observer = events
    return state, events


def drain(sub: Subscription) -> list[Event]:
    out: list[Event] = []
    while got := sub.take(100):
        out += got
    return out


def told(events: list[Event]) -> list[tuple[EventKind, str, str | None, list[bytes]]]:
    """Each event as (kind, tier, reason, hashes), for comparing."""
    return [(e.kind, e.tier, e.reason, list(e.hashes)) for e in events]


def test_a_store_is_one_stored_event_naming_the_namespace_model_rank_and_chunk_size() -> None:
    state, events = observed()
    instance = register(state)
    sub = events.hub.subscribe()
    chunk_hashes = hashes(3, 1)
    assert store(state, instance, chunk_hashes) == [None] * 3
    (event,) = drain(sub)
    assert (event.kind, event.seq, event.tier, list(event.hashes)) == (
        K.STORED,
        1,
        "l1",
        chunk_hashes,
    )
    assert (event.namespace, event.model_name, event.world_size, event.worker_id) == (
        instance.namespace.id,
        MODEL,
        1,
        0,
    )
    assert event.chunk_tokens == CHUNK


def test_nothing_is_published_while_nobody_subscribes() -> None:
    state, events = observed(slots=2)
    instance = register(state)
    store(state, instance, hashes(5, 1))  # stores and evicts
    state.clear()
    assert events.hub.seq == 0


def test_a_stores_evictions_are_told_as_one_event_before_the_store_that_made_room() -> None:
    state, events = observed(slots=4)
    instance = register(state)
    old = hashes(4, 1)
    store(state, instance, old)
    sub = events.hub.subscribe()
    new = hashes(2, 2)
    store(state, instance, new)
    assert told(drain(sub)) == [
        (K.REMOVED, "l1", "evicted", [old[0], old[1]]),
        (K.STORED, "l1", None, new),
    ]


def test_a_failed_store_tells_nothing() -> None:
    state, events = observed()
    instance = register(state)
    sub = events.hub.subscribe()
    plan = state.begin_store(instance, keys_for(instance, hashes(2, 1)), rows(2))
    state.settle_store(plan, copy_failed("the copy broke"))
    assert drain(sub) == []


def test_clear_tells_cleared_when_l1_is_left_empty() -> None:
    state, events = observed()
    instance = register(state)
    store(state, instance, hashes(3, 1))
    sub = events.hub.subscribe()
    assert state.clear() == 3
    assert told(drain(sub)) == [(K.CLEARED, "l1", None, [])]


def test_clear_tells_each_dropped_chunk_when_pinned_ones_stay() -> None:
    state, events = observed()
    instance = register(state)
    chunk_hashes = hashes(3, 1)
    store(state, instance, chunk_hashes)
    pool = pool_of(state)
    kept = pool.lookup(chunk_hashes[1] + instance.suffix)
    assert kept is not None
    pool.pin(kept)
    sub = events.hub.subscribe()
    assert state.clear() == 2
    (event,) = drain(sub)
    assert (event.kind, event.reason) == (K.REMOVED, "cleared")
    assert sorted(event.hashes) == sorted([chunk_hashes[0], chunk_hashes[2]])


def test_a_chunk_found_bad_in_l1_is_told_as_deleted() -> None:
    state, events = observed()
    instance = register(state)
    chunk_hashes = hashes(2, 1)
    store(state, instance, chunk_hashes)
    sub = events.hub.subscribe()
    keys = keys_for(instance, chunk_hashes)
    plan = state.begin_retrieve(instance, ["r", "r"], keys, rows(2, 32))
    state.settle_retrieve(plan, None, corrupt=[1], bad_in_l1=[1])
    assert told(drain(sub)) == [(K.REMOVED, "l1", "deleted", [chunk_hashes[1]])]


def test_a_snapshot_lists_l1_and_the_disk_per_rank_and_only_what_it_held() -> None:
    tier = ListedTier()
    state, events = observed(slots=8, tier=tier)
    rank0, rank1 = two_ranks(state)
    chunk_hashes = hashes(2, 1)
    store(state, rank0, chunk_hashes)  # written through: on disk too
    store(state, rank1, chunk_hashes[:1])
    tier.keys.add(b"short-name")  # a stray file named like no pool key
    sub = events.hub.subscribe(snapshot=True)
    store(state, rank1, hashes(1, 9))  # after the snapshot: a live event only
    snapshot = drain(sub)
    listed = {(e.tier, e.worker_id, h) for e in snapshot if e.kind is K.SNAPSHOT for h in e.hashes}
    assert listed == {
        ("l1", 0, chunk_hashes[0]),
        ("l1", 0, chunk_hashes[1]),
        ("l1", 1, chunk_hashes[0]),
        ("disk", 0, chunk_hashes[0]),
        ("disk", 0, chunk_hashes[1]),
        ("disk", 1, chunk_hashes[0]),
    }
    assert all(e.world_size == 2 for e in snapshot if e.kind is K.SNAPSHOT)
    assert [e.kind for e in snapshot[-2:]] == [K.SNAPSHOT_END, K.STORED]
    assert snapshot[-1].hashes == tuple(hashes(1, 9))


def test_a_snapshot_pulled_while_the_pool_evicts_still_tells_each_chunk_once() -> None:
    state, events = observed(slots=4)
    instance = register(state)
    store(state, instance, hashes(4, 1))
    events.hub.max_hashes = 1  # one chunk a snapshot event, to pull it between changes
    sub = events.hub.subscribe(snapshot=True)
    view: set[bytes] = set()
    seeds = iter(range(10, 100))
    while True:
        (event,) = sub.take(1)
        if event.kind is K.SNAPSHOT_END:
            break
        assert not set(event.hashes) & view
        view |= set(event.hashes)
        store(state, instance, hashes(1, next(seeds)))  # evicts one, stores one
    for event in drain(sub):
        if event.kind is K.STORED:
            assert not set(event.hashes) & view
            view |= set(event.hashes)
        else:
            assert event.kind is K.REMOVED and set(event.hashes) <= view
            view -= set(event.hashes)
    held = pool_of(state).keys()
    assert view == {key[:32] for key in held}
