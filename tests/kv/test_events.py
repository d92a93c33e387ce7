"""The event hub as specifications: plain synchronous calls, no server, no event loop.

What :class:`~kvrpc.kv.server.events.EventHub` promises a subscriber: numbers that only
grow, a snapshot and live events that together tell every change exactly once, a bounded
buffer whose overflow is told by exactly one gap, independent subscribers, and nothing
numbered or kept for nobody.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator

import pytest

from kvrpc.errors import KVError
from kvrpc.kv.server.events import ChunkGroup, Event, EventHub, EventKind, Subscription

NS = b"ns-one!!"
OTHER_NS = b"ns-two!!"
K = EventKind


def h(i: int) -> bytes:
    """The 32-byte hash of chunk ``i``."""
    return hashlib.sha256(str(i).encode()).digest()


def group(*ids: int, ns: bytes = NS, worker: int = 0) -> ChunkGroup:
    return ChunkGroup(ns, worker, tuple(h(i) for i in ids), "model", 1)


def store(hub: EventHub, *ids: int, ns: bytes = NS) -> None:
    hub.publish(K.STORED, "l1", group(*ids, ns=ns))


def drain(sub: Subscription, step: int = 1000) -> list[Event]:
    """Everything the subscription holds now."""
    out: list[Event] = []
    while True:
        got = sub.take(step)
        if not got:
            return out
        out += got


class Cache:
    """A model cache: the (tier, namespace, worker, hash) held, and a snapshot source of it.

    The source copies the set when called, as the server's copies the keys held.
    """

    def __init__(self, hub_max: int = 4) -> None:
        self.held: set[tuple[str, bytes, int, bytes]] = set()
        self.step = hub_max
        self.pulled = 0  # snapshot groups pulled so far

    def source(self, namespace: bytes | None) -> Iterator[tuple[str, ChunkGroup]]:
        copy = sorted(c for c in self.held if namespace is None or c[1] == namespace)
        return self._pull(copy)

    def _pull(self, copy: list[tuple[str, bytes, int, bytes]]) -> Iterator[tuple[str, ChunkGroup]]:
        for start in range(0, len(copy), self.step):
            part = copy[start : start + self.step]
            for tier, ns, worker, chunk in part:
                self.pulled += 1
                yield tier, ChunkGroup(ns, worker, (chunk,))


def apply(view: set[tuple[str, bytes, int, bytes]], event: Event) -> None:
    """Apply a live event to a subscriber's view, failing on a duplicate or a gap."""
    chunks = {(event.tier, event.namespace, event.worker_id or 0, x) for x in event.hashes}
    if event.kind in (K.STORED, K.MOVED, K.SNAPSHOT):
        assert not chunks & view, f"told twice: {event}"
        view |= chunks
    elif event.kind is K.REMOVED:
        assert chunks <= view, f"removed unseen chunks: {event}"
        view -= chunks
    elif event.kind is K.CLEARED:
        view -= {c for c in view if c[0] == event.tier}
    else:
        raise AssertionError(f"unexpected {event}")


# ------------------------------------------------------------------ numbering


def test_sequence_numbers_grow_by_one_across_kinds_and_split_groups() -> None:
    hub = EventHub(chunk_tokens=8, max_hashes=2)
    sub = hub.subscribe()
    store(hub, 1, 2, 3, 4, 5)  # three events of 2, 2 and 1 hashes
    hub.publish(K.REMOVED, "l1", group(1), reason="evicted")
    hub.publish(K.CLEARED, "l1")
    events = drain(sub)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert hub.seq == 5
    assert [e.kind for e in events] == [K.STORED] * 3 + [K.REMOVED, K.CLEARED]
    assert sum((e.hashes for e in events[:3]), ()) == tuple(h(i) for i in range(1, 6))
    assert all(len(e.hashes) <= 2 for e in events)
    assert events[3].reason == "evicted" and events[0].chunk_tokens == 8
    assert (events[0].namespace, events[0].model_name, events[0].world_size) == (NS, "model", 1)


def test_publishing_with_no_subscriber_numbers_and_keeps_nothing() -> None:
    hub = EventHub(chunk_tokens=8)
    assert not hub.watching
    for i in range(100):
        store(hub, i)
    assert hub.seq == 0
    sub = hub.subscribe()
    assert hub.watching and sub.snapshot_seq == 0 and not sub.pending
    store(hub, 7)
    assert [e.seq for e in drain(sub)] == [1]


# ------------------------------------------------------------------ snapshot then live


def test_a_snapshot_then_live_events_tell_every_chunk_once_while_the_cache_changes() -> None:
    cache = Cache()
    hub = EventHub(chunk_tokens=8, snapshot=cache.source)
    rng = random.Random(26)
    watcher = hub.subscribe(buffer=60_000)  # sees everything from the start, as a check
    next_id = 0

    def change() -> None:
        nonlocal next_id
        gone = [c for c in cache.held if rng.random() < 0.2]
        for tier, ns, worker, chunk in gone:
            cache.held.discard((tier, ns, worker, chunk))
            hub.publish(K.REMOVED, tier, ChunkGroup(ns, worker, (chunk,)), reason="evicted")
        for _ in range(rng.randint(1, 4)):
            tier, ns = rng.choice(["l1", "disk"]), rng.choice([NS, OTHER_NS])
            cache.held.add((tier, ns, 0, h(next_id)))
            hub.publish(K.STORED, tier, ChunkGroup(ns, 0, (h(next_id),)))
            next_id += 1

    for _ in range(30):
        change()
    sub = hub.subscribe(buffer=60_000, snapshot=True)
    assert sub.snapshot_seq == hub.seq
    at_snapshot = set(cache.held)
    view: set[tuple[str, bytes, int, bytes]] = set()
    live: list[Event] = []
    snapshot_done = False
    while not snapshot_done:  # pull the snapshot slowly, the cache changing meanwhile
        for event in sub.take(3):
            if event.kind is K.SNAPSHOT_END:
                assert view == at_snapshot  # exactly what was held at snapshot_seq
                snapshot_done = True
            elif event.kind is K.SNAPSHOT:
                assert event.seq == sub.snapshot_seq
                apply(view, event)
            else:
                assert snapshot_done, f"a live event before the snapshot's end: {event}"
                live.append(event)
        change()
    assert cache.pulled <= len(at_snapshot)
    for _ in range(10):
        change()
    live += drain(sub)
    # Every number after the snapshot's, once, in order: no gap, no duplicate.
    assert [e.seq for e in live] == list(range(sub.snapshot_seq + 1, hub.seq + 1))
    for event in live:
        apply(view, event)
    assert view == cache.held
    assert len(drain(watcher)) == hub.seq  # the other subscription saw every number


def test_the_snapshot_is_pulled_as_the_subscriber_takes_it_not_all_at_once() -> None:
    cache = Cache(hub_max=1)
    cache.held = {("l1", NS, 0, h(i)) for i in range(50)}
    hub = EventHub(chunk_tokens=8, snapshot=cache.source)
    sub = hub.subscribe(snapshot=True)
    assert cache.pulled == 0 and sub.pending
    first = sub.take(5)
    assert [e.kind for e in first] == [K.SNAPSHOT] * 5 and cache.pulled == 5
    rest = drain(sub)
    assert [e.kind for e in rest] == [K.SNAPSHOT] * 45 + [K.SNAPSHOT_END]
    assert rest[-1].seq == 0


def test_an_empty_snapshot_is_just_its_end() -> None:
    hub = EventHub(chunk_tokens=8)  # no source: nothing is ever held
    sub = hub.subscribe(snapshot=True)
    assert [(e.kind, e.seq) for e in drain(sub)] == [(K.SNAPSHOT_END, 0)]


def test_a_namespace_filter_applies_to_the_snapshot_and_to_live_chunk_events_only() -> None:
    cache = Cache()
    cache.held = {("l1", NS, 0, h(1)), ("l1", OTHER_NS, 0, h(2))}
    hub = EventHub(chunk_tokens=8, snapshot=cache.source)
    sub = hub.subscribe(snapshot=True, namespace=NS)
    store(hub, 3, ns=OTHER_NS)
    store(hub, 4, ns=NS)
    hub.publish(K.CLEARED, "l1")
    events = drain(sub)
    assert [(e.kind, e.hashes) for e in events] == [
        (K.SNAPSHOT, (h(1),)),
        (K.SNAPSHOT_END, ()),
        (K.STORED, (h(4),)),
        (K.CLEARED, ()),
    ]
    assert [e.seq for e in events[2:]] == [2, 3]  # the other namespace's number is skipped


# ------------------------------------------------------------------ overflow


def test_overflow_drops_the_oldest_and_tells_it_with_exactly_one_gap_then_live_goes_on() -> None:
    hub = EventHub(chunk_tokens=8)
    sub = hub.subscribe(buffer=4)
    for i in range(1, 11):
        store(hub, i)
    events = drain(sub)
    assert [(e.kind, e.first, e.last) for e in events[:1]] == [(K.GAP, 1, 6)]
    assert [e.seq for e in events[1:]] == [7, 8, 9, 10]
    assert all(e.kind is K.STORED for e in events[1:])
    assert sub.lost == 6
    store(hub, 11)
    store(hub, 12)
    assert [(e.kind, e.seq) for e in drain(sub)] == [(K.STORED, 11), (K.STORED, 12)]


def test_a_second_overflow_after_a_take_is_a_second_gap_of_its_own_range() -> None:
    hub = EventHub(chunk_tokens=8)
    sub = hub.subscribe(buffer=2)
    for i in range(5):
        store(hub, i)  # 1..5: 1-3 lost
    assert [(e.kind, e.seq) for e in sub.take(2)] == [(K.GAP, 3), (K.STORED, 4)]
    for i in range(3):
        store(hub, i)  # 6..8: the buffer held 5, so 5 and 6 are lost
    events = drain(sub)
    assert [(e.kind, e.first, e.last) for e in events if e.kind is K.GAP] == [(K.GAP, 5, 6)]
    assert [e.seq for e in events if e.kind is K.STORED] == [7, 8]


def test_the_buffer_never_holds_more_than_its_size_and_one_gap() -> None:
    hub = EventHub(chunk_tokens=8)
    sub = hub.subscribe(buffer=8)
    for i in range(1000):
        store(hub, i)
        assert len(sub) <= 8
    events = sub.take(10_000)
    assert len(events) == 9 and events[0].kind is K.GAP
    assert (events[0].first, events[0].last) == (1, 992)


def test_an_overflow_during_the_snapshot_comes_after_the_snapshot_s_end() -> None:
    cache = Cache()
    cache.held = {("l1", NS, 0, h(i)) for i in range(3)}
    hub = EventHub(chunk_tokens=8, snapshot=cache.source)
    sub = hub.subscribe(buffer=2, snapshot=True)
    for i in range(10, 15):
        store(hub, i)
    kinds = [e.kind for e in drain(sub)]
    assert kinds == [K.SNAPSHOT] * 3 + [K.SNAPSHOT_END, K.GAP, K.STORED, K.STORED]


# ------------------------------------------------------------------ subscribers


def test_subscribers_are_independent() -> None:
    hub = EventHub(chunk_tokens=8)
    slow, fast = hub.subscribe(buffer=2), hub.subscribe(buffer=100)
    for i in range(5):
        store(hub, i)
        assert [e.seq for e in fast.take(10)] == [i + 1]
    assert [e.kind for e in drain(slow)] == [K.GAP, K.STORED, K.STORED]
    assert fast.lost == 0 and slow.lost == 3


def test_an_unsubscribed_subscription_gets_nothing_and_the_hub_stops_numbering() -> None:
    hub = EventHub(chunk_tokens=8)
    sub = hub.subscribe()
    store(hub, 1)
    sub.close()
    sub.close()  # idempotent
    assert sub.closed and not sub.pending and sub.take() == []
    assert not hub.watching and hub.subscriptions == 0
    store(hub, 2)
    assert hub.seq == 1


def test_wakeup_is_called_when_the_subscription_becomes_non_empty_and_on_close() -> None:
    hub = EventHub(chunk_tokens=8)
    sub = hub.subscribe(buffer=2)
    calls: list[int] = []
    sub.wakeup = lambda: calls.append(hub.seq)
    store(hub, 1)
    store(hub, 2)
    store(hub, 3)  # overflows: still not empty, no call
    assert calls == [1]
    drain(sub)
    store(hub, 4)
    assert calls == [1, 4]
    hub.close()
    assert calls == [1, 4, 4] and sub.closed


def test_limits_are_refused_with_clear_errors() -> None:
    hub = EventHub(chunk_tokens=8, max_subscribers=2)
    with pytest.raises(KVError, match="1 to"):
        hub.subscribe(buffer=0)
    hub.subscribe()
    last = hub.subscribe()
    with pytest.raises(KVError, match="limit"):
        hub.subscribe()
    last.close()
    hub.subscribe()  # room again
    with pytest.raises(ValueError, match="max_items"):
        last.take(0)
    hub.close()
    with pytest.raises(KVError, match="closing"):
        hub.subscribe()


def test_a_wakeup_that_unsubscribes_does_not_disturb_the_others() -> None:
    hub = EventHub(chunk_tokens=8)
    first, second = hub.subscribe(), hub.subscribe()
    leave: Callable[[], None] = first.close
    first.wakeup = leave
    store(hub, 1)
    assert first.closed and [e.seq for e in drain(second)] == [1]
