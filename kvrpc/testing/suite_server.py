"""The conformance suite's server: its protocols, their handlers, and how tests reach them.

Both halves of the suite use it (:mod:`kvrpc.testing.conformance` for calls and the seam,
:mod:`kvrpc.testing.stream_conformance` for streams), and so does
``python -m kvrpc.testing URL``, the server a test can kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from kvrpc.client import AsyncClient
from kvrpc.protocol import HandlerType, ProtocolDefinition
from kvrpc.server import RPCServer
from kvrpc.transport import parse_url

__all__ = [
    "BCOUNT",
    "BLOCK",
    "CALL_TIMEOUT",
    "COUNT",
    "FAIL_AFTER",
    "LOSS_DEADLINE",
    "RECORD",
    "SLEEP",
    "TRICKLE",
    "WRONG_ITEMS",
    "StreamLog",
    "TransportCase",
    "client",
    "open_fds",
    "serve_conformance",
    "serving_child",
]

#: Protocols the suite's servers offer besides the built-ins.
SLEEP = ProtocolDefinition("conformance.sleep", (float,), str, HandlerType.NONBLOCKING)
RECORD = ProtocolDefinition("conformance.record", (int, int), int, HandlerType.NONBLOCKING)
BLOCK = ProtocolDefinition("conformance.block", (float,), str, HandlerType.BLOCKING)

#: Streams: ``COUNT(tag, n)`` yields 0..n-1 (``BCOUNT`` the same from a BLOCKING generator),
#: ``FAIL_AFTER(n)`` yields n items then raises, ``TRICKLE(tag)`` yields one item then waits
#: forever, ``WRONG_ITEMS(n)`` yields strings although it declares ints.
COUNT = ProtocolDefinition("conformance.count", (int, int), int, stream=True)
BCOUNT = ProtocolDefinition(
    "conformance.bcount", (int, int), int, HandlerType.BLOCKING, stream=True
)
FAIL_AFTER = ProtocolDefinition("conformance.fail_after", (int,), int, stream=True)
TRICKLE = ProtocolDefinition("conformance.trickle", (int,), int, stream=True)
WRONG_ITEMS = ProtocolDefinition("conformance.wrong_items", (int,), int, stream=True)

#: Generous bounds: reached only when the transport under test is broken.
CALL_TIMEOUT = 20.0
LOSS_DEADLINE = 10.0


@dataclass
class TransportCase:
    """How the suite reaches one transport.

    ``make_url`` returns a fresh, unused address on every call. ``raw_connect`` (for
    socket transports) opens a plain blocking socket to a server's URL, so the suite can
    send bytes no kvrpc client would; ``raw_inputs`` names byte strings that are malformed
    for this wire format (random bytes, half a frame, a length prefix over the cap...), built
    for a server whose ``max_message_size`` is the argument.
    """

    name: str
    make_url: Callable[[], str]
    raw_connect: Callable[[str], socket.socket] | None = None
    raw_inputs: Callable[[int], Mapping[str, bytes]] = field(default=lambda cap: {})


def open_fds() -> int:
    """Open file descriptors of this process (Linux and macOS)."""
    for where in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(where))
    raise RuntimeError("cannot count open file descriptors on this system")


class StreamLog:
    """What the stream handlers did, by tag: items pulled from them, and their ``finally``.

    Written on the server's loop (a BLOCKING generator hands its notes over to it), so a
    test on that loop waits for a count or an end with no polling.
    """

    def __init__(self) -> None:
        self.pulled: dict[int, int] = defaultdict(int)
        self.finished: set[int] = set()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the server runs on."""
        self._loop = loop

    def pull(self, tag: int) -> None:
        """A handler is asked for an item (on the loop)."""
        self.pulled[tag] += 1
        self._check()

    def finish(self, tag: int) -> None:
        """A handler's ``finally`` ran (on the loop)."""
        self.finished.add(tag)
        self._check()

    def from_thread(self, note: Callable[[int], None], tag: int) -> None:
        """Hand a note from a pool thread over to the loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(note, tag)

    async def until(self, condition: Callable[[], bool], timeout: float = LOSS_DEADLINE) -> None:
        """Wait until ``condition()`` holds, re-checked at each note."""
        if condition():
            return
        future = asyncio.get_running_loop().create_future()
        entry = (condition, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _check(self) -> None:
        for condition, future in list(self._waiters):
            if not future.done() and condition():
                future.set_result(None)


def _install(server: RPCServer, record: list[tuple[int, int]], log: StreamLog) -> None:
    async def sleep(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "slept"

    def append(client: int, seq: int) -> int:
        record.append((client, seq))
        return seq

    def block(seconds: float) -> str:
        time.sleep(seconds)
        return "blocked"

    async def count(tag: int, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                log.pull(tag)
                yield i
        finally:
            log.finish(tag)

    def bcount(tag: int, n: int) -> Iterator[int]:
        try:
            for i in range(n):
                log.from_thread(log.pull, tag)
                yield i
        finally:
            log.from_thread(log.finish, tag)

    async def fail_after(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise ValueError(f"failed after {n} items")

    async def trickle(tag: int) -> AsyncIterator[int]:
        try:
            yield 0
            await asyncio.Event().wait()  # never set: only a cancel ends this stream
        finally:
            log.finish(tag)

    async def wrong_items(n: int) -> AsyncIterator[Any]:
        for _ in range(n):
            yield "not an int"

    for definition, fn in (
        (SLEEP, sleep),
        (RECORD, append),
        (BLOCK, block),
        (COUNT, count),
        (BCOUNT, bcount),
        (FAIL_AFTER, fail_after),
        (TRICKLE, trickle),
        (WRONG_ITEMS, wrong_items),
    ):
        server.register(definition, fn)


@contextlib.asynccontextmanager
async def serve_conformance(
    url: str,
    record: list[tuple[int, int]] | None = None,
    streams: StreamLog | None = None,
    **options: Any,
) -> AsyncIterator[RPCServer]:
    """A running server at ``url`` with the suite's protocols.

    ``record`` gets RECORD calls, ``streams`` the stream handlers' notes.
    """
    server = RPCServer(url, shutdown_grace=0.5, **options)
    log = streams if streams is not None else StreamLog()
    log.bind(asyncio.get_running_loop())
    _install(server, record if record is not None else [], log)
    async with server:
        yield server


def client(url: str, **options: Any) -> AsyncClient:
    """A client of the suite's server, with the suite's call timeout unless told otherwise."""
    options.setdefault("timeout", CALL_TIMEOUT)
    return AsyncClient(url, **options)


@contextlib.asynccontextmanager
async def serving_child(url: str) -> AsyncIterator[int]:
    """``python -m kvrpc.testing URL`` in a process of its own, ready; yields its pid.

    For tests that kill the server: skips on ``inproc://``, which no other process reaches.
    The child is killed and reaped at the end, whatever the test did to it.
    """
    if parse_url(url).scheme == "inproc":
        pytest.skip("inproc:// cannot reach another process")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrpc.testing", url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        with anyio.fail_after(60):
            assert (await child.stdout.readline()).startswith(b"ready")
        yield child.pid
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
