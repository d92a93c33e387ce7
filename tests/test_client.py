"""AsyncClient and SyncClient: results, errors, timeouts, lost connections, threads."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvrpc import (
    AsyncClient,
    ClientClosed,
    ConnectionLost,
    MessagingFuture,
    PayloadValidationError,
    ProtocolDefinition,
    RequestTimeout,
    RPCServer,
    SyncClient,
    TransportError,
    codec,
)
from kvrpc.codec import MessageKind
from kvrpc.errors import VersionMismatch
from kvrpc.testing.raw import RawServer
from kvrpc.testing.waiting import until

ADD = ProtocolDefinition("calc.add", (int, int), int)
LIAR = ProtocolDefinition("calc.liar", (), int)  # declares int, returns a str
HELD = ProtocolDefinition("calc.held", (int,), int)  # returns its tag once released: Gates

WAIT = 10.0  # seconds: only a failing test waits this long


class Gates:
    """The HELD handlers of one server: ``HELD(tag)`` runs until the test releases ``tag``.

    So a test decides when a reply may come, and knows when a call runs on the server,
    instead of pausing for long enough. ``running`` lists the tags started, in order.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.running: list[int] = []
        self._loop = loop
        self._gates: dict[int, asyncio.Event] = {}  # on the server's loop only
        self._changed = asyncio.Event()

    async def held(self, tag: int) -> int:
        self.running.append(tag)
        self._changed.set()
        await self._gate(tag).wait()
        return tag

    def release(self, *tags: int) -> None:
        """Let ``HELD(tag)`` return, now or when it comes, for each tag; from any thread."""
        for tag in tags:
            self._loop.call_soon_threadsafe(lambda tag=tag: self._gate(tag).set())

    async def started(self, count: int) -> None:
        """Wait, on the server's loop, until ``count`` HELD calls have begun running."""
        async with asyncio.timeout(WAIT):
            while len(self.running) < count:
                self._changed.clear()
                await self._changed.wait()

    def _gate(self, tag: int) -> asyncio.Event:
        return self._gates.setdefault(tag, asyncio.Event())


_gates: weakref.WeakKeyDictionary[RPCServer, Gates] = weakref.WeakKeyDictionary()


def gates(server: RPCServer) -> Gates:
    """The :class:`Gates` that :func:`install` gave ``server``."""
    return _gates[server]


def install(server: RPCServer) -> Gates:
    """Register the test protocols; call it on the server's loop."""
    server.register(ADD, lambda a, b: a + b)
    server.register(LIAR, lambda: "not an int")
    held = _gates[server] = Gates(asyncio.get_running_loop())
    server.register(HELD, held.held)
    return held


# ----------------------------------------------------------------------------- AsyncClient


async def test_submit_keeps_many_calls_in_flight_and_matches_replies(
    server: RPCServer, url: str
) -> None:
    held = install(server)
    async with AsyncClient(url, registry=server.registry) as client:
        futures = [await client.submit(HELD, i) for i in range(40)]
        # Later submits are answered first: replies must still reach their own futures.
        for tag in reversed(range(40)):
            held.release(tag)
            assert await futures[tag] == tag
            assert not any(future.done() for future in futures[:tag])


async def test_invalid_payload_is_refused_before_sending(server: RPCServer, url: str) -> None:
    install(server)
    async with AsyncClient(url, registry=server.registry) as client:
        with pytest.raises(PayloadValidationError, match=r"calc\.add"):
            await client.call(ADD, 1, "2")
        with pytest.raises(PayloadValidationError, match="takes 2"):
            await client.call("calc.add", 1)
    assert server.stats.requests == 0


async def test_response_of_the_wrong_type_is_a_validation_error(
    server: RPCServer, url: str
) -> None:
    install(server)
    async with AsyncClient(url, registry=server.registry) as client:
        with pytest.raises(PayloadValidationError, match="response"):
            await client.call(LIAR)
    async with AsyncClient(url, registry=server.registry, validate=False) as client:
        assert await client.call(LIAR) == "not an int"


async def test_timeout_raises_and_late_reply_is_dropped_not_misdelivered(
    server: RPCServer, url: str
) -> None:
    held = install(server)
    async with AsyncClient(url, registry=server.registry) as client:
        with pytest.raises(RequestTimeout, match=r"calc\.held"):
            await client.call(HELD, 111, timeout=0.05)  # held: only the deadline ends it
        waiting = await client.submit(HELD, 222)
        held.release(111)  # the late reply arrives while this call waits
        await until(lambda: client.stats.late_replies == 1, "the late reply")
        assert not waiting.done()  # it did not answer the call waiting
        held.release(222)
        assert await waiting == 222
        assert client.stats.timeouts == 1


async def test_request_timeout_is_also_a_builtin_timeout_error(server: RPCServer, url: str) -> None:
    held = install(server)
    async with AsyncClient(url, registry=server.registry, timeout=0.02) as client:
        with pytest.raises(TimeoutError):
            await client.call(HELD, 1)  # held: only the deadline ends it
    held.release(1)


async def test_submitted_future_times_out_even_if_nobody_awaits_it(
    server: RPCServer, url: str
) -> None:
    held = install(server)
    async with AsyncClient(url, registry=server.registry) as client:
        future = await client.submit(HELD, 1, timeout=0.05)  # held: only the deadline ends it
        # Told when it is done, without awaiting it (which a deadline could hang on).
        finished = asyncio.Event()
        future.add_done_callback(lambda _: finished.set())
        await asyncio.wait_for(finished.wait(), WAIT)
        assert isinstance(future.exception(), RequestTimeout)
        held.release(1)


async def test_each_call_expires_at_its_own_deadline_whatever_the_mix_of_timeouts(
    server: RPCServer, url: str
) -> None:
    """The client's one timer follows the earliest deadline as calls come and go.

    The rule itself is the CallTable's, tested on an explicit clock in tests/test_calls.py;
    here the loop's timer drives it. The slow calls are held on the server, so only their
    deadlines end them: none ends before its own, and a short deadline set after a long one
    (``LONG`` is twenty times ``SHORT``) is not held up by it.
    """
    held = install(server)
    loop = asyncio.get_running_loop()
    long, short = 1.0, 0.05
    async with AsyncClient(url, registry=server.registry) as client:
        sent: dict[int, float] = {}
        ended: dict[int, float] = {}
        slow = []
        for tag, timeout in enumerate([long, short] * 3):
            sent[tag] = loop.time()
            future = await client.submit(HELD, tag, timeout=timeout)
            future.add_done_callback(lambda _, tag=tag: ended.setdefault(tag, loop.time()))
            slow.append(future)
        # Answered long before their deadline (half of LONG, so passed by the end): a call
        # answered never expires.
        quick = [await client.submit(ADD, 3, 4, timeout=long / 2) for _ in range(3)]
        assert await asyncio.gather(*quick) == [7, 7, 7]
        await asyncio.wait(slow)
        assert all(isinstance(f.exception(), RequestTimeout) for f in slow)
        for tag, timeout in enumerate([long, short] * 3):
            assert ended[tag] >= sent[tag] + timeout, (tag, ended[tag] - sent[tag])
        assert max(ended[tag] for tag in (1, 3, 5)) < min(ended[tag] for tag in (0, 2, 4))
        assert client.stats.timeouts == 6
        assert await client.call(ADD, 1, 2, timeout=0.1) == 3
        held.release(*range(6))


async def test_cancelled_call_frees_its_slot(server: RPCServer, url: str) -> None:
    held = install(server)
    async with AsyncClient(url, registry=server.registry, max_in_flight=1) as client:
        task = asyncio.create_task(client.call(HELD, 1))
        await held.started(1)  # the call is running on the server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # With max_in_flight=1 this would wait forever if the cancelled call kept its slot.
        assert await asyncio.wait_for(client.call(ADD, 1, 1), WAIT) == 2
        held.release(1)


async def test_lost_connection_fails_every_pending_call(url: str) -> None:
    server = RPCServer(url, shutdown_grace=0.05)
    held = install(server)
    await server.start()
    async with AsyncClient(url, registry=server.registry, timeout=30) as client:
        pending = [await client.submit(HELD, i) for i in range(5)]
        await held.started(5)  # all five run on the server (and are never released)
        start = time.perf_counter()
        await server.aclose()
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(r, ConnectionLost) for r in results), results
        assert time.perf_counter() - start < 5
        with pytest.raises(ConnectionLost):
            await client.call("rpc.ping")


async def test_closing_the_client_fails_pending_calls_with_client_closed(
    server: RPCServer, url: str
) -> None:
    held = install(server)
    client = await AsyncClient(url, registry=server.registry).connect()
    pending = await client.submit(HELD, 1)
    await client.aclose()
    with pytest.raises(ClientClosed):
        await pending
    with pytest.raises(ClientClosed):
        await client.call("rpc.ping")
    held.release(1)


async def test_unreachable_server_is_a_transport_error(url: str) -> None:
    with pytest.raises(TransportError, match="no server"):
        async with AsyncClient(url):
            pass


async def test_malformed_and_unknown_replies_are_counted_and_ignored(url: str) -> None:
    """A misbehaving server: junk and unsolicited replies before the real answer."""
    fake = await RawServer(url).start()

    async def misbehave() -> None:
        peer, frames = await fake.recv()
        request = codec.decode(frames)
        fake.send(peer, [b"\xff\x00garbage"])
        fake.send(peer, codec.encode_response(request.request_id + 1000, "stray"))
        fake.send(peer, codec.encode_response(request.request_id, "pong"))

    async with AsyncClient(url, timeout=5) as client:
        task = asyncio.create_task(misbehave())
        assert await client.call("rpc.ping") == "pong"
        await task
        assert client.stats.malformed == 1
        assert client.stats.late_replies == 1
    await fake.close()


async def test_reply_from_another_wire_version_fails_that_call_at_once(url: str) -> None:
    fake = await RawServer(url).start()

    async def answer_in_another_version() -> None:
        import msgpack

        peer, frames = await fake.recv()
        request = codec.decode(frames)
        fake.send(
            peer, [msgpack.packb([9, int(MessageKind.RESPONSE), request.request_id, "", "pong"])]
        )

    async with AsyncClient(url, timeout=5) as client:
        task = asyncio.create_task(answer_in_another_version())
        with pytest.raises(VersionMismatch, match="version 9"):
            await client.call("rpc.ping")
        await task
    await fake.close()


# ----------------------------------------------------------------------------- SyncClient


def run_server_in_thread(url: str) -> tuple[threading.Thread, list[RPCServer]]:
    """A server on its own loop thread, as an engine process would talk to a separate one."""
    holder: list[RPCServer] = []
    started = threading.Event()

    async def main() -> None:
        server = RPCServer(url, max_workers=4, shutdown_grace=0.2)
        install(server)
        holder.append(server)
        async with server:
            started.set()
            await server.wait_for_stop()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(5)
    return thread, holder


def stop_server_thread(thread: threading.Thread, holder: list[RPCServer]) -> None:
    holder[0].stop()  # from this thread: stop() is thread-safe
    thread.join(5)
    assert not thread.is_alive()


@pytest.fixture
def threaded_server(url: str):  # type: ignore[no-untyped-def]
    thread, holder = run_server_in_thread(url)
    yield holder[0]
    stop_server_thread(thread, holder)


def test_sync_call_and_submit(threaded_server: RPCServer, url: str) -> None:
    with SyncClient(url, registry=threaded_server.registry) as client:
        assert client.call(ADD, 20, 22) == 42
        future = client.submit(ADD, 3, 4)
        assert isinstance(future, MessagingFuture)
        assert future.result(timeout=5) == 7


def test_sync_client_from_eight_threads_at_once(threaded_server: RPCServer, url: str) -> None:
    with SyncClient(url, registry=threaded_server.registry) as client:

        def worker(base: int) -> list[int]:
            return [client.call(ADD, base, i) for i in range(200)]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(worker, [t * 1000 for t in range(8)]))
    for t, got in enumerate(results):
        assert got == [t * 1000 + i for i in range(200)]


def test_sync_validation_errors_raise_in_the_calling_thread(
    threaded_server: RPCServer, url: str
) -> None:
    with SyncClient(url, registry=threaded_server.registry) as client:
        with pytest.raises(PayloadValidationError):
            client.submit(ADD, "1", 2)
        assert client.call(ADD, 1, 2) == 3


def test_sync_timeout_and_future_wait(threaded_server: RPCServer, url: str) -> None:
    held = gates(threaded_server)
    with SyncClient(url, registry=threaded_server.registry) as client:
        waiting = client.submit(HELD, 1)  # held on the server until released
        assert not waiting.wait(timeout=0.01)  # a wait that ran out says so
        expiring = client.submit(HELD, 2, timeout=0.05)  # held: only its deadline ends it
        with pytest.raises(RequestTimeout):
            expiring.result(timeout=WAIT)
        held.release(1, 2)
        assert waiting.wait(timeout=WAIT) and waiting.result() == 1


def test_sync_client_close_fails_pending_calls(threaded_server: RPCServer, url: str) -> None:
    client = SyncClient(url, registry=threaded_server.registry)
    pending = client.submit(HELD, 1)
    client.close()
    with pytest.raises(ClientClosed):
        pending.result(timeout=WAIT)
    gates(threaded_server).release(1)
    with pytest.raises(ClientClosed):
        client.call("rpc.ping")


def test_sync_client_to_unreachable_server_raises_at_once(url: str) -> None:
    start = time.perf_counter()
    with pytest.raises(TransportError, match=url):
        SyncClient(url)
    assert time.perf_counter() - start < 5


async def test_messaging_future_from_sync_client_is_awaitable(
    threaded_server: RPCServer, url: str
) -> None:
    with SyncClient(url, registry=threaded_server.registry) as client:
        future = client.submit(ADD, 2, 2)
        assert await future == 4


def test_cancelling_a_sync_future_frees_its_slot(threaded_server: RPCServer, url: str) -> None:
    with SyncClient(url, registry=threaded_server.registry, max_in_flight=1) as client:
        slow = client.submit(HELD, 1)
        assert slow.cancel()
        # With max_in_flight=1, submit would block until the held call ended if the
        # cancelled call kept its slot; run it in a thread so a regression fails instead
        # of hanging.
        answer: list[int] = []
        caller = threading.Thread(target=lambda: answer.append(client.call(ADD, 1, 1)))
        caller.start()
        caller.join(WAIT)
        assert answer == [2]
    gates(threaded_server).release(1)
