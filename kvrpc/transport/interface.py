"""The transport seam: what servers and clients need of a transport, as ``typing.Protocol``s.

Servers and clients only ever see :class:`ServerTransport` / :class:`ClientTransport`.
Optional capabilities are protocols of their own, checked with ``isinstance``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kvrpc.auth import Authenticator
from kvrpc.codec import Buffer
from kvrpc.transport.urls import TransportURL

if TYPE_CHECKING:
    from kvrpc.curve import CurveKeys

__all__ = [
    "BlockingClientTransport",
    "ClientSink",
    "ClientTransport",
    "Oversized",
    "Peer",
    "PeerCredentials",
    "ServerSink",
    "ServerTransport",
    "SupportsBlockingClient",
    "SupportsPeerCredentials",
    "SupportsTrySend",
    "TransportOptions",
    "TransportPlugin",
]

Peer = bytes
"""Opaque identity of one connected client, as the server transport reports it."""


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """Settings every transport honours.

    ``max_message_size``: the most bytes (all frames together) one message may carry; a
    framing layer that sees a larger one drops the connection that sent it and counts it.
    ``reconnect_timeout``: how long, in seconds, a client's ``send`` waits for a lost
    connection to come back before it raises :class:`ConnectionLost`.
    ``peer_stall_timeout``: how long, in seconds, a server transport keeps messages queued for
    a peer that reads none of them before it drops them, or that peer's connection.
    ``auth``: where set, a server transport decodes nothing from a peer until it has passed
    the handshake of :mod:`kvrpc.auth` (and counts the failures), and a client transport
    runs that handshake on every new connection before it sends a request; failing, it
    raises :class:`~kvrpc.errors.AuthenticationFailed`. None (the default): no handshake.
    ``curve``: ZMQ CURVE keys (:mod:`kvrpc.curve`), for ``zmq+tcp`` only: a server's keys make
    it a CURVE server, a client's (with the server's public key) a CURVE client; any other
    transport refuses them. None (the default): no encryption.
    """

    max_message_size: int = 256 * 1024 * 1024
    reconnect_timeout: float = 2.0
    peer_stall_timeout: float = 10.0
    auth: Authenticator | None = None
    curve: CurveKeys | None = None


@runtime_checkable
class ServerSink(Protocol):
    """What a server transport delivers into; the core hands one to ``start``.

    The transport calls these on the event loop's thread, from its read callbacks, and never
    awaits them; they never raise into the transport (the core catches its own errors).
    :class:`kvrpc.transport.inbox.Inbox` is the core's implementation.
    """

    def deliver(self, peer: Peer, frames: list[Buffer]) -> None:
        """One message from ``peer``; the frames belong to the sink from now on.

        Each frame's ``len()`` is its size in bytes (``bytes``, ``bytearray`` or a
        byte-format ``memoryview``): the inbox bounds the work of one read by it.
        """

    def read_done(self) -> None:
        """The read callback that delivered the last messages has delivered all it read.

        A transport calls it once at the end of every read callback that delivered anything
        (the inbox lets each read handle a bounded burst straight away, and queues the rest).
        """

    def peer_lost(self, peer: Peer) -> None:
        """``peer``'s connection has ended, after its last message was delivered.

        Once per connection whose messages could be delivered (with auth: one that passed
        its handshake), whatever ended it (a hang-up, bad framing, a stall); not for a
        connection refused or failed in its handshake, nor for those that
        :meth:`ServerTransport.close` ends. A transport that cannot see hang-ups (a ZeroMQ
        ROUTER cannot) never calls it, and says so by ``reports_peer_loss = False``.
        """


@runtime_checkable
class ServerTransport(Protocol):
    """The server side: push ``(peer, frames)`` from any client into a sink, send to one peer.

    Reading: from :meth:`start` on, every message read is handed to ``sink.deliver`` in
    arrival order per connection, straight from the read callback. :meth:`pause_reading`
    stops reading from every connection (what is already read may still be delivered within
    the same callback) until :meth:`resume_reading`; the core's bounded inbox uses them for
    back-pressure, so a transport keeps no inbox of its own. Input the framing cannot parse
    (bad length prefixes, oversized messages, garbage) closes that one connection and is
    counted in :meth:`stats`; it is never delivered and never disturbs other peers.

    Writing: :meth:`send` never waits. Each peer's unsent messages wait in a bounded queue of
    their own, and a peer that stops reading loses its own replies or its connection
    (counted in :meth:`stats`), never delaying another peer's.

    ``reports_peer_loss`` declares whether ``sink.peer_lost`` is ever called. Optional
    capabilities are declared by :class:`SupportsPeerCredentials`.
    """

    reports_peer_loss: bool

    async def start(self, sink: ServerSink) -> None:
        """Bind, begin accepting, and deliver into ``sink``; raises :class:`TransportError`."""

    def send(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        """Send or queue one message for ``peer`` and return at once.

        A peer that has gone away is silently skipped (counted as ``skipped`` where the
        transport counts it); one whose
        queue is over its bound loses this message (counted as ``dropped``) or its
        connection. The frames may be written without a copy: leave them unchanged.
        """

    def pause_reading(self) -> None:
        """Stop reading from every connection until :meth:`resume_reading`; idempotent."""

    def resume_reading(self) -> None:
        """Read again after :meth:`pause_reading`; idempotent."""

    async def close(self) -> None:
        """Stop accepting and release every resource; idempotent. Nothing is delivered after."""

    def stats(self) -> dict[str, int]:
        """Counters since start: at least ``connections``, ``disconnects``, ``malformed``.

        Also ``dropped``: messages lost by peers that stopped reading.
        """
        ...


@runtime_checkable
class ClientSink(Protocol):
    """What a client transport delivers into; the core hands one to ``connect``.

    Called on the event loop's thread from the transport's read callbacks; never raises.
    """

    def deliver(self, frames: list[Buffer]) -> None:
        """One message from the server."""

    def connection_lost(self, reason: str) -> None:
        """The connection ended: replies still owed on it will never come.

        Once per lost connection; not for the one :meth:`ClientTransport.close` ends.
        """


@runtime_checkable
class ClientTransport(Protocol):
    """The client side: a connection to one server that comes back after a restart.

    Every message read is handed to ``sink.deliver``, in the order the server sent them; a
    lost connection is reported once, by ``sink.connection_lost``. The next :meth:`send`
    connects again, waiting up to ``TransportOptions.reconnect_timeout`` for the server.
    :meth:`pause_reading` stops reading the connection (the server then holds the replies,
    and gives up on a client that stays paused past its ``peer_stall_timeout``) until
    :meth:`resume_reading`; a sink that queues replies for a slow reader uses them.

    An optional capability is declared by :class:`SupportsTrySend`.
    """

    async def connect(self, sink: ClientSink) -> None:
        """Connect and deliver into ``sink``; raises :class:`TransportError` if it cannot."""

    async def send(self, frames: Sequence[Buffer]) -> None:
        """Send one message, reconnecting first if the connection was lost.

        The only wait is for a connection, or for room in the socket's queue. Raises
        :class:`ConnectionLost` if the server stays unreachable for ``reconnect_timeout``
        seconds, or once the transport is closed.
        """

    def pause_reading(self) -> None:
        """Stop reading replies (a handshake still reads its own) until resumed; idempotent."""

    def resume_reading(self) -> None:
        """Read again after :meth:`pause_reading`; idempotent."""

    async def close(self) -> None:
        """Close the connection; idempotent. Nothing is delivered after."""


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

        A ``timeout`` of 0 never waits, and still returns a message that has arrived.

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
