"""The conformance suite's streams: what every transport must carry for a streamed call.

:class:`StreamConformance` is a base of :class:`~kvrpc.testing.TransportConformance`, so
every transport runs these: items in order then the end, the error end, back-pressure from
a consumer that stops reading (others unaffected), cancellation from the consumer (the
producer's ``finally`` runs), the server's idle timeout, a server killed mid-stream, typed
items, and the blocking twins.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import signal

import anyio
import pytest

from kvrpc.client import SyncClient
from kvrpc.errors import ConnectionLost, PayloadValidationError, RequestTimeout, StreamIdle
from kvrpc.protocol import PING
from kvrpc.testing.suite_server import (
    BCOUNT,
    COUNT,
    FAIL_AFTER,
    LOSS_DEADLINE,
    TRICKLE,
    WRONG_ITEMS,
    StreamLog,
    TransportCase,
    client,
    serve_conformance,
    serving_child,
)
from kvrpc.testing.waiting import until

__all__ = ["StreamConformance"]

_tags = itertools.count(1)


class StreamConformance:
    """The stream half of the transport conformance suite (see the module doc)."""

    @pytest.mark.asyncio
    async def test_a_stream_delivers_every_item_in_order_then_ends(
        self, transport_case: TransportCase
    ) -> None:
        """Many credit rounds (a window of 16 for 5,000 items), from both generator kinds."""
        url = transport_case.make_url()
        async with serve_conformance(url), client(url) as c:
            for definition in (COUNT, BCOUNT):
                items = [x async for x in c.stream(definition, next(_tags), 5000, window=16)]
                assert items == list(range(5000))
            assert [x async for x in c.stream(COUNT, next(_tags), 0)] == []
            assert await c.call(PING) == "pong"  # the connection is still good

    @pytest.mark.asyncio
    async def test_a_sync_clients_stream_is_a_blocking_iterator(
        self, transport_case: TransportCase
    ) -> None:
        """``for item in sync_client.stream(...)``, from both generator kinds."""
        url = transport_case.make_url()
        async with serve_conformance(url):

            def read() -> tuple[list[int], list[int]]:
                with SyncClient(url, timeout=LOSS_DEADLINE) as sync:
                    first = list(sync.stream(COUNT, next(_tags), 1000, window=8))
                    with sync.stream(BCOUNT, next(_tags), 300) as stream:
                        second = list(stream)
                    return first, second

            first, second = await asyncio.to_thread(read)
        assert first == list(range(1000)) and second == list(range(300))

    @pytest.mark.asyncio
    async def test_a_failing_producer_ends_the_stream_with_its_error_after_its_items(
        self, transport_case: TransportCase
    ) -> None:
        """Every item made before the error arrives, then the error itself."""
        url = transport_case.make_url()
        async with serve_conformance(url), client(url) as c:
            got: list[int] = []
            with pytest.raises(Exception, match="failed after 300 items") as info:
                async for item in c.stream(FAIL_AFTER, 300, window=64):
                    got.append(item)
            assert got == list(range(300))
            assert type(info.value).__name__ == "RemoteError"

    @pytest.mark.asyncio
    async def test_items_that_fail_their_declared_type_fail_the_stream(
        self, transport_case: TransportCase
    ) -> None:
        """Items are checked like responses: a wrong one fails the stream, not the client."""
        url = transport_case.make_url()
        async with serve_conformance(url), client(url) as c:
            with pytest.raises(PayloadValidationError, match=r"conformance\.wrong_items item"):
                async for _ in c.stream(WRONG_ITEMS, 3):
                    pass
            assert await c.call(PING) == "pong"

    @pytest.mark.asyncio
    async def test_a_consumer_that_stops_reading_stops_the_producer_and_nobody_else(
        self, transport_case: TransportCase
    ) -> None:
        """The producer is asked for exactly the window's items; other clients stream on."""
        url = transport_case.make_url()
        log = StreamLog()
        stalled, window = next(_tags), 32
        async with serve_conformance(url, streams=log), client(url) as slow, client(url) as other:
            async with slow.stream(COUNT, stalled, 10**9, window=window) as stream:
                await log.until(lambda: log.pulled[stalled] >= window)
                # Another client, meanwhile, is served in full.
                tag = next(_tags)
                assert [x async for x in other.stream(COUNT, tag, 2000)] == list(range(2000))
                assert await other.call(PING) == "pong"
                # A round trip of the slow client's own: all it sent has been handled.
                assert await slow.call(PING) == "pong"
                assert log.pulled[stalled] == window
                # Reading half a window grants that much: the producer goes on by as much.
                taken = [await stream.__anext__() for _ in range(window // 2)]
                assert taken == list(range(window // 2))
                await log.until(lambda: log.pulled[stalled] >= window + window // 2)
                assert await slow.call(PING) == "pong"
                assert log.pulled[stalled] == window + window // 2
            await log.until(lambda: stalled in log.finished)

    @pytest.mark.asyncio
    async def test_cancelling_mid_stream_runs_the_producers_finally(
        self, transport_case: TransportCase
    ) -> None:
        """By ``aclose``, by leaving ``async with``, by dropping the iterator, by disconnecting."""
        url = transport_case.make_url()
        log = StreamLog()
        async with serve_conformance(url, streams=log) as server:
            async with client(url) as c:
                closed, left, dropped, blocking = (next(_tags) for _ in range(4))
                stream = c.stream(COUNT, closed, 10**9, window=8)
                assert [await stream.__anext__() for _ in range(20)] == list(range(20))
                await stream.aclose()
                await log.until(lambda: closed in log.finished)
                with pytest.raises(StopAsyncIteration):
                    await stream.__anext__()  # closed: it ends, nothing more comes

                async with c.stream(TRICKLE, left) as trickle:
                    assert await trickle.__anext__() == 0
                await log.until(lambda: left in log.finished)

                async for item in c.stream(COUNT, dropped, 10**9, window=8):
                    if item == 5:
                        break  # the iterator is dropped here, unclosed
                gc.collect()
                await log.until(lambda: dropped in log.finished)

                async for item in c.stream(BCOUNT, blocking, 10**9, window=8):
                    if item == 5:
                        break
                gc.collect()
                await log.until(lambda: blocking in log.finished)
                assert await c.call(PING) == "pong"

            async with client(url) as gone:
                tag = next(_tags)
                stream = gone.stream(TRICKLE, tag)
                assert await stream.__anext__() == 0
            # Its client closed with the stream open: the server stops it.
            await log.until(lambda: tag in log.finished)
            # The slot comes back after the finally: a counter, with no event to wait on.
            await until(lambda: server.stats.in_flight == 0, "the slot back", LOSS_DEADLINE)
            assert server.stats.streams_cancelled >= 5

    @pytest.mark.asyncio
    async def test_a_consumer_that_waits_past_its_timeout_gets_request_timeout(
        self, transport_case: TransportCase
    ) -> None:
        """And the stream is cancelled on the server, whose producer's finally runs."""
        url = transport_case.make_url()
        log = StreamLog()
        async with serve_conformance(url, streams=log), client(url) as c:
            tag = next(_tags)
            stream = c.stream(TRICKLE, tag, timeout=0.2)
            assert await stream.__anext__() == 0
            with pytest.raises(RequestTimeout, match=r"conformance\.trickle sent no item"):
                await stream.__anext__()
            await log.until(lambda: tag in log.finished)

    @pytest.mark.asyncio
    async def test_a_stream_its_consumer_leaves_unread_ends_with_stream_idle(
        self, transport_case: TransportCase
    ) -> None:
        """The items sent before the idle timeout come first, then ``StreamIdle``."""
        url = transport_case.make_url()
        log = StreamLog()
        async with serve_conformance(url, streams=log, stream_idle_timeout=0.2) as server:
            async with client(url) as c:
                tag = next(_tags)
                async with c.stream(COUNT, tag, 10**9, window=4) as stream:
                    await log.until(lambda: tag in log.finished)
                    got: list[int] = []
                    with pytest.raises(StreamIdle, match="granted no credit"):
                        async for item in stream:
                            got.append(item)
                    assert got == [0, 1, 2, 3]
            assert server.stats.handler_errors == 1

    @pytest.mark.asyncio
    async def test_a_server_closing_ends_its_streams_with_server_busy(
        self, transport_case: TransportCase
    ) -> None:
        """A stream that would never end by itself does not hold the shutdown."""
        url = transport_case.make_url()
        log = StreamLog()
        c = client(url, reconnect_timeout=0.2)
        try:
            async with serve_conformance(url, streams=log) as server:
                await c.connect()
                tag = next(_tags)
                stream = c.stream(TRICKLE, tag, timeout=None)
                assert await stream.__anext__() == 0
                assert server.stats.in_flight == 1
            assert tag in log.finished
            with pytest.raises(Exception, match="shutting down") as info:
                await stream.__anext__()
            assert type(info.value).__name__ == "ServerBusy"
        finally:
            await c.aclose()

    @pytest.mark.asyncio
    async def test_a_killed_server_fails_an_open_stream_with_connection_lost(
        self, transport_case: TransportCase
    ) -> None:
        """A SIGKILLed server's stream raises ConnectionLost promptly, not at a timeout."""
        url = transport_case.make_url()
        async with serving_child(url) as pid, client(url, reconnect_timeout=0.2) as c:
            stream = c.stream(TRICKLE, 1, timeout=None)  # only the server's loss ends it
            assert await stream.__anext__() == 0
            os.kill(pid, signal.SIGKILL)
            with anyio.fail_after(LOSS_DEADLINE), pytest.raises(ConnectionLost):
                await stream.__anext__()
