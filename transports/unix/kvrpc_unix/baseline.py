"""The raw baseline for benchmarks: a plain Unix-socket echo, without kvrpc.

Each message is a ``!Q`` length and the body; the server writes every message back as it
came. It is registered under the ``kvrpc.baselines`` entry points, apart from the transport
plugin, so that ``kvrpc bench rpc`` can show what kvrpc's ``unix://`` transport costs on top
of the socket itself. Each side is the fastest plain use of the standard library for its job:

* the server, an :class:`asyncio.Protocol` that writes back whatever it receives, on an
  event loop as kvrpc's own server is (the fastest way asyncio serves a socket: no stream
  buffers, no task per connection, no parsing);
* :class:`RawEchoClient`, an :class:`asyncio.Protocol` too, that parses echoes straight from
  ``data_received``;
* :class:`SyncRawEchoClient`, a blocking socket in the caller's thread.

Run ``python -m kvrpc_unix.baseline /path/to/socket`` to serve: it prints ``ready`` once
listening and serves until SIGTERM or SIGINT, then removes its socket file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
from collections import deque
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from kvrpc.transport import TransportURL

__all__ = ["RAW_BASELINE", "RawEchoBaseline", "RawEchoClient", "SyncRawEchoClient", "serve"]

_LENGTH: Final = struct.Struct("!Q")


class _EchoProtocol(asyncio.Protocol):
    """Splits the byte stream into echoes and resolves the oldest waiting future with each."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[bytes]] = deque()
        self._buffer = bytearray()
        self._lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, offset)
            end = offset + _LENGTH.size + size
            if len(buffer) < end:
                break
            reply = self.waiting.popleft()
            if not reply.done():
                reply.set_result(bytes(buffer[offset + _LENGTH.size : end]))
            offset = end
        del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = ConnectionError(f"echo server closed the connection: {exc}")
        self.fail(self._lost)

    def fail(self, exc: BaseException) -> None:
        while self.waiting:
            reply = self.waiting.popleft()
            if not reply.done():
                reply.set_exception(exc)

    def check(self) -> None:
        if self._lost is not None:
            raise self._lost


class RawEchoClient:
    """One asyncio connection to the echo server; echoes come back in the order sent."""

    def __init__(self, protocol: _EchoProtocol) -> None:
        self._protocol = protocol

    async def call(self, payload: bytes) -> bytes:
        """Send ``payload`` and return its echo."""
        return await (await self.submit(payload))

    async def submit(self, payload: bytes) -> asyncio.Future[bytes]:
        """Send ``payload`` and return a future of its echo, without waiting for it."""
        protocol = self._protocol
        protocol.check()
        assert protocol.transport is not None
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        protocol.waiting.append(reply)
        protocol.transport.write(_LENGTH.pack(len(payload)) + payload)
        return reply

    async def close(self) -> None:
        """Fail unanswered submits and close the connection."""
        self._protocol.fail(ConnectionError("echo client closed"))
        if self._protocol.transport is not None:
            self._protocol.transport.close()


class SyncRawEchoClient:
    """One blocking connection to the echo server, used from one thread."""

    def __init__(self, path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._buffer = bytearray()

    def send(self, payload: bytes) -> None:
        """Send one message without waiting for its echo."""
        self._sock.sendall(_LENGTH.pack(len(payload)) + payload)

    def recv(self) -> bytes:
        """Block until the next echo has arrived whole, and return it."""
        header = self._read(_LENGTH.size)
        (size,) = _LENGTH.unpack(header)
        return self._read(size)

    def _read(self, size: int) -> bytes:
        buffer = self._buffer
        while len(buffer) < size:
            chunk = self._sock.recv(max(65536, size - len(buffer)))
            if not chunk:
                raise ConnectionError("echo server closed the connection")
            buffer += chunk
        out = bytes(buffer[:size])
        del buffer[:size]
        return out

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


class RawEchoBaseline:
    """How a benchmark starts the echo server in a process of its own and connects to it."""

    def server_argv(self, url: TransportURL) -> list[str]:
        """The command that serves the echo at ``url``'s path; it prints ``ready`` once up."""
        return [sys.executable, "-m", "kvrpc_unix.baseline", url.path]

    async def connect(self, url: TransportURL) -> RawEchoClient:
        """Connect to the echo server at ``url``'s path."""
        _, protocol = await asyncio.get_running_loop().create_unix_connection(
            _EchoProtocol, url.path
        )
        return RawEchoClient(protocol)

    def connect_sync(self, url: TransportURL) -> SyncRawEchoClient:
        """A blocking connection to the echo server at ``url``'s path."""
        return SyncRawEchoClient(url.path)


#: The baseline of the ``unix://`` transport (entry point ``kvrpc.baselines`` ``unix``).
RAW_BASELINE: Final = RawEchoBaseline()


class _EchoServerProtocol(asyncio.Protocol):
    """Writes back whatever arrives, as it arrives: the framing passes through untouched."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_unix_server(_EchoServerProtocol, path)
    try:
        print("ready", flush=True)
        await stop.wait()
    finally:
        server.close()


def serve(path: str) -> None:
    """Serve the echo at ``path`` until SIGTERM or SIGINT, then remove the socket file."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a benchmark's own path: a leftover is from an earlier run
    try:
        asyncio.run(_serve(path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def main(argv: list[str]) -> int:
    """Entry point of ``python -m kvrpc_unix.baseline PATH``."""
    if len(argv) != 1:
        print("usage: python -m kvrpc_unix.baseline /path/to/socket", file=sys.stderr)
        return 2
    serve(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
