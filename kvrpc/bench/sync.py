"""``kvrpc bench rpc``'s synchronous figures: a caller thread that blocks on every reply.

A scheduler or a worker of an inference engine calls from a plain Python thread, so this is
the figure that decides whether kvrpc is faster than what it replaces. Each contender answers
from a process of its own and is measured in turns with the others, in one run:

* ``sync_``: kvrpc's :class:`~kvrpc.client.SyncClient` calling ``rpc.ping`` on a
  ``kvrpc serve`` at the URL (``call`` for the sequential figure, so the calling thread's
  direct lane answers it where the transport has one; ``submit`` when pipelined), and
  ``sync_loop_``, the same with ``direct=False``: every call through the client's loop thread;
  and ``sync_direct_``, pipelined with ``submit_direct`` (sent from the caller's thread, each
  reply read there as it is waited for: no thread crossing at all);
* ``raw_sync_``: the URL's socket library used plainly from the caller's thread, with no
  kvrpc (the ``kvrpc.baselines`` entry point's blocking client: a pyzmq DEALER, a blocking
  Unix socket), sending messages the size of a kvrpc ping;
* ``raw_zmq_sync_``: for a URL that is not ZeroMQ, also the plain pyzmq one over ipc, so that
  every transport's figures can be divided by the fastest plain socket in the same run;
* ``lmcache_``: with ``--vs lmcache``, LMCache's ``MessageQueueClient`` against its
  ``MessageQueueServer`` with a SYNC ``noop`` handler, over ZeroMQ ipc
  (:mod:`kvrpc.bench.lmcache_peer`).

For each: the p50 and p99 of sequential round trips, and calls/s with ``window`` calls in
flight (sent without waiting, the oldest waited for whenever the window is full) with the
p50 and p99 of those calls' latencies, send to observed answer.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from kvrpc import codec
from kvrpc.bench._child import kv_server_child, ready_child
from kvrpc.bench.baselines import SyncRawBaseline, SyncRawEchoClient, baseline_for
from kvrpc.bench.lmcache_peer import LMCacheSyncPath, lmcache_version, require_lmcache
from kvrpc.bench.rpc import _raw_url, percentile
from kvrpc.client import SyncClient
from kvrpc.errors import KvrpcError
from kvrpc.progress import Progress
from kvrpc.protocol import PING
from kvrpc.transport import parse_url

__all__ = ["SyncOptions", "SyncPath", "run_sync_bench"]


class SyncPath(Protocol):
    """One synchronous request/reply path: ``send`` returns a handle that ``wait`` blocks on."""

    def call(self) -> None:
        """One round trip, the way a caller that waits for each answer makes it."""
        ...

    def send(self) -> Any:
        """Send one small request without waiting for the answer."""
        ...

    def wait(self, handle: Any) -> None:
        """Block until the request behind ``handle`` is answered (handles are waited in order)."""
        ...

    def close(self) -> None:
        """Disconnect."""
        ...


@dataclass(frozen=True)
class SyncOptions:
    """What the synchronous figures measure, per contender.

    ``calls`` sequential round trips and ``pipelined`` calls with ``window`` in flight, cut
    into ``rounds`` turns; ``vs_lmcache`` adds LMCache's client and server.
    """

    url: str
    calls: int = 20000
    pipelined: int = 100000
    window: int = 64
    rounds: int = 5
    vs_lmcache: bool = False
    #: More ``kvrpc serve`` flags for the server (``--inbox-burst 4``, say).
    serve_options: tuple[str, ...] = ()


class _KvrpcSync:
    def __init__(self, client: SyncClient, direct: bool = False) -> None:
        self.client = client
        self.submit = client.submit_direct if direct else client.submit

    def call(self) -> None:
        self.client.call(PING)

    def send(self) -> Any:
        return self.submit(PING)

    def wait(self, handle: Any) -> None:
        handle.result()

    def close(self) -> None:
        self.client.close()


class _RawSync:
    """A raw blocking echo client, sent messages the size of a kvrpc ping request."""

    def __init__(self, client: SyncRawEchoClient) -> None:
        self.client = client
        self.message = bytes(codec.encode_request(1, PING.name, ())[0])

    def call(self) -> None:
        self.client.send(self.message)
        self.client.recv()

    def send(self) -> Any:
        self.client.send(self.message)
        return None

    def wait(self, handle: Any) -> None:
        self.client.recv()

    def close(self) -> None:
        self.client.close()


# kvrpc's own contenders; every other one is a baseline their figures are divided by.
_KVRPC_PATHS = ("sync_", "sync_loop_", "sync_direct_")

# On a terminal, a status line rewritten in place; piped, nothing (see kvrpc.progress).
_progress = Progress("bench rpc")


@_progress.closing
def run_sync_bench(options: SyncOptions) -> dict[str, Any]:
    """Every contender's sequential and pipelined figures, and kvrpc's ratios to the others."""
    if options.vs_lmcache:
        require_lmcache()
    figures: dict[str, Any] = {"sync_url": options.url}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kvrpc-bench-sync-"))
        paths = _contenders(stack, options, tmp, figures)
        _progress(f"sync contenders: {', '.join(p.rstrip('_') for p in paths)}")
        for path in paths.values():
            _sequential(path, min(1000, options.calls))  # warm-up, not counted
        samples: dict[str, list[float]] = {prefix: [] for prefix in paths}
        loaded: dict[str, list[float]] = {prefix: [] for prefix in paths}
        busy = dict.fromkeys(paths, 0.0)
        turns = max(1, options.rounds)
        for turn in range(turns):
            _progress(f"sync round {turn + 1}/{turns}")
            for prefix, path in paths.items():
                samples[prefix] += _sequential(path, options.calls // turns)
                elapsed, latencies = _pipelined(path, options.pipelined // turns, options.window)
                busy[prefix] += elapsed
                loaded[prefix] += latencies
        for prefix in paths:
            figures[f"{prefix}ping_p50_us"] = percentile(samples[prefix], 0.5) * 1e6
            figures[f"{prefix}ping_p99_us"] = percentile(samples[prefix], 0.99) * 1e6
            figures[f"{prefix}ping_mean_us"] = statistics.fmean(samples[prefix]) * 1e6
            figures[f"{prefix}pipelined_calls_per_s"] = len(loaded[prefix]) / busy[prefix]
            figures[f"{prefix}pipelined_p50_us"] = percentile(loaded[prefix], 0.5) * 1e6
            figures[f"{prefix}pipelined_p99_us"] = percentile(loaded[prefix], 0.99) * 1e6
        figures["sync_pipelined_p99_over_p50"] = (
            figures["sync_pipelined_p99_us"] / figures["sync_pipelined_p50_us"]
        )
        figures["sync_direct_pipelined_p99_over_p50"] = (
            figures["sync_direct_pipelined_p99_us"] / figures["sync_direct_pipelined_p50_us"]
        )
        for other in (p for p in paths if p not in _KVRPC_PATHS):
            name = other.rstrip("_")
            figures[f"sync_ping_p50_ratio_to_{name}"] = (
                figures["sync_ping_p50_us"] / figures[f"{other}ping_p50_us"]
            )
            for mine in ("sync_", "sync_direct_"):
                figures[f"{mine}pipelined_ratio_to_{name}"] = (
                    figures[f"{mine}pipelined_calls_per_s"]
                    / figures[f"{other}pipelined_calls_per_s"]
                )
        for path in paths.values():
            path.close()
    return figures


def _contenders(
    stack: contextlib.ExitStack, options: SyncOptions, tmp: str, figures: dict[str, Any]
) -> dict[str, SyncPath]:
    url = parse_url(options.url)
    if url.scheme == "inproc":
        raise KvrpcError("the synchronous figures need a server in another process: not inproc")
    server = stack.enter_context(kv_server_child(options.url, tmp, *options.serve_options))
    figures["sync_server"] = f"kvrpc serve, child process {server.pid}"
    paths: dict[str, SyncPath] = {
        "sync_": _KvrpcSync(SyncClient(options.url, timeout=60.0)),
        # The same client with every call through its loop thread: what the lane saves.
        "sync_loop_": _KvrpcSync(SyncClient(options.url, timeout=60.0, direct=False)),
        # Pipelined with submit_direct: sent from the caller's thread, read as it waits.
        "sync_direct_": _KvrpcSync(SyncClient(options.url, timeout=60.0), direct=True),
    }
    raws = [("raw_sync_", url.scheme)]
    if not url.scheme.startswith("zmq+"):
        raws.append(("raw_zmq_sync_", "zmq+ipc"))
    for prefix, scheme in raws:
        baseline = baseline_for(scheme)
        if not isinstance(baseline, SyncRawBaseline):
            _progress(f"no blocking raw baseline for {scheme}: {prefix.rstrip('_')} left out")
            continue
        raw_url = (
            _raw_url(url)  # the async figures' place for it: the next port
            if scheme == url.scheme and url.port is not None
            else parse_url(f"{scheme}://{os.path.join(tmp, 'raw.sock')}")
        )
        child = stack.enter_context(
            ready_child(baseline.server_argv(raw_url), "ready", tmp, f"raw echo at {raw_url.raw}")
        )
        figures[f"{prefix}baseline"] = (
            f"{type(baseline).__name__} at {raw_url.raw} (child process {child.pid})"
        )
        paths[prefix] = _RawSync(baseline.connect_sync(raw_url))
    if options.vs_lmcache:
        endpoint = f"ipc://{os.path.join(tmp, 'lmcache.sock')}"
        argv = [sys.executable, "-m", "kvrpc.bench.lmcache_peer", endpoint]
        child = stack.enter_context(ready_child(argv, "ready", tmp, "LMCache's server"))
        figures["lmcache_version"] = lmcache_version()
        figures["lmcache_server"] = f"MessageQueueServer at {endpoint} (child process {child.pid})"
        paths["lmcache_"] = LMCacheSyncPath(endpoint)
    return paths


def _sequential(path: SyncPath, calls: int) -> list[float]:
    out: list[float] = []
    clock = time.perf_counter
    call = path.call
    for _ in range(calls):
        start = clock()
        call()
        out.append(clock() - start)
    return out


def _pipelined(path: SyncPath, calls: int, window_size: int) -> tuple[float, list[float]]:
    """Seconds for ``calls`` calls kept ``window_size`` in flight, and each call's latency."""
    clock = time.perf_counter
    window: deque[tuple[float, Any]] = deque()
    latencies: list[float] = []
    start = clock()
    for _ in range(calls):
        window.append((clock(), path.send()))
        if len(window) >= window_size:
            sent, handle = window.popleft()
            path.wait(handle)
            latencies.append(clock() - sent)
    while window:
        sent, handle = window.popleft()
        path.wait(handle)
        latencies.append(clock() - sent)
    return clock() - start, latencies
