"""The vLLM connector's event feed against live KV servers: what reaches vLLM's table.

Real servers (the harness in ``conftest.py``, over each transport), real stores through the
wire, and the connector's :class:`EventFeed` threads holding real ``kv.events`` streams;
what they read is turned by :class:`BlockEvents` (the connector's rules, which
tests/test_vllm_block_events.py checks as plain calls) into the block events vLLM would
publish. No vLLM: the connector under vLLM's own Scheduler is in tests/vllm_scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest
import torch

from kvrpc import RPCServer
from kvrpc.integrations.vllm.block_events import (
    BlockEvents,
    RemovedBlocks,
    StoredBlocks,
    expected_ranks,
)
from kvrpc.integrations.vllm.event_feed import EventFeed, FeedItem
from kvrpc.kv import protocols as kv
from kvrpc.testing.waiting import until

from .conftest import (
    MODEL,
    OK,
    WAIT,
    Keep,
    KVServer,
    RawClient,
    chunk_hashes,
    start_kv_server,
    wait_until,
)


class Watcher:
    """A feed and the table it feeds, as the connector's ``take_events`` drives them.

    ``held`` is what a consumer of the block events believes the server holds: every chunk
    hash told stored and not removed since (the tests here name no chunk, so each block
    event carries kvrpc's chunk hashes).
    """

    def __init__(self, feed: EventFeed, table: BlockEvents) -> None:
        self.feed = feed
        self.table = table
        self.items: list[FeedItem] = []
        self.held: set[bytes] = set()

    def step(self) -> None:
        for server, item in self.feed.take():
            self.items.append((server, item))
            if item is None:
                self.table.resubscribed(server)
            else:
                self.table.feed(server, item)
        for event in self.table.take():
            if isinstance(event, StoredBlocks):
                assert not event.named and event.block_size == 0
                self.held.update(event.block_hashes)
            else:
                assert isinstance(event, RemovedBlocks)
                self.held.difference_update(event.block_hashes)

    def kinds(self) -> list[str | None]:
        return [None if item is None else item.kind for _, item in self.items]

    def until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            self.step()
            if done():
                return
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; read {self.kinds()}")
            time.sleep(0.005)

    def close(self) -> None:
        self.feed.close()
        assert self.feed.alive() == 0, "a feed thread outlived close()"


def watch(url: str, opened: Keep, world_size: int = 1, **options: int) -> Watcher:
    feed = EventFeed([url], connect_timeout=WAIT, **options)
    table = BlockEvents(MODEL, world_size, expected_ranks(world_size, world_size, False))
    watcher = opened(Watcher(feed, table))
    feed.start()
    watcher.until(lambda: "snapshot_end" in watcher.kinds(), "the first snapshot")
    return watcher


def test_a_snapshot_comes_first_then_stores_of_every_rank_are_told_once(
    start_server: Callable[..., KVServer], kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    server = start_server()
    raw = opened(RawClient(server.url, world_size=2))
    rank0, rank1 = raw.register(0, kv_cache()), raw.register(1, kv_cache())
    before, after = chunk_hashes(2, seed=1), chunk_hashes(3, seed=2)
    assert rank0.store(before, 0) == rank1.store(before, 0) == [OK] * 2
    watcher = watch(server.url, opened, world_size=2)
    assert watcher.kinds()[0] is None  # the feed says a new subscription starts
    assert watcher.held == set(before)  # from the snapshot
    assert rank0.store(after, 8) == [OK] * 3
    watcher.until(lambda: watcher.kinds().count("stored") == 1, "rank 0's store")
    assert watcher.held == set(before)  # rank 1 has not stored: nothing is loadable yet
    assert rank1.store(after, 8) == [OK] * 3
    watcher.until(lambda: watcher.held == set(before + after), "both ranks' stores")
    assert server.stats_client.call(kv.CLEAR) == 10
    watcher.until(lambda: not watcher.held, "the clear")


def test_a_consumer_that_stops_reading_gets_a_gap_and_then_the_truth(
    start_server: Callable[..., KVServer], kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    server = start_server(slots=64)
    raw = opened(RawClient(server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    watcher = watch(server.url, opened, max_events=2, server_buffer=2)
    # Nobody takes from the feed now (an idle engine): its queue fills, the stream's window
    # (256) and the server's buffer (2) after it; 400 stores, each an event, and the
    # evictions they cause overflow all of them.
    hashes = [chunk_hashes(1, seed=100 + i)[0] for i in range(400)]
    for i, chunk_hash in enumerate(hashes):
        assert worker.store([chunk_hash], i % 32 * 2) == [OK]
    first = len(watcher.items)
    watcher.until(
        lambda: (
            "gap" in watcher.kinds()[first:]
            and "snapshot_end" in watcher.kinds()[first + watcher.kinds()[first:].index("gap") :]
        ),
        "the gap and the snapshot after it",
    )
    gap = watcher.kinds()[first:].index("gap") + first
    assert watcher.kinds()[gap + 1] is None  # then a new subscription, with its snapshot
    held = {h for h in hashes if raw.probe([h]) == 1}
    assert len(held) == 64  # the pool is full of the latest ones
    assert watcher.held == held


def test_after_the_server_restarts_the_feed_subscribes_again_and_withdraws_what_went(
    start_server: Callable[..., KVServer], kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    server = start_server()
    raw = RawClient(server.url, world_size=1)
    worker = raw.register(0, kv_cache())
    hashes = chunk_hashes(2, seed=3)
    assert worker.store(hashes, 0) == [OK] * 2
    raw.close()
    watcher = watch(server.url, opened)
    assert watcher.held == set(hashes)
    server.stop()  # its stream ends; the feed tries again, and again, while it is down
    restarted = start_kv_server(server.url)
    try:
        watcher.until(lambda: watcher.kinds().count("snapshot_end") == 2, "a second snapshot")
        assert watcher.held == set()  # the new server holds nothing
        assert watcher.feed.subscriptions >= 2
        raw = opened(RawClient(restarted.url, world_size=1))
        again = chunk_hashes(1, seed=4)
        assert raw.register(0, kv_cache()).store(again, 0) == [OK]
        watcher.until(lambda: watcher.held == set(again), "a store on the restarted server")
        watcher.close()  # before the server stops, as the connector's shutdown does
    finally:
        restarted.stop()


def test_closing_the_feed_ends_its_subscriptions_even_with_its_queue_full(
    start_server: Callable[..., KVServer], kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    server = start_server()
    raw = opened(RawClient(server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    watcher = watch(server.url, opened, max_events=1)
    for i in range(4):  # the queue holds one item: the thread waits for room
        assert worker.store(chunk_hashes(1, seed=10 + i), 2 * i) == [OK]

    def subscriptions() -> int:
        return asyncio.run_coroutine_threadsafe(_count(server), server.loop).result(WAIT)

    assert subscriptions() == 1
    watcher.feed.close()
    assert watcher.feed.alive() == 0
    wait_until(subscriptions, lambda n: n == 0, "the server to drop the subscription")
    assert watcher.feed.take() == []  # a closed feed holds nothing


async def _count(server: KVServer) -> int:
    return server.service.events.subscriptions


async def test_a_server_without_kv_events_is_given_up_on_with_a_warning(
    server: RPCServer, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    feed = EventFeed([url], connect_timeout=WAIT)
    with caplog.at_level(logging.WARNING, logger="kvrpc.vllm"):
        feed.start()
        # The feed's threads, with no event to wait on: it gives up and its thread ends.
        await until(lambda: not feed.alive(), "the feed to give up on the server", WAIT)
    assert feed.take() == [(0, None)]  # it had begun a subscription; nothing came
    await asyncio.to_thread(feed.close)
    assert "has no kv.events" in caplog.text
