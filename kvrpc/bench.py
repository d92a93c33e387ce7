"""Benchmarks behind ``kvrpc bench``: figures come from real calls, never from timed tests.

``inproc://`` runs the server on the benchmark's own event loop (the honest in-process
figure: codec, validation, dispatch and futures, no socket); any other scheme starts
``kvrpc serve`` in a second process and measures across the real transport.
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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio

from kvrpc.client import AsyncClient
from kvrpc.errors import TransportError
from kvrpc.protocol import ECHO, PING
from kvrpc.server import RPCServer
from kvrpc.transport import parse_url

__all__ = ["measure_import", "percentile", "run_rpc_bench"]

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


def _progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def _server_for(url: str) -> AsyncIterator[str]:
    """A server at ``url``: in this loop for inproc, else a ``kvrpc serve`` child process."""
    if parse_url(url).scheme == "inproc":
        async with RPCServer(url):
            yield "same event loop"
        return
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kvrpc",
        "serve",
        "--url",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert child.stdout is not None
        with anyio.fail_after(30):
            line = await child.stdout.readline()
        if not line.startswith(b"kvrpc ready"):
            raise TransportError(f"benchmark server for {url} did not start: {line!r}")
        yield f"child process {child.pid}"
    finally:
        if child.returncode is None:
            child.terminate()
        with anyio.move_on_after(10):
            await child.wait()


async def run_rpc_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure ping round trips, pipelined calls and echo bandwidth against ``args.url``.

    For ``inproc://`` the same figures are taken, in the same run, for a raw baseline: two
    tasks passing requests and replies through asyncio queues, the least any in-process RPC
    must do. The ratios (kvrpc / raw) are what to compare between machines.
    """
    payload = os.urandom(args.payload_mib * 1024 * 1024)
    figures: dict[str, Any] = {"url": args.url}
    async with _server_for(args.url) as where:
        figures["server"] = where
        async with AsyncClient(args.url, timeout=60.0) as client:
            _progress(f"warming up against {args.url} ({where})")

            async def ping() -> Any:
                return await client.call(PING)

            async def submit_ping() -> asyncio.Future[Any]:
                return await client.submit(PING)

            figures.update(await _latency_and_rate(ping, submit_ping, args))

            _progress(f"{args.rounds} rpc.echo round trips of {args.payload_mib} MiB")
            start = time.perf_counter()
            for _ in range(args.rounds):
                echoed = await client.call(ECHO, payload)
            elapsed = time.perf_counter() - start
            if echoed != payload:
                raise AssertionError("echo returned different bytes")
            # Bytes moved each round: the payload out and back.
            figures["echo_gb_per_s"] = 2 * len(payload) * args.rounds / elapsed / 1e9
            figures["echo_payload_mib"] = args.payload_mib
    if parse_url(args.url).scheme == "inproc":
        _progress("raw baseline: asyncio queue echo between two tasks")
        async with _raw_queue_echo() as (raw_call, raw_submit):
            raw = await _latency_and_rate(raw_call, raw_submit, args)
        figures.update({f"raw_{key}": value for key, value in raw.items()})
        figures["ping_p50_ratio_to_raw"] = figures["ping_p50_us"] / raw["ping_p50_us"]
        figures["pipelined_ratio_to_raw"] = (
            figures["pipelined_calls_per_s"] / raw["pipelined_calls_per_s"]
        )
    return figures


async def _latency_and_rate(
    call: Callable[[], Awaitable[Any]],
    submit: Callable[[], Awaitable[asyncio.Future[Any]]],
    args: argparse.Namespace,
) -> dict[str, float]:
    """Sequential round-trip percentiles and pipelined calls/s of one call path."""
    for _ in range(min(500, args.calls)):
        await call()
    _progress(f"{args.calls} sequential calls")
    samples = []
    for _ in range(args.calls):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    _progress(f"{args.pipelined} calls, {args.window} in flight")
    window: deque[asyncio.Future[Any]] = deque()
    start = time.perf_counter()
    for _ in range(args.pipelined):
        window.append(await submit())
        if len(window) >= args.window:
            await window.popleft()
    while window:
        await window.popleft()
    return {
        "ping_p50_us": percentile(samples, 0.50) * 1e6,
        "ping_p99_us": percentile(samples, 0.99) * 1e6,
        "ping_mean_us": statistics.fmean(samples) * 1e6,
        "pipelined_calls_per_s": args.pipelined / (time.perf_counter() - start),
    }


@contextlib.asynccontextmanager
async def _raw_queue_echo() -> AsyncIterator[
    tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[asyncio.Future[Any]]]]
]:
    """A bare request/reply pair of tasks: a server task and a client reader, two queues."""
    requests: asyncio.Queue[tuple[int, str]] = asyncio.Queue(1024)
    replies: asyncio.Queue[tuple[int, str]] = asyncio.Queue(1024)
    pending: dict[int, asyncio.Future[Any]] = {}
    ids = itertools.count()
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        while True:
            request_id, _ = await requests.get()
            await replies.put((request_id, "pong"))

    async def read() -> None:
        while True:
            request_id, value = await replies.get()
            pending.pop(request_id).set_result(value)

    async def submit() -> asyncio.Future[Any]:
        request_id = next(ids)
        future = pending[request_id] = loop.create_future()
        await requests.put((request_id, "rpc.ping"))
        return future

    async def call() -> Any:
        return await (await submit())

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(serve)
        tasks.start_soon(read)
        yield call, submit
        tasks.cancel_scope.cancel()
