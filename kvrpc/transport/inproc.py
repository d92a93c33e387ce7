"""The built-in ``inproc://name`` transport: servers and clients in one process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Callable, Sequence

from kvrpc.codec import Buffer
from kvrpc.errors import ConnectionLost, InvalidURL, TransportError
from kvrpc.transport.interface import ClientTransport, Peer, ServerTransport, TransportOptions
from kvrpc.transport.urls import TransportURL

__all__ = ["InprocPlugin"]

_INPROC_QUEUE = 1024
_CLOSED = None  # queue sentinel: the other side went away


class _Endpoint:
    """An asyncio queue bound to the loop that reads it, writable from any thread.

    ``maxsize`` 0 is unbounded: a client's endpoint, whose replies are bounded by its own
    limit on calls in flight, so that the server never has to wait for a client to read.
    """

    def __init__(self, maxsize: int = _INPROC_QUEUE) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[Peer, list[Buffer]] | None] = asyncio.Queue(maxsize)

    async def put(self, item: tuple[Peer, list[Buffer]] | None) -> None:
        """Deliver ``item``, waiting while the queue is full (back-pressure)."""
        if asyncio.get_running_loop() is self.loop:
            await self.queue.put(item)
        else:
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
            )

    def put_nowait_threadsafe(self, item: tuple[Peer, list[Buffer]] | None) -> bool:
        """Deliver an item without waiting; False if it had to be dropped (queue full)."""

        def deliver() -> None:
            # A full queue means the reader is far behind; it sees the closed flag instead.
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(item)

        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            try:
                self.queue.put_nowait(item)
            except asyncio.QueueFull:
                return False
            return True
        if self.loop.is_closed():
            return False
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self.loop.call_soon_threadsafe(deliver)
        return True


def _copy_frames(frames: Sequence[Buffer]) -> list[Buffer]:
    # A real transport hands the receiver its own bytes; copying keeps inproc honest about
    # that, so that code tested over inproc does not come to rely on shared memory. `bytes`
    # are immutable, so bytes(f) shares them instead of copying, which is just as safe.
    return [bytes(f) for f in frames]


_inproc_servers: dict[str, _InprocServer] = {}
_inproc_lock = threading.Lock()
_peer_ids = itertools.count(1)


class _InprocServer:
    def __init__(self, name: str) -> None:
        self.name = name
        self._inbox: _Endpoint | None = None
        self._clients: dict[Peer, _InprocClient] = {}
        self._peer_lost: Callable[[Peer], None] | None = None
        self._closed = False
        self._counts = {"connections": 0, "disconnects": 0, "malformed": 0, "dropped": 0}

    async def start(self) -> None:
        self._inbox = _Endpoint()
        with _inproc_lock:
            if self.name in _inproc_servers:
                raise TransportError(f"inproc://{self.name} is already bound in this process")
            _inproc_servers[self.name] = self

    def attach(self, client: _InprocClient) -> Peer:
        if self._closed:
            raise TransportError(f"inproc://{self.name} is closed")
        peer = next(_peer_ids).to_bytes(8, "big")
        self._clients[peer] = client
        self._counts["connections"] += 1
        return peer

    def detach(self, peer: Peer) -> None:
        if self._clients.pop(peer, None) is not None:
            self._counts["disconnects"] += 1
            if self._peer_lost is not None:
                self._peer_lost(peer)

    def set_peer_lost(self, callback: Callable[[Peer], None] | None) -> None:
        # A client may close from another thread or loop; the callback belongs to ours.
        loop = self._inbox.loop if self._inbox is not None else None
        if callback is None or loop is None:
            self._peer_lost = callback
            return

        def report(peer: Peer) -> None:
            try:
                on_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                on_loop = False
            if on_loop:
                callback(peer)
            elif not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(callback, peer)

        self._peer_lost = report

    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    async def deliver(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        if self._closed or self._inbox is None:
            raise ConnectionLost(f"inproc://{self.name} is closed")
        await self._inbox.put((peer, _copy_frames(frames)))

    async def recv(self) -> tuple[Peer, list[Buffer]]:
        if self._inbox is None:
            raise TransportError("server transport is not started")
        item = await self._inbox.queue.get()
        if item is None:
            raise ConnectionLost(f"inproc://{self.name} is closed")
        return item

    async def send(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        client = self._clients.get(peer)
        if client is not None and not client.deliver(_copy_frames(frames)):
            self._counts["dropped"] += 1

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _inproc_lock:
            if _inproc_servers.get(self.name) is self:
                del _inproc_servers[self.name]
        for client in list(self._clients.values()):
            client.server_closed()
        self._counts["disconnects"] += len(self._clients)
        self._clients.clear()
        if self._inbox is not None:
            self._inbox.put_nowait_threadsafe(_CLOSED)


class _InprocClient:
    def __init__(self, name: str, options: TransportOptions) -> None:
        self.name = name
        self._options = options
        self._server: _InprocServer | None = None
        self._peer = b""
        self._inbox: _Endpoint | None = None
        self._closed = False

    async def connect(self) -> None:
        if not self._attach():
            raise TransportError(f"no server is bound at inproc://{self.name} in this process")

    def _attach(self) -> bool:
        with _inproc_lock:
            server = _inproc_servers.get(self.name)
        if server is None or server._closed:
            return False
        if self._inbox is None:
            self._inbox = _Endpoint(maxsize=0)
        self._peer = server.attach(self)
        self._server = server
        return True

    def deliver(self, frames: list[Buffer]) -> bool:
        """Queue a reply without waiting (the inbox is unbounded); False if it was dropped."""
        if self._inbox is None or self._closed:
            return False
        return self._inbox.put_nowait_threadsafe((b"", frames))

    def server_closed(self) -> None:
        self._server = None
        if self._inbox is not None:
            self._inbox.put_nowait_threadsafe(_CLOSED)

    async def send(self, frames: Sequence[Buffer]) -> None:
        if self._closed:
            raise ConnectionLost(f"connection to inproc://{self.name} is closed")
        server = self._server
        if server is None:
            server = await self._reconnect()
        await server.deliver(self._peer, frames)

    async def _reconnect(self) -> _InprocServer:
        deadline = asyncio.get_running_loop().time() + self._options.reconnect_timeout
        while not self._attach():
            if asyncio.get_running_loop().time() >= deadline:
                raise ConnectionLost(
                    f"inproc://{self.name} is gone and did not come back within "
                    f"{self._options.reconnect_timeout}s"
                )
            await asyncio.sleep(0.01)
        assert self._server is not None
        return self._server

    async def recv(self) -> list[Buffer]:
        if self._inbox is None or self._closed:
            raise ConnectionLost(f"connection to inproc://{self.name} is closed")
        item = await self._inbox.queue.get()
        if item is None:
            raise ConnectionLost(f"inproc://{self.name} closed the connection")
        return item[1]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.detach(self._peer)
            self._server = None
        if self._inbox is not None:
            self._inbox.put_nowait_threadsafe(_CLOSED)


class InprocPlugin:
    """The built-in ``inproc://name`` transport: server and clients in one process.

    Works across event loops and threads of the process; frames are copied on delivery as a
    socket would, and each side's queue is bounded, so a slow reader slows the writer down.
    """

    def create_server(self, url: TransportURL, options: TransportOptions) -> ServerTransport:
        """A server bound to the name in ``url`` when started."""
        return _InprocServer(_inproc_name(url))

    def create_client(self, url: TransportURL, options: TransportOptions) -> ClientTransport:
        """A client for the server bound to the name in ``url``."""
        return _InprocClient(_inproc_name(url), options)


def _inproc_name(url: TransportURL) -> str:
    name = url.netloc + url.path
    if not name:
        raise InvalidURL(f"{url.raw!r}: inproc URLs need a name, like 'inproc://demo'")
    return name
