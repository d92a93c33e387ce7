"""Benchmarks behind ``kvrpc bench``: figures come from real calls, never from timed tests.

``inproc://`` runs the server on the benchmark's own event loop (the honest in-process
figure: codec, validation, dispatch and futures, no socket); any other scheme starts
``kvrpc serve`` in a second process and measures across the real transport, and beside it
the transport plugin's raw baseline (its socket library with no kvrpc), in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio

from kvrpc import codec
from kvrpc._memory import max_rss_bytes
from kvrpc.bench.baselines import RawEchoClient, baseline_for
from kvrpc.client import AsyncClient
from kvrpc.errors import TransportError
from kvrpc.progress import Progress
from kvrpc.protocol import ECHO, PING, STATS
from kvrpc.server import RPCServer
from kvrpc.transport import TransportURL, parse_url

__all__ = [
    "EchoPath",
    "inbox_options",
    "measure_import",
    "percentile",
    "run_rpc_bench",
    "serve_options",
]

# Run in a fresh interpreter: prints the import time of kvrpc in seconds and which heavy
# modules it pulled in.
_IMPORT_PROBE = """
import sys, time
start = time.perf_counter()
import kvrpc
elapsed = time.perf_counter() - start
print(elapsed, 'torch' in sys.modules, 'pydantic' in sys.modules)
"""


def percentile(samples: list[float], fraction: float) -> float:
    """The sample at ``fraction`` (0-1) of the sorted samples, nearest rank."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def measure_import(runs: int) -> dict[str, Any]:
    """Median ``import kvrpc`` time over ``runs`` fresh interpreters, and a bare baseline."""
    import subprocess

    probe, bare, heavy = [], [], set()
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True
        ).stdout.split()
        probe.append(float(out[0]))
        heavy |= {
            name
            for name, loaded in zip(("torch", "pydantic"), out[1:], strict=False)
            if loaded == "True"
        }
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - start)
    return {
        "import_kvrpc_median_ms": statistics.median(probe) * 1e3,
        "import_kvrpc_max_ms": max(probe) * 1e3,
        "bare_interpreter_start_median_ms": statistics.median(bare) * 1e3,
        "heavy_modules_imported": ", ".join(sorted(heavy)) or "none",
        "runs": runs,
    }


# On a terminal, a status line rewritten in place; piped, nothing (see kvrpc.progress).
_progress = Progress("bench rpc")


class EchoPath(Protocol):
    """One request/reply path being measured: kvrpc itself, or a raw baseline."""

    async def call(self) -> Any:
        """One small round trip."""

    async def submit(self) -> asyncio.Future[Any]:
        """Send one small request; the future resolves with its reply."""

    async def echo(self, payload: bytes) -> bytes:
        """Send ``payload`` and return what came back."""


class _KvrpcPath:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def call(self) -> Any:
        return await self.client.call(PING)

    async def submit(self) -> asyncio.Future[Any]:
        return await self.client.submit(PING)

    async def echo(self, payload: bytes) -> bytes:
        result: bytes = await self.client.call(ECHO, payload)
        return result


class _RawPath:
    """A plugin's raw echo client, sending messages the size of a kvrpc ping request."""

    def __init__(self, client: RawEchoClient) -> None:
        self.client = client
        self.message = bytes(codec.encode_request(1, PING.name, ())[0])

    async def call(self) -> Any:
        return await self.client.call(self.message)

    async def submit(self) -> asyncio.Future[Any]:
        return await self.client.submit(self.message)

    async def echo(self, payload: bytes) -> bytes:
        return await self.client.call(payload)


@contextlib.asynccontextmanager
async def _child(argv: list[str], ready: bytes, what: str) -> AsyncIterator[int]:
    """A child process that prints a line starting with ``ready`` once it serves."""
    child = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        assert child.stdout is not None
        with anyio.fail_after(60):
            line = await child.stdout.readline()
        if not line.startswith(ready):
            raise TransportError(f"{what} did not start: {line!r}")
        yield child.pid
    finally:
        if child.returncode is None:
            child.terminate()
        with anyio.move_on_after(10):
            await child.wait()


@contextlib.asynccontextmanager
async def _server_for(url: str, *serve_options: str) -> AsyncIterator[str]:
    """A server at ``url``: in this loop for inproc, else a ``kvrpc serve`` child process.

    ``serve_options`` are more ``kvrpc serve`` flags for the child.
    """
    if parse_url(url).scheme == "inproc":
        async with RPCServer(url):
            yield "same event loop"
        return
    # --insecure: a benchmark's zmq+tcp server listens on loopback, without a token.
    argv = [sys.executable, "-m", "kvrpc", "serve", "--url", url, "--insecure", *serve_options]
    async with _child(argv, b"kvrpc ready", f"benchmark server for {url}") as pid:
        yield f"child process {pid}"


def serve_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``kvrpc serve`` flags ``bench rpc``'s options ask for (its ``--inbox-burst*``)."""
    return inbox_options(args.inbox_burst, args.inbox_burst_bytes)


def inbox_options(burst: int | None, burst_bytes: int | None) -> tuple[str, ...]:
    """``kvrpc serve``'s ``--inbox-burst`` and ``--inbox-burst-bytes`` for those given."""
    options: tuple[str, ...] = ()
    if burst is not None:
        options += ("--inbox-burst", str(burst))
    if burst_bytes is not None:
        options += ("--inbox-burst-bytes", str(burst_bytes))
    return options


def _raw_url(url: TransportURL) -> TransportURL:
    """Where the raw baseline listens: beside the kvrpc server, never on its address."""
    if url.port is not None:
        return parse_url(url.raw.replace(f":{url.port}", f":{url.port + 1}", 1))
    return parse_url(f"{url.scheme}://{url.netloc}{url.path}-raw")


@contextlib.asynccontextmanager
async def _baseline_for(url: str) -> AsyncIterator[tuple[str, EchoPath] | None]:
    """The raw baseline for ``url``'s transport, started and connected, or None."""
    parsed = parse_url(url)
    if parsed.scheme == "inproc":
        async with _raw_queue_echo() as path:
            yield "asyncio queues between two tasks (same loop)", path
        return
    baseline = baseline_for(parsed.scheme)
    if baseline is None:
        yield None
        return
    raw_url = _raw_url(parsed)
    async with _child(baseline.server_argv(raw_url), b"ready", "raw baseline server") as pid:
        client = await baseline.connect(raw_url)
        try:
            yield (
                f"{type(baseline).__name__} at {raw_url.raw} (child process {pid})",
                _RawPath(client),
            )
        finally:
            await client.close()


async def run_rpc_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure ping round trips, pipelined calls and echo bandwidth against ``args.url``.

    In the same run, and interleaved with kvrpc's own rounds so that a noisy machine hurts
    both alike, the same figures are taken for the transport's raw baseline: for inproc two
    tasks passing messages through asyncio queues, for a plugin's scheme the baseline registered
    under ``kvrpc.baselines`` (plain pyzmq, plain sockets). The ratios kvrpc / raw are what
    to compare.
    """
    try:
        return await _measure(args)
    finally:
        _progress.close()


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    payload = os.urandom(args.payload_mib * 1024 * 1024)
    figures: dict[str, Any] = {"url": args.url}
    async with contextlib.AsyncExitStack() as stack:
        figures["server"] = await stack.enter_async_context(
            _server_for(args.url, *serve_options(args))
        )
        client = await stack.enter_async_context(AsyncClient(args.url, timeout=300.0))
        paths: dict[str, EchoPath] = {"": _KvrpcPath(client)}
        raw = await stack.enter_async_context(_baseline_for(args.url))
        if raw is not None:
            figures["raw_baseline"], paths["raw_"] = raw
        else:
            _progress(f"no raw baseline for {args.url}: kvrpc figures only")
        _progress(f"warming up against {args.url} ({figures['server']})")
        for path in paths.values():
            for _ in range(min(500, args.calls)):
                await path.call()
        figures.update(await _latency_and_rate(paths, args))
        figures.update(await _bandwidth(paths, client, payload, args))
    if raw is not None:
        figures["ping_p50_ratio_to_raw"] = figures["ping_p50_us"] / figures["raw_ping_p50_us"]
        figures["pipelined_ratio_to_raw"] = (
            figures["pipelined_calls_per_s"] / figures["raw_pipelined_calls_per_s"]
        )
        figures["echo_ratio_to_raw"] = figures["echo_gb_per_s"] / figures["raw_echo_gb_per_s"]
    return figures


async def _latency_and_rate(
    paths: dict[str, EchoPath], args: argparse.Namespace
) -> dict[str, float]:
    """Sequential round-trip percentiles and pipelined calls/s, the paths taking turns."""
    rounds = max(1, args.interleave)
    samples: dict[str, list[float]] = {prefix: [] for prefix in paths}
    busy: dict[str, float] = dict.fromkeys(paths, 0.0)
    loaded: dict[str, list[float]] = {prefix: [] for prefix in paths}
    for turn in range(rounds):
        _progress(f"round {turn + 1}/{rounds}: {args.calls // rounds} sequential pings each")
        for prefix, path in paths.items():
            out = samples[prefix]
            for _ in range(args.calls // rounds):
                start = time.perf_counter()
                await path.call()
                out.append(time.perf_counter() - start)
        _progress(
            f"round {turn + 1}/{rounds}: {args.pipelined // rounds} calls, "
            f"{args.window} in flight, each"
        )
        for prefix, path in paths.items():
            elapsed, latencies = await _pipelined(path, args.pipelined // rounds, args.window)
            busy[prefix] += elapsed
            loaded[prefix] += latencies
    figures: dict[str, float] = {}
    for prefix, taken in samples.items():
        figures[f"{prefix}ping_p50_us"] = percentile(taken, 0.50) * 1e6
        figures[f"{prefix}ping_p99_us"] = percentile(taken, 0.99) * 1e6
        figures[f"{prefix}ping_mean_us"] = statistics.fmean(taken) * 1e6
        figures[f"{prefix}pipelined_calls_per_s"] = len(loaded[prefix]) / busy[prefix]
        figures[f"{prefix}pipelined_p50_us"] = percentile(loaded[prefix], 0.50) * 1e6
        figures[f"{prefix}pipelined_p99_us"] = percentile(loaded[prefix], 0.99) * 1e6
    figures["pipelined_p99_over_p50"] = figures["pipelined_p99_us"] / figures["pipelined_p50_us"]
    return figures


async def _pipelined(path: EchoPath, calls: int, window_size: int) -> tuple[float, list[float]]:
    """Seconds to complete ``calls`` calls keeping ``window_size`` in flight, and latencies.

    A call's latency runs from its send to the moment its answer was awaited; answers come in
    the order sent, so the oldest is always the next to wait for.
    """
    clock = time.perf_counter
    window: deque[tuple[float, asyncio.Future[Any]]] = deque()
    latencies: list[float] = []
    start = clock()
    for _ in range(calls):
        window.append((clock(), await path.submit()))
        if len(window) >= window_size:
            sent, future = window.popleft()
            await future
            latencies.append(clock() - sent)
    while window:
        sent, future = window.popleft()
        await future
        latencies.append(clock() - sent)
    return clock() - start, latencies


async def _bandwidth(
    paths: dict[str, EchoPath], client: AsyncClient, payload: bytes, args: argparse.Namespace
) -> dict[str, float]:
    """Echo round trips of ``payload``; for kvrpc also the payload copies each side held.

    Copies are read off peak resident memory (which only grows), so kvrpc's rounds run
    first, before the baseline's buffers can raise the peak of this process.
    """
    figures: dict[str, float] = {}
    mib = len(payload) / (1 << 20)
    server_before = (await client.call(STATS)).get("max_rss_bytes", 0)
    client_before = max_rss_bytes()
    for prefix, path in paths.items():
        _progress(f"{prefix or 'kvrpc '}echo: {args.rounds} round trips of {mib:.0f} MiB")
        await path.echo(payload)  # first touch of the buffers is not the steady state
        elapsed = 0.0
        for _ in range(args.rounds):
            start = time.perf_counter()
            echoed = await path.echo(payload)
            elapsed += time.perf_counter() - start
            if echoed != payload:
                raise AssertionError(f"{prefix or 'kvrpc '}echo returned different bytes")
            del echoed
        # Bytes moved each round: the payload out and back.
        figures[f"{prefix}echo_gb_per_s"] = 2 * len(payload) * args.rounds / elapsed / 1e9
        figures[f"{prefix}echo_round_trip_ms"] = elapsed / args.rounds * 1e3
        if not prefix:
            server_after = (await client.call(STATS)).get("max_rss_bytes", 0)
            figures["echo_payload_mib"] = mib
            # Peak growth in payloads: what one round held at once beyond the start.
            figures["client_peak_rss_growth_payloads"] = (max_rss_bytes() - client_before) / len(
                payload
            )
            figures["server_peak_rss_growth_payloads"] = (server_after - server_before) / len(
                payload
            )
    return figures


@contextlib.asynccontextmanager
async def _raw_queue_echo() -> AsyncIterator[EchoPath]:
    """A bare request/reply pair of tasks: a server task and a client reader, two queues."""
    requests: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(1024)
    replies: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(1024)
    pending: dict[int, asyncio.Future[Any]] = {}
    ids = itertools.count()
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        while True:
            request_id, value = await requests.get()
            await replies.put((request_id, "pong" if value is None else value))

    async def read() -> None:
        while True:
            request_id, value = await replies.get()
            pending.pop(request_id).set_result(value)

    class QueuePath:
        async def submit(self, value: Any = None) -> asyncio.Future[Any]:
            request_id = next(ids)
            future = pending[request_id] = loop.create_future()
            await requests.put((request_id, value))
            return future

        async def call(self) -> Any:
            return await (await self.submit())

        async def echo(self, payload: bytes) -> bytes:
            # Copied once, as a socket would: a queue alone would hand the same object back.
            result: bytes = await (await self.submit(bytes(bytearray(payload))))
            return result

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(serve)
        tasks.start_soon(read)
        yield QueuePath()
        tasks.cancel_scope.cancel()
