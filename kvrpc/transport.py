"""The transport seam: a few async methods that move frame lists, found by URL scheme.

Servers and clients only ever see :class:`ServerTransport` / :class:`ClientTransport`.
Concrete transports are plugins: a distribution registers a :class:`TransportPlugin` under
the entry-point group ``kvrpc.transports`` with the URL scheme as the entry-point name, and
:func:`get_plugin` finds it. The in-process ``inproc://name`` transport lives here, for tests
and for servers and clients in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlsplit

from kvrpc.codec import Buffer
from kvrpc.errors import ConnectionLost, InvalidURL, TransportError, TransportNotFound

__all__ = [
    "ENTRY_POINT_GROUP",
    "ClientTransport",
    "InprocPlugin",
    "ServerTransport",
    "TransportOptions",
    "TransportPlugin",
    "TransportURL",
    "claim_socket_path",
    "connect_client",
    "create_server",
    "get_plugin",
    "parse_url",
    "register_plugin",
]

ENTRY_POINT_GROUP = "kvrpc.transports"

#: Schemes whose plugin kvrpc knows by name, so a missing one can be named in the error.
_KNOWN_PACKAGES = {"zmq+tcp": "kvrpc-zmq", "zmq+ipc": "kvrpc-zmq", "unix": "kvrpc-unix"}

Peer = bytes
"""Opaque identity of one connected client, as the server transport reports it."""


@dataclass(frozen=True, slots=True)
class TransportURL:
    """A parsed transport URL: ``scheme://host:port/path?key=value``."""

    raw: str
    scheme: str
    host: str
    port: int | None
    path: str
    netloc: str = ""
    params: dict[str, str] = field(default_factory=dict)


def parse_url(url: str) -> TransportURL:
    """Parse a transport URL; raises :class:`InvalidURL` with the reason."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidURL(f"{url!r} is not a transport URL like 'zmq+tcp://127.0.0.1:5555'")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidURL(f"{url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise InvalidURL(f"{url!r} has no scheme")
    return TransportURL(
        raw=url,
        scheme=scheme,
        host=parts.hostname or "",
        port=port,
        path=parts.path,
        netloc=parts.netloc,
        params=dict(parse_qsl(parts.query)),
    )


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """Settings every transport honours.

    ``max_message_size``: the most bytes (all frames together) one message may carry; a
    framing layer that sees a larger one drops the connection that sent it and counts it.
    ``reconnect_timeout``: how long, in seconds, a client's ``send`` waits for a lost
    connection to come back before it raises :class:`ConnectionLost`.
    """

    max_message_size: int = 256 * 1024 * 1024
    reconnect_timeout: float = 2.0


@runtime_checkable
class ServerTransport(Protocol):
    """The server side: receive ``(peer, frames)`` from any client, send frames to one.

    ``recv`` hands out messages from every connection in arrival order per connection; a
    transport reads whatever is ready in one wake-up and serves it from a bounded queue, and
    stops reading (back-pressure) while that queue is full. Input the framing cannot parse
    (bad length prefixes, oversized messages, garbage) closes that one connection and is
    counted in :meth:`stats`; it never reaches ``recv`` and never disturbs other peers.

    A transport may also offer ``set_receiver(receiver)``, ``receiver(peer, frames) -> bool``:
    each message is then offered to it straight from the read callback, while nothing waits
    for :meth:`recv`. True means handled; False declines it, and the transport queues that
    message and every later one for :meth:`recv` (bounded, as above) until the queue is empty
    again, so the order of messages never changes. The server uses it where it exists.
    """

    async def start(self) -> None:
        """Bind and begin accepting; raises :class:`TransportError` if it cannot."""

    async def recv(self) -> tuple[Peer, list[Buffer]]:
        """The next message from any peer; raises :class:`ConnectionLost` once closed."""

    async def send(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        """Send one message to ``peer``; a peer that has gone away is silently skipped."""

    async def close(self) -> None:
        """Stop accepting and release every resource; idempotent."""

    def stats(self) -> dict[str, int]:
        """Counters since start: at least ``connections``, ``disconnects``, ``malformed``."""
        ...


@runtime_checkable
class ClientTransport(Protocol):
    """The client side: a connection to one server that comes back after a restart.

    A lost connection shows up once, as :class:`ConnectionLost` from :meth:`recv` (replies
    still owed on it will never come); the next :meth:`send` connects again, waiting up to
    ``TransportOptions.reconnect_timeout`` for the server, and later ``recv`` calls return
    messages from the new connection. Messages on one connection arrive in the order sent.

    A transport may also offer ``set_receiver(receiver)``, taking a plain function of one
    message: once it is set, messages are handed to it straight from the transport's read
    callback (one event-loop turn sooner than through a task awaiting :meth:`recv`), and
    :meth:`recv` only reports lost connections. The client uses it where it exists.
    """

    async def connect(self) -> None:
        """Connect; raises :class:`TransportError` if the server cannot be reached."""

    async def send(self, frames: Sequence[Buffer]) -> None:
        """Send one message, reconnecting first if the connection was lost.

        Raises :class:`ConnectionLost` if the server stays unreachable for
        ``reconnect_timeout`` seconds, or once the transport is closed.
        """

    async def recv(self) -> list[Buffer]:
        """The next message; raises :class:`ConnectionLost` once per lost connection.

        Waits across reconnections; after :meth:`close` it raises :class:`ConnectionLost`.
        """

    async def close(self) -> None:
        """Close the connection; idempotent."""


class TransportPlugin(Protocol):
    """What a transport distribution registers under the ``kvrpc.transports`` entry points."""

    def create_server(self, url: TransportURL, options: TransportOptions) -> ServerTransport:
        """A server transport for ``url`` (not started yet)."""
        ...

    def create_client(self, url: TransportURL, options: TransportOptions) -> ClientTransport:
        """A client transport for ``url`` (not connected yet)."""
        ...


_plugins: dict[str, TransportPlugin] = {}
_plugins_lock = threading.Lock()


def register_plugin(scheme: str, plugin: TransportPlugin) -> None:
    """Make ``plugin`` handle ``scheme`` in this process, ahead of any entry point."""
    with _plugins_lock:
        _plugins[scheme.lower()] = plugin


def get_plugin(scheme: str) -> TransportPlugin:
    """The plugin for ``scheme``: registered in this process, or found by entry point.

    Raises :class:`TransportNotFound` naming the package to install.
    """
    scheme = scheme.lower()
    with _plugins_lock:
        plugin = _plugins.get(scheme)
        if plugin is not None:
            return plugin
        from importlib.metadata import entry_points  # 10 ms: only when a plugin is needed

        found = entry_points(group=ENTRY_POINT_GROUP, name=scheme)
        for entry in found:
            try:
                loaded = entry.load()
            except Exception as exc:
                raise TransportNotFound(
                    f"the plugin for {scheme}:// ({entry.value}) failed to import: {exc}"
                ) from exc
            # An entry point may name a plugin class or a ready instance.
            found_plugin: TransportPlugin = loaded() if isinstance(loaded, type) else loaded
            _plugins[scheme] = found_plugin
            return found_plugin
    package = _KNOWN_PACKAGES.get(scheme)
    if package is not None:
        raise TransportNotFound(
            f"no transport for {scheme}:// is installed; install it with 'pip install {package}'"
        )
    known = ", ".join(sorted({"inproc", *_KNOWN_PACKAGES, *_plugins}))
    raise TransportNotFound(
        f"no transport plugin handles {scheme}://; known schemes: {known}. A plugin registers "
        f"its scheme under the entry-point group {ENTRY_POINT_GROUP!r}"
    )


def create_server(url: str, options: TransportOptions | None = None) -> ServerTransport:
    """A server transport for ``url``, from the plugin of its scheme."""
    parsed = parse_url(url)
    return get_plugin(parsed.scheme).create_server(parsed, options or TransportOptions())


def connect_client(url: str, options: TransportOptions | None = None) -> ClientTransport:
    """A client transport for ``url`` (call ``connect()`` on it), from its scheme's plugin."""
    parsed = parse_url(url)
    return get_plugin(parsed.scheme).create_client(parsed, options or TransportOptions())


def claim_socket_path(path: str) -> None:
    """Make ``path`` ready for a server to bind a Unix-domain socket there.

    A socket file left by a server that died is removed; a file that is not a socket, or a
    socket a live server still accepts on, raises :class:`TransportError` saying which, so
    one server never silently steals another's address. For plugin authors.
    """
    import os
    import socket
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise TransportError(f"cannot bind {path}: directory {parent} does not exist") from None
        return
    if not stat.S_ISSOCK(mode):
        raise TransportError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody accepts there: the file is a leftover of a server that died.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise TransportError(f"cannot check the socket at {path}: {exc}") from exc
    finally:
        probe.close()
    raise TransportError(f"a server is already listening on {path}; stop it or choose another path")


# ------------------------------------------------------------------------------- inproc://

_INPROC_QUEUE = 1024
_CLOSED = None  # queue sentinel: the other side went away


class _Endpoint:
    """An asyncio queue bound to the loop that reads it, writable from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[Peer, list[Buffer]] | None] = asyncio.Queue(_INPROC_QUEUE)

    async def put(self, item: tuple[Peer, list[Buffer]] | None) -> None:
        """Deliver ``item``, waiting while the queue is full (back-pressure)."""
        if asyncio.get_running_loop() is self.loop:
            await self.queue.put(item)
        else:
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
            )

    def put_nowait_threadsafe(self, item: tuple[Peer, list[Buffer]] | None) -> None:
        """Deliver a control item without waiting (close notices)."""

        def deliver() -> None:
            # A full queue means the reader is far behind; it sees the closed flag instead.
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(item)

        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self.loop.call_soon_threadsafe(deliver)


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
        self._closed = False
        self._counts = {"connections": 0, "disconnects": 0, "malformed": 0}

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
        if client is not None:
            await client.deliver(_copy_frames(frames))

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
            self._inbox = _Endpoint()
        self._peer = server.attach(self)
        self._server = server
        return True

    async def deliver(self, frames: list[Buffer]) -> None:
        if self._inbox is not None and not self._closed:
            await self._inbox.put((b"", frames))

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


register_plugin("inproc", InprocPlugin())
