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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from kvrpc.calls import ClientStats, outcome, read_reply
from kvrpc.codec import Buffer, Message, MessageKind
from kvrpc.errors import ConnectionLost, RequestTimeout, TransportError
from kvrpc.protocol import ProtocolDefinition
from kvrpc.transport import BlockingClientTransport, TransportOptions, connect_blocking

__all__ = ["NOT_TAKEN", "DirectLane"]

#: What :meth:`DirectLane.call` returns when the caller must use the loop path instead.
NOT_TAKEN: Any = object()


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
        self._lock = threading.Lock()
        self._conn: BlockingClientTransport | None = None
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
            conn = self._connection()
            if conn is None:
                return NOT_TAKEN
            try:
                sent = conn.send(frames)
            except TransportError:  # the loop path reports what it says about this message
                sent = False
            if not sent:
                self._drop()
                return NOT_TAKEN
            self.stats.requests += 1
            return self._await_reply(conn, request_id, definition, timeout)
        finally:
            self._lock.release()

    def close(self) -> None:
        """Close the connection; calls take the loop path from now on."""
        with self._lock:
            self._closed = True
            self._drop()

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
