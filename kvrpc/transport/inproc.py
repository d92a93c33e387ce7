"""The built-in ``inproc://name`` transport: servers and clients in one process."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Sequence

from kvrpc.codec import Buffer
from kvrpc.errors import ConnectionLost, InvalidURL, TransportError
from kvrpc.transport.interface import (
    ClientSink,
    ClientTransport,
    Peer,
    ServerSink,
    ServerTransport,
    TransportOptions,
)
from kvrpc.transport.urls import TransportURL

__all__ = ["InprocPlugin"]


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _call_on(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: object) -> bool:
    """Run ``fn(*args)`` on ``loop``: now if this is its thread, else soon; False if closed.

    Calls made from one thread keep their order either way: ``call_soon_threadsafe`` is FIFO.
    """
    if _on_loop(loop):
        fn(*args)
        return True
    if loop.is_closed():
        return False
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed meanwhile
        return False
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
    reports_peer_loss = True

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: ServerSink | None = None
        self._clients: dict[Peer, _InprocClient] = {}
        self._closed = False
        # Paused by the core's inbox: senders wait for a resume (on their own loops).
        self._paused = False
        self._resumers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._lock = threading.Lock()  # the pause state is read by senders on other threads
        self._counts = {
            "connections": 0,
            "disconnects": 0,
            "malformed": 0,
            "dropped": 0,
            "skipped": 0,
        }

    async def start(self, sink: ServerSink) -> None:
        self._loop = asyncio.get_running_loop()
        self._sink = sink
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
            if self._loop is not None:
                _call_on(self._loop, self._report_lost, peer)

    def _report_lost(self, peer: Peer) -> None:
        if not self._closed and self._sink is not None:
            self._sink.peer_lost(peer)

    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    async def deliver(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        """From a client, on any loop: wait while paused, then hand over one message."""
        while True:
            if self._closed or self._loop is None:
                raise ConnectionLost(f"inproc://{self.name} is closed")
            with self._lock:
                if not self._paused:
                    break
                waiter = asyncio.get_running_loop().create_future()
                self._resumers.append((asyncio.get_running_loop(), waiter))
            await waiter
        if not _call_on(self._loop, self._take, peer, _copy_frames(frames)):
            raise ConnectionLost(f"inproc://{self.name} is closed")

    def _take(self, peer: Peer, frames: list[Buffer]) -> None:
        sink = self._sink
        if self._closed or sink is None:
            return
        sink.deliver(peer, frames)
        sink.read_done()

    def pause_reading(self) -> None:
        with self._lock:
            self._paused = True

    def resume_reading(self) -> None:
        with self._lock:
            self._paused = False
            resumers, self._resumers = self._resumers, []
        for loop, waiter in resumers:
            _call_on(loop, _settle, waiter)

    def send(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        client = self._clients.get(peer)
        if client is None:
            self._counts["skipped"] += 1
        elif not client.deliver(_copy_frames(frames)):
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
        self._sink = None
        self.resume_reading()  # senders still waiting see the closed flag


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _InprocClient:
    def __init__(self, name: str, options: TransportOptions) -> None:
        self.name = name
        self._options = options
        self._server: _InprocServer | None = None
        self._peer = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: ClientSink | None = None
        self._closed = False

    async def connect(self, sink: ClientSink) -> None:
        self._loop = asyncio.get_running_loop()
        self._sink = sink
        if not self._attach():
            raise TransportError(f"no server is bound at inproc://{self.name} in this process")

    def _attach(self) -> bool:
        with _inproc_lock:
            server = _inproc_servers.get(self.name)
        if server is None or server._closed:
            return False
        self._peer = server.attach(self)
        self._server = server
        return True

    def deliver(self, frames: list[Buffer]) -> bool:
        """A reply from the server, on any loop: handed to the sink on ours; never waits."""
        if self._closed or self._loop is None:
            return False
        return _call_on(self._loop, self._take, frames)

    def _take(self, frames: list[Buffer]) -> None:
        if not self._closed and self._sink is not None:
            self._sink.deliver(frames)

    def server_closed(self) -> None:
        self._server = None
        if self._loop is not None:
            _call_on(self._loop, self._report_lost)

    def _report_lost(self) -> None:
        if not self._closed and self._sink is not None:
            self._sink.connection_lost(f"inproc://{self.name} closed the connection")

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

    def pause_reading(self) -> None:
        pass  # replies are handed over without waiting, however slowly they are read

    def resume_reading(self) -> None:
        pass

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.detach(self._peer)
            self._server = None


class InprocPlugin:
    """The built-in ``inproc://name`` transport: server and clients in one process.

    Works across event loops and threads of the process: each side's sink is called on its
    own loop. Frames are copied on delivery as a socket would; while the server's inbox has
    paused reading, clients' sends wait.
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
