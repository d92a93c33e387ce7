"""The rules of a streamed call, without I/O: credits on the server, the window on the client.

A stream is one request id on which the server sends batches of items (docs/core.md,
"Streams"). Back-pressure is by credit: the client opens the stream granting ``window``
items and grants more as its consumer takes them; the server sends an item only against a
credit. So the items a stream holds anywhere (queued in the server, in flight, buffered in
the client) never exceed the window, whatever the consumer does.

:class:`ServerStream` is the server's side: the credit left, and the shell's hooks to wake
or stop the producer. :class:`ConsumerBuffer` is the client's side: the items received and
not yet taken, the end, and when to grant more. Both are plain objects driven by plain
calls (tests/test_streams.py); the shells (:mod:`kvrpc.stream_runner`,
:mod:`kvrpc.client_streams`) do the waiting and the sending.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Final

from kvrpc.transport import Peer

__all__ = ["DEFAULT_WINDOW", "EMPTY", "MAX_WINDOW", "ConsumerBuffer", "ServerStream"]

#: The items a client lets a stream hold unread unless told otherwise.
DEFAULT_WINDOW: Final = 256

#: The largest window a client may ask for, and the most credit a server ever holds for one
#: stream: a client granting more is clipped, so a stream's memory stays bounded.
MAX_WINDOW: Final = 65536


class _Empty:
    def __repr__(self) -> str:
        return "EMPTY"


#: What :meth:`ConsumerBuffer.take` returns when no item is there yet.
EMPTY: Final = _Empty()


def _nothing() -> None:
    return None


class ServerStream:
    """One open stream on the server: who it is for, its credit, and the shell's hooks.

    Credit is counted as two totals, ``granted`` (written on the loop, where credits
    arrive) and ``sent`` (written by the producer, which for a BLOCKING generator is a
    pool thread): each has one writer, so no lock is needed to keep them right, and
    ``available`` is their difference.
    """

    __slots__ = ("cancelled", "granted", "peer", "request_id", "sent", "stop", "wake")

    def __init__(self, peer: Peer, request_id: int, credits: int) -> None:
        self.peer = peer
        self.request_id = request_id
        self.granted = min(credits, MAX_WINDOW)
        self.sent = 0
        self.cancelled = False
        #: Set by the shell: called when credit arrives for a producer that had none.
        self.wake: Callable[[], None] = _nothing
        #: Set by the shell: called once when the stream is cancelled.
        self.stop: Callable[[], None] = _nothing

    @property
    def available(self) -> int:
        """Items the producer may send now."""
        return self.granted - self.sent

    def grant(self, credits: int) -> bool:
        """The client grants ``credits`` more; True if the producer was out of credit.

        The credit held is clipped to :data:`MAX_WINDOW`.
        """
        was_empty = self.granted <= self.sent
        self.granted = min(self.granted + credits, self.sent + MAX_WINDOW)
        return was_empty and self.granted > self.sent

    def took(self, items: int = 1) -> None:
        """The producer sent ``items`` against its credit."""
        self.sent += items

    def cancel(self) -> bool:
        """Mark the stream cancelled; True the first time (the shell then stops it)."""
        if self.cancelled:
            return False
        self.cancelled = True
        return True


class ConsumerBuffer:
    """The client's side of one stream: items received, the end, and credit to grant.

    The consumer has granted ``granted`` items in all (``window`` when it opened), received
    ``received`` and taken ``taken``. It grants again once it has taken half a window
    since its last grant, as much as it took, so ``granted - taken`` never exceeds the
    window and neither do the items buffered here. A server that sends beyond its credit
    breaks the protocol: :meth:`push` refuses the batch.
    """

    __slots__ = ("_end", "_ended", "_items", "_taken_since_grant", "granted", "received", "window")

    def __init__(self, window: int) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"a stream's window is 1-{MAX_WINDOW} items, not {window}")
        self.window = window
        self.granted = window
        self.received = 0
        self._items: deque[Any] = deque()
        self._taken_since_grant = 0
        self._ended = False
        self._end: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def ended(self) -> bool:
        """True once the end (or an error) arrived or was decided here."""
        return self._ended

    def push(self, items: list[Any]) -> bool:
        """A batch arrived; False (and nothing kept) if it goes beyond the credit granted."""
        if self._ended:
            return True  # items after a local end (a timeout, a cancel) are dropped
        if self.received + len(items) > self.granted:
            return False
        self.received += len(items)
        self._items.extend(items)
        return True

    def finish(self, error: BaseException | None = None) -> bool:
        """The stream ended: cleanly (``error`` None) or with ``error``; False if it had."""
        if self._ended:
            return False
        self._ended = True
        self._end = error
        return True

    def close(self) -> bool:
        """The consumer stops reading: the items buffered are dropped, and it ends cleanly.

        False if it had ended already (its end then stays, but its items still go).
        """
        self._items.clear()
        return self.finish()

    def take(self) -> Any:
        """The next item, or :data:`EMPTY` while none is there and the stream goes on.

        At the end, raises ``StopIteration`` for a clean end, or the stream's error; the
        items that arrived before the end are taken first.
        """
        items = self._items
        if items:
            self._taken_since_grant += 1
            return items.popleft()
        if not self._ended:
            return EMPTY
        if self._end is not None:
            raise self._end
        raise StopIteration

    def take_would_wait(self) -> bool:
        """True while :meth:`take` would return :data:`EMPTY`."""
        return not self._items and not self._ended

    def credit_due(self) -> int:
        """Credit to grant now (0: none yet); the caller sends it."""
        taken = self._taken_since_grant
        if self._ended or taken * 2 < self.window:
            return 0
        self._taken_since_grant = 0
        self.granted += taken
        return taken
