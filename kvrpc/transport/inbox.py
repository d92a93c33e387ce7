"""The core's one bounded inbox: where server transports push what they read.

A transport calls :meth:`Inbox.deliver` for each message from its read callback and
:meth:`Inbox.read_done` at the end of that callback. The inbox either hands the message to
its handler at once (the fast path: a ping is answered inside the read callback, with no task
and no further loop turn) or queues it, and it owns the one rule about reading:

- A peer's messages are handled in the order they came. Once one of a peer's messages is
  queued, the peer's later messages queue behind it.
- At most ``burst`` messages, and at most ``burst_bytes`` bytes, of one read are handled
  straight from it; the rest queue, and the queue is worked off one loop turn at a time,
  within the same two bounds per turn, taking one message from each peer in turn. A peer
  that sends thousands of requests in one write then delays another peer's request by at
  most one of its own, not by all of them, and the loop's other work (timers, finished
  runs, other sockets) gets a turn between bursts.
- The byte bound is what keeps large messages fair: handling a message costs about its
  size (decoding, copying, the reply), so 64 small calls go at once while 64 KiB requests
  go a few at a time. A message is handled in a read or turn only if it fits what is left
  of ``burst_bytes``, except the first of the read or turn, which is always handled: a
  message larger than the whole budget is handled alone, never starved. A message's size
  is the sum of ``len()`` of its frames, as the transport delivered them (bytes, or
  byte-format buffers), so measuring it copies and decodes nothing.
- While ``limit`` messages or more are queued, the transport is told to pause reading (the
  kernel's socket buffers, then the senders, wait); below half of it, to resume. The inbox's
  memory is bounded by ``limit`` messages plus what one read delivers.

Without a handler the inbox is a queue for :meth:`Inbox.recv` (tests and tools that read a
transport by hand), with the same bound and the same round-robin order.

:class:`ClientInbox` is the client side's counterpart for code that reads a client transport
by hand; :class:`~kvrpc.client.AsyncClient` is its own sink.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

from kvrpc.codec import Buffer
from kvrpc.errors import ConnectionLost
from kvrpc.transport.interface import Peer

__all__ = ["ClientInbox", "Inbox", "ReadControl"]

logger = logging.getLogger(__name__)

_LOST: Final = object()  # queued after a lost peer's last message, so the loss keeps its place


class ReadControl(Protocol):
    """The part of a server transport the inbox drives: reading on and off."""

    def pause_reading(self) -> None:
        """Stop reading from every connection; idempotent."""

    def resume_reading(self) -> None:
        """Read again; idempotent."""


class Inbox:
    """A :class:`~kvrpc.transport.ServerSink` in front of ``handler``, bounded by ``limit``.

    ``handler(peer, frames)`` handles one message and must not block; ``on_peer_lost(peer)``
    is told of a lost peer after that peer's queued messages. Both run on the loop's thread,
    and an exception from either is logged, never raised into the transport. Call
    :meth:`bind` with the transport before it starts delivering. ``burst`` and
    ``burst_bytes`` bound what one read, and one loop turn of the queue, handles (None for
    ``burst_bytes``: the count alone; the server passes ``ServerConfig.inbox_burst_bytes``).
    ``schedule(fn)`` runs ``fn`` in a later loop turn (the running loop's ``call_soon`` by
    default). See the module docstring for the rules.
    """

    def __init__(
        self,
        handler: Callable[[Peer, list[Buffer]], None] | None = None,
        on_peer_lost: Callable[[Peer], None] | None = None,
        *,
        limit: int = 1024,
        burst: int = 64,
        burst_bytes: int | None = None,
        schedule: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        if limit < 2 or burst < 1:
            raise ValueError(f"need limit >= 2 and burst >= 1, not {limit} and {burst}")
        if burst_bytes is not None and burst_bytes < 1:
            raise ValueError(f"need burst_bytes >= 1 (or None), not {burst_bytes}")
        self.limit = limit
        self.burst = burst
        #: Bytes of messages handled at most per read or turn (None: bounded by count only).
        self.burst_bytes = burst_bytes
        # The same bound as a plain int for the hot path: no None test per message.
        self._budget = burst_bytes if burst_bytes is not None else sys.maxsize
        self._handler = handler
        self._on_peer_lost = on_peer_lost
        self._control: ReadControl | None = None
        self._queues: dict[Peer, deque[object]] = {}
        self._turns: deque[Peer] = deque()  # peers with something queued, in serving order
        self._queued = 0
        self._this_read = 0  # messages handled straight from the current read
        self._this_read_bytes = 0  # and their bytes
        self._paused = False
        self._pump_scheduled = False
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        # Runs the pump in the next loop turn; injectable so the rules test without a loop.
        self._schedule = schedule
        #: Times reading was paused because the inbox was full.
        self.pauses = 0

    def bind(self, control: ReadControl) -> None:
        """Drive ``control``'s reading (the transport this inbox is the sink of)."""
        self._control = control

    @property
    def queued(self) -> int:
        """Messages (and peer losses) waiting to be handled."""
        return self._queued

    @property
    def paused(self) -> bool:
        """Whether the inbox has asked its transport to stop reading."""
        return self._paused

    # -------------------------------------------------------------- the sink

    def deliver(self, peer: Peer, frames: list[Buffer]) -> None:
        """One message from ``peer``: handled now, or queued behind what came first."""
        if self._closed:
            return
        handler = self._handler
        if handler is not None and self._this_read < self.burst and peer not in self._queues:
            size = sum(map(len, frames))
            spent = self._this_read_bytes
            if not self._this_read or spent + size <= self._budget:
                self._this_read += 1
                self._this_read_bytes = spent + size
                self._call(handler, peer, frames)
                return
        self._enqueue(peer, frames)

    def peer_lost(self, peer: Peer) -> None:
        """``peer``'s connection ended: tell ``on_peer_lost`` after its queued messages."""
        if self._closed:
            return
        if peer in self._queues:
            self._enqueue(peer, _LOST)
        else:
            self._report_lost(peer)

    def read_done(self) -> None:
        """The transport's read callback has delivered all it read: a new read may burst."""
        self._this_read = 0
        self._this_read_bytes = 0

    def close(self) -> None:
        """Drop what is queued and take nothing more; a waiting :meth:`recv` raises."""
        self._closed = True
        self._queues.clear()
        self._turns.clear()
        self._queued = 0
        self._wake()

    # -------------------------------------------------------------- reading by hand

    async def recv(self) -> tuple[Peer, list[Buffer]]:
        """The next queued message (only without a handler); ConnectionLost once closed."""
        if self._handler is not None:
            raise RuntimeError("this inbox hands its messages to a handler")
        while True:
            while not self._queued:
                if self._closed:
                    raise ConnectionLost("the inbox is closed")
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            peer, item = self._next()
            if item is _LOST:
                self._report_lost(peer)
                continue
            self._loss_is_next(peer)
            assert isinstance(item, list)
            return peer, item

    def _loss_is_next(self, peer: Peer) -> None:
        """Report ``peer``'s loss now if only the loss is left of it, not in a later turn."""
        queue = self._queues.get(peer)
        if queue is not None and len(queue) == 1 and queue[0] is _LOST:
            del self._queues[peer]
            self._turns.remove(peer)
            self._queued -= 1
            self._report_lost(peer)

    def _report_lost(self, peer: Peer) -> None:
        if self._on_peer_lost is not None:
            self._call(self._on_peer_lost, peer)

    # -------------------------------------------------------------- the queue

    def _enqueue(self, peer: Peer, item: object) -> None:
        queue = self._queues.get(peer)
        if queue is None:
            queue = self._queues[peer] = deque()
            self._turns.append(peer)
        queue.append(item)
        self._queued += 1
        if self._queued >= self.limit and not self._paused and self._control is not None:
            self._paused = True
            self.pauses += 1
            self._control.pause_reading()
        if self._handler is None:
            self._wake()
        elif not self._pump_scheduled:
            self._pump_scheduled = True
            if self._schedule is None:
                self._schedule = asyncio.get_running_loop().call_soon
            self._schedule(self._pump)

    def _next(self) -> tuple[Peer, object]:
        """Take one item from the peer whose turn it is; the peer goes to the back."""
        peer = self._turns.popleft()
        queue = self._queues[peer]
        item = queue.popleft()
        if queue:
            self._turns.append(peer)
        else:
            del self._queues[peer]
        self._queued -= 1
        if self._paused and self._queued <= self.limit // 2 and self._control is not None:
            self._paused = False
            self._control.resume_reading()
        return peer, item

    def _pump(self) -> None:
        """Handle a burst of queued items, one per peer in turn; again next turn if more.

        A burst is what a read may handle: up to ``burst`` items and ``burst_bytes`` bytes,
        the first item always. An item that does not fit ends the turn and opens the next.
        """
        self._pump_scheduled = False
        handler = self._handler
        assert handler is not None
        budget = self._budget
        spent = 0
        for taken in range(self.burst):
            if not self._queued or self._closed:
                return
            head = self._queues[self._turns[0]][0]
            size = sum(map(len, head)) if isinstance(head, list) else 0  # a loss costs nothing
            if taken and spent + size > budget:
                break
            spent += size
            peer, item = self._next()
            if item is _LOST:
                self._report_lost(peer)
            else:
                assert isinstance(item, list)
                self._call(handler, peer, item)
                self._loss_is_next(peer)
        if self._queued and not self._closed:
            self._pump_scheduled = True
            assert self._schedule is not None
            self._schedule(self._pump)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @staticmethod
    def _call(fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:  # the core's bug must not stop the transport's read callback
            logger.exception("inbox handler failed")


class ClientInbox:
    """A :class:`~kvrpc.transport.ClientSink` that queues messages for :meth:`recv`.

    For tests and tools that drive a client transport by hand: a lost connection comes out
    of :meth:`recv` as :class:`ConnectionLost`, once, in its place among the messages. With
    a ``limit`` (and :meth:`bind`), the transport is paused while that many messages wait
    and resumed at half of it, so a reader that stops reading is one, as the server sees it.
    """

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and limit < 2:
            raise ValueError(f"need limit >= 2, not {limit}")
        self.limit = limit
        self._items: deque[list[Buffer] | ConnectionLost] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._control: ReadControl | None = None
        self._paused = False
        #: Connections reported lost so far.
        self.losses = 0

    def bind(self, control: ReadControl) -> None:
        """Drive ``control``'s reading (the transport this inbox is the sink of)."""
        self._control = control

    @property
    def paused(self) -> bool:
        """Whether the inbox has asked its transport to stop reading."""
        return self._paused

    def deliver(self, frames: list[Buffer]) -> None:
        """Queue one message."""
        self._items.append(frames)
        limit = self.limit
        control = self._control
        if limit is not None and len(self._items) >= limit and not self._paused and control:
            self._paused = True
            control.pause_reading()
        self._wake()

    def connection_lost(self, reason: str) -> None:
        """Queue the loss, to be raised by :meth:`recv` in its turn."""
        self.losses += 1
        self._items.append(ConnectionLost(f"connection lost: {reason}"))
        self._wake()

    async def recv(self, timeout: float | None = None) -> list[Buffer]:
        """The next message; raises ConnectionLost for a loss, TimeoutError after ``timeout``."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            finally:
                self._waiter = None
        item = self._items.popleft()
        limit = self.limit
        if self._paused and limit is not None and len(self._items) <= limit // 2:
            self._paused = False
            assert self._control is not None
            self._control.resume_reading()
        if isinstance(item, ConnectionLost):
            raise item
        return item

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
