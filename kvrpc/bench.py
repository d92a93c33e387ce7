"""Benchmarks behind ``kvrpc bench``: figures come from real calls, never from timed tests.

``inproc://`` runs the server on the benchmark's own event loop (the honest in-process
figure: codec, validation, dispatch and futures, no socket); any other scheme starts
``kvrpc serve`` in a second process and measures across the real transport.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
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
    """Measure ping round trips, pipelined calls and echo bandwidth against ``args.url``."""
    payload = os.urandom(args.payload_mib * 1024 * 1024)
    figures: dict[str, Any] = {"url": args.url}
    async with _server_for(args.url) as where:
        figures["server"] = where
        async with AsyncClient(args.url, timeout=60.0) as client:
            _progress(f"warming up against {args.url} ({where})")
            for _ in range(min(500, args.calls)):
                await client.call(PING)

            _progress(f"{args.calls} sequential rpc.ping calls")
            samples = []
            for _ in range(args.calls):
                start = time.perf_counter()
                await client.call(PING)
                samples.append(time.perf_counter() - start)
            figures["ping_p50_us"] = percentile(samples, 0.50) * 1e6
            figures["ping_p99_us"] = percentile(samples, 0.99) * 1e6
            figures["ping_mean_us"] = statistics.fmean(samples) * 1e6

            _progress(f"{args.pipelined} rpc.ping calls, {args.window} in flight")
            window: deque[asyncio.Future[Any]] = deque()
            start = time.perf_counter()
            for _ in range(args.pipelined):
                window.append(await client.submit(PING))
                if len(window) >= args.window:
                    await window.popleft()
            while window:
                await window.popleft()
            figures["pipelined_calls_per_s"] = args.pipelined / (time.perf_counter() - start)

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
    return figures
