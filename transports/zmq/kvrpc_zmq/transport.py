"""ROUTER/DEALER transport driven straight from the asyncio loop.

The server is a ROUTER socket, each client a DEALER; a message is one zmq multipart message.
Sockets are plain (synchronous) pyzmq sockets whose notification descriptor is watched with
``loop.add_reader``: one wake-up reads what is ready, a batch per loop turn, and hands each
message to the sink the core gave the transport, from that same callback. zmq.asyncio instead
costs an await, a future and a poller round per message.

ZeroMQ's descriptor is edge-triggered: it only says that the socket's state *may* have changed,
and a send can consume that edge while a message is waiting. So after every send, and when
reading resumes after a pause, the socket is asked directly (``EVENTS``) and read without
waiting for an edge.

Back-pressure on the server: while the core's inbox has asked it to pause, the ROUTER is not
read at all; libzmq holds ``SERVER_RCVHWM`` unread messages per connection, then the kernel's
socket buffers fill and the senders wait.

Connection state comes from zmq's socket monitor: the client learns of a lost server from a
``DISCONNECTED`` event (reported to its sink as ``connection_lost``) and of its return from
``HANDSHAKE_SUCCEEDED``; with ``IMMEDIATE`` set, zmq queues nothing while disconnected, so a
request is never delivered late to a restarted server after its caller was told it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvrpc.auth import (
    Authenticator,
    ClientHandshake,
    FailureLimiter,
    ServerHandshake,
    Verdict,
    is_handshake,
    refusal,
    refusal_error,
)
from kvrpc.codec import Buffer
from kvrpc.errors import AuthenticationFailed, ConnectionLost, InvalidURL, TransportError
from kvrpc.transport import (
    ClientSink,
    ClientTransport,
    Peer,
    ServerSink,
    ServerTransport,
    TransportOptions,
    TransportURL,
    claim_socket_path,
)
from kvrpc.transport.handshake import authenticate_blocking

__all__ = [
    "ZmqBlockingClient",
    "ZmqClientTransport",
    "ZmqPlugin",
    "ZmqServerTransport",
    "endpoint_for",
]

logger = logging.getLogger("kvrpc.zmq")

#: Messages libzmq queues per connection, each way, unless a socket sets its own bound.
QUEUE_HWM = 1024
#: Unread messages libzmq may hold per client connection on the server's side.
SERVER_RCVHWM = 64
#: Messages read (and delivered) in one event-loop turn: a peer sending without pause must
#: not keep the loop from everything else, other peers' sends included.
READ_BATCH = 16
#: Frames at least this large are received without a copy (as a view of zmq's buffer) and
#: sent without one; smaller ones are cheaper to copy than to track.
ZERO_COPY_THRESHOLD = 64 * 1024
#: Bytes of replies the server keeps for one client whose zmq queue is full (SNDHWM messages
#: are waiting for it already); a reply beyond that is dropped and counted. The server never
#: waits for such a client: its replies wait in this backlog, retried from a timer, and are
#: dropped if it takes none of them for ``TransportOptions.peer_stall_timeout`` seconds.
PEER_BACKLOG_BYTES = 64 * 1024 * 1024
#: Requests from muted peers (see ``_ServerDriver``) the server reads and throws away per
#: second, and at most in a burst, before it pauses reading while nothing else waits.
REFUSE_RATE = 2000.0
REFUSE_BURST = 32.0
#: The longest such pause: a message from any other peer ends it anyway (see refuse_pause).
REFUSE_PAUSE_MAX = 0.005
_RETRY_FIRST = 0.0005
_RETRY_MAX = 0.05
#: A TCP peer that vanished without closing (power loss, dropped route) is noticed by the
#: kernel in about 5 s: keepalive probes after 1 s idle, 1 s apart, 4 unanswered; data left
#: unacknowledged for 5 s (ZMQ_TCP_MAXRT, TCP_USER_TIMEOUT on Linux) drops it too.
#: zmq's own heartbeats (ZMQ_HEARTBEAT_IVL) are deliberately not used: libzmq 4.3.5 aborts
#: the process (``Assertion failed: !_io_error (src/stream_engine_base.cpp:310)``) when the
#: heartbeat timer fires on a connection whose peer hung up while its inbound queue was full
#: (the timer calls out_event() without checking _io_error; zeromq/libzmq#4364).
TCP_KEEPALIVE_IDLE_S = 1
TCP_KEEPALIVE_INTVL_S = 1
TCP_KEEPALIVE_CNT = 4
TCP_MAXRT_MS = 5000
RECONNECT_IVL_MS = 20
RECONNECT_IVL_MAX_MS = 500


def endpoint_for(url: TransportURL) -> str:
    """The zmq endpoint of a kvrpc URL; raises :class:`InvalidURL` for a malformed one."""
    if url.scheme == "zmq+tcp":
        if not url.host or url.port is None:
            raise InvalidURL(
                f"{url.raw!r}: zmq+tcp URLs need a host and a port, like 'zmq+tcp://127.0.0.1:5555'"
            )
        if url.port == 0:
            raise InvalidURL(f"{url.raw!r}: port 0 is not supported; clients must know the port")
        host = f"[{url.host}]" if ":" in url.host else url.host
        return f"tcp://{host}:{url.port}"
    if url.scheme == "zmq+ipc":
        if url.host or not url.path.startswith("/"):
            raise InvalidURL(
                f"{url.raw!r}: zmq+ipc URLs need an absolute path, like 'zmq+ipc:///tmp/kvrpc.sock'"
            )
        return f"ipc://{url.path}"
    raise InvalidURL(f"{url.raw!r}: the zmq transport handles zmq+tcp:// and zmq+ipc://")


def _context() -> zmq.Context[Any]:
    # One context (and so one zmq I/O thread) per process; instance() makes a new one after
    # a fork, where the parent's may not be used.
    return zmq.Context.instance()


def _socket(kind: int, url: TransportURL, options: TransportOptions) -> zmq.Socket[Any]:
    """A new socket of ``kind`` with every transport option set (CURVE keys included)."""
    sock: zmq.Socket[Any] = _context().socket(kind)
    try:
        _configure(sock, options)
        _set_curve(sock, url, options)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def _configure(sock: zmq.Socket[Any], options: TransportOptions) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, options.max_message_size)
    # No ZMQ_HEARTBEAT_IVL/TIMEOUT/TTL: see TCP_KEEPALIVE_IDLE_S. (ipc ignores these.)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTVL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_CNT)
    sock.setsockopt(zmq.TCP_MAXRT, TCP_MAXRT_MS)
    sock.setsockopt(zmq.SNDHWM, QUEUE_HWM)
    sock.setsockopt(zmq.RCVHWM, QUEUE_HWM)
    sock.copy_threshold = ZERO_COPY_THRESHOLD


def _set_curve(sock: zmq.Socket[Any], url: TransportURL, options: TransportOptions) -> None:
    """Make ``sock`` a CURVE server or client where ``options`` carry keys; zmq+tcp only.

    Raises :class:`TransportError` for keys on any other URL: an ipc socket is guarded by
    its file mode, and silently ignoring the keys there would hide a mistake.
    """
    keys = options.curve
    if keys is None:
        return
    if url.scheme != "zmq+tcp":
        raise TransportError(f"{url.raw}: CURVE encryption is for zmq+tcp:// URLs only")
    if keys.server_key is None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    else:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def _send_parts(sock: zmq.Socket[Any], parts: Sequence[Any]) -> None:
    """Send one multipart message without blocking; raises ``zmq.Again`` if there is no room.

    Each part is sent on its own so that only large ones go zero-copy: pyzmq's zero-copy path
    costs tens of microseconds per frame, far more than copying a small one. zmq accepts a
    multipart message atomically, so only the first part can raise ``zmq.Again``.
    """
    last = len(parts) - 1
    for index, part in enumerate(parts):
        size = len(part) if type(part) is bytes else memoryview(part).nbytes
        flags = zmq.NOBLOCK if index == last else zmq.NOBLOCK | zmq.SNDMORE
        sock.send(part, flags, copy=size < ZERO_COPY_THRESHOLD)


_MONITOR_IDS = itertools.count()


def _monitor(sock: zmq.Socket[Any], events: int) -> zmq.Socket[Any]:
    """A PAIR socket receiving ``sock``'s monitor events, with no queue limit.

    libzmq's I/O thread blocks when a monitor's queue is full (a storm of connections can
    produce thousands of events before the loop reads them), so the receiving end's high-water
    mark is 0: the queue is then unbounded, and drained on every wake-up.
    """
    # A counter, not id(sock): a closed socket's id is reused at once, while libzmq may still
    # hold its monitor's endpoint, and the reuse then fails with "Address already in use".
    address = f"inproc://kvrpc-monitor-{os.getpid()}-{next(_MONITOR_IDS)}"
    sock.monitor(address, events)
    pair: zmq.Socket[Any] = sock.context.socket(zmq.PAIR)
    pair.setsockopt(zmq.RCVHWM, 0)
    pair.setsockopt(zmq.LINGER, 0)
    pair.connect(address)
    return pair


class _Driver:
    """One zmq socket (and its monitor) driven by the running loop's reader callbacks.

    :meth:`drain` is the read callback: it reads up to ``READ_BATCH`` messages, hands each to
    :meth:`take`, and carries on next loop turn while more wait. It reads nothing while
    :attr:`paused` (the server's back-pressure) or once closed. Subclasses say what a message
    and a monitor event mean, and what happens at the end of each read (:meth:`read_finished`).
    """

    def __init__(self, sock: zmq.Socket[Any], monitor_events: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.closed = False
        #: Set while the socket must not be read at all (see ZmqServerTransport.pause_reading).
        self.paused = False
        self._fd = sock.FD
        self._monitor: zmq.Socket[Any] | None = _monitor(sock, monitor_events)
        self._monitor_fd = self._monitor.FD
        self.check_scheduled = False
        self.draining = False
        self._pause_timer: asyncio.TimerHandle | None = None
        self.loop.add_reader(self._fd, self.drain)
        self.loop.add_reader(self._monitor_fd, self.catch_up)
        # Whatever arrived before the readers were added raised no edge we will see.
        self.loop.call_soon(self.catch_up)

    # Subclasses handle received multipart messages and react to monitor events.
    def take(self, parts: list[bytes]) -> None:
        raise NotImplementedError

    def on_event(self, event: int, value: int) -> None:
        raise NotImplementedError

    def receive_one(self) -> None:
        """Read one waiting message (``zmq.Again`` if none) and hand it to :meth:`take`."""
        self.take(self.sock.recv_multipart(zmq.NOBLOCK))

    def refuse_pause(self) -> float:
        """Seconds to stop reading for after the message just read (0: read on)."""
        return 0.0

    def read_finished(self) -> None:
        """Called at the end of every :meth:`drain`, whatever it read."""

    def drain(self) -> None:
        """Read what is ready, a batch a turn, unless paused or closed."""
        self.check_scheduled = False
        if self.closed or self.paused:
            return
        self.draining = True
        try:
            for _ in range(READ_BATCH):
                # Copying receive: a large frame costs the same copies either way (the codec
                # turns a view into bytes), and small ones are cheaper as plain bytes.
                self.receive_one()
                if self.closed or self.paused:  # the sink paused reading, or closed us
                    break
                pause = self.refuse_pause()
                if pause:
                    if self._pause_timer is None:
                        self._pause_timer = self.loop.call_later(pause, self._end_refuse_pause)
                    break
            else:
                # More may be waiting, and the edge that announced them is spent: carry on
                # next turn, after the loop's other callbacks (other sockets, timers) ran.
                self.check_scheduled = True
                self.loop.call_soon(self.drain)
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            if not self.closed:
                logger.debug("zmq receive failed: %s", exc)
        finally:
            self.draining = False
            self.read_finished()

    def _end_refuse_pause(self) -> None:
        self._pause_timer = None
        self.drain()

    def after_send(self) -> None:
        """Look for a message whose descriptor edge a send may have swallowed, once per turn.

        Not for a send made while :meth:`drain` reads (a reply sent by a handler that ran
        inline): drain goes on receiving until zmq has nothing, which finds any such message,
        and checking again next turn would cost a loop turn per message.
        """
        if not self.check_scheduled and not self.draining:
            self.check_scheduled = True
            self.loop.call_soon(self._check)

    def check_soon(self) -> None:
        """Read, next loop turn, whatever is already waiting (the edge may be spent)."""
        if not self.check_scheduled:
            self.check_scheduled = True
            self.loop.call_soon(self._check)

    def _check(self) -> None:
        if self.check_scheduled and not self.closed:
            if int(self.sock.get(zmq.EVENTS)) & zmq.POLLIN:
                self.drain()
            else:
                self.check_scheduled = False

    def catch_up(self) -> None:
        """Handle every monitor event that is waiting.

        Also called before decisions that depend on the connection's state.
        """
        monitor = self._monitor
        while monitor is not None and not self.closed:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.ZMQError:  # Again: none left; anything else: the monitor is gone
                return
            self.on_event(int(event["event"]), int(event["value"]))

    def shutdown(self) -> None:
        """Remove the callbacks and close both sockets; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        self.loop.remove_reader(self._fd)
        self.loop.remove_reader(self._monitor_fd)
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        self.sock.close(linger=0)


# --------------------------------------------------------------------------------- server


class _Gate:
    """Which routing identities have passed the handshake, and the handshakes under way.

    A ROUTER reports no connections, only messages tagged with the sender's routing identity,
    and a peer may choose its identity. So an identity counts as authenticated only together
    with the descriptor of the connection that authenticated it (libzmq's ``ZMQ_SRCFD`` of
    each message), and is forgotten when the monitor reports that descriptor disconnected:
    another connection claiming the same identity later must authenticate for itself.
    Handshakes under way are bounded (``max_pending``) and expire after
    ``handshake_timeout``; a ROUTER cannot hang up on a peer, so one that fails only has its
    messages dropped from then on.
    """

    def __init__(self, auth: Authenticator, counts: dict[str, int]) -> None:
        self.auth = auth
        self.counts = counts
        self.limiter: FailureLimiter = auth.limiter()
        self.authenticated: dict[bytes, int] = {}  # identity -> descriptor
        self.identity_of: dict[int, bytes] = {}  # descriptor -> identity
        # identity -> (handshake, descriptor, limiter key, started at), oldest first.
        self.pending: OrderedDict[bytes, tuple[ServerHandshake, int, str, float]] = OrderedDict()
        counts.update(auth_ok=0, auth_failed=0, auth_rate_limited=0, unauthenticated=0)

    def disconnected(self, fd: int) -> None:
        identity = self.identity_of.pop(fd, None)
        if identity is not None and self.authenticated.get(identity) == fd:
            del self.authenticated[identity]
        for identity, entry in list(self.pending.items()):
            if entry[1] == fd:
                del self.pending[identity]
                self._failed(entry[2], entry[3])

    def _failed(self, key: str, now: float) -> None:
        self.counts["auth_failed"] += 1
        self.limiter.failed(key, now)

    def _expire(self, now: float) -> None:
        timeout = self.auth.handshake_timeout
        while self.pending:
            identity, entry = next(iter(self.pending.items()))
            if now - entry[3] < timeout:
                return
            del self.pending[identity]
            self._failed(entry[2], now)

    def step(self, identity: bytes, fd: int, key: str, frames: list[Any], now: float) -> bytes:
        """Take a message from a peer that has not authenticated; returns what to send back.

        ``b""``: send nothing (a rate-limited peer's messages are dropped in silence).
        """
        self._expire(now)
        entry = self.pending.get(identity)
        if entry is None or entry[1] != fd:
            if entry is not None:  # the same identity on a new connection starts over
                del self.pending[identity]
            if not self.limiter.allowed(key, now):
                self.counts["auth_rate_limited"] += 1
                if not is_handshake(frames):
                    self.counts["unauthenticated"] += 1
                return b""
            if len(self.pending) >= self.auth.max_pending:
                self.counts["auth_rate_limited"] += 1
                return refusal(
                    f"more than {self.auth.max_pending} handshakes under way; retry shortly"
                ).reply
            entry = (self.auth.server_handshake(), fd, key, now)
            self.pending[identity] = entry
        step = entry[0].receive(frames)
        if step.verdict is Verdict.ACCEPTED:
            del self.pending[identity]
            stale = self.identity_of.pop(fd, None)
            if stale is not None:
                self.authenticated.pop(stale, None)
            self.authenticated[identity] = fd
            self.identity_of[fd] = identity
            self.counts["auth_ok"] += 1
        elif step.verdict is Verdict.REFUSED:
            del self.pending[identity]
            self._failed(key, now)
            if not is_handshake(frames):
                self.counts["unauthenticated"] += 1  # thrown away, undecoded
            logger.info("zmq: handshake from %s failed: %s", key, step.reason)
        return step.reply


class _ServerDriver(_Driver):
    """The ROUTER's reader: each message goes to the sink, in arrival order.

    zmq's ROUTER takes one message from each peer with one waiting in turn, so no peer waits
    behind another's queue; what a flooding peer can still take from the others is the
    server's time. So a peer is *muted* while replies wait in its backlog (it reads none of
    what it asked for, and zmq holds SNDHWM of them already): its requests are thrown away
    as they arrive, before any decoding, and counted as ``refused`` (the caller's timeout
    reports each). A ROUTER cannot stop reading one peer, or hang up on it, as the unix
    transport does, so a muted peer would go on flooding at the rate the server can throw its
    requests away, taking CPU time from the rest. So past ``REFUSE_RATE`` a second (a burst
    of ``REFUSE_BURST``), reading pauses (up to ``REFUSE_PAUSE_MAX``) once zmq's round-robin
    has offered only muted peers' messages both before and after zmq's pending commands were
    processed (a peer whose queue just filled joins the round-robin only then): zmq's queues
    fill and the flooder's sends block, while a message from anyone else wakes the reader.
    The peer is heard again once its backlog has drained (or was dropped after
    ``peer_stall_timeout``).

    That pause is the driver's own and ends at the next edge; :attr:`paused` (the sink's
    back-pressure) stops all reading until the transport resumes it.
    """

    def __init__(
        self,
        sock: zmq.Socket[Any],
        sink: ServerSink,
        counts: dict[str, int],
        auth: Authenticator | None,
        muted: dict[bytes, Any],
    ) -> None:
        self.sink = sink
        self.counts = counts
        self.gate = _Gate(auth, counts) if auth is not None else None
        #: The peers whose requests are thrown away unread (the transport's backlogs).
        self.muted = muted
        counts["refused"] = 0
        #: Messages handed to the sink since the last ``read_done``.
        self.delivered = 0
        #: Muted peers' messages read one after the other: more than there are muted peers
        #: means zmq's round-robin found nobody else waiting.
        self.refused_in_a_row = 0
        self.commands_processed = False  # since refused_in_a_row was last reset
        self.tokens = REFUSE_BURST  # what REFUSE_RATE allows still, refilled with time
        self.tokens_at = 0.0
        self.scheme = "zmq"  # the limiter's key where a peer has no address (ipc)
        super().__init__(
            sock,
            zmq.EVENT_ACCEPTED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        )

    def refuse_pause(self) -> float:
        """Pause once refusals outran ``REFUSE_RATE`` and only muted peers are waiting."""
        if self.tokens >= 0 or self.refused_in_a_row <= len(self.muted):
            return 0.0
        self.refused_in_a_row = 0
        if not self.commands_processed:
            # libzmq activates a pipe that received a message only when it processes its
            # commands (every 100 messages read, or here): go round once more after that.
            self.commands_processed = True
            self.sock.get(zmq.EVENTS)
            return 0.0
        self.commands_processed = False
        return min(REFUSE_PAUSE_MAX, -self.tokens / REFUSE_RATE)

    def take(self, parts: list[bytes]) -> None:
        self.refused_in_a_row = 0
        self.commands_processed = False
        self.delivered += 1
        try:
            # bytes frames: a list of them is a list of Buffer (list is invariant).
            self.sink.deliver(parts[0], cast("list[Buffer]", parts[1:]))
        except Exception:  # the sink's bug must not stop this socket's reading
            logger.exception("the server sink failed")

    def read_finished(self) -> None:
        if self.delivered:
            self.delivered = 0
            try:
                self.sink.read_done()
            except Exception:
                logger.exception("the server sink failed")

    def _refuse_rest(self) -> None:
        """Throw away the rest of a muted peer's message, uncopied, and count it."""
        sock = self.sock
        while sock.get(zmq.RCVMORE):
            sock.recv(zmq.NOBLOCK, copy=False)  # a view: 64 KiB is not copied to be dropped
        self.counts["refused"] += 1
        self.refused_in_a_row += 1
        now = self.loop.time()
        tokens = min(REFUSE_BURST, self.tokens + (now - self.tokens_at) * REFUSE_RATE) - 1
        self.tokens = max(tokens, -REFUSE_RATE * REFUSE_PAUSE_MAX)
        self.tokens_at = now

    def receive_one(self) -> None:
        sock = self.sock
        gate = self.gate
        if gate is None:
            identity = sock.recv(zmq.NOBLOCK)
            if identity in self.muted:
                self._refuse_rest()
                return
            parts: list[Any] = [identity]
            while sock.get(zmq.RCVMORE):
                parts.append(sock.recv(zmq.NOBLOCK))
            self.take(parts)
            return
        # The identity frame as a zmq.Frame: it tells which connection the message came on.
        head = sock.recv(zmq.NOBLOCK, copy=False)
        identity, fd = head.bytes, int(head.get(zmq.SRCFD))
        if identity in self.muted and gate.authenticated.get(identity) == fd:
            self._refuse_rest()
            return
        parts = [identity]
        while sock.get(zmq.RCVMORE):
            parts.append(sock.recv(zmq.NOBLOCK))
        if gate.authenticated.get(identity) == fd:
            self.take(parts)
            return
        # A DISCONNECTED event for this descriptor, if any, is handled before the decision:
        # libzmq posts it before the descriptor can be reused for a new connection.
        self.catch_up()
        if gate.authenticated.get(identity) == fd:
            self.take(parts)
            return
        self.refused_in_a_row = 0
        self.commands_processed = False
        address = str(head.get("Peer-Address") or "")
        key = address or self.scheme
        reply = gate.step(identity, fd, key, parts[1:], self.loop.time())
        if reply:
            with contextlib.suppress(zmq.ZMQError):  # full or gone: it learns by its timeout
                _send_parts(sock, [identity, reply])
            self.after_send()

    def on_event(self, event: int, value: int = -1) -> None:
        if event == zmq.EVENT_ACCEPTED:
            self.counts["connections"] += 1
        elif event == zmq.EVENT_DISCONNECTED:
            self.counts["disconnects"] += 1
            if self.gate is not None:
                self.gate.disconnected(value)
        else:  # a peer that does not speak ZMTP, or broke off its greeting
            self.counts["malformed"] += 1


_umask_lock = threading.Lock()


def _bind_private(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Bind an ipc endpoint whose socket file has mode 0600 from its first moment.

    libzmq listens as it binds, so a chmod afterwards would leave a window in which the file
    has the umask's mode (0777 under umask 0) and any local user may connect. The umask is
    process-wide: while it is tightened, another thread's new files get mode 0600 at most,
    never more than they asked for.
    """
    with _umask_lock:
        previous = os.umask(0o177)
        try:
            sock.bind(endpoint)
        finally:
            os.umask(previous)


class _Backlog:
    """Replies for one client whose zmq queue was full, oldest first, with a retry timer."""

    __slots__ = ("messages", "nbytes", "pause", "progress_at", "timer")

    def __init__(self, now: float) -> None:
        self.messages: deque[list[Any]] = deque()
        self.nbytes = 0
        self.pause = _RETRY_FIRST
        self.progress_at = now  # when the client last took a reply (loop time)
        self.timer: asyncio.TimerHandle | None = None


def _message_bytes(message: Sequence[Any]) -> int:
    return sum(len(p) if type(p) is bytes else memoryview(p).nbytes for p in message)


class _ReadSwitch:
    """Pausing a transport whose socket a :class:`_Driver` reads.

    The pause outlives the driver: a driver made later (on start, or a client's connect)
    starts paused if the transport is.
    """

    _driver: _Driver | None
    _paused: bool

    def _pause_driver(self) -> None:
        self._paused = True
        if self._driver is not None:
            self._driver.paused = True

    def _resume_driver(self) -> None:
        if not self._paused:
            return
        self._paused = False
        driver = self._driver
        if driver is not None and not driver.closed:
            driver.paused = False
            driver.check_soon()  # the descriptor's edges went by while paused


class ZmqServerTransport(_ReadSwitch):
    """A ROUTER socket bound to the URL; each connected DEALER is one peer.

    A ROUTER sees messages, not connections: it cannot report a peer's hang-up
    (``reports_peer_loss`` is False), close one peer's connection or stop reading one peer.
    """

    reports_peer_loss = False

    def __init__(self, url: TransportURL, options: TransportOptions) -> None:
        self.url = url
        self.endpoint = endpoint_for(url)
        self.options = options
        self._driver: _ServerDriver | None = None
        self._paused = False
        self._backlogs: dict[Peer, _Backlog] = {}
        # (st_dev, st_ino) of the ipc socket file this server bound, removed on close.
        self._socket_file: tuple[int, int] | None = None
        self._counts = {
            "connections": 0,
            "disconnects": 0,
            "malformed": 0,
            "dropped": 0,
            "skipped": 0,
            "backlogged": 0,
        }

    async def start(self, sink: ServerSink) -> None:
        """Bind the ROUTER socket and deliver into ``sink``; :class:`TransportError` if taken."""
        if self.url.scheme == "zmq+ipc":
            # zmq would silently unlink a live server's socket file and take its address.
            claim_socket_path(self.url.path)
        sock = _socket(zmq.ROUTER, self.url, self.options)
        # Refuse (EHOSTUNREACH, or EAGAIN when its queue is full) instead of dropping silently,
        # so a full client queue is waited on and a departed client is known to be gone.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.BACKLOG, 1024)  # many workers (re)connect at once
        # libzmq holds up to RCVHWM unread messages per connection, and keeps those of a
        # client that hung up until they are read: under a sustained flood from peers that
        # reconnect, that is what the server's memory grows by. A small per-peer read-ahead
        # bounds it; beyond it, the kernel's socket buffer and then the sender wait (also
        # while the sink has paused reading).
        sock.setsockopt(zmq.RCVHWM, SERVER_RCVHWM)
        # A ZAP domain makes libzmq refuse peers that fall back to the 2010 ZMTP/1.0 framing,
        # which is what arbitrary bytes look like to it; libzmq 4.3.5 leaked about 7 KB for
        # each such connection (measured). No ZAP handler is needed: NULL security still
        # admits every kvrpc client.
        sock.setsockopt(zmq.ZAP_DOMAIN, b"kvrpc")
        try:
            if self.url.scheme == "zmq+ipc":
                _bind_private(sock, self.endpoint)
            else:
                sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError(f"cannot bind {self.url.raw}: {exc}") from exc
        if self.url.scheme == "zmq+ipc":
            with contextlib.suppress(OSError):
                info = os.lstat(self.url.path)
                self._socket_file = (info.st_dev, info.st_ino)
        # A peer with replies waiting in its backlog is muted.
        driver = _ServerDriver(sock, sink, self._counts, self.options.auth, self._backlogs)
        driver.paused = self._paused
        self._driver = driver

    def pause_reading(self) -> None:
        """Read nothing from the ROUTER until :meth:`resume_reading`; idempotent.

        libzmq then holds up to ``SERVER_RCVHWM`` messages per connection, and the kernel
        and the senders hold the rest. The current read callback stops after the message
        it is delivering.
        """
        self._pause_driver()

    def resume_reading(self) -> None:
        """Read again; what is waiting already is read next loop turn. Idempotent."""
        self._resume_driver()

    def send(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        """Send or queue a reply to ``peer`` without waiting; a departed client is skipped."""
        driver = self._driver
        if driver is None or driver.closed:
            return
        message = [peer, *frames]
        backlog = self._backlogs.get(peer)
        if backlog is not None:  # behind the replies already waiting, to keep their order
            self._queue(backlog, message)
            return
        # Any call on the socket, a refused send too, may swallow the descriptor's edge for a
        # message waiting to be read: every path below looks for one afterwards.
        driver.after_send()
        try:
            _send_parts(driver.sock, message)
        except zmq.Again:
            backlog = self._backlogs[peer] = _Backlog(driver.loop.time())
            self._counts["backlogged"] += 1
            self._queue(backlog, message)
            backlog.timer = driver.loop.call_later(backlog.pause, self._retry, peer)
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise TransportError(f"sending on {self.url.raw} failed: {exc}") from exc
            self._counts["skipped"] += 1  # that client disconnected: nobody takes the reply

    def _queue(self, backlog: _Backlog, message: list[Any]) -> None:
        size = _message_bytes(message)
        if backlog.messages and backlog.nbytes + size > PEER_BACKLOG_BYTES:
            self._counts["dropped"] += 1
            return
        backlog.messages.append(message)
        backlog.nbytes += size

    def _retry(self, peer: Peer) -> None:
        """Send what a client's backlog holds while its queue has room; drop it if stalled."""
        driver, backlog = self._driver, self._backlogs.get(peer)
        if backlog is None:
            return
        backlog.timer = None
        if driver is None or driver.closed:
            del self._backlogs[peer]
            return
        messages = backlog.messages
        now = driver.loop.time()
        driver.after_send()  # see send()
        while messages:
            try:
                _send_parts(driver.sock, messages[0])
            except zmq.Again:
                break
            except zmq.ZMQError:  # the client has gone: nobody is left to take these
                messages.clear()
                break
            backlog.nbytes -= _message_bytes(messages.popleft())
            backlog.progress_at = now
            backlog.pause = _RETRY_FIRST
        if not messages:
            del self._backlogs[peer]
            return
        if now - backlog.progress_at >= self.options.peer_stall_timeout:
            self._counts["dropped"] += len(messages)
            logger.warning(
                "dropped %d replies to a client that read none for %ss",
                len(messages),
                self.options.peer_stall_timeout,
            )
            del self._backlogs[peer]
            return
        # ROUTER's writability is for any peer, not this one, so retry with a growing pause.
        backlog.pause = min(backlog.pause * 2, _RETRY_MAX)
        backlog.timer = driver.loop.call_later(backlog.pause, self._retry, peer)

    async def close(self) -> None:
        """Unbind and close; the socket file of an ipc URL goes with it. Idempotent.

        Nothing is delivered after: a read callback that closes the transport stops after
        the message it is delivering.
        """
        for backlog in self._backlogs.values():
            if backlog.timer is not None:
                backlog.timer.cancel()
        self._backlogs.clear()
        if self._driver is not None:
            self._driver.shutdown()
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        # libzmq leaves a bound ipc socket's file behind on close. Only ours goes: another
        # server may have replaced it since (after finding it stale), and its clients need it.
        identity, self._socket_file = self._socket_file, None
        if identity is None:
            return
        try:
            info = os.lstat(self.url.path)
        except OSError:
            return
        if (info.st_dev, info.st_ino) == identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.url.path)

    def stats(self) -> dict[str, int]:
        """Counters: connections, disconnects, failed handshakes, replies dropped, backlogs.

        ``skipped``: replies to clients that had gone; ``refused``: requests from muted peers
        thrown away unread (see ``_ServerDriver``); with auth, the handshake's counters.
        """
        return dict(self._counts)


# --------------------------------------------------------------------------------- client


class _ClientDriver(_Driver):
    """The DEALER's reader: replies go to the sink; the monitor tells of the connection.

    With auth, each new connection runs the handshake before any request goes out on it
    (``connected`` is clear until it succeeds). One rule covers a server that restarted: zmq
    may attach the new connection before the loop has read the monitor's ``DISCONNECTED``
    for the old one, so a request can reach the new server before the handshake. The server
    refuses it (a REFUSE, before its reply to our HELLO, since it answers in order). A client
    that has authenticated before treats such a refusal as the lost connection it is: it is
    never delivered to the sink nor raised as :class:`AuthenticationFailed`; the loss is
    reported once and the handshake runs again. Only a refusal of the handshake itself (of
    its ANSWER: a wrong token) fails the client. A refusal before the server's CHALLENGE
    may also be of our HELLO (too many handshakes under way, or rate-limited silence): such a
    handshake is started afresh after ``handshake_timeout``.
    """

    def __init__(
        self, sock: zmq.Socket[Any], sink: ClientSink, auth: Authenticator | None, where: str
    ) -> None:
        self.sink = sink
        #: Set while connected and (with auth) authenticated, or once authentication failed.
        self.connected = asyncio.Event()
        #: Set once zmq's own handshake succeeded (ours may still be under way).
        self.linked = asyncio.Event()
        self.auth = auth
        self.where = where
        self.handshake: ClientHandshake | None = None
        #: Whether the server has answered the current handshake's HELLO yet.
        self.heard = False
        #: Whether a handshake of this client ever succeeded (see the class docstring).
        self.authenticated_once = False
        #: Why the server refused this client; every later send raises it.
        self.auth_error: AuthenticationFailed | None = None
        #: Refusals of requests sent before a new connection's handshake (see above).
        self.stray_refusals = 0
        self._refusal_check_scheduled = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._writable: list[asyncio.Future[None]] = []
        super().__init__(sock, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)

    # ------------------------------------------------------------ reading

    def take(self, parts: list[bytes]) -> None:
        if self.handshake is not None:
            self._handshake_message(parts)
            return
        if self.auth is not None and is_handshake(parts):
            # Never a reply. A REFUSE says the server does not know this connection.
            if refusal_error(parts, self.where) is not None:
                self.stray_refusals += 1
                if not self._refusal_check_scheduled:
                    self._refusal_check_scheduled = True
                    self.loop.call_soon(self._refused)
            return
        try:
            # bytes frames: a list of them is a list of Buffer (list is invariant).
            self.sink.deliver(cast("list[Buffer]", parts))
        except Exception:  # the sink's bug must not stop this socket's reading
            logger.exception("the client sink failed")

    def read_finished(self) -> None:
        self._wake_writers()

    def _read_waiting(self) -> None:
        """Deliver every message zmq holds now (bounded by RCVHWM), all at once."""
        if self.draining:
            return  # the running drain goes on reading them
        self.draining = True
        try:
            while not self.closed:
                self.receive_one()
        except zmq.ZMQError:  # Again: all read; anything else: nothing more to read
            pass
        finally:
            self.draining = False

    def _refused(self) -> None:
        """A request was refused outside a handshake: this is not the connection we authenticated.

        Runs after the read callback that read the refusal, and after the monitor's news.
        """
        self._refusal_check_scheduled = False
        if self.closed:
            return
        self.catch_up()  # a new connection's events may be waiting: they start its handshake
        if self.handshake is None and self.connected.is_set():
            # No event came, yet the server does not know this connection (it forgot us):
            # the same as a lost connection, and this socket authenticates again.
            self._lose(f"{self.where} no longer knows this connection (restarted?)")
            if self.auth_error is None:
                self._start_handshake()

    # ------------------------------------------------------------ the handshake

    def _start_handshake(self) -> None:
        assert self.auth is not None
        handshake = self.handshake = self.auth.client_handshake(self.where)
        self.heard = False
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self.authenticated_once:  # connect() bounds the first one itself
            self._handshake_timer = self.loop.call_later(
                self.auth.handshake_timeout, self._handshake_expired, handshake
            )
        self._send_handshake(handshake.hello())

    def _handshake_expired(self, handshake: ClientHandshake) -> None:
        self._handshake_timer = None
        if self.closed or self.handshake is not handshake or self.heard:
            return  # done, or the server answered (it then answers the rest in order)
        logger.info("zmq: %s did not answer the handshake; starting it again", self.where)
        self._start_handshake()

    def _end_handshake(self) -> None:
        self.handshake = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _handshake_message(self, parts: list[bytes]) -> None:
        handshake = self.handshake
        assert handshake is not None
        if not self.heard and self.authenticated_once and refusal_error(parts, self.where):
            # The refusal of a request that went out on this connection before our HELLO
            # (see the class docstring): the server's CHALLENGE to our HELLO follows.
            self.stray_refusals += 1
            return
        self.heard = True
        try:
            reply = handshake.receive(parts)
        except AuthenticationFailed as exc:
            self._end_handshake()
            self.auth_error = exc
            self.connected.set()  # wakes the waiters, who find auth_error
            return
        if reply is not None:
            self._send_handshake(reply)
        elif handshake.done:
            self._end_handshake()
            self.authenticated_once = True
            self.connected.set()

    def _send_handshake(self, frame: bytes) -> None:
        try:
            _send_parts(self.sock, [frame])
        except zmq.ZMQError as exc:  # a fresh connection has room; this one broke already
            logger.debug("zmq: sending a handshake message failed: %s", exc)
        self.after_send()

    # ------------------------------------------------------------ the connection

    def on_event(self, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.linked.set()
            if self.auth is None:
                self.connected.set()
            elif self.auth_error is None:
                # Each connection is a new routing identity at the server: authenticate it
                # before any request goes out on it.
                self._start_handshake()
        elif event == zmq.EVENT_DISCONNECTED:
            self.linked.clear()
            if self.handshake is not None:
                self._end_handshake()  # the next connection starts its own
            elif self.connected.is_set():
                self._read_waiting()  # replies that made it before the drop are still good
                self._lose(f"{self.where} closed the connection")
            self._wake_writers(force=True)  # senders waiting for room wait for a connection

    def _lose(self, reason: str) -> None:
        """Report the connection lost (once: ``connected`` is set only while it is up)."""
        if self.closed or not self.connected.is_set():
            return
        self.connected.clear()
        try:
            self.sink.connection_lost(reason)
        except Exception:
            logger.exception("the client sink failed")

    # ------------------------------------------------------------ writing

    async def wait_writable(self) -> None:
        """Until zmq has room, the connection drops, or the driver closes."""
        waiter = self.loop.create_future()
        self._writable.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._writable:
                self._writable.remove(waiter)

    def _wake_writers(self, force: bool = False) -> None:
        if self._writable and (
            force or self.closed or int(self.sock.get(zmq.EVENTS)) & zmq.POLLOUT
        ):
            for waiter in self._writable:
                if not waiter.done():
                    waiter.set_result(None)
            self._writable.clear()

    def shutdown(self) -> None:
        if self.closed:
            return
        self._end_handshake()
        super().shutdown()
        self._wake_writers()


async def _resolve(url: TransportURL) -> None:
    """Raise :class:`TransportError` naming the host where ``url``'s host does not resolve."""
    host = url.host
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return  # an address: nothing to look up
    except OSError:
        pass
    try:
        await asyncio.get_running_loop().getaddrinfo(host, url.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransportError(
            f"cannot connect to {url.raw}: the host {host!r} does not resolve ({exc.strerror}); "
            "check the host name in the URL"
        ) from None


class ZmqClientTransport(_ReadSwitch):
    """A DEALER socket connected to the server; zmq reconnects it in the background.

    Replies go to the sink from the read callback; a lost connection is reported to it once
    (from the monitor's ``DISCONNECTED``, or, with auth, when the server refuses a request on
    a connection it does not know: see ``_ClientDriver``).
    """

    def __init__(self, url: TransportURL, options: TransportOptions) -> None:
        self.url = url
        self.endpoint = endpoint_for(url)
        self.options = options
        self._driver: _ClientDriver | None = None
        self._paused = False

    async def connect(self, sink: ClientSink) -> None:
        """Connect, deliver into ``sink``, and wait for the handshake (the caller bounds it).

        A ``zmq+tcp`` host name is resolved first: zmq would retry a name that does not
        resolve in silence until the caller gave up, so :class:`TransportError` says so now.
        With auth, raises :class:`AuthenticationFailed` if the server refuses this client or
        does not answer within ``handshake_timeout``.
        """
        if self.url.scheme == "zmq+tcp":
            await _resolve(self.url)
        sock = _socket(zmq.DEALER, self.url, self.options)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        auth = self.options.auth
        driver = self._driver = _ClientDriver(sock, sink, auth, self.url.raw)
        driver.paused = self._paused
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            driver.shutdown()
            raise TransportError(f"cannot connect to {self.url.raw}: {exc}") from exc
        if auth is not None:
            await driver.linked.wait()
            try:
                async with asyncio.timeout(auth.handshake_timeout):
                    await driver.connected.wait()
            except TimeoutError:
                raise AuthenticationFailed(
                    f"{self.url.raw} sent no handshake reply within {auth.handshake_timeout}s; "
                    "is the server started with --auth-token-file?"
                ) from None
        await driver.connected.wait()
        self._check_auth(driver)

    def pause_reading(self) -> None:
        """Read no replies until :meth:`resume_reading`; idempotent.

        libzmq holds up to its receive high-water mark, then the server holds the rest.
        A handshake on a new connection is not read either, so it waits for the resume.
        """
        self._pause_driver()

    def resume_reading(self) -> None:
        """Read again; what is waiting already is read next loop turn. Idempotent."""
        self._resume_driver()

    def _check_auth(self, driver: _ClientDriver) -> None:
        if driver.auth_error is not None:
            raise driver.auth_error

    async def send(self, frames: Sequence[Buffer]) -> None:
        """Send one request, waiting for room, or up to ``reconnect_timeout`` for the server.

        A request goes out only while connected and (with auth) authenticated: after every
        wait the monitor's news is read first, since the room may be a new connection's.
        """
        driver = self._require()
        while True:
            if not driver.connected.is_set():
                # Known to be disconnected: a message handed to zmq now could sit in a pipe
                # that is being torn down and vanish, so wait for the new connection first.
                await self._wait_connected(driver)
            self._check_auth(driver)
            try:
                _send_parts(driver.sock, frames)
                break
            except zmq.Again:  # the server's queue is full, or no connection (IMMEDIATE)
                driver.catch_up()
                if driver.connected.is_set():
                    await driver.wait_writable()  # back-pressure
                    driver.catch_up()
                if driver.closed:
                    raise ConnectionLost(f"connection to {self.url.raw} is closed") from None
            except zmq.ZMQError as exc:
                if driver.closed:
                    raise ConnectionLost(f"connection to {self.url.raw} is closed") from exc
                raise TransportError(f"sending to {self.url.raw} failed: {exc}") from exc
        driver.after_send()

    def try_send(self, frames: Sequence[Buffer]) -> bool:
        """Send one request now if connected and zmq has room; else send nothing, False."""
        driver = self._driver
        if (
            driver is None
            or driver.closed
            or not driver.connected.is_set()
            or driver.auth_error is not None
        ):
            return False
        try:
            _send_parts(driver.sock, frames)
        except zmq.ZMQError:  # Again (full) or worse: send() waits or reports it
            return False
        driver.after_send()
        return True

    async def _wait_connected(self, driver: _ClientDriver) -> None:
        if driver.closed:
            raise ConnectionLost(f"connection to {self.url.raw} is closed")
        timeout = self.options.reconnect_timeout
        try:
            async with asyncio.timeout(timeout):
                await driver.connected.wait()
        except TimeoutError:
            raise ConnectionLost(
                f"{self.url.raw} is unreachable and did not come back within {timeout}s"
            ) from None
        if driver.closed:
            raise ConnectionLost(f"connection to {self.url.raw} is closed")

    async def close(self) -> None:
        """Close the socket; idempotent. Nothing is delivered after, no loss reported."""
        if self._driver is not None:
            self._driver.shutdown()

    def _require(self) -> _ClientDriver:
        driver = self._driver
        if driver is None or driver.closed:
            raise ConnectionLost(f"connection to {self.url.raw} is closed")
        return driver


class ZmqBlockingClient:
    """A DEALER socket for blocking calls from one thread at a time (no event loop).

    Its monitor reports a lost connection, so a server that dies fails a waiting call at
    once with :class:`ConnectionLost` instead of at its deadline.
    """

    def __init__(self, url: TransportURL, options: TransportOptions, timeout: float) -> None:
        self.url = url
        sock = _socket(zmq.DEALER, url, options)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a peer that is not there
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        self._sock = sock
        self._monitor = _monitor(sock, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._connected = False
        self._lost = False
        try:
            sock.connect(endpoint_for(url))
            deadline = time.monotonic() + timeout
            while not self._connected and not self._lost:
                left = deadline - time.monotonic()
                if left <= 0 or not self._monitor.poll(max(1, int(left * 1000))):
                    raise TransportError(f"could not connect to {url.raw} within {timeout}s")
                self._read_events()
            if options.auth is not None:
                authenticate_blocking(
                    self, options.auth.client_handshake(url.raw), url.raw, timeout
                )
        except BaseException:
            self.close()
            raise

    def _read_events(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self._lost = True

    def send(self, frames: Sequence[Buffer]) -> bool:
        """Send one message now; False (nothing sent) when disconnected or full."""
        self._read_events()
        if self._lost or self._sock.closed:
            return False
        try:
            _send_parts(self._sock, frames)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            raise TransportError(f"sending to {self.url.raw} failed: {exc}") from exc
        return True

    def recv(self, timeout: float | None) -> list[Buffer]:
        """The next message within ``timeout`` seconds; :class:`ConnectionLost` once lost."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                # bytes frames: a list of them is a list of Buffer (list is invariant).
                return cast("list[Buffer]", self._sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise ConnectionLost(f"receiving from {self.url.raw} failed: {exc}") from exc
            self._read_events()
            if self._lost:
                raise ConnectionLost(f"{self.url.raw} closed the connection")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"no message from {self.url.raw} within {timeout}s")
            self._poller.poll(None if left is None else max(1, int(left * 1000)))

    def close(self) -> None:
        """Close the socket and its monitor; idempotent."""
        if not self._sock.closed:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)


class ZmqPlugin:
    """The ``zmq+tcp://host:port`` and ``zmq+ipc:///path`` transports."""

    def create_server(self, url: TransportURL, options: TransportOptions) -> ServerTransport:
        """A ROUTER server for ``url`` (bound by ``start``)."""
        return ZmqServerTransport(url, options)

    def create_client(self, url: TransportURL, options: TransportOptions) -> ClientTransport:
        """A DEALER client for ``url`` (connected by ``connect``)."""
        return ZmqClientTransport(url, options)

    def connect_blocking(
        self, url: TransportURL, options: TransportOptions, timeout: float
    ) -> ZmqBlockingClient:
        """A connected DEALER for blocking calls (a SyncClient's calling threads)."""
        return ZmqBlockingClient(url, options, timeout)
