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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlsplit

from kvrpc.codec import Buffer
from kvrpc.errors import ConnectionLost, InvalidURL, TransportError, TransportNotFound

__all__ = [
    "ENTRY_POINT_GROUP",
    "BlockingClientTransport",
    "ClientTransport",
    "InprocPlugin",
    "Oversized",
    "PeerCredentials",
    "ServerTransport",
    "SupportsBlockingClient",
    "SupportsClientReceiver",
    "SupportsPeerCredentials",
    "SupportsServerReceiver",
    "SupportsTrySend",
    "TransportOptions",
    "TransportPlugin",
    "TransportURL",
    "claim_socket_path",
    "connect_blocking",
    "connect_client",
    "create_server",
    "default_url",
    "local_url",
    "runtime_dir",
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
    ``peer_stall_timeout``: how long, in seconds, a server transport keeps messages queued for
    a peer that reads none of them before it drops them, or that peer's connection.
    """

    max_message_size: int = 256 * 1024 * 1024
    reconnect_timeout: float = 2.0
    peer_stall_timeout: float = 10.0


@runtime_checkable
class ServerTransport(Protocol):
    """The server side: receive ``(peer, frames)`` from any client, send frames to one.

    ``recv`` hands out messages from every connection in arrival order per connection; a
    transport reads whatever is ready in one wake-up and serves it from a bounded queue, and
    stops reading (back-pressure) while that queue is full. Input the framing cannot parse
    (bad length prefixes, oversized messages, garbage) closes that one connection and is
    counted in :meth:`stats`; it never reaches ``recv`` and never disturbs other peers.

    :meth:`send` never waits for one peer to read: each peer's unsent messages wait in a
    bounded queue of their own, and a peer that stops reading loses its own replies or its
    connection (counted in :meth:`stats`), never delaying another peer's.

    Optional capabilities are declared by the protocols :class:`SupportsServerReceiver` and
    :class:`SupportsPeerCredentials`; the server uses them where ``isinstance`` finds them.
    """

    async def start(self) -> None:
        """Bind and begin accepting; raises :class:`TransportError` if it cannot."""

    async def recv(self) -> tuple[Peer, list[Buffer]]:
        """The next message from any peer; raises :class:`ConnectionLost` once closed."""

    async def send(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        """Send or queue one message for ``peer`` and return without waiting for it to read.

        A peer that has gone away is silently skipped; one whose queue is over its bound
        loses this message (counted as ``dropped``) or its connection.
        """

    async def close(self) -> None:
        """Stop accepting and release every resource; idempotent."""

    def stats(self) -> dict[str, int]:
        """Counters since start: at least ``connections``, ``disconnects``, ``malformed``.

        Also ``dropped``: messages lost by peers that stopped reading.
        """
        ...


@runtime_checkable
class ClientTransport(Protocol):
    """The client side: a connection to one server that comes back after a restart.

    A lost connection shows up once, as :class:`ConnectionLost` from :meth:`recv` (replies
    still owed on it will never come); the next :meth:`send` connects again, waiting up to
    ``TransportOptions.reconnect_timeout`` for the server, and later ``recv`` calls return
    messages from the new connection. Messages on one connection arrive in the order sent.

    An optional capability is declared by :class:`SupportsClientReceiver`; the client uses it
    where ``isinstance`` finds it.
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


class Oversized(list[Buffer]):
    """Delivered in place of a message over ``max_message_size`` that a transport discarded.

    It holds only the first bytes of the message's header frame (enough for
    :func:`kvrpc.codec.peek` to read its kind and request id, so that the request can be
    answered with ``MessageTooLarge``); ``size`` is the size the message announced.
    """

    def __init__(self, head: bytes, size: int) -> None:
        super().__init__([head])
        self.size = size


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is at the other end of a local connection, as the kernel reports it.

    ``pid``, ``uid`` and ``gid`` of the process that connected (``SO_PEERCRED`` on Linux),
    read when the connection was accepted. A peer cannot forge them.
    """

    pid: int
    uid: int
    gid: int


@runtime_checkable
class SupportsServerReceiver(Protocol):
    """A server transport that can hand messages over straight from its read callback.

    ``receiver(peer, frames) -> bool`` is offered each message while nothing waits for
    ``recv``: True means handled; False declines it, and the transport queues that message
    and every later one for ``recv`` (bounded) until the queue is empty again, so the order
    of messages never changes. ``None`` turns it off.
    """

    def set_receiver(self, receiver: Callable[[Peer, list[Buffer]], bool] | None) -> None:
        """Offer each message to ``receiver`` as it is read."""


@runtime_checkable
class SupportsClientReceiver(Protocol):
    """A client transport that can hand replies straight from its read callback.

    Once a receiver is set, every message goes to it (one event-loop turn sooner than through
    a task awaiting ``recv``), and ``recv`` only reports lost connections.
    """

    def set_receiver(self, receiver: Callable[[list[Buffer]], None]) -> None:
        """Hand each message to ``receiver`` as it is read."""


@runtime_checkable
class SupportsTrySend(Protocol):
    """A client transport that can send at once, without an await, when nothing is in the way.

    The client tries this first for every request it sends from the event loop's thread: a
    request submitted by another thread then goes out in the same loop turn that receives it,
    instead of one turn later from the task that awaits ``send``.
    """

    def try_send(self, frames: Sequence[Buffer]) -> bool:
        """Send ``frames`` now and return True, or send nothing and return False.

        False means ``send`` must be used for this message: not connected, the socket's queue
        is full, or an error that ``send`` will report. Never raises and never waits.
        """


@runtime_checkable
class SupportsPeerCredentials(Protocol):
    """A server transport that knows which local process each peer is (Unix sockets)."""

    def peer_credentials(self, peer: Peer) -> PeerCredentials | None:
        """The kernel-reported credentials of ``peer``; None for a peer no longer connected."""


class BlockingClientTransport(Protocol):
    """A client connection for blocking calls, used by one thread at a time.

    What a :class:`~kvrpc.client.SyncClient` uses to let a calling thread do its own socket
    I/O when it has the client to itself, with no event loop in between. The caller
    serialises its use (a lock); it may pass between threads.
    """

    def send(self, frames: Sequence[Buffer]) -> bool:
        """Send one message whole and return True, or send nothing and return False.

        False means this connection cannot take it now (disconnected, full): nothing of the
        message went out, so the caller may send it another way. Raises
        :class:`~kvrpc.errors.TransportError` for a message it can never send.
        """
        ...

    def recv(self, timeout: float | None) -> list[Buffer]:
        """The next message, waiting up to ``timeout`` seconds (None: no limit).

        Raises ``TimeoutError`` when none came in time (the connection stays usable), and
        :class:`~kvrpc.errors.ConnectionLost` once the connection is gone (it is then
        unusable). A message over ``max_message_size`` comes back as an :class:`Oversized`.
        """
        ...

    def close(self) -> None:
        """Close the connection; idempotent."""
        ...


@runtime_checkable
class SupportsBlockingClient(Protocol):
    """A plugin that can also open :class:`BlockingClientTransport` connections."""

    def connect_blocking(
        self, url: TransportURL, options: TransportOptions, timeout: float
    ) -> BlockingClientTransport:
        """Connect within ``timeout`` seconds; raises :class:`~kvrpc.errors.TransportError`."""
        ...


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


def connect_blocking(
    url: str, options: TransportOptions, timeout: float
) -> BlockingClientTransport | None:
    """A connected blocking client for ``url``, or None where its plugin offers none."""
    parsed = parse_url(url)
    plugin = get_plugin(parsed.scheme)
    if not isinstance(plugin, SupportsBlockingClient):
        return None
    return plugin.connect_blocking(parsed, options, timeout)


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


def runtime_dir() -> str:
    """The calling user's private directory for kvrpc's sockets (mode 0700), made if missing.

    ``$XDG_RUNTIME_DIR/kvrpc`` where that variable names a directory of this user (the
    per-user runtime directory a login session has), else ``/tmp/kvrpc-<uid>``. An existing
    one must be a real directory of this user that no one else may enter: anyone can make
    ``/tmp/kvrpc-<uid>`` first, and would then see every socket made in it, so otherwise
    :class:`TransportError` says what is wrong with it.
    """
    import os
    import stat

    uid = os.geteuid()
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    try:
        usable_base = bool(base) and os.stat(base).st_uid == uid
    except OSError:
        usable_base = False
    path = os.path.join(base, "kvrpc") if usable_base else f"/tmp/kvrpc-{uid}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise TransportError(
            f"{path} is not a private directory of this user (uid {uid}, mode 0700); it may "
            "have been made by someone else to catch kvrpc's sockets: remove it, or give "
            "--url a socket path in a directory of your own"
        )
    return path


def local_url(directory: str, name: str = "kvrpc.sock") -> str:
    """A socket URL in ``directory``: ``unix://`` when that plugin is installed, else zmq+ipc."""
    import os

    path = os.path.join(directory, name)
    try:
        get_plugin("unix")
    except TransportNotFound:
        return f"zmq+ipc://{path}"
    return f"unix://{path}"


def default_url() -> str:
    """Where ``kvrpc serve`` listens and the adapters connect when no URL is given.

    A Unix socket in :func:`runtime_dir`: only this user's processes can connect, and the
    server knows which process each peer is. TCP is used only when a URL asks for it.
    """
    return local_url(runtime_dir())


# ------------------------------------------------------------------------------- inproc://

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


register_plugin("inproc", InprocPlugin())
