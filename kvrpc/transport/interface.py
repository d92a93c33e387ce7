"""The transport seam: what servers and clients need of a transport, as ``typing.Protocol``s.

Servers and clients only ever see :class:`ServerTransport` / :class:`ClientTransport`.
Optional capabilities are protocols of their own, checked with ``isinstance``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kvrpc.auth import Authenticator
from kvrpc.codec import Buffer
from kvrpc.transport.urls import TransportURL

if TYPE_CHECKING:
    from kvrpc.curve import CurveKeys

__all__ = [
    "BlockingClientTransport",
    "ClientTransport",
    "Oversized",
    "Peer",
    "PeerCredentials",
    "ServerTransport",
    "SupportsBlockingClient",
    "SupportsClientReceiver",
    "SupportsPeerCredentials",
    "SupportsPeerLoss",
    "SupportsServerReceiver",
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
class SupportsPeerLoss(Protocol):
    """A server transport that reports the end of each peer's connection.

    The server frees a lost peer's per-peer slots at once (its running requests go on, and
    their results are dropped unsent) instead of when each run ends. A transport that cannot
    see hang-ups (a ZeroMQ ROUTER cannot) does not declare it.
    """

    def set_peer_lost(self, callback: Callable[[Peer], None] | None) -> None:
        """Call ``callback(peer)`` on the loop's thread once ``peer``'s connection has ended.

        Once per connection, whatever ended it (a hang-up, bad framing, a stall, a failed
        handshake); not for the connections that :meth:`ServerTransport.close` ends. A
        message of that connection still queued for ``recv`` may come after the callback;
        its reply goes nowhere. ``None`` turns it off.
        """


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
