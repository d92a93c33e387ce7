"""A prefix-aware router: send each prompt to the KV server that already caches most of it.

Run it from the repository root:

    python examples/prefix_router.py
        a demo: three KV servers in this process, different prefixes stored in each,
        prompts routed and checked against each server's own lookup
    python examples/prefix_router.py URL [URL ...] --model NAME [--world-size N]
        follows running servers (``kvrpc serve``) and routes prompts read from stdin,
        one per line as space-separated token ids

The router subscribes to every server's ``kv.events`` with a snapshot: first every chunk
the server holds, then each chunk it stores, evicts, moves between tiers or clears, all
numbered. From them it keeps, per server, the chunk hashes each rank of each model holds
(:class:`ServerIndex`, plain code without I/O). To route a prompt it hashes the prompt's
token ids as the KV client does (:func:`kvrpc.kv.keys.hashes_from_tokens`: prefix-chained,
so hash ``i`` covers tokens ``[i * chunk_tokens, (i + 1) * chunk_tokens)`` and stands for
everything before it too) and counts, per server, the leading hashes held: the server
with the most has the longest cached prefix.

A subscriber that falls behind its buffer gets a ``gap`` event: the router then
subscribes again with a snapshot, and keeps answering from the index it had until the new
snapshot is complete. A server that goes away is left out of routing until the router
has subscribed to it again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvrpc import AsyncClient
from kvrpc.errors import ConnectionLost
from kvrpc.kv import hashes_from_tokens, kv_registry
from kvrpc.kv import protocols as kv
from kvrpc.kv.protocols import EVENTS_DEFAULT_BUFFER, EventsRequest, KVEvent

__all__ = ["PrefixRouter", "ServerIndex", "main"]

logger = logging.getLogger("prefix_router")


class ServerIndex:
    """What one server holds, as its ``kv.events`` told: chunk hashes per model and rank.

    Fed one event at a time by :meth:`apply`, from a subscription that began with a
    snapshot. Per namespace (one model and world size on that server) and rank, it keeps
    each chunk hash with the tiers holding it: a chunk evicted from memory may still be on
    the disk, and a server's lookup finds it there. No I/O; not thread-safe.
    """

    def __init__(self) -> None:
        self.seq = -1
        """The number of the last event applied (-1 before the first)."""
        self.ready = False
        """True once the snapshot is complete: from then on the index is the server's."""
        # (namespace id, rank) -> chunk hash -> the tiers holding it.
        self._held: dict[tuple[bytes, int | None], dict[bytes, set[str]]] = {}
        self._models: dict[bytes, tuple[str, int]] = {}  # namespace id -> model, world size

    def apply(self, event: KVEvent) -> bool:
        """Take ``event`` in; False if events were lost (subscribe again with a snapshot).

        Events are lost where the server says so (a gap), or where a live event's number
        is not the next one: without a namespace filter the numbers go up by one.
        """
        kind = event.kind
        if kind == "gap":
            return False
        if kind in ("snapshot", "snapshot_end"):
            self.seq = event.seq  # every snapshot event carries the number it was taken at
            if kind == "snapshot_end":
                self.ready = True
            else:
                self._add(event)
            return True
        if event.seq != self.seq + 1:
            return False
        self.seq = event.seq
        if kind in ("stored", "moved"):  # a move copies: the source tier still holds them
            self._add(event)
        elif kind == "removed":
            chunks = self._held.get((event.namespace, event.worker_id), {})
            for chunk_hash in event.hashes:
                tiers = chunks.get(chunk_hash)
                if tiers is not None:
                    tiers.discard(event.tier)
                    if not tiers:
                        del chunks[chunk_hash]
        elif kind == "cleared":
            for chunks in self._held.values():
                for chunk_hash in [h for h, tiers in chunks.items() if event.tier in tiers]:
                    chunks[chunk_hash].discard(event.tier)
                    if not chunks[chunk_hash]:
                        del chunks[chunk_hash]
        return True

    def cached_chunks(self, model_name: str, world_size: int, hashes: Sequence[bytes]) -> int:
        """How many of ``hashes``, from the first on, the server holds for every rank.

        Every rank means every rank the events have named in that model's namespace (the
        server's own lookup counts the ranks registered with it; a rank that registered
        but never stored anything is not known here).
        """
        best = 0
        for namespace, model in self._models.items():
            if model != (model_name, world_size):
                continue
            ranks = [chunks for (ns, _), chunks in self._held.items() if ns == namespace]
            count = 0
            for chunk_hash in hashes:
                if not ranks or not all(chunk_hash in chunks for chunks in ranks):
                    break
                count += 1
            best = max(best, count)
        return best

    def _add(self, event: KVEvent) -> None:
        if event.model_name is not None and event.world_size is not None:
            self._models[event.namespace] = (event.model_name, event.world_size)
        chunks = self._held.setdefault((event.namespace, event.worker_id), {})
        for chunk_hash in event.hashes:
            chunks.setdefault(chunk_hash, set()).add(event.tier)


@dataclass(eq=False)
class _Server:
    """One followed server: its index (None while the router has none it trusts)."""

    url: str
    index: ServerIndex | None = None
    chunk_tokens: int = 0
    resyncs: int = 0  # subscriptions taken again after lost events
    followed: bool = False  # a snapshot of it was complete once
    error: BaseException | None = None  # why the first subscription failed
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class PrefixRouter:
    """Follows several KV servers' ``kv.events``; names the one caching a prompt's longest prefix.

    For one model (``model_name``, ``world_size``, and the ``cache_salt`` its prompts are
    hashed under). ``buffer`` is the live events each server keeps for the router while it
    does not read, ``retry_delay`` the seconds between attempts to follow a server that
    went away; ``client_options`` go to each :class:`~kvrpc.client.AsyncClient`
    (``auth_token_file``, say). Use it on one event loop; close it with :meth:`aclose`.
    """

    def __init__(
        self,
        model_name: str,
        world_size: int = 1,
        *,
        cache_salt: str | None = None,
        buffer: int = EVENTS_DEFAULT_BUFFER,
        retry_delay: float = 1.0,
        **client_options: Any,
    ) -> None:
        self.model_name = model_name
        self.world_size = world_size
        self.cache_salt = cache_salt
        self.buffer = buffer
        self.retry_delay = retry_delay
        self._client_options = client_options
        self._servers: dict[str, _Server] = {}
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> PrefixRouter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def add_server(self, url: str) -> None:
        """Follow ``url``; returns once its snapshot is in, so :meth:`route` considers it.

        Raises what connecting or subscribing raised, if the first attempt fails.
        """
        if url in self._servers:
            raise ValueError(f"{url} is followed already")
        server = self._servers[url] = _Server(url)
        server.task = asyncio.create_task(self._follow(server), name=f"prefix-router {url}")
        await self.wait_for(lambda: server.index is not None or server.error is not None)
        if server.error is not None:
            del self._servers[url]
            await server.task
            raise server.error

    def route(self, tokens: Sequence[int]) -> tuple[str | None, int]:
        """The server caching the longest prefix of ``tokens``, and how many tokens it caches.

        Ties go to the server added first (a real router would weigh load there). The URL
        is None only while no server is followed with a complete index.
        """
        best: tuple[str | None, int] = (None, -1)
        for url, tokens_cached in self.cached_tokens(tokens).items():
            if tokens_cached > best[1]:
                best = (url, tokens_cached)
        return best[0], max(best[1], 0)

    def cached_tokens(self, tokens: Sequence[int]) -> dict[str, int]:
        """Per followed server with a complete index: the tokens of ``tokens`` it caches."""
        hashed: dict[int, list[bytes]] = {}  # servers may differ in chunk size
        answer: dict[str, int] = {}
        for url, server in self._servers.items():
            if server.index is None:
                continue
            size = server.chunk_tokens
            if size not in hashed:
                hashed[size] = hashes_from_tokens(tokens, size, self.cache_salt)
            chunks = server.index.cached_chunks(self.model_name, self.world_size, hashed[size])
            answer[url] = chunks * size
        return answer

    def seq(self, url: str) -> int:
        """The number of the last event of ``url`` in the index routed on (-1 if none)."""
        index = self._servers[url].index
        return -1 if index is None else index.seq

    def resyncs(self, url: str) -> int:
        """How many times the router subscribed to ``url`` again after losing events."""
        return self._servers[url].resyncs

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is checked again after every event applied."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def aclose(self) -> None:
        """Stop following every server; idempotent."""
        servers, self._servers = list(self._servers.values()), {}
        tasks = [s.task for s in servers if s.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ following a server

    async def _follow(self, server: _Server) -> None:
        """Subscribe to ``server`` for as long as the router runs, again after any loss."""
        while True:
            error: Exception | None = None
            try:
                async with AsyncClient(
                    server.url, registry=kv_registry(), **self._client_options
                ) as client:
                    server.chunk_tokens = await client.call(kv.GET_CHUNK_SIZE)
                    while not await self._subscribe(client, server):
                        server.resyncs += 1  # events were lost: a new snapshot
            except Exception as exc:  # lost, refused (too many subscribers), unreachable
                error = exc
            if not server.followed:  # the first attempt: add_server raises why
                server.error = error or ConnectionLost(f"{server.url} ended the stream at once")
                await self._notify()
                return
            if server.index is not None:  # told once an outage, not at every retry
                why = "it ended its event stream" if error is None else repr(error)
                logger.warning("lost %s (%s); following it again", server.url, why)
            # What the server holds is unknown until it is followed again (it may come
            # back empty): leave it out of routing meanwhile.
            server.index = None
            await self._notify()
            await asyncio.sleep(self.retry_delay)

    async def _subscribe(self, client: AsyncClient, server: _Server) -> bool:
        """One subscription, into a fresh index that replaces the server's once complete.

        Returns False if events were lost (subscribe again), True when the server ended
        the stream (it is shutting down).
        """
        fresh = ServerIndex()
        request = EventsRequest(snapshot=True, buffer=self.buffer)
        async with client.stream(kv.EVENTS, request, timeout=None) as events:
            async for event in events:
                if not fresh.apply(event):
                    return False
                if fresh.ready:
                    server.index = fresh
                    server.followed = True
                await self._notify()
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


# ---------------------------------------------------------------------- the demo

MODEL = "router-demo"
BLOCK_SIZE = 4
CHUNK_TOKENS = 16
LAYER_SHAPE = (2, 64, BLOCK_SIZE, 1, 8)  # [K/V, blocks, tokens, heads, head dim]


def _prompt(seed: int, chunks: int) -> list[int]:
    """Token ids of ``chunks`` whole chunks, the same for the same seed."""
    return [seed * 1000 + i for i in range(chunks * CHUNK_TOKENS)]


@contextlib.asynccontextmanager
async def _kv_servers(directory: str, count: int) -> AsyncIterator[list[str]]:
    """``count`` KV servers on this event loop, each on its own socket in ``directory``."""
    from kvrpc.kv import KVServerSettings, serve_kv
    from kvrpc.transport import local_url

    urls = [local_url(directory, f"kv{i}.sock") for i in range(count)]
    running: list[Any] = []
    tasks = []
    for url in urls:
        started = asyncio.Event()

        def ready(server: Any, service: Any, started: asyncio.Event = started) -> None:
            running.append(server)
            started.set()

        settings = KVServerSettings(url=url, chunk_size=CHUNK_TOKENS, cpu_buffer_size=0.01)
        tasks.append(asyncio.create_task(serve_kv(settings, on_ready=ready)))
        await started.wait()
    try:
        yield urls
    finally:
        for server in running:
            server.stop()
        await asyncio.gather(*tasks)


class _Engine:
    """One engine's worker and scheduler on one server (blocking adapters, run in threads)."""

    def __init__(self, url: str) -> None:
        import torch

        from kvrpc.kv import PollingSchedulerAdapter, WorkerAdapter, shared_empty

        self.url = url
        self.layers = [shared_empty(LAYER_SHAPE, torch.float16) for _ in range(2)]
        self.worker = WorkerAdapter(url, MODEL, 1, 0, BLOCK_SIZE)
        self.worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(self.layers)})
        self.scheduler = PollingSchedulerAdapter(url, MODEL, 1, 0, BLOCK_SIZE)
        self._requests = 0

    def store(self, tokens: list[int]) -> None:
        """Store the KV of ``tokens`` (whatever the blocks hold: the demo routes, not reads)."""
        import time

        from kvrpc.kv import LoadStoreOp

        self._requests += 1
        request_id = f"store-{self._requests}"
        blocks = list(range(len(tokens) // BLOCK_SIZE))
        self.worker.submit_store_request(request_id, LoadStoreOp(blocks, token_ids=tokens))
        while request_id not in self.worker.get_finished({request_id})[0]:
            time.sleep(0.001)

    def lookup(self, tokens: list[int]) -> int:
        """The server's own answer: the tokens of ``tokens`` it holds (``kv.lookup``)."""
        self._requests += 1
        request_id = f"lookup-{self._requests}"
        self.scheduler.maybe_submit_lookup_request(request_id, token_ids=tokens)
        matched = self.scheduler.check_lookup_result(request_id)
        self.scheduler.end_session(request_id)
        return matched or 0

    def clear(self) -> int:
        """``kv.clear``: the server drops every chunk it holds in memory."""
        from kvrpc.client import SyncClient

        with SyncClient(self.url, registry=kv_registry(), timeout=5) as client:
            dropped: int = client.call(kv.CLEAR)
        return dropped

    def close(self) -> None:
        from kvrpc.kv import release_shared

        self.scheduler.close()
        self.worker.close()
        for tensor in self.layers:
            release_shared(tensor)


async def _demo() -> None:
    with tempfile.TemporaryDirectory(prefix="kvrpc-router-") as directory:
        async with _kv_servers(directory, 3) as urls, PrefixRouter(MODEL) as router:
            for url in urls:
                await router.add_server(url)
            print(f"following {len(urls)} servers' kv.events")
            engines = [await asyncio.to_thread(_Engine, url) for url in urls]
            try:
                await _route_and_check(router, urls, engines)
            finally:
                for engine in engines:
                    await asyncio.to_thread(engine.close)
    print("router and servers closed")


async def _route_and_check(router: PrefixRouter, urls: list[str], engines: list[_Engine]) -> None:
    system = _prompt(1, 4)  # a shared "system prompt" of 4 chunks
    stored = [system[: 1 * CHUNK_TOKENS], system, _prompt(2, 3)]
    for i, (engine, tokens) in enumerate(zip(engines, stored, strict=True)):
        await asyncio.to_thread(engine.store, tokens)
        print(f"server {i} stored a prefix of {len(tokens)} tokens")
    # The stores are done; their events reach the router a moment later.
    await router.wait_for(
        lambda: (
            router.cached_tokens(system + [7] * 5)[urls[1]] == len(system)
            and router.cached_tokens(stored[2])[urls[2]] == len(stored[2])
        )
    )
    prompts = {
        "system prompt + question": system + [7] * 5,
        "first chunk only": system[:CHUNK_TOKENS] + [9] * 20,
        "the other prompt": stored[2],
        "nothing cached": _prompt(3, 2),
    }
    for name, tokens in prompts.items():
        await _show(router, urls, engines, name, tokens)
    dropped = await asyncio.to_thread(engines[1].clear)
    print(f"server 1 cleared ({dropped} chunks)")
    await router.wait_for(lambda: router.cached_tokens(system)[urls[1]] == 0)
    await _show(
        router, urls, engines, "system prompt + question", prompts["system prompt + question"]
    )


async def _show(
    router: PrefixRouter, urls: list[str], engines: list[_Engine], name: str, tokens: list[int]
) -> None:
    url, cached = router.route(tokens)
    lookups = [await asyncio.to_thread(engine.lookup, tokens) for engine in engines]
    agrees = url is not None and cached == max(lookups) == lookups[urls.index(url)]
    where = f"server {urls.index(url)}" if url is not None and cached else "any server"
    print(
        f"route({name!r}, {len(tokens)} tokens) -> {where}, {cached} tokens cached; "
        f"kv.lookup on each: {lookups}; agrees: {agrees}"
    )
    if not agrees:
        raise SystemExit(f"the router disagrees with the servers' lookups for {name!r}")


async def _follow_and_route(urls: list[str], model: str, world_size: int) -> None:
    async with PrefixRouter(model, world_size) as router:
        for url in urls:
            await router.add_server(url)
        print(f"following {', '.join(urls)}; token ids on stdin, one prompt a line")
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            chosen, cached = router.route([int(word) for word in line.split()])
            print(f"{chosen} {cached}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the demo, or, given URLs, route prompts read from stdin across those servers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("urls", nargs="*", metavar="URL", help="KV servers to follow")
    parser.add_argument("--model", help="the model whose prompts are routed (with URLs)")
    parser.add_argument("--world-size", type=int, default=1, help="its world size")
    args = parser.parse_args(argv)
    if not args.urls:
        asyncio.run(_demo())
        return
    if args.model is None:
        parser.error("give --model with the servers' URLs")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_follow_and_route(args.urls, args.model, args.world_size))


if __name__ == "__main__":
    main()
