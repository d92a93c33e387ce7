"""The KV server's events from a real served service: stores, evictions, tiers, clear.

A KVService served over ``inproc://`` (the transport does not matter here: events are
taken from the service object, on its loop; the RPC stream is tested by the events CLI's
and the router's tests, and by the last test here, on every transport), with a real disk
tier in a temporary directory and a real ``redis-server`` where one is installed. The disk
tier's own reports are checked on a DiskTier alone, with real files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from kvrpc.client import SyncClient
from kvrpc.kv import KVService
from kvrpc.kv import protocols as kv
from kvrpc.kv.server.events import Event, EventKind, Subscription
from kvrpc.kv.server.observer import DELETED, DISK, EVICTED, L1
from kvrpc.kv.server.tiers.disk import DiskTier
from kvrpc.testing.redis_server import RedisProcess, redis_available

from .conftest import (
    CHUNK,
    MODEL,
    OK,
    WAIT,
    Keep,
    KVServer,
    RawClient,
    chunk_hashes,
    wait_until,
)

T = TypeVar("T")
K = EventKind

#: The served tests run over inproc only: the transport carries none of this.
inproc = pytest.mark.parametrize("start_server", ["inproc"], indirect=True)


def on_loop(server: KVServer, fn: Callable[[], T]) -> T:
    """``fn()`` run on the server's loop thread, the only one that may touch the hub."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:
            done.set_exception(exc)

    server.loop.call_soon_threadsafe(run)
    return done.result(WAIT)


def subscribe(server: KVServer, *, snapshot: bool = False) -> Subscription:
    return on_loop(server, lambda: server.service.events.subscribe(snapshot=snapshot))


def take(server: KVServer, sub: Subscription) -> list[Event]:
    """Everything the subscription holds now."""

    def drain() -> list[Event]:
        out: list[Event] = []
        while got := sub.take(100):
            out += got
        return out

    return on_loop(server, drain)


def told(events: Sequence[Event]) -> list[tuple[EventKind, str, str | None, list[bytes]]]:
    """(kind, tier, source or reason, hashes) of each event."""
    return [(e.kind, e.tier, e.source or e.reason, list(e.hashes)) for e in events]


@inproc
def test_stores_evictions_and_clear_of_a_served_pool_are_told_in_order(
    start_server: Callable[..., KVServer], kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    server = start_server(slots=4)
    raw = opened(RawClient(server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    sub = subscribe(server)
    a, b = chunk_hashes(3, 1), chunk_hashes(3, 2)
    assert worker.store(a, 0) == [OK] * 3
    assert worker.store(b, 8) == [OK] * 3  # a full pool of 4: two of a go
    assert server.stats_client.call(kv.CLEAR) == 4
    events = take(server, sub)
    assert told(events) == [
        (K.STORED, L1, None, a),
        (K.REMOVED, L1, EVICTED, [a[0], a[1]]),  # one event for the store's evictions
        (K.STORED, L1, None, b),
        (K.CLEARED, L1, None, []),
    ]
    assert [e.seq for e in events] == [1, 2, 3, 4]
    first = events[0]
    assert (first.model_name, first.world_size, first.worker_id, first.chunk_tokens) == (
        MODEL,
        1,
        0,
        CHUNK,
    )
    assert len(first.namespace) == 8


@inproc
def test_write_downs_to_disk_and_prefetch_loads_are_moves_between_tiers(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
) -> None:
    server = start_server(slots=4, disk_dir=tmp_path)
    raw = opened(RawClient(server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    sub = subscribe(server)
    a, b = chunk_hashes(2, 3), chunk_hashes(4, 4)
    assert worker.store(a, 0) == [OK, OK]
    server.wait_stats("a on disk", tier_saves=2, pinned_chunks=0)
    assert worker.store(b, 8) == [OK] * 4  # a leaves L1, stays on disk
    server.wait_stats("b on disk", tier_saves=6, pinned_chunks=0)
    job = raw.lookup("r", a)
    assert isinstance(job, str)
    assert wait_until(lambda: raw.query(job), lambda n: n is not None, "the prefetch") == 2
    events = told(take(server, sub))
    assert events[0] == (K.STORED, L1, None, a)
    # A store's saves run side by side: they land on the disk in either order.
    assert sorted(events[1:3]) == sorted([(K.MOVED, DISK, L1, [h]) for h in a])
    assert events[3:5] == [
        (K.REMOVED, L1, EVICTED, [a[0], a[1]]),  # the store's evictions, as one event
        (K.STORED, L1, None, b),
    ]
    assert sorted(e[3][0] for e in events[5:9]) == sorted(b)
    assert all(e[:3] == (K.MOVED, DISK, L1) for e in events[5:9])
    # The prefetch: each load makes room in L1 first, then lands there from the disk.
    assert events[9:] == [
        (K.REMOVED, L1, EVICTED, [b[0]]),
        (K.MOVED, L1, DISK, [a[0]]),
        (K.REMOVED, L1, EVICTED, [b[1]]),
        (K.MOVED, L1, DISK, [a[1]]),
    ]


@inproc
def test_a_snapshot_of_a_served_cache_lists_l1_and_disk_then_live_events_follow(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
) -> None:
    server = start_server(slots=4, disk_dir=tmp_path)
    raw = opened(RawClient(server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    a, b, c = chunk_hashes(2, 5), chunk_hashes(4, 6), chunk_hashes(1, 7)
    assert worker.store(a, 0) == [OK, OK]
    server.wait_stats("a on disk", tier_saves=2, pinned_chunks=0)
    assert worker.store(b, 8) == [OK] * 4
    server.wait_stats("b on disk", tier_saves=6, pinned_chunks=0)
    sub = subscribe(server, snapshot=True)
    assert worker.store(c, 24) == [OK]
    events = take(server, sub)
    end = [e.kind for e in events].index(K.SNAPSHOT_END)
    listed = {(e.tier, h) for e in events[:end] for h in e.hashes}
    assert listed == {(L1, h) for h in b} | {(DISK, h) for h in a + b}
    assert all(e.kind is K.SNAPSHOT and e.seq == sub.snapshot_seq for e in events[:end])
    live = told(events[end + 1 :])
    assert live[:2] == [(K.REMOVED, L1, EVICTED, [b[0]]), (K.STORED, L1, None, c)]
    assert all(e.seq > sub.snapshot_seq for e in events[end + 1 :])


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    if not redis_available():
        pytest.skip("redis-server/redis-cli not installed")
    with RedisProcess() as process:
        yield process


@inproc
def test_writes_to_redis_are_moves_from_l1(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    redis: RedisProcess,
) -> None:
    server = start_server(slots=8, redis_url=redis.url)
    raw = opened(RawClient(server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    sub = subscribe(server)
    a = chunk_hashes(2, 8)
    assert worker.store(a, 0) == [OK, OK]
    server.wait_stats("written to Redis", redis_writes=2, redis_write_queued=0)
    events = told(take(server, sub))
    assert events[0] == (K.STORED, L1, None, a)
    assert sorted(events[1:]) == sorted([(K.MOVED, "redis", L1, [h]) for h in a])


async def test_closing_the_service_closes_its_subscriptions() -> None:
    service = KVService(chunk_size=CHUNK, cpu_buffer_bytes=1 << 20)
    async with service:
        sub = service.events.subscribe()
        woken = asyncio.Event()
        sub.wakeup = woken.set
    assert woken.is_set() and sub.closed


# ------------------------------------------------------------------ the disk tier's reports


class Reports:
    """An observer that keeps what it is told: the test's window on the tier's calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[bytes], str | None]] = []
        self.watching = True

    def stored(self, tier: str, keys: Sequence[bytes], source: str | None = None) -> None:
        self.calls.append(("stored", tier, list(keys), source))

    def removed(self, tier: str, keys: Sequence[bytes], reason: str) -> None:
        self.calls.append(("removed", tier, list(keys), reason))

    def cleared(self, tier: str) -> None:
        self.calls.append(("cleared", tier, [], None))


def pool_key(i: int) -> bytes:
    return bytes([i]) * 32 + b"N" * 8 + b"\x00\x00"


async def test_the_disk_tier_reports_saves_evictions_and_bad_files(tmp_path: Path) -> None:
    nbytes = 256
    tier = DiskTier(tmp_path, capacity_bytes=2 * nbytes)
    reports = Reports()
    tier.observe(reports)
    try:
        for i in range(3):
            await tier.save(pool_key(i), torch.full((nbytes,), i, dtype=torch.uint8))
        assert reports.calls == [
            ("stored", DISK, [pool_key(0)], L1),
            ("stored", DISK, [pool_key(1)], L1),
            ("removed", DISK, [pool_key(0)], EVICTED),  # room for 2, told before 2 lands
            ("stored", DISK, [pool_key(2)], L1),
        ]
        assert tier.held_keys() == [pool_key(1), pool_key(2)]
        (tmp_path / pool_key(1).hex()).write_bytes(b"not a chunk")
        assert await tier.load(pool_key(1), torch.empty(nbytes, dtype=torch.uint8)) is None
        assert reports.calls[-1] == ("removed", DISK, [pool_key(1)], DELETED)
        reports.watching = False
        await tier.save(pool_key(3), torch.zeros(nbytes, dtype=torch.uint8))
        assert len(reports.calls) == 5  # nobody listening: nothing gathered
    finally:
        await tier.aclose()


def test_kv_stats_counts_the_subscribers_over_rpc(kv_server: KVServer) -> None:
    """A subscription over RPC shows in ``kv.stats``, and leaves it when the stream closes."""
    with SyncClient(kv_server.url, registry=kv.kv_registry(), timeout=WAIT) as client:
        assert kv_server.stats()["event_subscribers"] == 0
        first = client.stream(kv.EVENTS, kv.EventsRequest(snapshot=True), timeout=WAIT)
        second = client.stream(kv.EVENTS, kv.EventsRequest(snapshot=True), timeout=WAIT)
        # The snapshot's end proves each subscription is taken.
        assert next(first).kind == "snapshot_end" and next(second).kind == "snapshot_end"
        assert kv_server.stats()["event_subscribers"] == 2
        first.close()
        wait_until(lambda: kv_server.stats()["event_subscribers"], lambda n: n == 1, "a close")
        second.close()
        wait_until(lambda: kv_server.stats()["event_subscribers"], lambda n: n == 0, "a close")
