"""examples/prefix_router.py against real KV servers: its answers are the servers' lookups.

Live servers from the harness (``conftest.py``, over unix sockets: the router's logic does
not depend on the transport, which the conformance suite covers), engines that store
prompts through the real worker adapters, and the router on the test's own event loop.
The router is known to have caught up with a server once the number of its last applied
event reaches the server's hub's (read on the server's loop); every comparison waits for
that first, on the router's own condition, never on a clock. The lookups are the real
``kv.lookup`` of each server, made through the scheduler adapter from the same token ids.

Its index is also tested on its own, fed events by hand, at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import itertools
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
import torch

from kvrpc.kv import LoadStoreOp, SchedulerAdapter
from kvrpc.kv import protocols as kv
from kvrpc.kv.protocols import KVEvent

from .conftest import (
    BLOCK,
    CHUNK,
    MODEL,
    OK,
    WAIT,
    WORLD,
    Keep,
    KVServer,
    RawClient,
    blocks,
    chunk_hashes,
    lookup_tokens,
    open_workers,
    prompt,
    start_kv_server,
    store_all,
)

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]

#: The served tests run over unix sockets only.
unix = pytest.mark.parametrize("start_server", ["unix"], indirect=True)


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "prefix_router", ROOT / "examples" / "prefix_router.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


example = load_example()
PrefixRouter = example.PrefixRouter
ServerIndex = example.ServerIndex

_ids = itertools.count()


# ------------------------------------------------------------------ helpers


def on_loop(server: KVServer, fn: Callable[[], T]) -> T:
    """``fn()`` run on the server's loop thread, the only one that may touch its hub."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:
            done.set_exception(exc)

    server.loop.call_soon_threadsafe(run)
    return done.result(WAIT)


async def caught_up(router: Any, *servers: KVServer) -> None:
    """Wait until the router has applied every event each server has published so far."""
    for server in servers:
        await _caught_up(router, server)


async def _caught_up(router: Any, server: KVServer) -> None:
    seq = on_loop(server, lambda: server.service.events.seq)
    async with asyncio.timeout(WAIT):  # bounds a hang; the outcome is the condition's
        await router.wait_for(lambda: router.seq(server.url) >= seq)


class Engine:
    """One engine on one server: its workers (every rank) and its scheduler."""

    def __init__(
        self,
        server: KVServer,
        kv_cache: Callable[..., list[torch.Tensor]],
        opened: Keep,
        world_size: int = WORLD,
    ) -> None:
        self.server = server
        self.workers = open_workers(server.url, kv_cache, opened, world_size)
        self.scheduler: SchedulerAdapter = opened(
            SchedulerAdapter(server.url, MODEL, world_size, 0, BLOCK)
        )

    def store(self, tokens: list[int], ranks: list[int] | None = None) -> None:
        """Every rank (or only ``ranks``) stores the whole chunks of ``tokens``; waits."""
        request_id = f"store-{next(_ids)}"
        op = LoadStoreOp(blocks(0, len(tokens) // CHUNK), token_ids=tokens)
        chosen = self.workers if ranks is None else [self.workers[r] for r in ranks]
        store_all(chosen, request_id, op)

    def lookup(self, tokens: list[int]) -> int:
        """The server's ``kv.lookup`` of ``tokens``, in tokens; its session ended after."""
        request_id = f"lookup-{next(_ids)}"
        matched = lookup_tokens(self.scheduler, request_id, token_ids=tokens)
        self.scheduler.end_session(request_id)
        # Its pins gone before anything else runs (no other sessions are open here).
        self.server.wait_stats("the lookup's session to end", sessions=0)
        return matched


async def check_routes(router: Any, engines: list[Engine], prompts: list[list[int]]) -> None:
    """For each prompt: the router's count per server is that server's lookup, and its
    choice is a server whose lookup matched the most."""
    for tokens in prompts:
        # A lookup may change what is held (it loads chunks back from the disk): caught
        # up again before each.
        await caught_up(router, *(engine.server for engine in engines))
        ours = router.cached_tokens(tokens)
        theirs = {e.server.url: await asyncio.to_thread(e.lookup, tokens) for e in engines}
        assert ours == theirs
        url, cached = router.route(tokens)
        assert cached == max(theirs.values()) and theirs[url] == cached


@pytest.fixture
async def router() -> AsyncIterator[Any]:
    """A router for MODEL (two ranks), retrying a lost server at once."""
    async with PrefixRouter(MODEL, WORLD, retry_delay=0.01) as following:
        yield following


# ------------------------------------------------------------------ against real servers


@unix
async def test_the_router_names_the_server_whose_lookup_matches_the_most(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    router: Any,
) -> None:
    servers = [start_server() for _ in range(3)]
    for server in servers:
        await router.add_server(server.url)
    engines = [Engine(server, kv_cache, opened) for server in servers]
    p, q, r = prompt(6, seed=1), prompt(5, seed=2), prompt(3, seed=3)
    await asyncio.to_thread(engines[0].store, p[: 2 * CHUNK])
    await asyncio.to_thread(engines[1].store, p[: 5 * CHUNK])
    await asyncio.to_thread(engines[1].store, q[:CHUNK])
    await asyncio.to_thread(engines[2].store, q)
    # r on server 2 by rank 0 only: not whole there, so not cached (both ranks registered).
    await asyncio.to_thread(engines[2].store, r, [0])
    prompts = [
        p,  # server 1: 5 chunks
        [*p[: 3 * CHUNK], 1, 2, 3],  # server 1: 3 chunks
        p[:CHUNK],  # servers 0 and 1: one chunk each
        q + [9] * 7,  # server 2: all 5
        q[:CHUNK] + prompt(2, seed=4),  # servers 1 and 2: one chunk
        r,  # nowhere whole
        prompt(2, seed=5),  # nowhere
    ]
    await check_routes(router, engines, prompts)
    assert router.route(p) == (servers[1].url, 5 * CHUNK)
    assert router.route(q) == (servers[2].url, 5 * CHUNK)
    assert router.route(r)[1] == 0
    # The last rank's store of r makes it whole on server 2.
    await asyncio.to_thread(engines[2].store, r, [1])
    await check_routes(router, engines, [r])
    assert router.route(r) == (servers[2].url, 3 * CHUNK)


@unix
async def test_evictions_and_a_clear_on_one_server_move_the_route(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    router: Any,
) -> None:
    small, large = start_server(slots=8), start_server()  # 4 chunks of 2 ranks / 32
    for server in (small, large):
        await router.add_server(server.url)
    engines = [Engine(small, kv_cache, opened), Engine(large, kv_cache, opened)]
    p, q = prompt(4, seed=11), prompt(4, seed=12)
    await asyncio.to_thread(engines[0].store, p)
    await asyncio.to_thread(engines[1].store, p[: 2 * CHUNK])
    await check_routes(router, engines, [p, q])
    assert router.route(p) == (small.url, 4 * CHUNK)
    # q fills the small pool: p's chunks are evicted from it, and p goes to the large one.
    await asyncio.to_thread(engines[0].store, q)
    await check_routes(router, engines, [p, q])
    assert router.route(p) == (large.url, 2 * CHUNK)
    assert router.route(q) == (small.url, 4 * CHUNK)
    assert small.stats_client.call(kv.CLEAR) == 8
    await check_routes(router, engines, [p, q])
    assert router.cached_tokens(q) == {small.url: 0, large.url: 0}


@unix
async def test_chunks_evicted_from_memory_but_on_disk_still_count(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    router: Any,
    tmp_path: Path,
) -> None:
    server = start_server(slots=8, disk_dir=tmp_path)
    await router.add_server(server.url)
    engine = Engine(server, kv_cache, opened)
    p, q = prompt(3, seed=21), prompt(4, seed=22)
    await asyncio.to_thread(engine.store, p)
    await asyncio.to_thread(engine.store, q)  # p leaves memory; the disk keeps both
    server.wait_stats("every chunk on disk", tier_saves=2 * 7, pinned_chunks=0)
    # The lookup of p loads it back from the disk (a prefetch): its count is the router's.
    await check_routes(router, [engine], [p, q])
    assert server.stats()["prefetch_jobs"] >= 1  # p's lookup did load it from the disk
    await caught_up(router, server)
    assert router.cached_tokens(p) == {server.url: 3 * CHUNK}


@unix
async def test_a_router_that_falls_behind_gets_a_gap_and_resnapshots_the_servers_state(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    server = start_server(slots=8)
    raw = opened(RawClient(server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    async with PrefixRouter(MODEL, 1, buffer=16) as router:
        await router.add_server(server.url)
        await caught_up(router, server)
        # The stores run here, on the router's own loop thread, which therefore reads
        # nothing meanwhile: a subscriber that falls behind. The first store fills the
        # pool of 8 chunks; each later one evicts 8 (one event) and stores 8 (another):
        # 399 events in all, past the stream's window (256), the server's batch (32) and
        # the buffer (16).
        for i in range(200):
            assert worker.store(chunk_hashes(8, seed=100 + i), 0) == [OK] * 8
        await caught_up(router, server)
        assert router.resyncs(server.url) == 1
        assert router.seq(server.url) == 399
        # What it holds now is what the server holds: the last store, and nothing before.
        last, before = prompt(8, seed=299), prompt(8, seed=298)
        assert router.cached_tokens(last) == {server.url: 8 * CHUNK}
        assert router.cached_tokens(before) == {server.url: 0}
        assert raw.probe(chunk_hashes(8, seed=299)) == 8
        assert raw.probe(chunk_hashes(8, seed=298)) == 0


@unix
async def test_a_server_that_goes_away_is_left_out_until_it_is_followed_again(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    router: Any,
) -> None:
    stays, goes = start_server(), start_server()
    for server in (stays, goes):
        await router.add_server(server.url)
    p = prompt(2, seed=31)
    for server in (stays, goes):
        raw = opened(RawClient(server.url))
        for rank in range(WORLD):
            assert raw.register(rank, kv_cache()).store(chunk_hashes(2, seed=31), 0) == [OK] * 2
    await caught_up(router, stays, goes)
    assert router.cached_tokens(p) == {stays.url: 2 * CHUNK, goes.url: 2 * CHUNK}
    goes.stop()
    async with asyncio.timeout(WAIT):
        await router.wait_for(lambda: goes.url not in router.cached_tokens(p))
    assert router.route(p) == (stays.url, 2 * CHUNK)
    # A new server at the same address: followed again, empty, then as it stores.
    back = start_kv_server(goes.url)
    try:
        async with asyncio.timeout(WAIT):
            await router.wait_for(lambda: goes.url in router.cached_tokens(p))
        assert router.cached_tokens(p)[goes.url] == 0
        raw = RawClient(back.url)
        try:
            for rank in range(WORLD):
                worker = raw.register(rank, kv_cache())
                assert worker.store(chunk_hashes(2, seed=31), 0) == [OK] * 2
            await caught_up(router, back)
            assert router.cached_tokens(p)[goes.url] == 2 * CHUNK
        finally:
            raw.close()
    finally:
        back.stop()


async def test_add_server_raises_when_nothing_serves_there(sock_dir: str, router: Any) -> None:
    from kvrpc.errors import TransportError

    with pytest.raises(TransportError):
        await router.add_server(f"unix://{sock_dir}/nobody.sock")
    assert router.route(prompt(1, seed=1)) == (None, 0)


# ------------------------------------------------------------------ the index alone


NS = b"n" * 8


def chunks(
    kind: str, seq: int, tier: str, hashes: list[bytes], rank: int = 0, **fields: Any
) -> KVEvent:
    """A chunk event of rank ``rank`` of the two-rank MODEL (``fields`` override)."""
    told: dict[str, Any] = {"model_name": MODEL, "world_size": 2, **fields}
    return KVEvent(
        kind=kind, seq=seq, tier=tier, namespace=NS, worker_id=rank, hashes=hashes,
        chunk_tokens=CHUNK, **told,
    )  # fmt: skip


def test_the_index_counts_leading_chunks_every_rank_holds_on_some_tier() -> None:
    h = chunk_hashes(4, seed=50)
    index = ServerIndex()
    assert index.apply(chunks("snapshot", 0, "disk", h[:2]))
    assert index.apply(chunks("snapshot", 0, "disk", h[:2], rank=1))
    assert not index.ready
    assert index.apply(KVEvent(kind="snapshot_end", seq=0))
    assert index.ready and index.cached_chunks(MODEL, 2, h) == 2
    assert index.apply(chunks("stored", 1, "l1", h))
    assert index.cached_chunks(MODEL, 2, h) == 2  # rank 1 lacks chunks 2 and 3
    assert index.apply(chunks("stored", 2, "l1", h, rank=1))
    assert index.cached_chunks(MODEL, 2, h) == 4
    assert index.apply(chunks("removed", 3, "l1", h[:1], reason="evicted"))
    assert index.cached_chunks(MODEL, 2, h) == 4  # rank 0's first chunk is on disk still
    assert index.apply(chunks("removed", 4, "disk", h[:1], reason="evicted"))
    assert index.cached_chunks(MODEL, 2, h) == 0  # gone: no prefix is held past it
    assert index.apply(chunks("moved", 5, "l1", h[:1], source="disk"))
    assert index.cached_chunks(MODEL, 2, h) == 4
    assert index.apply(KVEvent(kind="cleared", seq=6, tier="l1"))
    assert index.cached_chunks(MODEL, 2, h) == 0  # rank 0's first chunk was in l1 only
    assert index.cached_chunks(MODEL, 2, h[1:]) == 1  # the disk's, of both ranks
    assert index.cached_chunks(MODEL, 1, h[1:]) == 0  # another world size: not this model
    assert index.cached_chunks("other", 2, h[1:]) == 0


def test_the_index_asks_for_a_new_snapshot_on_a_gap_or_a_skipped_number() -> None:
    h = chunk_hashes(2, seed=51)
    index = ServerIndex()
    assert index.apply(KVEvent(kind="snapshot_end", seq=7))
    assert index.apply(chunks("stored", 8, "l1", h))
    assert not index.apply(chunks("stored", 10, "l1", h))  # 9 was never told
    assert not ServerIndex().apply(KVEvent(kind="gap", seq=12, first=9, last=12))
    # A disk's chunks of a namespace not registered since the server started: no model
    # is known for them, so no prompt of any model is routed by them.
    unknown = ServerIndex()
    assert unknown.apply(chunks("snapshot", 0, "disk", h, model_name=None, world_size=None))
    assert unknown.apply(KVEvent(kind="snapshot_end", seq=0))
    assert unknown.cached_chunks(MODEL, 2, h) == 0
