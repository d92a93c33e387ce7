"""``kvrpc bench stream``: streamed items against pipelined calls, and kv.events end to end.

Figures, each with its baseline taken in the same run:

- **items/s**: one stream of small items (``rpc.count``) against kvrpc's pipelined unary
  calls (``rpc.ping``, 64 in flight) on the same transport and server, taking turns.
- **event latency**: from a ``kv.store``'s reply to a subscriber (another connection of
  the same process) holding the store's ``stored`` event; an event that comes before the
  reply counts as 0.
- **events lost without a gap**: a subscriber that reads everything checks that every
  sequence number came as an event or inside a ``gap`` event's range.
- **server memory with a subscriber that never reads**: the same stores against two fresh
  servers, one with such a subscriber (a small window, so its stream fills at once, and its
  ``buffer`` of events) and one without; the resident memory of the first over the second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from kvrpc.bench.kv import (
    _MODEL,
    TINY_CHUNK_TOKENS,
    _kv_server,
    figure_url,
    proc_status,
    register_tiny,
    tiny_layer,
)
from kvrpc.bench.rpc import percentile
from kvrpc.client import AsyncClient, SyncClient
from kvrpc.errors import KVError
from kvrpc.kv import protocols
from kvrpc.kv.keys import HASH_SIZE, KeyBatch
from kvrpc.kv.protocols import EventsRequest, KVEvent
from kvrpc.kv.shm import release_shared
from kvrpc.progress import Progress
from kvrpc.protocol import COUNT, PING

__all__ = ["StreamBenchOptions", "run_stream_bench"]

_progress = Progress("bench stream")


@dataclass(frozen=True)
class StreamBenchOptions:
    """What ``kvrpc bench stream`` measures; see the module doc."""

    url: str
    items: int = 200_000  #: items of each streamed round
    calls: int = 40_000  #: pipelined calls of each baseline round
    window: int = 1024  #: the stream's window
    rounds: int = 5  #: turns the stream and the calls take
    stores: int = 5_000  #: kv.store calls for the latency and loss figures
    events: int = 100_000  #: events the memory figure's stores produce, about
    buffer: int = 1024  #: the never-reading subscriber's event buffer

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StreamBenchOptions:
        """From ``kvrpc bench stream``'s parsed arguments."""
        return cls(
            args.url,
            items=args.items,
            calls=args.calls,
            window=args.window,
            rounds=args.rounds,
            stores=args.stores,
            events=args.events,
            buffer=args.buffer,
        )


def run_stream_bench(options: StreamBenchOptions) -> dict[str, Any]:
    """Take every figure (see the module doc); returns them as a dict."""
    try:
        with tempfile.TemporaryDirectory(prefix="kvrpc-bench-stream-") as tmp:
            figures: dict[str, Any] = {"url": options.url}
            figures |= _throughput(options, figure_url(options.url, 0), tmp)
            figures |= _events(options, figure_url(options.url, 1), tmp)
            figures |= _memory(options, figure_url(options.url, 2), figure_url(options.url, 3), tmp)
            return figures
    finally:
        _progress.close()


# ------------------------------------------------------------------ items/s


def _throughput(options: StreamBenchOptions, url: str, tmp: str) -> dict[str, Any]:
    with _kv_server(url, tmp) as pid:
        rates = asyncio.run(_rates(options, url))
    streamed, called = rates
    ratios = sorted(s / c for s, c in zip(streamed, called, strict=True))
    return {
        "stream_server": f"child process {pid}",
        "stream_items_per_s": statistics.median(streamed),
        "stream_items_per_s_runs": streamed,
        "pipelined_calls_per_s": statistics.median(called),
        "pipelined_calls_per_s_runs": called,
        "stream_ratio_to_pipelined": statistics.median(ratios),
        "stream_ratio_to_pipelined_range": [ratios[0], ratios[-1]],
        "stream_ratio_goal": _goal(statistics.median(ratios) >= 5, "items/s >= 5x calls/s"),
    }


async def _rates(options: StreamBenchOptions, url: str) -> tuple[list[float], list[float]]:
    streamed: list[float] = []
    called: list[float] = []
    async with AsyncClient(url, timeout=300.0) as client:
        async for _ in client.stream(COUNT, 1000, window=options.window):  # warm up
            pass
        for turn in range(options.rounds):
            _progress(f"round {turn + 1}/{options.rounds}: {options.items:,} streamed items")
            start = time.perf_counter()
            count = 0
            async for _ in client.stream(COUNT, options.items, window=options.window):
                count += 1
            streamed.append(count / (time.perf_counter() - start))
            _progress(f"round {turn + 1}/{options.rounds}: {options.calls:,} pipelined pings")
            called.append(await _pipelined(client, options.calls, 64))
    return streamed, called


async def _pipelined(client: AsyncClient, calls: int, in_flight: int) -> float:
    window: deque[asyncio.Future[Any]] = deque()
    start = time.perf_counter()
    for _ in range(calls):
        window.append(await client.submit(PING))
        if len(window) >= in_flight:
            await window.popleft()
    while window:
        await window.popleft()
    return calls / (time.perf_counter() - start)


# ------------------------------------------------------------------ kv.events


@dataclass
class _Watch:
    """What one reading subscriber saw: arrival times by first hash, and the numbering."""

    arrived: dict[bytes, float] = field(default_factory=dict)
    expected: int | None = None
    lost: int = 0  #: sequence numbers neither received nor inside a gap's range
    gaps: int = 0
    events: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    seen: threading.Condition = field(default_factory=threading.Condition)

    def note(self, event: KVEvent, now: float) -> None:
        with self.seen:
            self.events += 1
            if event.kind == "snapshot_end":
                self.expected = event.seq + 1
                self.ready.set()
            elif event.kind == "gap":
                assert event.first is not None and event.last is not None
                if self.expected is not None and event.first > self.expected:
                    self.lost += event.first - self.expected
                self.gaps += 1
                self.expected = event.last + 1
            elif event.kind != "snapshot":
                if self.expected is not None and event.seq > self.expected:
                    self.lost += event.seq - self.expected
                self.expected = event.seq + 1
                if event.kind == "stored" and event.hashes:
                    self.arrived.setdefault(event.hashes[0], now)
            self.seen.notify_all()

    def wait_for(self, key: bytes, timeout: float) -> None:
        with self.seen:
            if not self.seen.wait_for(lambda: key in self.arrived, timeout):
                raise KVError(f"no stored event for a chunk within {timeout}s")


@contextmanager
def _subscriber(url: str, watch: _Watch, request: EventsRequest, window: int) -> Iterator[None]:
    """A subscriber in a thread of its own, with its own loop, until the block ends."""
    stop: list[asyncio.AbstractEventLoop] = []
    errors: list[BaseException] = []

    async def read() -> None:
        stop.append(asyncio.get_running_loop())
        async with AsyncClient(url, registry=protocols.kv_registry()) as client:
            async for event in client.stream(
                protocols.EVENTS, request, window=window, timeout=None
            ):
                watch.note(event, time.perf_counter())

    def run() -> None:
        try:
            asyncio.run(read())
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
            watch.ready.set()

    thread = threading.Thread(target=run, name="kvrpc-bench-subscriber", daemon=True)
    thread.start()
    try:
        yield
    finally:
        if stop:
            loop = stop[0]
            for task in asyncio.all_tasks(loop):
                loop.call_soon_threadsafe(task.cancel)
        thread.join(30)
    if errors:
        raise KVError(f"the subscriber failed: {errors[0]!r}") from errors[0]


def _events(options: StreamBenchOptions, url: str, tmp: str) -> dict[str, Any]:
    server_options = ("--chunk-size", str(TINY_CHUNK_TOKENS), "--client-timeout", "600")
    watch = _Watch()
    layer, layout, _ = tiny_layer(1)
    rows = _rows()
    latencies: list[float] = []
    try:
        with (
            _kv_server(url, tmp, *server_options),
            SyncClient(url, registry=protocols.kv_registry(), timeout=300.0) as client,
            _subscriber(url, watch, EventsRequest(snapshot=True), window=256),
        ):
            if not watch.ready.wait(60):
                raise KVError("the subscriber got no snapshot within 60 s")
            me = secrets.token_bytes(16)
            instance = register_tiny(client, me, layer, layout)
            _progress(f"events: {options.stores:,} stores, each waited for as an event")
            for _ in range(options.stores):
                keys = KeyBatch(_MODEL, 1, 0, os.urandom(HASH_SIZE))
                client.call(protocols.STORE, me, instance, keys, rows, [])
                done = time.perf_counter()
                watch.wait_for(keys.hashes[:HASH_SIZE], 30)
                latencies.append(max(0.0, watch.arrived[keys.hashes[:HASH_SIZE]] - done))
    finally:
        release_shared(layer)
    p99 = percentile(latencies, 0.99) * 1e3
    return {
        "event_latency_p50_ms": percentile(latencies, 0.50) * 1e3,
        "event_latency_p99_ms": p99,
        "event_latency_max_ms": max(latencies) * 1e3,
        "events_before_reply": sum(1 for x in latencies if x == 0.0),
        "event_latency_goal": _goal(p99 < 5, "p99 < 5 ms"),
        "events_seen": watch.events,
        "event_gaps": watch.gaps,
        "events_lost_untold": watch.lost,
        "events_lost_goal": _goal(watch.lost == 0, "0 lost without a gap event"),
    }


def _rows() -> Any:
    import torch

    return torch.zeros((1, 1), dtype=torch.int64)


# ------------------------------------------------------------------ memory


def _memory(
    options: StreamBenchOptions, quiet_url: str, stalled_url: str, tmp: str
) -> dict[str, Any]:
    # A small pool, so that most stores also evict: two events a store once it is full.
    stores = options.events // 2
    quiet = _rss_after_stores(options, quiet_url, tmp, stores, stalled=False)
    stalled = _rss_after_stores(options, stalled_url, tmp, stores, stalled=True)
    ratio = stalled["rss"] / quiet["rss"]
    return {
        "memory_events_produced": stalled["events"],
        "memory_subscriber_buffer": options.buffer,
        "server_rss_quiet_mib": quiet["rss"] / 2**20,
        "server_rss_stalled_subscriber_mib": stalled["rss"] / 2**20,
        "server_rss_ratio_stalled_to_quiet": ratio,
        "stalled_subscriber_gaps_pending": stalled["events"] > options.buffer,
        "server_rss_goal": _goal(ratio <= 1.05, "RSS with a never-reading subscriber <= 1.05x"),
    }


def _rss_after_stores(
    options: StreamBenchOptions, url: str, tmp: str, stores: int, stalled: bool
) -> dict[str, int]:
    slots = 1024
    slot = 16  # bytes of a tiny chunk
    server_options = (
        "--chunk-size",
        str(TINY_CHUNK_TOKENS),
        "--cpu-buffer-size",
        f"{(slots * slot + slot / 2) / 2**30!r}",
        "--client-timeout",
        "600",
    )
    layer, layout, _ = tiny_layer(1)
    rows = _rows()
    request = EventsRequest(buffer=options.buffer)
    try:
        with ExitStack() as stack:
            pid = stack.enter_context(_kv_server(url, tmp, *server_options))
            client = stack.enter_context(
                SyncClient(url, registry=protocols.kv_registry(), timeout=300.0)
            )
            if stalled:
                # Opened and never read: its window of 4 fills, then its buffer does.
                stack.enter_context(
                    client.stream(protocols.EVENTS, request, window=4, timeout=None)
                )
            me = secrets.token_bytes(16)
            instance = register_tiny(client, me, layer, layout)
            what = "with a never-reading subscriber" if stalled else "without subscribers"
            _progress(f"memory {what}: {stores:,} stores")
            for _ in range(stores):
                keys = KeyBatch(_MODEL, 1, 0, os.urandom(HASH_SIZE))
                client.call(protocols.STORE, me, instance, keys, rows, [])
            stats = client.call(protocols.STATS)
            rss = proc_status(pid, "VmRSS")
    finally:
        release_shared(layer)
    return {"rss": rss, "events": stores + stats.get("evictions", 0)}


def _goal(met: bool, text: str) -> str:
    return f"{'met' if met else 'MISSED'} ({text})"
