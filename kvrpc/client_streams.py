"""The client's shells for streams: an async iterator and a blocking one.

Both hold a :class:`~kvrpc.streams.ConsumerBuffer` (the rules: what arrived, what to grant)
and are the call table's sink for their stream: the loop thread pushes items and the end
into them. :class:`Stream` is read with ``async for`` on the client's loop;
:class:`SyncStream` with ``for`` from any thread but the client's own. Either stops its
stream on the server when closed before the end (``async with`` / ``with``, ``aclose()`` /
``close()``, or dropped unread), and raises :class:`~kvrpc.errors.RequestTimeout` when its
consumer waits longer than ``timeout`` for the next item.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from contextlib import suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kvrpc.errors import RequestTimeout
from kvrpc.streams import EMPTY, ConsumerBuffer

if TYPE_CHECKING:
    from kvrpc.client import AsyncClient, ProtocolRef

__all__ = ["Stream", "SyncSink", "SyncStream"]


def _timed_out(name: str, url: str, timeout: float) -> RequestTimeout:
    return RequestTimeout(f"{name} sent no item from {url} within {timeout}s")


class _AsyncSink:
    """The call table's side of a :class:`Stream`: the buffer and its waiter, on the loop.

    Apart from the :class:`Stream` so that the table does not keep a dropped stream alive:
    dropping it unread is how a ``break`` out of ``async for`` cancels it.
    """

    __slots__ = ("buffer", "waiter")

    def __init__(self, window: int) -> None:
        self.buffer = ConsumerBuffer(window)
        self.waiter: asyncio.Future[None] | None = None

    def done(self) -> bool:
        """True once the stream ended (here or on the server)."""
        return self.buffer.ended

    def push(self, items: list[Any]) -> bool:
        """Items arrived (see :class:`~kvrpc.calls.StreamSink`)."""
        accepted = self.buffer.push(items)
        self._wake()
        return accepted

    def set_result(self, value: Any) -> None:
        """The server ended the stream."""
        self.buffer.finish()
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        """The stream failed: the server's error, a lost connection, a bad item."""
        self.buffer.finish(exc)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Stream:
    """The items of one streamed call, for ``async for``; made by :meth:`AsyncClient.stream`.

    The request is sent when iteration (or ``async with``) begins. Not thread-safe: use it
    on the client's loop.
    """

    def __init__(
        self,
        client: AsyncClient,
        protocol: ProtocolRef,
        payload: tuple[Any, ...],
        window: int,
        timeout: float | None,
    ) -> None:
        self._client = client
        self._protocol = protocol
        self._payload = payload
        self._timeout = timeout
        self._sink = _AsyncSink(window)
        self._request_id: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def name(self) -> str:
        """The protocol's name."""
        protocol = self._protocol
        return protocol if isinstance(protocol, str) else protocol.name

    async def _open(self) -> int:
        if self._request_id is None:
            self._loop = asyncio.get_running_loop()
            self._request_id = await self._client.open_stream(
                self._sink, self._protocol, self._payload, self._sink.buffer.window
            )
        return self._request_id

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        request_id = await self._open()
        sink = self._sink
        buffer = sink.buffer
        while True:
            try:
                item = buffer.take()
            except StopIteration:
                raise StopAsyncIteration from None
            if item is not EMPTY:
                due = buffer.credit_due()
                if due:
                    self._client.grant(request_id, due)
                return item
            assert self._loop is not None
            waiter = sink.waiter = self._loop.create_future()
            if self._timeout is None:
                await waiter
                continue
            try:
                async with asyncio.timeout(self._timeout):
                    await waiter
            except TimeoutError:
                if buffer.take_would_wait():
                    error = _timed_out(self.name, self._client.url, self._timeout)
                    self._stop(error)
                    raise error from None

    async def aclose(self) -> None:
        """Stop reading: the server stops the stream and runs its producer's ``finally``."""
        self._stop(None)

    def _stop(self, error: BaseException | None) -> None:
        buffer = self._sink.buffer
        ended = buffer.finish(error) if error is not None else buffer.close()
        if ended and self._request_id is not None:
            self._client.cancel_stream(self._request_id)

    async def __aenter__(self) -> Stream:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop(None)

    def __del__(self) -> None:
        # Dropped unread (a ``break`` out of ``async for``): the server must stop producing.
        loop, request_id = self._loop, self._request_id
        if loop is not None and request_id is not None and self._sink.buffer.close():
            with suppress(RuntimeError):  # the loop is closed: so is the connection
                loop.call_soon_threadsafe(self._client.cancel_stream, request_id)


class SyncSink:
    """The call table's side of a :class:`SyncStream`: its buffer under a condition.

    Written on the client's loop thread, read by the consumer's; apart from the stream for
    the reason given at :class:`_AsyncSink`.
    """

    __slots__ = ("buffer", "cond")

    def __init__(self, window: int) -> None:
        self.buffer = ConsumerBuffer(window)
        self.cond = threading.Condition()

    def done(self) -> bool:
        """True once the stream ended (here or on the server)."""
        with self.cond:
            return self.buffer.ended

    def push(self, items: list[Any]) -> bool:
        """Items arrived (on the loop thread)."""
        with self.cond:
            accepted = self.buffer.push(items)
            self.cond.notify()
        return accepted

    def set_result(self, value: Any) -> None:
        """The server ended the stream."""
        with self.cond:
            self.buffer.finish()
            self.cond.notify()

    def set_exception(self, exc: BaseException) -> None:
        """The stream failed."""
        with self.cond:
            self.buffer.finish(exc)
            self.cond.notify()


class SyncStream:
    """The items of one streamed call, for ``for``; made by :meth:`SyncClient.stream`.

    Safe to read from one thread at a time, any but the client's own loop thread.
    """

    def __init__(
        self,
        client: AsyncClient,
        loop: asyncio.AbstractEventLoop,
        request_id: int,
        name: str,
        sink: SyncSink,
        timeout: float | None,
    ) -> None:
        self._client = client
        self._loop = loop
        self._request_id = request_id
        self._name = name
        self._timeout = timeout
        self._sink = sink

    def __iter__(self) -> SyncStream:
        return self

    def __next__(self) -> Any:
        sink = self._sink
        buffer = sink.buffer
        with sink.cond:
            while True:
                item = buffer.take()  # StopIteration, or the stream's error, at the end
                if item is not EMPTY:
                    due = buffer.credit_due()
                    break
                if not sink.cond.wait(self._timeout) and buffer.take_would_wait():
                    assert self._timeout is not None
                    error = _timed_out(self._name, self._client.url, self._timeout)
                    self._stop(error)
                    raise error
        if due:
            self._call_on_loop(self._client.grant, self._request_id, due)
        return item

    def close(self) -> None:
        """Stop reading: the server stops the stream and runs its producer's ``finally``.

        A thread blocked in ``next`` on this stream wakes and sees it end.
        """
        with self._sink.cond:
            self._stop(None)
            self._sink.cond.notify_all()

    def _stop(self, error: BaseException | None) -> None:
        # Holding the condition.
        buffer = self._sink.buffer
        if buffer.finish(error) if error is not None else buffer.close():
            self._call_on_loop(self._client.cancel_stream, self._request_id)

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        with suppress(RuntimeError):  # the client was closed: its streams ended with it
            self._loop.call_soon_threadsafe(fn, *args)

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
