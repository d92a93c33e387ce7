"""The raw baseline for benchmarks: a plain asyncio Unix-socket echo, without kvrpc.

Each message is a ``!Q`` length and the body; the server writes every message back as it
came. It uses asyncio streams (``start_unix_server``, ``open_unix_connection``), the way an
application would without a framework, so that ``kvrpc bench`` can show what kvrpc's
``unix://`` transport costs on top of the socket itself.

Run ``python -m kvrpc_unix.baseline /path/to/socket`` to serve: it prints ``ready`` once
listening and serves until SIGTERM or SIGINT, then removes its socket file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import sys
from collections import deque
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from kvrpc.transport import TransportURL

__all__ = ["RAW_BASELINE", "RawEchoBaseline", "RawEchoClient", "serve"]

_LENGTH: Final = struct.Struct("!Q")


class RawEchoClient:
    """One connection to the echo server.

    :meth:`call` makes one round trip; :meth:`submit` pipelines (replies come back in the
    order sent, and a reader task started by the first ``submit`` resolves them). A ``call``
    made after a ``submit`` queues behind the pipelined requests.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()  # one inline round trip at a time
        self._replies: deque[asyncio.Future[bytes]] = deque()
        self._reader_task: asyncio.Task[None] | None = None

    async def call(self, payload: bytes) -> bytes:
        """Send ``payload`` and return its echo."""
        if self._reader_task is not None:
            return await (await self.submit(payload))
        async with self._lock:
            if self._reader_task is None:
                self._writer.write(_LENGTH.pack(len(payload)) + payload)
                await self._writer.drain()
                (size,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
                return await self._reader.readexactly(size)
        return await (await self.submit(payload))

    async def submit(self, payload: bytes) -> asyncio.Future[bytes]:
        """Send ``payload`` and return a future of its echo, without waiting for it."""
        loop = asyncio.get_running_loop()
        if self._reader_task is None:
            # Wait out an inline call, so that only the reader task reads from now on.
            async with self._lock:
                if self._reader_task is None:
                    self._reader_task = loop.create_task(self._read_replies())
        reply: asyncio.Future[bytes] = loop.create_future()
        self._replies.append(reply)
        self._writer.write(_LENGTH.pack(len(payload)) + payload)
        await self._writer.drain()
        return reply

    async def _read_replies(self) -> None:
        try:
            while True:
                (size,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
                body = await self._reader.readexactly(size)
                reply = self._replies.popleft()
                if not reply.done():
                    reply.set_result(body)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._fail_pending(ConnectionError(f"echo server closed the connection: {exc}"))

    def _fail_pending(self, exc: BaseException) -> None:
        while self._replies:
            reply = self._replies.popleft()
            if not reply.done():
                reply.set_exception(exc)

    async def close(self) -> None:
        """Stop the reader task, fail unanswered submits, and close the connection."""
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None
        self._fail_pending(ConnectionError("echo client closed"))
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


class RawEchoBaseline:
    """How a benchmark starts the echo server in a process of its own and connects to it."""

    def server_argv(self, url: TransportURL) -> list[str]:
        """The command that serves the echo at ``url``'s path; it prints ``ready`` once up."""
        return [sys.executable, "-m", "kvrpc_unix.baseline", url.path]

    async def connect(self, url: TransportURL) -> RawEchoClient:
        """Connect to the echo server at ``url``'s path."""
        reader, writer = await asyncio.open_unix_connection(url.path)
        return RawEchoClient(reader, writer)


#: The baseline of the ``unix://`` transport (``UnixPlugin.raw_baseline``).
RAW_BASELINE: Final = RawEchoBaseline()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await reader.readexactly(_LENGTH.size)
            (size,) = _LENGTH.unpack(header)
            writer.write(header + await reader.readexactly(size))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(path: str) -> None:
    """Serve the echo at ``path`` until SIGTERM or SIGINT, then remove the socket file."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    handlers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers[task] = writer
        try:
            await _echo(reader, writer)
        finally:
            del handlers[task]

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a benchmark's own path: a leftover is from an earlier run
    server = await asyncio.start_unix_server(handle, path)
    try:
        print("ready", flush=True)
        await stop.wait()
    finally:
        server.close()
        # Hang up rather than cancel: on Python 3.11 asyncio logs a cancelled connection
        # handler as an unhandled exception. Each handler then ends on end-of-stream.
        for writer in handlers.values():
            writer.close()
        if handlers:
            await asyncio.wait(list(handlers), timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def main(argv: list[str]) -> int:
    """Entry point of ``python -m kvrpc_unix.baseline PATH``."""
    if len(argv) != 1:
        print("usage: python -m kvrpc_unix.baseline /path/to/socket", file=sys.stderr)
        return 2
    asyncio.run(serve(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
