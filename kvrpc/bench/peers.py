"""``kvrpc bench slow-reader``: how much a client that never reads delays everyone else.

A ``kvrpc serve`` child process; this process pings it for a while with nothing else going on
(the baseline, in the same run), then again while a second child process floods it with 64 KiB
``rpc.echo`` requests and reads none of the replies. The figures are the pings' percentiles
in both phases and their ratio, and what the server's transport counted (replies dropped,
peers backlogged or dropped for stalling, requests refused unread), and each round's ratio.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from kvrpc.bench.rpc import _child, _server_for, inbox_options, percentile
from kvrpc.client import AsyncClient
from kvrpc.codec import encode_request
from kvrpc.errors import KvrpcError
from kvrpc.progress import Progress
from kvrpc.protocol import ECHO, PING, STATS
from kvrpc.transport import ClientInbox, TransportOptions, connect_client

__all__ = ["run_slow_reader_bench"]

_FLOOD_READY = b"flooding"


# On a terminal, a status line rewritten in place; piped, nothing (see kvrpc.progress).
_progress = Progress("bench slow-reader")


async def run_slow_reader_bench(
    url: str,
    seconds: float,
    rounds: int,
    inbox_burst: int | None = None,
    inbox_burst_bytes: int | None = None,
) -> dict[str, Any]:
    """Ping ``url`` for ``seconds`` idle, then as long beside a flooder, ``rounds`` times.

    ``inbox_burst`` and ``inbox_burst_bytes``: the server's ``--inbox-burst`` and
    ``--inbox-burst-bytes`` (None: its default).
    """
    try:
        return await _measure(url, seconds, rounds, inbox_options(inbox_burst, inbox_burst_bytes))
    finally:
        _progress.close()


async def _measure(
    url: str, seconds: float, rounds: int, options: tuple[str, ...]
) -> dict[str, Any]:
    async with _server_for(url, *options) as where, AsyncClient(url, timeout=10.0) as client:
        idle: list[float] = []
        flooded: list[float] = []
        failures = 0
        ratios: list[float] = []  # each round's flooded p99 / idle p99: the spread
        for round_ in range(rounds):
            _progress(f"round {round_ + 1}/{rounds}: idle")
            idle_times = await _pings(client, seconds)
            idle += idle_times
            _progress(f"round {round_ + 1}/{rounds}: beside a client that reads nothing")
            argv = [sys.executable, "-m", "kvrpc.bench.peers", "flood", url, str(seconds + 5)]
            async with _child(argv, _FLOOD_READY, "flooding client"):
                times = await _pings(client, seconds)
            failures += sum(1 for t in times if t < 0)
            flooded += [t for t in times if t >= 0]
            ratios.append(
                percentile([t for t in times if t >= 0], 0.99)
                / max(percentile(idle_times, 0.99), 1e-9)
            )
        stats = await client.call(STATS)
    figures: dict[str, Any] = {
        "server": where,
        "url": url,
        "server_options": " ".join(options) or "its defaults",
        "rounds": rounds,
    }
    for name, samples in (("idle", idle), ("flooded", flooded)):
        figures[f"ping_{name}_p50_us"] = percentile(samples, 0.5) * 1e6
        figures[f"ping_{name}_p99_us"] = percentile(samples, 0.99) * 1e6
        figures[f"ping_{name}_max_us"] = max(samples) * 1e6
        figures[f"ping_{name}_count"] = len(samples)
    figures["ping_p99_flooded_over_idle"] = figures["ping_flooded_p99_us"] / max(
        figures["ping_idle_p99_us"], 1e-9
    )
    figures["ping_p99_flooded_over_idle_rounds"] = " ".join(f"{r:.2f}" for r in ratios)
    figures["ping_failures"] = failures
    for key in (
        "transport_dropped",
        "transport_backlogged",
        "transport_stalled",
        "transport_refused",
    ):
        figures[key] = stats.get(key, 0)
    return figures


async def _pings(client: AsyncClient, seconds: float) -> list[float]:
    """Round-trip times of pings, one each millisecond; a failed ping counts as -1."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            await client.call(PING, timeout=5.0)
        except KvrpcError:
            times.append(-1.0)
            continue
        times.append(time.perf_counter() - started)
        await asyncio.sleep(0.001)
    return times


async def _flood(url: str, seconds: float) -> None:
    """Send 64 KiB echo requests for ``seconds`` and read no reply."""
    transport = connect_client(url, TransportOptions())
    # Never read: past 16 replies the inbox pauses the transport, which then reads nothing.
    unread = ClientInbox(limit=16)
    unread.bind(transport)
    await transport.connect(unread)
    request = encode_request(1, ECHO.name, (b"x" * (64 * 1024),))
    print(_FLOOD_READY.decode(), flush=True)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                    await transport.send(request)
            except TimeoutError:
                # The server stopped taking our requests (it is not reading us): stay, unread.
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            except KvrpcError:
                await asyncio.sleep(0.01)  # dropped by the server: connect again
    finally:
        await transport.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        asyncio.run(_flood(sys.argv[2], float(sys.argv[3])))
