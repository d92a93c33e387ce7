"""Bare transports read by hand: for tests and tools that send what no well-behaved peer would.

:class:`RawServer` and :class:`RawClient` pair a transport from the registry with the core's
inboxes (:class:`~kvrpc.transport.Inbox`, :class:`~kvrpc.transport.ClientInbox`), so that a
test can ``await recv()`` one message at a time, exactly as the transport delivered it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import TracebackType

from kvrpc.codec import Buffer
from kvrpc.transport import (
    ClientInbox,
    ClientTransport,
    Inbox,
    Peer,
    ReadControl,
    ServerTransport,
    TransportOptions,
    connect_client,
    create_server,
)

__all__ = ["RawClient", "RawServer"]


class RawServer:
    """A server transport at ``url`` whose messages wait in an :class:`Inbox` for :meth:`recv`.

    ``limit`` is the inbox's bound: past it the transport is paused until :meth:`recv` has
    taken half of them. ``lost`` lists the peers the transport reported gone, in order;
    :meth:`wait` waits for a state of either to come about.
    """

    def __init__(
        self, url: str, options: TransportOptions | None = None, *, limit: int = 1024
    ) -> None:
        self.transport: ServerTransport = create_server(url, options or TransportOptions())
        self.lost: list[Peer] = []
        self._changed = asyncio.Event()
        self.inbox = Inbox(on_peer_lost=self._peer_lost, limit=limit)
        self.inbox.bind(_NotedReading(self.transport, self._changed.set))

    async def wait(self, condition: Callable[[], bool], timeout: float | None = None) -> None:
        """Return once ``condition()`` holds; TimeoutError after ``timeout`` seconds.

        It is checked now and again after each peer loss and each time the inbox pauses or
        resumes the transport's reading: for conditions on :attr:`lost` and
        ``inbox.paused``, which change only then.
        """
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def _peer_lost(self, peer: Peer) -> None:
        self.lost.append(peer)
        self._changed.set()

    async def start(self) -> RawServer:
        """Bind and begin delivering into the inbox."""
        await self.transport.start(self.inbox)
        return self

    async def recv(self, timeout: float | None = None) -> tuple[Peer, list[Buffer]]:
        """The next message; TimeoutError after ``timeout`` seconds, ConnectionLost if closed."""
        return await asyncio.wait_for(self.inbox.recv(), timeout)

    def send(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        """Send one message to ``peer`` (never waits)."""
        self.transport.send(peer, frames)

    async def close(self) -> None:
        """Close the transport and the inbox; idempotent."""
        self.inbox.close()
        await self.transport.close()

    async def __aenter__(self) -> RawServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _NotedReading:
    """The transport's reading, as the inbox drives it, calling ``noted`` after each change."""

    def __init__(self, control: ReadControl, noted: Callable[[], None]) -> None:
        self._control = control
        self._noted = noted

    def pause_reading(self) -> None:
        self._control.pause_reading()
        self._noted()

    def resume_reading(self) -> None:
        self._control.resume_reading()
        self._noted()


class RawClient:
    """A client transport to ``url`` whose messages wait in a :class:`ClientInbox`.

    ``limit``: past that many unread messages the transport stops reading (a client that
    never calls :meth:`recv` is then a peer that reads nothing, as the server sees it);
    None reads and keeps every message.
    """

    def __init__(
        self, url: str, options: TransportOptions | None = None, *, limit: int | None = 256
    ) -> None:
        self.transport: ClientTransport = connect_client(url, options or TransportOptions())
        self.inbox = ClientInbox(limit)
        self.inbox.bind(self.transport)

    async def connect(self) -> RawClient:
        """Connect; raises :class:`~kvrpc.errors.TransportError` if it cannot."""
        await self.transport.connect(self.inbox)
        return self

    async def send(self, frames: Sequence[Buffer]) -> None:
        """Send one message (reconnecting first if the connection was lost)."""
        await self.transport.send(frames)

    async def recv(self, timeout: float | None = None) -> list[Buffer]:
        """The next message; ConnectionLost in its place for a lost connection."""
        return await self.inbox.recv(timeout)

    async def close(self) -> None:
        """Close the connection; idempotent."""
        await self.transport.close()

    async def __aenter__(self) -> RawClient:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
