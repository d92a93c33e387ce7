"""The ``unix:///absolute/path`` transport: framed messages over a Unix-domain stream socket.

Sockets are non-blocking and driven straight from the running loop with ``add_reader`` /
``add_writer`` rather than through asyncio streams: on Python 3.11 ``StreamWriter.writelines``
joins its buffers into one before writing and ``StreamReader`` copies every byte into its own
buffer and again out of it, and kvrpc promises that a large payload is copied at most once on
each side. Here a message goes out as one vectored ``sendmsg`` of ``[prefix, *frames]``, and a
large incoming frame is received straight into a buffer of its own (see
:mod:`kvrpc_unix.framing`).

Reader callbacks parse what arrived and hand each message to the core's sink
(:class:`~kvrpc.transport.ServerSink` / :class:`~kvrpc.transport.ClientSink`) directly;
nothing on the per-message path creates a task, and the transport keeps no inbox of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import select
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from kvrpc.auth import (
    MAX_MESSAGE_BYTES,
    ClientHandshake,
    ServerHandshake,
    Verdict,
    is_handshake,
    refusal,
)
from kvrpc.codec import Buffer
from kvrpc.errors import AuthenticationFailed, ConnectionLost, InvalidURL, TransportError
from kvrpc.transport import (
    ClientSink,
    PeerCredentials,
    ServerSink,
    TransportOptions,
    TransportURL,
    claim_socket_path,
)
from kvrpc.transport.handshake import authenticate_blocking
from kvrpc_unix.framing import FrameReader, FramingError, frame_prefix

__all__ = [
    "UnixBlockingClient",
    "UnixClientTransport",
    "UnixPlugin",
    "UnixServerTransport",
    "socket_path",
]

logger = logging.getLogger(__name__)

#: The longest socket path the OS accepts, in bytes (``sun_path`` less its NUL terminator).
SUN_PATH_MAX: Final = 103 if sys.platform == "darwin" or "bsd" in sys.platform else 107

# IOV_MAX is 1024 on Linux and macOS; a little under it leaves room for the prefix.
_IOV_BATCH: Final = 1000
# A client's sender waits once its connection has this much unsent data, and the server stops
# reading a peer that leaves this much of its replies unread, until it is down to _LOW_WATER.
_HIGH_WATER: Final = 4 * 1024 * 1024
_LOW_WATER: Final = 1024 * 1024
# What one read callback takes from one connection before the loop moves on.
_READS_PER_TURN: Final = 16
_MESSAGES_PER_TURN: Final = 64
_RECONNECT_INTERVAL: Final = 0.025
# Linux answers a non-blocking connect with EAGAIN while the listen backlog is full.
_BACKLOG_RETRY: Final = 0.005
# How long accepting pauses after accept() fails (out of descriptors, say: closing sockets
# may free some), so that a listening socket that stays readable does not spin the loop.
_ACCEPT_PAUSE: Final = 0.1
_SEND_FLAGS: Final = getattr(socket, "MSG_NOSIGNAL", 0)
_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Bytes a peer may send before its handshake is done: the HELLO and the ANSWER are 49 bytes
# each with their framing, so anything near this is not a kvrpc client, and it is cut off
# rather than buffered. It is also the largest message the frame reader takes meanwhile:
# one announcing more breaks the framing as soon as its lengths arrive, before the reader
# gives it a buffer (a large frame's own buffer would cost up to 1 MiB otherwise).
_PRE_AUTH_BYTES: Final = 4 * MAX_MESSAGE_BYTES


def socket_path(url: TransportURL) -> str:
    """The socket path of a ``unix:///absolute/path`` URL; raises :class:`InvalidURL`."""
    example = "like 'unix:///tmp/kvrpc.sock'"
    if url.netloc:
        raise InvalidURL(
            f"{url.raw!r}: a unix URL has no host, only an absolute path after three "
            f"slashes, {example}"
        )
    if not url.path or url.path == "/":
        raise InvalidURL(f"{url.raw!r} names no socket path; give an absolute path, {example}")
    size = len(os.fsencode(url.path))
    if size > SUN_PATH_MAX:
        raise InvalidURL(
            f"{url.raw!r}: the socket path is {size} bytes but Unix-domain socket paths are "
            f"limited to {SUN_PATH_MAX} bytes on this OS; choose a shorter path"
        )
    return url.path


def _nbytes(buffer: Buffer) -> int:
    # len() of a memoryview counts items of its first dimension, not bytes.
    return buffer.nbytes if type(buffer) is memoryview else len(buffer)


def _byte_view(buffer: Buffer) -> memoryview:
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class _Owner(Protocol):
    """What a connection reports to: the server or the client transport that made it."""

    def _deliver(self, connection: _Connection) -> None: ...

    def _lost(self, connection: _Connection, reason: str, malformed: bool) -> None: ...

    def _drained(self, connection: _Connection) -> None: ...


def _peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """The connecting process's pid, uid and gid from the kernel (Linux ``SO_PEERCRED``)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size))
    except OSError:
        return None
    return PeerCredentials(pid, uid, gid)


class _Connection:
    """One connected socket: a frame reader on its input and a write queue on its output."""

    __slots__ = (
        "_auth_timer",
        "_drain_waiters",
        "_full_limits",
        "_loop",
        "_owner",
        "_recv_into",
        "_sendmsg",
        "_stall_timer",
        "_writing",
        "admitted",
        "backlogged",
        "closed",
        "credentials",
        "fd",
        "handshake",
        "out",
        "out_bytes",
        "peer",
        "pre_auth_budget",
        "progress_at",
        "reader",
        "reading",
        "sock",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        peer: bytes,
        max_message_size: int,
        owner: _Owner,
    ) -> None:
        self._loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.reader = FrameReader(max_message_size)
        self._owner = owner
        self._recv_into = sock.recv_into
        self._sendmsg = sock.sendmsg
        self.reading = False
        self._writing = False
        self.closed = False
        # Unsent buffers, in order; the first may be the unsent tail of a partly sent one.
        self.out: deque[Buffer] = deque()
        self.out_bytes = 0
        self._drain_waiters: list[asyncio.Future[bool]] = []
        #: Set by the server while this peer leaves too much of its replies unread: its input
        #: is not read meanwhile, so it cannot ask for more (other peers are unaffected).
        self.backlogged = False
        #: When the peer last took any of its unsent data (loop time).
        self.progress_at = 0.0
        self._stall_timer: asyncio.TimerHandle | None = None
        self.credentials: PeerCredentials | None = None
        #: The server's side of this peer's handshake while it is under way (auth only): the
        #: peer's messages go to it, never to the server, and its input is capped.
        self.handshake: ServerHandshake | None = None
        #: Whether the server's sink has been told of this peer (it passed the handshake, or
        #: there is none): only then is its loss reported.
        self.admitted = False
        self.pre_auth_budget = _PRE_AUTH_BYTES
        self._auth_timer: asyncio.TimerHandle | None = None
        #: The reader's own limits while the handshake's cap replaces them.
        self._full_limits: tuple[int, int] | None = None

    def expect_handshake(
        self, handshake: ServerHandshake, timeout: float, on_expiry: Callable[[_Connection], None]
    ) -> None:
        """Hold this peer to ``handshake`` until it ends; ``on_expiry`` after ``timeout`` s.

        Meanwhile its reader takes no message over :data:`_PRE_AUTH_BYTES`: one announced
        larger is a :class:`FramingError` before any buffer is made for it.
        """
        self.handshake = handshake
        self._auth_timer = self._loop.call_later(timeout, on_expiry, self)
        reader = self.reader
        self._full_limits = (reader.max_message_size, reader.discard_limit)
        reader.max_message_size = min(reader.max_message_size, _PRE_AUTH_BYTES)
        reader.discard_limit = _PRE_AUTH_BYTES

    def end_handshake(self) -> None:
        """The handshake is over (passed or failed): stop its deadline, lift the input cap.

        The reader is the same one, so bytes it holds past the handshake's last message stay
        where they are, and are parsed under the full limits from here on.
        """
        self.handshake = None
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        if self._full_limits is not None:
            self.reader.max_message_size, self.reader.discard_limit = self._full_limits
            self._full_limits = None

    # -------------------------------------------------------------- reading

    def start_reading(self) -> None:
        if not self.reading and not self.closed and not self.backlogged:
            self._loop.add_reader(self.fd, self._on_readable)
            self.reading = True

    def stop_reading(self) -> None:
        if self.reading:
            self._loop.remove_reader(self.fd)
            self.reading = False

    def _on_readable(self) -> None:
        reader = self.reader
        recv_into = self._recv_into
        failure = None
        malformed = False
        messages = reader.messages
        try:
            # Bounded per turn: a peer that sends without pause must not keep the loop from
            # everything else; the socket is polled level-triggered, so the rest waits safely.
            for _ in range(_READS_PER_TURN):
                target = reader.get_buffer()
                received = recv_into(target)
                if not received:
                    malformed = reader.in_message
                    failure = "the peer closed the connection" + (
                        " in the middle of a message" if malformed else ""
                    )
                    break
                reader.buffer_updated(received)
                if self.handshake is not None:
                    self.pre_auth_budget -= received
                    if self.pre_auth_budget < 0:
                        failure = f"sent over {_PRE_AUTH_BYTES} bytes before authenticating"
                        malformed = True
                        break
                if received < len(target) or len(messages) >= _MESSAGES_PER_TURN:
                    # A short read emptied the socket, or this turn's share is taken; the
                    # loop polls level-triggered, so anything left or arriving later wakes us
                    # again (and after a short read, a read that would only answer EAGAIN is
                    # saved).
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except FramingError as exc:
            failure = str(exc) + (" before authenticating" if self.handshake is not None else "")
            malformed = True
        except OSError as exc:
            failure = f"receive failed: {exc}"
            malformed = reader.in_message
        # Messages that arrived whole before a failure are good and are handed on.
        if messages:
            self._owner._deliver(self)
        # Unless the owner closed this connection meanwhile (a send that failed, its close):
        # it has then reported the loss already, or must not.
        if failure is not None and not self.closed:
            self._owner._lost(self, failure, malformed)

    # -------------------------------------------------------------- writing

    def write(self, prefix: bytes, frames: Sequence[Buffer], total: int) -> bool:
        """Send one message now or queue it behind earlier ones; never interleaves messages.

        False means the connection was already unusable and not a byte of this message was
        written (the owner has been told); True means the message is sent or queued.
        """
        if self.closed:
            return False
        out = self.out
        if not out and len(frames) < _IOV_BATCH:
            try:
                sent = self._sendmsg([prefix, *frames], (), _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._owner._lost(self, f"send failed: {exc}", False)
                return False
            if sent == total:
                return True
            self.progress_at = self._loop.time()
            out.append(prefix)
            out.extend(frames)
            self.out_bytes += total - sent
            self._consume(sent)
            self._start_writing()
            return True
        if not out:
            self.progress_at = self._loop.time()
        out.append(prefix)
        out.extend(frames)
        self.out_bytes += total
        if not self._writing:
            self._flush()
        return True

    async def drain(self) -> bool:
        """Wait until the unsent data is down to the low-water mark; False if closed first."""
        if self.closed:
            return False
        if self.out_bytes <= _LOW_WATER:
            return True
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._drain_waiters.append(waiter)
        return await waiter

    def _consume(self, sent: int) -> None:
        """Drop ``sent`` bytes from the front of the write queue."""
        out = self.out
        while out:
            size = _nbytes(out[0])
            if size > sent:
                if sent:
                    out[0] = _byte_view(out[0])[sent:]
                return
            out.popleft()
            sent -= size

    def _start_writing(self) -> None:
        if not self._writing:
            self._loop.add_writer(self.fd, self._flush)
            self._writing = True

    def _flush(self) -> None:
        out = self.out
        try:
            while out:
                batch = list(itertools.islice(out, _IOV_BATCH))
                sent = self._sendmsg(batch, (), _SEND_FLAGS)
                if sent:
                    self.progress_at = self._loop.time()
                self.out_bytes -= sent
                self._consume(sent)
                if sent < sum(map(_nbytes, batch)):
                    break  # the socket buffer is full
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._owner._lost(self, f"send failed: {exc}", False)
            return
        if out:
            self._start_writing()
        elif self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False
        if self.out_bytes <= _LOW_WATER:
            if self._drain_waiters:
                self._wake_drain_waiters(True)
            if self.backlogged:
                self._owner._drained(self)

    def watch_for_stall(self, timeout: float, on_stall: Callable[[_Connection], None]) -> None:
        """Call ``on_stall(self)`` if the peer takes none of its unsent data for ``timeout`` s."""
        if self._stall_timer is not None or self.closed:
            return

        def check() -> None:
            self._stall_timer = None
            if self.closed or not self.out:
                return
            idle = self._loop.time() - self.progress_at
            if idle >= timeout:
                on_stall(self)
            else:
                self._stall_timer = self._loop.call_later(timeout - idle, check)

        self._stall_timer = self._loop.call_later(timeout, check)

    def _wake_drain_waiters(self, ok: bool) -> None:
        waiters = self._drain_waiters
        self._drain_waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(ok)

    # -------------------------------------------------------------- closing

    def close(self) -> None:
        """Unregister from the loop, close the socket, fail waiting senders; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        # Unregister before closing: the descriptor number may be reused at once.
        self.stop_reading()
        if self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False
        self.sock.close()
        self.out.clear()
        self.out_bytes = 0
        self._wake_drain_waiters(False)


class UnixServerTransport:
    """Accepts Unix-domain connections at ``path`` and exchanges framed messages with them.

    The socket file is created with mode 0600 (only its owner may connect) and removed by
    :meth:`close` if it is still the one this server bound. Each connection is a peer with an
    8-byte id, and the kernel's credentials of the process that connected
    (:meth:`peer_credentials`).

    Every message read goes straight to the sink given to :meth:`start`, in arrival order per
    connection, from the read callback that read it; ``sink.read_done()`` follows each read
    callback that delivered anything, and ``sink.peer_lost(peer)`` follows a connection's last
    message once it ends (not for the connections :meth:`close` ends, nor, with auth on, for
    one that never passed its handshake: the sink never heard of it). While the sink has
    called :meth:`pause_reading`, no connection is read. A connection whose input breaks the
    framing or ends in the middle of a message is closed and counted as ``malformed``; a
    message over ``max_message_size`` is read and thrown away, and delivered as an
    :class:`~kvrpc.transport.Oversized` so that it can be answered (one far over it closes the
    connection instead).

    :meth:`send` never waits: a peer that leaves more than 4 MiB of its replies unread is not
    read from until it has taken most of them (so it can ask for nothing more), and one that
    takes none of them for ``peer_stall_timeout`` seconds is disconnected and counted as
    ``stalled``. Use from one event loop.
    """

    #: It sees every hang-up, so the sink is told of each lost peer.
    reports_peer_loss: bool = True

    def __init__(self, path: str, options: TransportOptions) -> None:
        self.path = path
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._accept_retry: asyncio.TimerHandle | None = None
        self._connections: dict[bytes, _Connection] = {}
        self._sink: ServerSink | None = None
        self._paused = False  # by the sink: no connection is read meanwhile
        self._closed = False
        self._ids = itertools.count(1)
        self._counts = {
            "connections": 0,
            "disconnects": 0,
            "malformed": 0,
            "dropped": 0,
            "backlogged": 0,
            "stalled": 0,
            "skipped": 0,
        }
        self._auth = options.auth
        self._limiter = options.auth.limiter() if options.auth is not None else None
        self._authenticating = 0  # connections in the middle of their handshake
        if options.auth is not None:
            # Only with auth on, so that a server without it reports what it always did.
            self._counts.update(auth_ok=0, auth_failed=0, auth_rate_limited=0, unauthenticated=0)

    async def start(self, sink: ServerSink) -> None:
        """Bind ``path``, begin accepting, and deliver into ``sink``.

        Raises :class:`TransportError` if it cannot bind. A socket file left by a server that
        died is replaced; a live server's is not.
        """
        if self._closed:
            raise TransportError(f"server transport for unix://{self.path} is closed")
        if self._sock is not None:
            raise TransportError(f"server transport for unix://{self.path} is already started")
        loop = asyncio.get_running_loop()
        claim_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            sock.setblocking(False)
            sock.bind(self.path)
            bound = True
            info = os.stat(self.path)
            self._identity = (info.st_dev, info.st_ino)
            # Before listen(): until then a connect is refused, so nobody gets in while the
            # file still has the umask's mode.
            os.chmod(self.path, 0o600)
            sock.listen(socket.SOMAXCONN)
            loop.add_reader(sock.fileno(), self._on_acceptable)
        except OSError as exc:
            sock.close()
            if bound:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            raise TransportError(f"cannot listen on unix://{self.path}: {exc}") from exc
        self._loop = loop
        self._sock = sock
        self._sink = sink

    # -------------------------------------------------------------- accepting

    def _on_acceptable(self) -> None:
        sock = self._sock
        assert sock is not None and self._loop is not None
        while True:
            try:
                accepted, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # Out of descriptors (or another accept failure): pause rather than spin on
                # a listening socket that stays readable.
                logger.warning(
                    "unix://%s: cannot accept connections (%s); trying again in %.1fs",
                    self.path,
                    exc,
                    _ACCEPT_PAUSE,
                )
                self._loop.remove_reader(sock.fileno())
                self._accept_retry = self._loop.call_later(_ACCEPT_PAUSE, self._resume_accepting)
                return
            self._adopt(accepted)

    def _resume_accepting(self) -> None:
        self._accept_retry = None
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_acceptable)

    def _adopt(self, sock: socket.socket) -> None:
        assert self._loop is not None
        try:
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        peer = next(self._ids).to_bytes(8, "big")
        connection = _Connection(self._loop, sock, peer, self._options.max_message_size, self)
        connection.credentials = _peer_credentials(sock)
        self._connections[peer] = connection
        self._counts["connections"] += 1
        if self._auth is None:
            connection.admitted = True
        elif not self._admit(connection):
            return
        if not self._paused:
            connection.start_reading()

    # -------------------------------------------------------------- authentication

    def _limit_key(self, connection: _Connection) -> str:
        # All of one local user's processes share a bucket: a pid is cheap to change.
        credentials = connection.credentials
        return f"uid:{credentials.uid}" if credentials is not None else "unix"

    def _admit(self, connection: _Connection) -> bool:
        """Start a new connection's handshake, or refuse it at once; False if refused."""
        auth, limiter = self._auth, self._limiter
        assert auth is not None and limiter is not None and self._loop is not None
        key = self._limit_key(connection)
        now = self._loop.time()
        if not limiter.allowed(key, now):
            wait = limiter.retry_after(key, now)
            reason = f"too many failed handshakes from {key}; retry in {wait:.1f}s"
        elif self._authenticating >= auth.max_pending:
            reason = f"more than {auth.max_pending} handshakes under way; retry shortly"
        else:
            self._authenticating += 1
            connection.expect_handshake(
                auth.server_handshake(), auth.handshake_timeout, self._handshake_expired
            )
            return True
        self._counts["auth_rate_limited"] += 1
        self._send_raw(connection, refusal(reason).reply)
        self._lost(connection, reason, False)
        return False

    def _send_raw(self, connection: _Connection, frame: bytes) -> None:
        prefix, total = frame_prefix([frame])
        connection.write(prefix, [frame], total)

    def _authenticate(self, connection: _Connection) -> None:
        """Feed a peer's messages to its handshake until it ends; drop it if it fails."""
        handshake = connection.handshake
        messages = connection.reader.messages
        while messages and handshake is not None:
            frames = messages.popleft()
            step = handshake.receive(frames)
            self._send_raw(connection, step.reply)
            if step.verdict is Verdict.ACCEPTED:
                connection.end_handshake()
                connection.admitted = True
                self._authenticating -= 1
                self._counts["auth_ok"] += 1
                return
            if step.verdict is Verdict.REFUSED:
                # Requests sent without a handshake are thrown away here, undecoded.
                self._counts["unauthenticated"] += len(messages) + (not is_handshake(frames))
                messages.clear()
                self._lost(connection, f"authentication failed: {step.reason}", False)
                return

    def _handshake_expired(self, connection: _Connection) -> None:
        if connection.handshake is not None and not connection.closed:
            timeout = self._auth.handshake_timeout if self._auth is not None else 0
            self._send_raw(connection, refusal(f"no handshake within {timeout}s").reply)
            self._lost(connection, "the handshake timed out", False)

    # -------------------------------------------------------------- connection reports

    def _deliver(self, connection: _Connection) -> None:
        if connection.handshake is not None:
            self._authenticate(connection)
            if connection.handshake is not None or connection.closed:
                return
        messages = connection.reader.messages
        sink = self._sink
        assert sink is not None  # nothing is read before start()
        peer = connection.peer
        deliver = sink.deliver
        delivered = False
        # The sink may close this connection while it handles a message (a reply whose send
        # fails) or close the transport: nothing is delivered after the loss it was told of.
        while messages and not connection.closed:
            deliver(peer, messages.popleft())
            delivered = True
        if delivered:
            sink.read_done()
        messages.clear()

    def _lost(self, connection: _Connection, reason: str, malformed: bool) -> None:
        if connection.handshake is not None:
            # Every way a handshake can end badly comes here once: a wrong or misshapen
            # message, its deadline, too much input, or the peer hanging up.
            connection.end_handshake()
            self._authenticating -= 1
            self._counts["auth_failed"] += 1
            if self._limiter is not None and self._loop is not None:
                self._limiter.failed(self._limit_key(connection), self._loop.time())
            logger.info("unix://%s: handshake failed: %s", self.path, reason)
            malformed = False  # counted as a failed handshake instead
        connection.close()
        if self._connections.pop(connection.peer, None) is not None:
            self._counts["disconnects"] += 1
            if connection.admitted and self._sink is not None:
                self._sink.peer_lost(connection.peer)
        if malformed:
            self._counts["malformed"] += 1
            logger.debug("unix://%s: dropped peer %s: %s", self.path, connection.peer.hex(), reason)

    def _drained(self, connection: _Connection) -> None:
        connection.backlogged = False
        if not self._paused:
            connection.start_reading()

    def _stalled(self, connection: _Connection) -> None:
        self._counts["stalled"] += 1
        self._counts["dropped"] += 1
        logger.warning(
            "unix://%s: dropped peer %s, which read none of its %d unsent bytes for %ss",
            self.path,
            connection.peer.hex(),
            connection.out_bytes,
            self._options.peer_stall_timeout,
        )
        self._lost(connection, "the peer stopped reading", False)

    def peer_credentials(self, peer: bytes) -> PeerCredentials | None:
        """The kernel's pid, uid and gid of the process that connected as ``peer``.

        None for a peer that is no longer connected, or where the OS does not report them.
        """
        connection = self._connections.get(peer)
        return connection.credentials if connection is not None else None

    # -------------------------------------------------------------- the transport API

    def send(self, peer: bytes, frames: Sequence[Buffer]) -> None:
        """Send or queue one message for ``peer`` and return at once; a departed peer is skipped.

        The frames are written without being copied, so they must stay unchanged until the
        write completes. A peer left with more than the high-water mark of unsent data is not
        read from until it takes most of it, and is dropped if it takes none of it for
        ``peer_stall_timeout`` seconds (see the class docstring).
        """
        connection = self._connections.get(peer)
        if connection is None:
            self._counts["skipped"] += 1
            return
        prefix, total = frame_prefix(frames)
        if (
            connection.write(prefix, frames, total)
            and connection.out_bytes >= _HIGH_WATER
            and not connection.backlogged
        ):
            connection.backlogged = True
            connection.stop_reading()
            self._counts["backlogged"] += 1
            connection.watch_for_stall(self._options.peer_stall_timeout, self._stalled)

    def pause_reading(self) -> None:
        """Stop reading from every connection until :meth:`resume_reading`; idempotent.

        What the current read callback has already read is still delivered. Bytes that arrive
        meanwhile wait in the kernel's socket buffers, and then their senders wait.
        """
        if self._paused:
            return
        self._paused = True
        for connection in self._connections.values():
            connection.stop_reading()

    def resume_reading(self) -> None:
        """Read again from every connection but those backlogged by their unread replies."""
        if not self._paused:
            return
        self._paused = False
        for connection in self._connections.values():
            connection.start_reading()

    async def close(self) -> None:
        """Stop accepting, close every connection, remove the socket file if ours; idempotent.

        Nothing is delivered after, and the connections it closes are not reported lost.
        """
        if self._closed:
            return
        self._closed = True
        if self._accept_retry is not None:
            self._accept_retry.cancel()
            self._accept_retry = None
        sock = self._sock
        self._sock = None
        if sock is not None:
            self._unlink_if_ours()
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        connections = list(self._connections.values())
        self._connections.clear()
        for connection in connections:
            connection.close()
        self._counts["disconnects"] += len(connections)
        self._sink = None

    def _unlink_if_ours(self) -> None:
        # Another server may have replaced the file since (after deciding ours was stale);
        # removing its file would strand its clients.
        try:
            info = os.lstat(self.path)
        except OSError:
            return
        if (info.st_dev, info.st_ino) == self._identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def stats(self) -> dict[str, int]:
        """Counters since start.

        ``connections``, ``disconnects``, ``malformed`` (connections closed for bad framing),
        ``dropped`` (peers closed for not reading), ``backlogged`` (reads paused for a peer
        with too much unsent), ``stalled`` and ``skipped`` (sends to a peer already gone).
        With auth on, also ``auth_ok`` and ``auth_failed`` (handshakes passed and failed: a
        wrong token, a request before the handshake, too much input, its deadline, a hang-up),
        ``auth_rate_limited`` (connections refused at once, see :class:`FailureLimiter`) and
        ``unauthenticated`` (messages thrown away undecoded because their peer had not
        authenticated).
        """
        return dict(self._counts)


class UnixClientTransport:
    """A connection to the server at ``path`` that is re-established after a restart.

    Every message read goes straight to the sink given to :meth:`connect`, in the order the
    server sent them, from the read callback that read it. A lost connection is reported
    once, by ``sink.connection_lost(reason)`` (not the one :meth:`close` ends, nor one whose
    handshake failed: that failure is raised from :meth:`connect` or :meth:`send`); the
    next :meth:`send` reconnects, retrying for up to ``reconnect_timeout`` seconds (one
    attempt at a time however many tasks send). Use from one event loop.
    """

    def __init__(self, path: str, options: TransportOptions) -> None:
        self.path = path
        self._options = options
        self._connection: _Connection | None = None
        self._sink: ClientSink | None = None
        self._closed = False
        self._connect_lock = asyncio.Lock()
        self._failed_reconnects = 0
        self._paused = False  # by the sink: replies are not read until it resumes
        # A new connection whose handshake is under way (auth only), and how it ends.
        self._authenticating: tuple[_Connection, ClientHandshake, asyncio.Future[None]] | None
        self._authenticating = None

    async def connect(self, sink: ClientSink) -> None:
        """Connect to the server and deliver into ``sink`` from now on.

        Raises :class:`TransportError` if the server cannot be reached, and
        :class:`~kvrpc.errors.AuthenticationFailed` if the handshake fails (auth on).
        """
        if self._closed:
            raise TransportError(f"client transport for unix://{self.path} is closed")
        self._sink = sink
        async with self._connect_lock:
            if self._connection is not None:
                return
            loop = asyncio.get_running_loop()
            try:
                sock = await self._open_socket(loop.time() + self._options.reconnect_timeout)
            except OSError as exc:
                raise TransportError(
                    f"cannot connect to unix://{self.path}: {exc.strerror or exc}; "
                    "is the server running?"
                ) from None
            if self._closed:
                sock.close()
                raise TransportError(f"client transport for unix://{self.path} was closed")
            await self._attach(loop, sock)

    async def _open_socket(self, deadline: float) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            while True:
                try:
                    sock.connect(self.path)
                    return sock
                except BlockingIOError:
                    # The server lives but its backlog is full: it will make room.
                    if loop.time() >= deadline:
                        raise
                    await asyncio.sleep(_BACKLOG_RETRY)
        except BaseException:
            sock.close()
            raise

    async def _attach(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> _Connection:
        connection = _Connection(loop, sock, b"", self._options.max_message_size, self)
        auth = self._options.auth
        if auth is not None:
            # Not this transport's connection until the handshake passes: nothing else is
            # sent on it before, and what it receives meanwhile goes to the handshake.
            await self._authenticate(loop, connection, auth.client_handshake(f"unix://{self.path}"))
            if connection.closed:
                # The server hung up right behind its ACCEPT: there is nothing to report (no
                # request went out on it), and a sender's write finds it closed and reconnects.
                return connection
        self._connection = connection
        if not self._paused:
            connection.start_reading()
        if connection.reader.messages:
            self._deliver(connection)  # what the handshake's last read held behind its ACCEPT
        return connection

    async def _authenticate(
        self, loop: asyncio.AbstractEventLoop, connection: _Connection, handshake: ClientHandshake
    ) -> None:
        assert self._options.auth is not None
        timeout = self._options.auth.handshake_timeout
        done: asyncio.Future[None] = loop.create_future()
        self._authenticating = (connection, handshake, done)
        hello = handshake.hello()
        prefix, total = frame_prefix([hello])
        connection.write(prefix, [hello], total)
        connection.start_reading()
        try:
            async with asyncio.timeout(timeout):
                await done
        except TimeoutError:
            connection.close()
            raise AuthenticationFailed(
                f"unix://{self.path} sent no handshake reply within {timeout}s; is the server "
                "started with --auth-token-file?"
            ) from None
        except BaseException:
            connection.close()
            raise
        finally:
            self._authenticating = None

    def _handshake_step(self, connection: _Connection) -> None:
        assert self._authenticating is not None
        _, handshake, done = self._authenticating
        messages = connection.reader.messages
        while messages and not done.done():
            try:
                reply = handshake.receive(messages.popleft())
            except AuthenticationFailed as exc:
                done.set_exception(exc)
                return
            if reply is not None:
                prefix, total = frame_prefix([reply])
                connection.write(prefix, [reply], total)
            elif handshake.done:
                # Replies that came right behind the ACCEPT wait for the transport's reader.
                connection.stop_reading()
                done.set_result(None)

    async def _reconnect(self) -> _Connection:
        attempt = self._failed_reconnects
        async with self._connect_lock:
            if self._closed:
                raise ConnectionLost(f"client transport for unix://{self.path} is closed")
            if self._connection is not None:
                return self._connection  # another sender reconnected meanwhile
            timeout = self._options.reconnect_timeout
            if self._failed_reconnects != attempt:
                # The attempt this sender queued behind already waited the full timeout.
                raise ConnectionLost(f"unix://{self.path} did not come back within {timeout}s")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                try:
                    sock = await self._open_socket(deadline)
                except OSError as exc:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        self._failed_reconnects += 1
                        raise ConnectionLost(
                            f"unix://{self.path} did not come back within {timeout}s "
                            f"({exc.strerror or exc}); is the server running?"
                        ) from None
                    await asyncio.sleep(min(_RECONNECT_INTERVAL, remaining))
                    if self._closed:
                        raise ConnectionLost(
                            f"client transport for unix://{self.path} is closed"
                        ) from None
                    continue
                if self._closed:
                    sock.close()
                    raise ConnectionLost(f"client transport for unix://{self.path} is closed")
                return await self._attach(loop, sock)

    def pause_reading(self) -> None:
        """Read no replies until :meth:`resume_reading`; idempotent.

        The kernel's buffers, then the server, hold them (a server drops a client that
        leaves them unread past its ``peer_stall_timeout``). A handshake still reads its own.
        """
        self._paused = True
        if self._connection is not None:
            self._connection.stop_reading()

    def resume_reading(self) -> None:
        """Read again; idempotent."""
        self._paused = False
        connection = self._connection
        if connection is not None and not connection.closed:
            connection.start_reading()

    # -------------------------------------------------------------- connection reports

    def _deliver(self, connection: _Connection) -> None:
        authenticating = self._authenticating
        if authenticating is not None and authenticating[0] is connection:
            self._handshake_step(connection)
            return
        messages = connection.reader.messages
        sink = self._sink
        if sink is not None and connection is self._connection:
            deliver = sink.deliver
            # The sink may close the transport while it handles a message: nothing after.
            while messages and not connection.closed:
                deliver(messages.popleft())
        messages.clear()

    def _drained(self, connection: _Connection) -> None:
        pass  # a client's senders wait in drain() instead

    def _lost(self, connection: _Connection, reason: str, malformed: bool) -> None:
        connection.close()
        authenticating = self._authenticating
        if authenticating is not None and authenticating[0] is connection:
            if not authenticating[2].done():
                authenticating[2].set_exception(
                    AuthenticationFailed(
                        f"unix://{self.path} closed the connection during the handshake ({reason})"
                    )
                )
            return
        if connection is not self._connection:
            return
        self._connection = None
        logger.debug("unix://%s: connection lost: %s", self.path, reason)
        if self._sink is not None:
            self._sink.connection_lost(f"unix://{self.path}: {reason}")

    # -------------------------------------------------------------- the transport API

    async def send(self, frames: Sequence[Buffer]) -> None:
        """Send one message, reconnecting first if the connection was lost.

        The frames are written without being copied, so they must stay unchanged until the
        write completes; it returns once the message is written or queued and the queue of
        unsent data is below the high-water mark. Raises :class:`ConnectionLost` if the
        server stays away for ``reconnect_timeout`` seconds, if the connection breaks before
        the message is written, or once the transport is closed.
        """
        if self._closed:
            raise ConnectionLost(f"client transport for unix://{self.path} is closed")
        if self._sink is None:
            raise TransportError(
                f"client transport for unix://{self.path} is not connected; call connect() first"
            )
        prefix, total = frame_prefix(frames)
        connection = self._connection
        if connection is None:
            connection = await self._reconnect()
        if not connection.write(prefix, frames, total):
            # The connection had died unnoticed and nothing of this message went out: it
            # is reported lost (the sink is told), and this message goes on a new one.
            connection = await self._reconnect()
            if not connection.write(prefix, frames, total):
                raise ConnectionLost(f"connection to unix://{self.path} broke at once")
        if connection.closed:
            raise ConnectionLost(f"connection to unix://{self.path} broke while sending")
        if connection.out_bytes >= _HIGH_WATER and not await connection.drain():
            raise ConnectionLost(f"connection to unix://{self.path} broke while sending")

    def try_send(self, frames: Sequence[Buffer]) -> bool:
        """Write one message now if connected and below the high-water mark; else False.

        Like :meth:`send`, the frames are written without being copied.
        """
        connection = self._connection
        if self._closed or connection is None or connection.out_bytes >= _HIGH_WATER:
            return False
        try:
            prefix, total = frame_prefix(frames)
        except Exception:  # send() reports a message the framing refuses
            return False
        # False: the connection had died unnoticed and nothing was written; send() reconnects.
        return connection.write(prefix, frames, total)

    async def close(self) -> None:
        """Close the connection; waiting and later sends raise ConnectionLost. Idempotent.

        The sink is not told of this connection's end, and is given nothing more.
        """
        if self._closed:
            return
        self._closed = True
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._sink = None


class UnixBlockingClient:
    """A blocking Unix-socket connection for calls from one thread at a time (no event loop).

    Framing is the same sans-IO :class:`FrameReader` the event-loop transport uses. The
    socket itself never blocks: a wait is a ``poll`` with the time left, so a caller that
    sends and reads in turn (a lane) never switches the socket's mode, which costs a system
    call each way.
    """

    def __init__(self, path: str, options: TransportOptions, timeout: float) -> None:
        self.path = path
        self._reader = FrameReader(options.max_message_size)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._broken = False
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            self._sock.setblocking(False)
        except OSError as exc:
            self._sock.close()
            raise TransportError(
                f"cannot connect to unix://{path}: {exc.strerror or exc}; is the server running?"
            ) from None
        self._poller = select.poll()
        self._poller.register(self._sock, select.POLLIN)
        if options.auth is not None:
            try:
                authenticate_blocking(
                    self, options.auth.client_handshake(f"unix://{path}"), f"unix://{path}", timeout
                )
            except BaseException:
                self.close()
                raise

    def send(self, frames: Sequence[Buffer]) -> bool:
        """Write one message whole; False (nothing written) if the connection is gone."""
        if self._broken:
            return False
        prefix, total = frame_prefix(frames)
        buffers: list[Buffer] = [prefix, *frames]
        sock = self._sock
        sent = 0
        try:
            while buffers:
                try:
                    done = sock.sendmsg(buffers[:_IOV_BATCH], (), _SEND_FLAGS)
                except BlockingIOError:  # the socket's buffer is full: wait for room
                    select.select((), (sock,), ())
                    continue
                sent += done
                while buffers and done >= memoryview(buffers[0]).nbytes:
                    done -= memoryview(buffers[0]).nbytes
                    buffers.pop(0)
                if done:
                    buffers[0] = memoryview(buffers[0]).cast("B")[done:]
        except OSError as exc:
            self._broken = True
            if sent == 0:
                return False  # not a byte went out: the caller may send it another way
            raise ConnectionLost(f"connection to unix://{self.path} broke: {exc}") from exc
        assert sent == total
        return True

    def recv(self, timeout: float | None) -> list[Buffer]:
        """The next message within ``timeout`` seconds; :class:`ConnectionLost` once lost.

        A ``timeout`` of 0 takes a message that has arrived, and never waits.
        """
        reader = self._reader
        deadline = None if timeout is None else time.monotonic() + timeout
        while not reader.messages:
            if self._broken:
                raise ConnectionLost(f"connection to unix://{self.path} is closed")
            try:
                size = self._sock.recv_into(reader.get_buffer())
            except BlockingIOError:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"no message from unix://{self.path} within {timeout}s"
                    ) from None
                self._poller.poll(None if left is None else max(1, math.ceil(left * 1000)))
                continue
            except OSError as exc:
                self._broken = True
                raise ConnectionLost(f"connection to unix://{self.path} broke: {exc}") from exc
            if size == 0:
                self._broken = True
                raise ConnectionLost(f"unix://{self.path} closed the connection")
            try:
                reader.buffer_updated(size)
            except FramingError as exc:
                self._broken = True
                raise ConnectionLost(f"unix://{self.path} broke the framing: {exc}") from exc
        return reader.messages.popleft()

    def close(self) -> None:
        """Close the socket; idempotent."""
        self._broken = True
        self._sock.close()


class UnixPlugin:
    """The ``unix://`` transport plugin, registered under the ``kvrpc.transports`` entry points.

    URLs are ``unix:///absolute/path/to/socket``.
    """

    def connect_blocking(
        self, url: TransportURL, options: TransportOptions, timeout: float
    ) -> UnixBlockingClient:
        """A connected blocking client for ``url`` (a SyncClient's calling threads)."""
        return UnixBlockingClient(socket_path(url), options, timeout)

    def create_server(self, url: TransportURL, options: TransportOptions) -> UnixServerTransport:
        """A server for the socket path in ``url`` (not started yet)."""
        return UnixServerTransport(socket_path(url), options)

    def create_client(self, url: TransportURL, options: TransportOptions) -> UnixClientTransport:
        """A client for the socket path in ``url`` (not connected yet)."""
        return UnixClientTransport(socket_path(url), options)
