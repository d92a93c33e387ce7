"""``kvrpc bench metrics``: what the Prometheus endpoint costs, against its goals.

Two ``kvrpc serve`` children in the same state, one with ``--metrics-port 0`` and one without:
each holds ``chunks`` tiny chunks (stored by raw ``kv.store`` calls, as ``bench kv``'s memory
figure stores them) and has ``clients`` clients connected and kept open (AsyncClients on one
event-loop thread of this process, each having made a call). Then:

* **scrape**: ``scrapes`` timed GETs of ``/metrics`` on the first server, one after another
  after an untimed one, each timed from the request to the last byte of the body. Reported
  as p50, p99 and max in ms, with the body's bytes and samples. Goal (issue 28): p50 under
  50 ms with 10k chunks and 64 clients, the default sizes.
* **ping cost**: ``rpc.ping`` round trips through a :class:`~kvrpc.client.SyncClient` to each
  server, the two taking turns in ``interleave`` rounds so that a noisy machine hurts both
  alike; no scrape runs meanwhile (a Prometheus scrapes every few seconds: the cost that
  matters is that of counting every call). Goal: ping p50 with metrics at most 1.03 x
  without.

Nothing is asserted: the figures and the goals' verdicts are reported, and the command exits
0 once they are taken (1 only when a figure could not be taken).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import secrets
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kvrpc.bench._child import default_url, kv_server_child
from kvrpc.bench.kv import (
    TINY_CHUNK_TOKENS,
    goal,
    interleaved,
    register_tiny,
    store_tiny,
    tiny_layer,
)
from kvrpc.bench.rpc import percentile
from kvrpc.client import AsyncClient, SyncClient
from kvrpc.errors import KVError
from kvrpc.kv import protocols
from kvrpc.kv.shm import release_shared
from kvrpc.progress import Progress
from kvrpc.protocol import PING
from kvrpc.transport import parse_url

__all__ = ["MetricsBenchOptions", "run_metrics_bench"]

_GIB = 1 << 30
_SCRAPE_GOAL_MS = 50.0
_PING_COST_GOAL = 1.03  # ping p50 with metrics / without, at most
_STORE_BATCH = 4096  # tiny chunks per kv.store message
_SCRAPE_TIMEOUT_S = 30.0

# On a terminal, a status line rewritten in place; piped, nothing (see kvrpc.progress).
_progress = Progress("bench metrics")


@dataclass(frozen=True)
class MetricsBenchOptions:
    """The workload of ``kvrpc bench metrics``; see the module docstring.

    ``url`` is where the metered server listens (None: a socket in a temporary directory);
    the plain one listens beside it (the port plus 1, or the path with ``-plain``).
    ``chunks`` tiny chunks are stored on each, ``clients`` connections held open to each;
    ``scrapes`` timed GETs of ``/metrics``; ``pings`` timed pings of each server, in
    ``interleave`` turns.
    """

    url: str | None = None
    chunks: int = 10_000
    clients: int = 64
    scrapes: int = 200
    pings: int = 2000
    interleave: int = 5

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MetricsBenchOptions:
        """The options of a parsed ``kvrpc bench metrics`` command line."""
        return cls(
            url=args.url,
            chunks=args.chunks,
            clients=args.clients,
            scrapes=args.scrapes,
            pings=args.pings,
            interleave=args.interleave,
        )


@_progress.closing
def run_metrics_bench(options: MetricsBenchOptions) -> dict[str, Any]:
    """Take the scrape and ping-cost figures; returns them by name, in the order taken.

    Raises :class:`KVError` where a server does not start, prints no metrics URL, or does not
    hold every chunk stored, rather than report figures of another state.
    """
    with tempfile.TemporaryDirectory(prefix="kvrpc-bench-metrics-") as tmp:
        metered_url = options.url or default_url(tmp)
        if parse_url(metered_url).scheme == "inproc":
            raise KVError(
                "kvrpc bench metrics runs its servers in child processes, which inproc:// "
                "cannot reach; use unix:// or zmq+ipc://"
            )
        plain_url = _beside(metered_url)
        figures: dict[str, Any] = {
            "url": metered_url,
            "plain_url": plain_url,
            "chunks": options.chunks,
            "clients": options.clients,
        }
        with contextlib.ExitStack() as stack:
            endpoint = _start(stack, options, metered_url, tmp, metrics=True)
            _start(stack, options, plain_url, tmp, metrics=False)
            figures["metrics_endpoint"] = endpoint
            figures.update(_scrape_figures(endpoint, options.scrapes))
            figures.update(_ping_figures(metered_url, plain_url, options))
    return figures


def _beside(url: str) -> str:
    """The plain server's address: never the metered one's."""
    parsed = parse_url(url)
    if parsed.port is not None:
        return url.replace(f":{parsed.port}", f":{parsed.port + 1}", 1)
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path}-plain"


def _start(
    stack: contextlib.ExitStack, options: MetricsBenchOptions, url: str, tmp: str, metrics: bool
) -> str:
    """A server at ``url`` holding the tiny chunks, its clients connected, until ``stack`` closes.

    Returns its metrics endpoint's base URL (``""`` without ``metrics``).
    """
    batch = min(_STORE_BATCH, options.chunks)
    layer, layout, slot = tiny_layer(batch)
    stack.callback(release_shared, layer)
    # Room for every chunk twice over, and a MiB: no store is refused or evicted for room.
    pool_gib = (2 * options.chunks * slot + (1 << 20)) / _GIB
    argv = ["--chunk-size", str(TINY_CHUNK_TOKENS), "--cpu-buffer-size", f"{pool_gib!r}"]
    argv += ["--client-timeout", "600"]
    if metrics:
        argv += ["--metrics-port", "0"]
    child = stack.enter_context(kv_server_child(url, tmp, *argv))
    _progress(f"server {child.pid}: {child.ready_line}")
    endpoint = ""
    if metrics:
        found = re.search(r" metrics=(http://\S+)", child.ready_line)
        if found is None:
            raise KVError(f"the server at {url} printed no metrics URL: {child.ready_line!r}")
        endpoint = found.group(1)
    client = stack.enter_context(SyncClient(url, registry=protocols.kv_registry(), timeout=300))
    me = secrets.token_bytes(16)
    instance = register_tiny(client, me, layer, layout)
    _progress(f"{url}: storing {options.chunks:,} chunks of {slot} bytes")
    refused = store_tiny(client, me, instance, options.chunks, batch, "store")
    held = client.call(protocols.STATS)["chunks"]
    if refused or held != options.chunks:
        raise KVError(f"of {options.chunks} chunks {refused} were refused; the server holds {held}")
    _progress(f"{url}: connecting {options.clients} clients")
    stack.enter_context(_held_clients(url, options.clients))
    return endpoint


@contextlib.contextmanager
def _held_clients(url: str, count: int) -> Iterator[None]:
    """``count`` AsyncClients of ``url``, each having pinged once, open until the block ends.

    They live on one event-loop thread of their own: idle connections, as an engine's
    workers hold them between requests.
    """
    ready = threading.Event()
    failed: list[BaseException] = []
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def hold() -> None:
        try:
            async with contextlib.AsyncExitStack() as clients:
                for _ in range(count):
                    client = await clients.enter_async_context(AsyncClient(url, timeout=60.0))
                    await client.call(PING)
                ready.set()
                await stop.wait()
        except BaseException as exc:  # handed to the bench's thread, which raises it
            failed.append(exc)
            ready.set()

    thread = threading.Thread(
        target=loop.run_until_complete, args=(hold(),), name="kvrpc-bench-clients", daemon=True
    )
    thread.start()
    try:
        ready.wait()
        if failed:
            raise KVError(f"could not connect {count} clients to {url}: {failed[0]!r}")
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()


def _scrape(endpoint: str) -> tuple[float, bytes]:
    """Seconds one GET of ``/metrics`` takes to its body's last byte, and the body."""
    start = time.perf_counter()
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=_SCRAPE_TIMEOUT_S) as reply:
        body: bytes = reply.read()
    return time.perf_counter() - start, body


def _scrape_figures(endpoint: str, scrapes: int) -> dict[str, Any]:
    _progress(f"scrape: {scrapes} GETs of {endpoint}/metrics")
    _scrape(endpoint)  # the first runs the exposition code cold: not timed
    taken: list[float] = []
    body = b""
    for _ in range(scrapes):
        seconds, body = _scrape(endpoint)
        taken.append(seconds)
    samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    p50_ms = percentile(taken, 0.50) * 1e3
    return {
        "scrapes": scrapes,
        "scrape_p50_ms": round(p50_ms, 3),
        "scrape_p99_ms": round(percentile(taken, 0.99) * 1e3, 3),
        "scrape_max_ms": round(max(taken) * 1e3, 3),
        "scrape_bytes": len(body),
        "scrape_samples": samples,
        "scrape_goal": goal(
            p50_ms < _SCRAPE_GOAL_MS, f"/metrics scrape p50 < {_SCRAPE_GOAL_MS:g} ms"
        ),
    }


def _ping_figures(metered: str, plain: str, options: MetricsBenchOptions) -> dict[str, Any]:
    with (
        SyncClient(metered, timeout=60.0) as with_metrics,
        SyncClient(plain, timeout=60.0) as without,
    ):
        paths: dict[str, Callable[[], Any]] = {
            "with_metrics": lambda: with_metrics.call(PING),
            "without_metrics": lambda: without.call(PING),
        }
        _progress(f"ping: {options.pings} of each server, {options.interleave} turns")
        for path in paths.values():
            for _ in range(min(200, options.pings)):
                path()
        samples = interleaved(paths, options.pings, options.interleave, "ping")
    figures: dict[str, Any] = {"pings": len(samples["with_metrics"])}
    for name, taken in samples.items():
        figures[f"ping_{name}_p50_us"] = round(percentile(taken, 0.50) * 1e6, 1)
        figures[f"ping_{name}_p99_us"] = round(percentile(taken, 0.99) * 1e6, 1)
    ratio = percentile(samples["with_metrics"], 0.5) / percentile(samples["without_metrics"], 0.5)
    figures["ping_p50_ratio_with_metrics"] = round(ratio, 4)
    figures["metrics_ping_cost_percent"] = round((ratio - 1) * 100, 2)
    figures["ping_cost_goal"] = goal(
        ratio <= _PING_COST_GOAL,
        f"ping p50 with metrics <= {_PING_COST_GOAL:g}x without "
        f"(a cost of <= {(_PING_COST_GOAL - 1) * 100:.0f}%)",
    )
    return figures
