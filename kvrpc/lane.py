"""A calling thread's own connection: the direct lane of a :class:`~kvrpc.client.SyncClient`.

A ``SyncClient`` call normally crosses threads twice: the caller hands the request to the
client's event-loop thread, and that thread hands the reply back. When the client has nothing
else in flight, neither crossing is needed: the calling thread sends the request and reads its
reply itself, on a blocking connection of its own (the transport plugin's
:class:`~kvrpc.transport.BlockingClientTransport`), and no other thread needs the GIL for it.

The lane is taken only when free (one thread at a time; a second caller takes the loop path
instead of waiting), and only by a ``call`` made while none of the client's calls is pending:
a request never overtakes one the same thread submitted earlier. A request the lane could not
send whole (the connection is gone or full) goes the loop path untouched, since nothing of it
reached the server. A lost lane is opened again at the next call, at most once every
``retry_interval`` seconds.

**Send now, read later** (:meth:`DirectLane.submit`): a thread may also put several requests
on the lane without waiting, as a scheduler does with its lookups. The thread that does so
owns the lane until every one of them is settled (its later calls take the lane too, so
nothing it sends overtakes them; other threads take the loop path meanwhile). Their replies
are read by whichever thread waits on, or polls, one of their futures (a
:class:`LaneFuture`), or sends on the lane next; a deadline passes at such a moment too. So a
future nobody looks at is settled late, and its done-callbacks run in the thread that reads
its reply. The lane keeps these calls in a :class:`~kvrpc.calls.CallTable` of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

from kvrpc.calls import CallTable, ClientStats, outcome, read_reply
from kvrpc.codec import Buffer, Message, MessageKind
from kvrpc.errors import ClientClosed, ConnectionLost, RequestTimeout, TransportError
from kvrpc.futures import MessagingFuture
from kvrpc.protocol import ProtocolDefinition
from kvrpc.transport import BlockingClientTransport, TransportOptions, connect_blocking

__all__ = ["NOT_TAKEN", "DirectLane", "LaneFuture"]

#: What :meth:`DirectLane.call` returns when the caller must use the loop path instead.
NOT_TAKEN: Any = object()

# The longest one read holds the lane while it waits for a reply: a thread that owns the lane
# and wants to send waits at most this long behind another thread's read.
_READ_SLICE = 0.005


class DirectLane:
    """One blocking connection to ``url`` that calling threads take in turn (see module doc).

    ``stats`` counts the lane's own traffic, in the client's counters' terms.
    """

    def __init__(
        self,
        url: str,
        options: TransportOptions,
        *,
        connect_timeout: float,
        retry_interval: float,
        validate: bool,
    ) -> None:
        self.url = url
        self.stats = ClientStats()
        self._options = options
        self._connect_timeout = connect_timeout
        self._retry_interval = retry_interval
        self._validate = validate
        # Reentrant: a done-callback that runs while a reply is read may use the lane again.
        self._lock = threading.RLock()
        self._conn: BlockingClientTransport | None = None
        self._table = CallTable(url, validate=validate)
        self._table.stats = self.stats  # one set of counters for the lane's calls
        self._owner: threading.Thread | None = None  # sent the calls in _table; see module doc
        self._supported = True
        self._retry_at = 0.0
        self._closed = False

    def open(self) -> bool:
        """Connect now if not connected; False if the transport has no lane or it failed."""
        with self._lock:
            return self._connection() is not None

    def call(
        self,
        request_id: int,
        definition: ProtocolDefinition | None,
        frames: Sequence[Buffer],
        timeout: float | None,
    ) -> Any:
        """The reply's value, or :data:`NOT_TAKEN`; raises the call's error.

        NOT_TAKEN (nothing was sent) when another thread holds the lane, it is not
        connected, or it could not take the message whole.
        """
        if not self._lock.acquire(blocking=False):
            return NOT_TAKEN
        try:
            if self._table:  # another thread's submitted calls own it (see owned_here)
                return NOT_TAKEN
            conn = self._send(frames)
            if conn is None:
                return NOT_TAKEN
            self.stats.requests += 1
            return self._await_reply(conn, request_id, definition, timeout)
        finally:
            self._lock.release()

    def owned_here(self) -> bool:
        """Whether this thread has submitted calls on the lane that are not settled yet."""
        return self._owner is threading.current_thread() and bool(self._table)

    def submit(
        self,
        request_id: int,
        definition: ProtocolDefinition | None,
        frames: Sequence[Buffer],
        timeout: float | None,
        on_done: Callable[[], None],
    ) -> LaneFuture[Any] | None:
        """Send a request now and return its :class:`LaneFuture`, or None.

        None (nothing was sent, ``on_done`` not called) when another thread owns the
        lane or holds it, the lane is not connected, or it could not take the message whole.
        ``on_done`` runs once the call leaves the lane's table, however it ends.
        """
        me = threading.current_thread()
        if not self._lock.acquire(blocking=self._owner is me and bool(self._table)):
            return None
        try:
            table = self._table
            if table and self._owner is not me:
                return None
            if self._send(frames) is None:
                return None
            future: LaneFuture[Any] = LaneFuture(self, request_id)
            table.add(request_id, future.sink, definition, timeout, time.monotonic(), on_done)
            self.stats.direct_calls += 1
            self._owner = me
            self._read_ready()  # replies that came meanwhile, for futures nobody polls
            return future
        finally:
            self._lock.release()

    def pump(self, future: LaneFuture[Any] | None, timeout: float | None) -> None:
        """Read the lane's replies until ``future`` is settled or ``timeout`` seconds pass.

        A ``timeout`` of 0 reads only what has arrived; None waits as long as it takes (the
        call's own deadline still settles it). With no ``future``, one read: a reply, or
        ``timeout`` (at most a slice of time) without one.
        """
        if future is None:
            with self._lock:
                wait = _READ_SLICE if timeout is None else timeout
                self._read_for(None, wait, wait=wait > 0)
            return
        if timeout == 0:  # one pass that never waits, not even for the lock
            if not future.settled() and self._lock.acquire(blocking=False):
                try:
                    self._read_for(future, 0.0, wait=False)
                finally:
                    self._lock.release()
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while not future.settled():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            if not self._lock.acquire(timeout=-1 if left is None else left):
                return
            try:
                self._read_for(future, _READ_SLICE if left is None else left, wait=True)
            finally:
                self._lock.release()

    def withdraw(self, request_id: int) -> None:
        """Forget a submitted call whose caller gave up on it; its reply will be late."""
        with self._lock:
            self._table.pop(request_id)

    def close(self) -> None:
        """Close the connection; calls take the loop path from now on.

        Submitted calls still pending fail with :class:`ClientClosed`.
        """
        with self._lock:
            self._closed = True
            self._drop()
            self._table.fail_all(ClientClosed(f"client for {self.url} is closed"))

    def _read_for(self, future: LaneFuture[Any] | None, left: float, wait: bool) -> None:
        # Holding the lock: expire what is due, then read one reply (waiting at most a slice,
        # the time left, or until the next deadline) and whatever else has arrived.
        table = self._table
        now = time.monotonic()
        table.expire(now)
        if (future is not None and future.settled()) or not table:
            return
        conn = self._conn
        if conn is None:
            table.fail_all(ConnectionLost(f"the lane's connection to {self.url} is gone"))
            return
        pause = 0.0
        if wait:
            pause = min(_READ_SLICE, left)
            due = table.next_deadline()
            if due is not None:
                pause = max(0.0, min(pause, due - now))
        try:
            frames = conn.recv(pause)
        except TimeoutError:
            table.expire(time.monotonic())
            return
        except ConnectionLost as exc:
            self._lost(str(exc))
            return
        table.receive(frames, self._options.max_message_size)
        self._read_ready()

    def _read_ready(self) -> None:
        # Holding the lock: settle every reply that has already arrived, without waiting.
        conn = self._conn
        table = self._table
        while conn is not None and table:
            try:
                frames = conn.recv(0)
            except TimeoutError:
                break
            except ConnectionLost as exc:
                self._lost(str(exc))
                break
            table.receive(frames, self._options.max_message_size)
            conn = self._conn

    def _send(self, frames: Sequence[Buffer]) -> BlockingClientTransport | None:
        # Holding the lock: connect if need be and send the message whole on the connection
        # returned, or drop it (failing the lane's submitted calls) and return None; then the
        # loop path takes the message and reports what it has to say about it.
        conn = self._connection()
        if conn is None:
            return None
        try:
            if conn.send(frames):
                return conn
        except TransportError:
            pass
        self._lost("the lane's connection could not take a request")
        return None

    def _lost(self, reason: str) -> None:
        # Holding the lock: the submitted calls' replies will never come on this connection.
        if self._conn is not None:
            self.stats.disconnects += 1
        self._drop()
        self._table.fail_all(ConnectionLost(f"connection to {self.url} lost: {reason}"))

    def _connection(self) -> BlockingClientTransport | None:
        if self._conn is not None or self._closed or not self._supported:
            return self._conn
        now = time.monotonic()
        if now < self._retry_at:
            return None
        try:
            conn = connect_blocking(self.url, self._options, self._connect_timeout)
        except TransportError:
            self._retry_at = now + self._retry_interval
            return None
        if conn is None:
            self._supported = False
        self._conn = conn
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            self._retry_at = time.monotonic() + self._retry_interval

    def _await_reply(
        self,
        conn: BlockingClientTransport,
        request_id: int,
        definition: ProtocolDefinition | None,
        timeout: float | None,
    ) -> Any:
        name = definition.name if definition is not None else "a request"
        deadline = None if timeout is None else time.monotonic() + timeout
        stats = self.stats
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                frames = conn.recv(left)
            except TimeoutError:
                stats.timeouts += 1
                # Its reply may still come: the next call here skips it as late.
                raise RequestTimeout(
                    f"{name} got no reply from {self.url} within {timeout}s"
                ) from None
            except ConnectionLost as exc:
                stats.disconnects += 1
                self._drop()
                raise ConnectionLost(f"connection to {self.url} lost: {exc}") from None
            message = read_reply(frames, self._options.max_message_size, self.url)
            if not isinstance(message, Message):
                stats.malformed += 1
                if message.error is not None and message.request_id is None:
                    self._drop()  # an auth server's answer to a lane without a token
                    raise message.error
                if message.error is not None and message.request_id == request_id:
                    raise message.error
                continue
            if message.kind is MessageKind.REQUEST:
                stats.malformed += 1
                continue
            if message.request_id != request_id:
                stats.late_replies += 1  # a reply to a call here that timed out
                continue
            stats.replies += 1
            stats.direct_calls += 1
            return outcome(message, definition, self._validate)


T = TypeVar("T")


class LaneFuture(MessagingFuture[T]):
    """The future of a call sent by :meth:`DirectLane.submit`: it reads its own reply.

    Waiting on it, or polling it with :meth:`done`, reads the lane's replies in the calling
    thread (see the module doc): any thread may, and no event loop is involved.
    """

    __slots__ = ("_lane", "_request_id", "sink")

    def __init__(self, lane: DirectLane, request_id: int) -> None:
        super().__init__()
        self._lane = lane
        self._request_id = request_id
        #: What the lane's call table resolves: it never reads the lane, as ``done`` does.
        self.sink = _Sink(self)

    def settled(self) -> bool:
        """True once resolved, without reading anything."""
        return self._future.done()

    def query(self) -> bool:
        """True once resolved; reads the replies that have arrived, never waits."""
        if not self._future.done():
            self._lane.pump(self, 0.0)
        return self._future.done()

    def done(self) -> bool:
        """Same as :meth:`query`."""
        return self.query()

    def wait(self, timeout: float | None = None) -> bool:
        """Read the lane's replies until this one is in or ``timeout`` passes; True if done."""
        self._lane.pump(self, timeout)
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        """The result, reading replies for up to ``timeout`` seconds (see :meth:`wait`).

        Raises ``TimeoutError`` if it is not in by then, and the call's error if it failed.
        """
        self._lane.pump(self, timeout)
        return self._future.result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The call's error, or None if it succeeded; waits like :meth:`result`."""
        self._lane.pump(self, timeout)
        return self._future.exception(0)

    def cancel(self) -> bool:
        """Stop waiting for the result; True if it was not done yet.

        The call leaves the lane's table at once, so its slot comes back now and its reply,
        should it still come, is skipped as late.
        """
        cancelled = self._future.cancel()
        if cancelled:
            self._lane.withdraw(self._request_id)
        return cancelled

    def __await__(self) -> Generator[Any, None, T]:
        # Nothing on the event loop reads the lane: a worker thread waits for the reply.
        return asyncio.get_running_loop().run_in_executor(None, self.result).__await__()

    def __repr__(self) -> str:
        return f"<LaneFuture {'done' if self._future.done() else 'pending'}>"


class _Sink:
    """A :class:`LaneFuture` as its lane's :class:`~kvrpc.calls.CallTable` sees it."""

    __slots__ = ("_future",)

    def __init__(self, future: LaneFuture[Any]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.settled()

    def set_result(self, value: Any, /) -> None:
        self._future.set_result(value)

    def set_exception(self, exc: BaseException, /) -> None:
        self._future.set_exception(exc)
