"""The raw pyzmq echo that ``kvrpc bench rpc --url zmq+...`` measures kvrpc against.

Server: a synchronous ROUTER that sends every message straight back (run this module with an
endpoint). Clients: a zmq.asyncio DEALER, the way an asyncio program would use pyzmq without
kvrpc, and a plain blocking DEALER in the caller's thread, the way a synchronous one would
(small frames copied, pyzmq's fastest path for them). None encodes, validates nor dispatches
anything, so kvrpc's figures divided by these are what kvrpc itself costs over the bare
socket library. Registered under the ``kvrpc.baselines`` entry points, apart from the plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

from kvrpc.transport import TransportURL
from kvrpc_zmq.transport import endpoint_for

__all__ = ["RAW_BASELINE", "RawZmqEcho", "RawZmqEchoClient", "SyncRawZmqEchoClient"]


class RawZmqEchoClient:
    """A zmq.asyncio DEALER talking to the raw echo server."""

    def __init__(self, endpoint: str) -> None:
        self._context = zmq.asyncio.Context()
        self._sock = self._context.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._waiting: deque[asyncio.Future[bytes]] = deque()
        self._reader: asyncio.Task[None] | None = None

    async def call(self, payload: bytes) -> bytes:
        """Send one message and await its echo."""
        await self._stop_reader()  # one receiver at a time
        await self._sock.send(payload, copy=len(payload) < 65536)
        frame = await self._sock.recv(copy=False)
        return frame.bytes

    async def submit(self, payload: bytes) -> asyncio.Future[bytes]:
        """Send without waiting; the echoes come back in order and resolve the futures."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        await self._sock.send(payload)
        return future

    async def _read(self) -> None:
        while True:
            frame = await self._sock.recv()
            self._waiting.popleft().set_result(frame)

    async def _stop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            assert not self._waiting, "call() while pipelined echoes are still owed"
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def close(self) -> None:
        """Stop the reader and close the socket."""
        await self._stop_reader()
        self._sock.close(linger=0)
        self._context.term()


class SyncRawZmqEchoClient:
    """A blocking DEALER in the caller's thread, talking to the raw echo server."""

    def __init__(self, endpoint: str) -> None:
        self._context: zmq.Context[Any] = zmq.Context()
        self._sock = self._context.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)

    def send(self, payload: bytes) -> None:
        """Send one message without waiting for its echo (copied when small, as pyzmq advises)."""
        if len(payload) < 65536:
            self._sock.send(payload)
        else:
            self._sock.send(payload, copy=False)

    def recv(self) -> bytes:
        """Block until the next echo arrives."""
        return self._sock.recv()

    def close(self) -> None:
        """Close the socket and its context."""
        self._sock.close(linger=0)
        self._context.term()


class RawZmqEcho:
    """How the benchmark starts and reaches the raw echo for a zmq URL."""

    def server_argv(self, url: TransportURL) -> list[str]:
        """A command that serves the echo at ``url`` and prints ``ready`` once bound."""
        return [sys.executable, "-m", "kvrpc_zmq.baseline", endpoint_for(url)]

    async def connect(self, url: TransportURL) -> RawZmqEchoClient:
        """A connected client."""
        return RawZmqEchoClient(endpoint_for(url))

    def connect_sync(self, url: TransportURL) -> SyncRawZmqEchoClient:
        """A connected blocking client."""
        return SyncRawZmqEchoClient(endpoint_for(url))


RAW_BASELINE = RawZmqEcho()


def serve(endpoint: str) -> None:
    """Echo every message received on a ROUTER at ``endpoint`` until SIGTERM."""
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    sock.setsockopt(zmq.RCVTIMEO, 200)  # wake up now and then to notice SIGTERM
    while not stop:
        try:
            message = sock.recv_multipart(copy=False)
        except zmq.Again:
            continue
        sock.send_multipart(message, copy=False)
    sock.close(linger=0)
    context.term()


if __name__ == "__main__":
    serve(sys.argv[1])
