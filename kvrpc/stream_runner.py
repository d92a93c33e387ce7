"""The server's shell for streams: drive a handler's generator against its credit.

A streamed handler is an async generator (run in a task on the loop) or a plain generator
(a BLOCKING protocol: run in one thread of the pool for the stream's whole life). Either
way the producer is asked for an item only while the stream has credit
(:class:`~kvrpc.streams.ServerStream`); out of credit it waits, up to the server's
``stream_idle_timeout``, and the stream then ends with :class:`~kvrpc.errors.StreamIdle`.

Items are sent in batches, one ITEMS message each: an item joins the current batch, which
is sent at the end of the loop turn (or sooner, once it holds :data:`MAX_BATCH` items or
the credit runs out). A producer that yields many items without waiting for anything thus
sends few messages, and one that waits between items sends each as soon as it waits, so a
batch costs no latency.

The producer's ``finally`` runs however the stream ends: at its end, on an error, when the
client cancels or is lost, at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Final

import anyio

from kvrpc.dispatch import Dispatcher, Finished, RunStream, RunStreamInPool
from kvrpc.errors import ServerBusy, StreamIdle
from kvrpc.replies import Replies
from kvrpc.streams import ServerStream
from kvrpc.transport import Peer

__all__ = ["MAX_BATCH", "StreamRunner"]

logger = logging.getLogger("kvrpc.server")

#: The most items one ITEMS message carries.
MAX_BATCH: Final = 128

# How long a producer's own ``finally`` may await after its stream was stopped, so that a
# finally that never returns cannot hold a shutdown.
_FINALLY_GRACE: Final = 1.0

_ENDED: Final = "ended"
_CANCELLED: Final = "cancelled"


class StreamRunner:
    """Runs the streams the Dispatcher opens; ``on_finished`` gets each run's outcome."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        replies: Replies,
        idle_timeout: float,
        on_finished: Callable[[Finished], None],
    ) -> None:
        self._dispatcher = dispatcher
        self._replies = replies
        self._idle_timeout = idle_timeout
        self._on_finished = on_finished

    # ------------------------------------------------------------------ shutdown

    def end_all(self) -> None:
        """Shutdown: end every open stream with ``ServerBusy`` and stop its producer."""
        error = ServerBusy("server is shutting down: the stream was ended")
        for stream in self._dispatcher.open_streams():
            if stream.cancel():
                self._replies.error(stream.peer, stream.request_id, error)
                stream.stop()

    # ------------------------------------------------------------------ async generators

    async def run(self, run: RunStream) -> None:
        """Drive an async generator handler until it ends, fails, or is stopped."""
        stream = run.stream
        batch = _Batch(self._replies, run.peer, run.request_id)
        credit = asyncio.Event()
        stream.wake = credit.set
        gen = None
        error: BaseException | None = None
        status = _CANCELLED
        try:
            with anyio.CancelScope() as scope:
                stream.stop = batch.on_failure = scope.cancel
                if stream.cancelled:  # its client was lost before it started
                    scope.cancel()
                try:
                    gen = run.fn(*run.args)
                    while True:
                        if stream.granted <= stream.sent:
                            batch.flush()
                            await self._wait_for_credit(stream, credit)
                        try:
                            item = await gen.__anext__()
                        except StopAsyncIteration:
                            break
                        stream.took()
                        batch.add(item)
                    batch.flush()
                    status = _ENDED
                except Exception as exc:
                    error = exc
                    # The items made before the error go out before it does.
                    with contextlib.suppress(Exception):
                        batch.flush()
        except BaseException:  # the whole server is cancelled: the slot still goes back
            stream.cancel()
            raise
        finally:
            batch.close()
            if gen is not None:
                # Shielded: the producer's finally runs even when the server is cancelled.
                with anyio.move_on_after(_FINALLY_GRACE, shield=True):
                    await gen.aclose()
            self._finish(run, status, batch.failed or error)

    async def _wait_for_credit(self, stream: ServerStream, credit: asyncio.Event) -> None:
        try:
            with anyio.fail_after(self._idle_timeout):
                while stream.granted <= stream.sent:
                    credit.clear()
                    await credit.wait()
        except TimeoutError:
            raise _idle(self._idle_timeout) from None

    # ------------------------------------------------------------------ blocking generators

    async def run_in_pool(self, run: RunStreamInPool, executor: Executor) -> None:
        """Drive a plain generator handler in one thread of ``executor``."""
        stream = run.stream
        loop = asyncio.get_running_loop()
        feed = _ThreadFeed(self._replies, run.peer, run.request_id, loop, stream)
        stream.wake = stream.stop = feed.notify
        produce = functools.partial(
            contextvars.copy_context().run, self._produce, run, feed, self._idle_timeout
        )
        error: BaseException | None = None
        status = _CANCELLED
        try:
            status = await loop.run_in_executor(executor, produce)
            # Items the thread handed over before it returned go out before the end does.
            feed.hand_over()
        except Exception as exc:
            error = exc
        except BaseException:  # the server is cancelled: the thread stops at its next item
            stream.cancel()
            feed.notify()
            raise
        finally:
            self._finish(run, status, feed.failed or error)

    @staticmethod
    def _produce(run: RunStreamInPool, feed: _ThreadFeed, idle_timeout: float) -> str:
        # In the pool thread. The credit check comes before each ``next``: a consumer that
        # reads nothing stops the generator itself, not only the sending.
        stream = run.stream
        gen = run.fn(*run.args)
        try:
            while True:
                if not feed.wait_for_credit(idle_timeout):
                    raise _idle(idle_timeout)
                if stream.cancelled:
                    return _CANCELLED
                try:
                    item = next(gen)
                except StopIteration:
                    return _ENDED
                stream.took()
                feed.put(item)
        finally:
            gen.close()

    # ------------------------------------------------------------------ the end

    def _finish(
        self, run: RunStream | RunStreamInPool, status: str, error: BaseException | None
    ) -> None:
        stream = run.stream
        outcome = self._dispatcher.finished(run, failed=error is not None and not stream.cancelled)
        if outcome.deliver and not stream.cancelled:
            # A cancelled stream's client has forgotten it, or was told at shutdown.
            if error is not None:
                self._replies.error(run.peer, run.request_id, error)
            elif status == _ENDED:
                self._replies.result(run.peer, run.request_id, None)
        self._on_finished(outcome)


def _idle(timeout: float) -> StreamIdle:
    return StreamIdle(f"the stream's consumer granted no credit within {timeout}s")


class _Batch:
    """The items of one stream waiting to go out, sent as one message at the turn's end."""

    __slots__ = (
        "_handle",
        "_items",
        "_loop",
        "_peer",
        "_replies",
        "_request_id",
        "failed",
        "on_failure",
    )

    def __init__(self, replies: Replies, peer: Peer, request_id: int) -> None:
        self._replies = replies
        self._peer = peer
        self._request_id = request_id
        self._items: list[Any] = []
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.Handle | None = None
        #: Why a send failed (an item with no wire form, say); the stream then ends with it.
        self.failed: BaseException | None = None
        self.on_failure: Callable[[], None] = _nothing

    def add(self, item: Any) -> None:
        self._items.append(item)
        if len(self._items) >= MAX_BATCH:
            self.flush()
        elif self._handle is None:
            self._handle = self._loop.call_soon(self._at_turn_end)

    def _at_turn_end(self) -> None:
        self._handle = None
        try:
            self.flush()
        except Exception as exc:  # from outside the producer: it is stopped and told
            self.failed = exc
            self.on_failure()

    def close(self) -> None:
        """Send nothing more: the stream is over."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._items = []

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        items = self._items
        if items:
            self._items = []
            self._replies.items(self._peer, self._request_id, items)


class _ThreadFeed:
    """Between a pool thread's generator and the loop: items handed over, credit waited on."""

    def __init__(
        self,
        replies: Replies,
        peer: Peer,
        request_id: int,
        loop: asyncio.AbstractEventLoop,
        stream: ServerStream,
    ) -> None:
        self._replies = replies
        self._peer = peer
        self._request_id = request_id
        self._loop = loop
        self._stream = stream
        self._cond = threading.Condition()
        self._items: deque[Any] = deque()
        self._wake_pending = False
        self.failed: BaseException | None = None

    def notify(self) -> None:
        """On the loop: credit came, or the stream was cancelled."""
        with self._cond:
            self._cond.notify()

    def wait_for_credit(self, timeout: float) -> bool:
        """In the thread: True once there is credit (or the stream is over), False on idle."""
        stream = self._stream
        deadline = time.monotonic() + timeout
        with self._cond:
            while stream.granted <= stream.sent and not stream.cancelled and self.failed is None:
                left = deadline - time.monotonic()
                timed_out = left <= 0 or not self._cond.wait(left)
                if timed_out and stream.granted <= stream.sent and not stream.cancelled:
                    return False
        if self.failed is not None:
            raise self.failed
        return True

    def put(self, item: Any) -> None:
        """In the thread: hand one item to the loop, with one wake-up per batch."""
        with self._cond:
            self._items.append(item)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._loop.call_soon_threadsafe(self._hand_over_quietly)

    def _hand_over_quietly(self) -> None:
        try:
            self.hand_over()
        except Exception as exc:
            with self._cond:
                self.failed = exc
                self._cond.notify()

    def hand_over(self) -> None:
        """On the loop: send what the thread put, in batches of :data:`MAX_BATCH`."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._wake_pending = False
        for start in range(0, len(items), MAX_BATCH):
            self._replies.items(self._peer, self._request_id, items[start : start + MAX_BATCH])


def _nothing() -> None:
    return None
