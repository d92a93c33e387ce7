"""The zmq transport on its own, over real sockets: delivery, pause, close, lost connections.

Each transport is read by hand through the core's sinks (:class:`~kvrpc.transport.Inbox` on
the server, :class:`~kvrpc.transport.ClientInbox` on the client). Where a test must show that
something did *not* happen, it first gives the transport every chance to do it: a round trip
through a second server and client on the same loop and zmq context, and a send on the
transport under test (which makes it look for waiting messages).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kvrpc.auth import Authenticator
from kvrpc.client import AsyncClient
from kvrpc.codec import Buffer
from kvrpc.errors import ConnectionLost, TransportError
from kvrpc.transport import (
    ClientInbox,
    Inbox,
    Peer,
    TransportOptions,
    connect_client,
    create_server,
)

zmq = pytest.importorskip("zmq")
kvrpc_zmq = pytest.importorskip("kvrpc_zmq")
from kvrpc_zmq.transport import ZmqClientTransport, ZmqServerTransport  # noqa: E402

WAIT = 30.0  # seconds a wait may take before the test fails: only a hang reaches it
TOKEN = Authenticator(token=b"t" * 32)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _new_url(scheme: str, directory: str) -> str:
    if scheme == "zmq+tcp":
        return f"zmq+tcp://127.0.0.1:{_free_port()}"
    return f"zmq+ipc://{directory}/kv-{_free_port()}.sock"


@pytest.fixture(params=["zmq+ipc", "zmq+tcp"])
def new_url(request: pytest.FixtureRequest, sock_dir: str) -> Callable[[], str]:
    """A maker of fresh URLs of one zmq scheme."""
    scheme: str = request.param
    return lambda: _new_url(scheme, sock_dir)


def _server(url: str, options: TransportOptions | None = None) -> ZmqServerTransport:
    server = create_server(url, options or TransportOptions())
    assert isinstance(server, ZmqServerTransport)
    return server


def _client(url: str, options: TransportOptions | None = None) -> ZmqClientTransport:
    client = connect_client(url, options or TransportOptions())
    assert isinstance(client, ZmqClientTransport)
    return client


class Echo:
    """A second server and client on the same loop: a round trip through it lets the loop
    run every reader callback that is ready, the transport under test's included."""

    def __init__(self, url: str) -> None:
        self.server = _server(url)
        self.client = _client(url)
        self.sink = ClientInbox()

    async def start(self) -> None:
        server = self.server
        inbox = Inbox(lambda peer, frames: server.send(peer, frames))
        inbox.bind(server)
        await server.start(inbox)
        await self.client.connect(self.sink)

    async def round_trip(self) -> None:
        await self.client.send([b"round trip"])
        assert await self.sink.recv(WAIT) == [b"round trip"]

    async def close(self) -> None:
        await self.client.close()
        await self.server.close()


@pytest.fixture
async def echo(new_url: Callable[[], str]) -> AsyncIterator[Echo]:
    pair = Echo(new_url())
    await pair.start()
    yield pair
    await pair.close()


class Recorder:
    """A server sink that checks the read_done rule: once at the end of every read callback
    that delivered, and only then (a check scheduled by the first delivery of a callback
    runs after that callback returns)."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.messages: list[tuple[Peer, list[Buffer]]] = []
        self.reads = 0  # read_done calls
        self.unfinished = 0  # deliveries since the last read_done
        self.broken: list[str] = []
        self.closed = False  # set by the test once close() has returned
        self.arrived: Any = None  # a future the test awaits for the next delivery

    def deliver(self, peer: Peer, frames: list[Buffer]) -> None:
        if self.closed:
            self.broken.append(f"delivered after close: {frames!r}")
        if not self.unfinished:
            self.loop.call_soon(self._callback_ended)
        self.unfinished += 1
        self.messages.append((peer, frames))
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(None)

    def read_done(self) -> None:
        if not self.unfinished:
            self.broken.append("read_done without a delivery before it")
        self.unfinished = 0
        self.reads += 1

    def peer_lost(self, peer: Peer) -> None:
        self.broken.append("peer_lost from a transport that says it never reports it")

    def _callback_ended(self) -> None:
        if self.unfinished:
            self.broken.append(f"{self.unfinished} deliveries and no read_done in their callback")

    async def wait_for(self, count: int) -> None:
        while len(self.messages) < count:
            self.arrived = self.loop.create_future()
            async with _deadline():
                await self.arrived


def _deadline() -> asyncio.Timeout:
    return asyncio.timeout(WAIT)


async def _recv(inbox: Inbox) -> tuple[Peer, list[Buffer]]:
    """The inbox's next message, within WAIT seconds."""
    async with _deadline():
        return await inbox.recv()


# ------------------------------------------------------------------ delivery


async def test_messages_are_delivered_in_order_and_replies_come_back_in_order(
    new_url: Callable[[], str],
) -> None:
    url = new_url()
    server, client, sink = _server(url), _client(url), ClientInbox()
    inbox = Inbox()
    inbox.bind(server)
    await server.start(inbox)
    try:
        await client.connect(sink)
        sent = [[b"header %d" % i, b"x" * (i % 7) * 1000] for i in range(500)]
        for frames in sent:
            await client.send(frames)
        received = []
        for _ in sent:
            peer, frames = await _recv(inbox)
            received.append([bytes(f) for f in frames])
            server.send(peer, [b"reply", frames[0]])
        assert received == sent
        replies = [await sink.recv(WAIT) for _ in sent]
        assert replies == [[b"reply", frames[0]] for frames in sent]
    finally:
        await client.close()
        await server.close()


async def test_read_done_follows_every_read_callback_that_delivered_once(
    new_url: Callable[[], str],
) -> None:
    url = new_url()
    server, client = _server(url), _client(url)
    recorder = Recorder(asyncio.get_running_loop())
    await server.start(recorder)
    assert server.reports_peer_loss is False
    try:
        await client.connect(ClientInbox())
        count = 300  # more than one read callback takes (READ_BATCH a turn)
        for i in range(count):
            await client.send([b"%d" % i])
        await recorder.wait_for(count)
        await asyncio.sleep(0)  # one loop turn: the last callback's check runs
        assert recorder.broken == []
        assert [bytes(frames[0]) for _, frames in recorder.messages] == [
            b"%d" % i for i in range(count)
        ]
        assert count // kvrpc_zmq.transport.READ_BATCH <= recorder.reads <= count
    finally:
        await client.close()
        await server.close()


# ------------------------------------------------------------------ pause and resume


async def test_a_paused_server_delivers_nothing_and_on_resume_everything_in_order(
    new_url: Callable[[], str], echo: Echo
) -> None:
    url = new_url()
    server, client, sink = _server(url), _client(url), ClientInbox()
    inbox = Inbox()
    inbox.bind(server)
    await server.start(inbox)
    try:
        await client.connect(sink)
        await client.send([b"hello"])
        peer, _ = await _recv(inbox)

        server.pause_reading()
        server.pause_reading()  # idempotent
        for i in range(40):  # fewer than the ROUTER holds per connection: none blocks
            await client.send([b"%d" % i])
        # Every chance to read them: round trips until the ROUTER holds them...
        driver = server._driver
        assert driver is not None
        while not int(driver.sock.get(zmq.EVENTS)) & zmq.POLLIN:
            await echo.round_trip()
        # ... a send, after which the transport looks for waiting messages, and its reply.
        server.send(peer, [b"poke"])
        assert await sink.recv(WAIT) == [b"poke"]
        await echo.round_trip()
        assert inbox.queued == 0

        server.resume_reading()
        server.resume_reading()
        got = [bytes((await _recv(inbox))[1][0]) for _ in range(40)]
        assert got == [b"%d" % i for i in range(40)]
    finally:
        await client.close()
        await server.close()


async def test_a_bounded_inbox_pauses_the_server_and_gets_every_message_in_order(
    new_url: Callable[[], str],
) -> None:
    url = new_url()
    server, client = _server(url), _client(url)
    inbox = Inbox(limit=8)
    inbox.bind(server)
    await server.start(inbox)
    try:
        await client.connect(ClientInbox())
        count = 200
        for i in range(count):
            await client.send([b"%d" % i])
        got = []
        for _ in range(count):
            # A read stops after the delivery that filled the inbox: it never holds more.
            assert inbox.queued <= inbox.limit
            got.append(bytes((await _recv(inbox))[1][0]))
        assert got == [b"%d" % i for i in range(count)]
        assert inbox.pauses >= 1 and not inbox.paused
    finally:
        await client.close()
        await server.close()


# ------------------------------------------------------------------ close


async def test_nothing_is_delivered_after_close(new_url: Callable[[], str], echo: Echo) -> None:
    url = new_url()
    server, client = _server(url), _client(url)
    recorder = Recorder(asyncio.get_running_loop())
    await server.start(recorder)
    try:
        await client.connect(ClientInbox())
        sent = 100
        for i in range(sent):
            client.try_send([b"%d" % i]) or await client.send([b"%d" % i])
        await recorder.wait_for(1)
        await server.close()
        recorder.closed = True
        # Closed with messages still to read: one read callback takes READ_BATCH of them.
        assert len(recorder.messages) < sent
        await echo.round_trip()
        await server.close()  # idempotent
        await echo.round_trip()
        assert recorder.broken == []
    finally:
        await client.close()
        await server.close()


# ------------------------------------------------------------------ lost connections


async def test_the_client_reports_a_lost_server_once_and_not_its_own_close(
    new_url: Callable[[], str], echo: Echo
) -> None:
    url = new_url()
    server, client, sink = _server(url), _client(url), ClientInbox()
    inbox = Inbox(lambda peer, frames: server.send(peer, frames))
    inbox.bind(server)
    await server.start(inbox)
    try:
        await client.connect(sink)
        await client.send([b"before"])
        assert await sink.recv(WAIT) == [b"before"]
        await server.close()
        with pytest.raises(ConnectionLost):
            await sink.recv(WAIT)
        assert sink.losses == 1

        again = _server(url)
        replies = Inbox(lambda peer, frames: again.send(peer, frames))
        replies.bind(again)
        await again.start(replies)
        try:
            await client.send([b"after"])  # waits for the new connection
            assert await sink.recv(WAIT) == [b"after"]  # no second loss before it
            await client.close()
            await client.close()
        finally:
            await again.close()
        await echo.round_trip()
        assert sink.losses == 1
        with pytest.raises(ConnectionLost, match="closed"):
            await client.send([b"closed"])
    finally:
        await client.close()
        await server.close()


# ------------------------------------------------------------------ auth across a restart


async def _authenticated(url: str) -> tuple[ZmqServerTransport, Inbox]:
    server = _server(url, TransportOptions(auth=TOKEN))
    inbox = Inbox(lambda peer, frames: server.send(peer, frames))
    inbox.bind(server)
    await server.start(inbox)
    return server, inbox


async def _lose_the_server_unseen(
    client: ZmqClientTransport, sink: ClientInbox, server: ZmqServerTransport, echo: Echo
) -> Any:
    """Connect and make one round trip, then close the server with the client's monitor
    unread (the loop "has not got round to" it) until zmq has dropped the pipe; returns the
    client's driver."""
    await client.connect(sink)
    await client.send([b"first"])
    assert await sink.recv(WAIT) == [b"first"]
    driver = client._driver
    assert driver is not None
    asyncio.get_running_loop().remove_reader(driver._monitor_fd)
    await server.close()
    while int(driver.sock.get(zmq.EVENTS)) & zmq.POLLOUT:  # until zmq dropped the pipe
        await echo.round_trip()
    return driver


@pytest.mark.parametrize("events_first", [False, True], ids=["refusal-first", "events-first"])
async def test_a_request_that_beats_the_new_handshake_after_a_restart_is_a_lost_connection(
    new_url: Callable[[], str], echo: Echo, events_first: bool
) -> None:
    """zmq may attach the restarted server's connection before the loop has read the
    monitor's news of the old one's end; a request sent then reaches the new server before
    the handshake and is refused. The client must take that as a lost connection, not as
    AuthenticationFailed. The race is forced: the client's monitor is left unread until the
    request has gone out, and then read after the refusal (refusal-first) or before it
    (events-first), so that the refusal arrives outside, or in the middle of, the new
    handshake.
    """
    url = new_url()
    server, _ = await _authenticated(url)
    client, sink = _client(url, TransportOptions(auth=TOKEN)), ClientInbox()
    loop = asyncio.get_running_loop()
    again = None
    try:
        driver = await _lose_the_server_unseen(client, sink, server, echo)

        again, _ = await _authenticated(url)
        # IMMEDIATE: nothing can be sent until zmq has attached the new connection, which
        # wakes the socket's reader and so the wait for room.
        async with _deadline():
            while not client.try_send([b"too early"]):
                await driver.wait_writable()
        assert again.stats()["auth_ok"] == 0  # it went out before any handshake
        if events_first:
            loop.remove_reader(driver._fd)  # the refusal waits in zmq meanwhile
            async with _deadline():
                driver.catch_up()  # the old connection's end, the new one's start: HELLO
                while driver.handshake is None:
                    await echo.round_trip()
                    driver.catch_up()
            loop.add_reader(driver._fd, driver.drain)
            driver.check_soon()
        else:
            async with _deadline():
                # Read outside any handshake, while the monitor still is not: the client
                # then reads the monitor's news itself.
                while not driver.stray_refusals:
                    await echo.round_trip()
        loop.add_reader(driver._monitor_fd, driver.catch_up)

        with pytest.raises(ConnectionLost):  # the refused request's loss, reported once
            await sink.recv(WAIT)
        await client.send([b"after"])  # after a fresh handshake
        assert await sink.recv(WAIT) == [b"after"]
        assert sink.losses == 1
        stats = again.stats()
        assert stats["auth_ok"] == 1 and stats["unauthenticated"] == 1
        assert driver.auth_error is None and driver.stray_refusals == 1
    finally:
        await client.close()
        await server.close()
        if again is not None:
            await again.close()


async def test_a_send_that_found_no_connection_waits_for_the_new_handshake(
    new_url: Callable[[], str], echo: Echo
) -> None:
    """The path the fault campaign hit: a send that found no connection (the server had
    died, the loop had not yet read the monitor) waited for room, and the restarted
    server's connection woke it right behind the new HELLO, before the handshake ended."""
    url = new_url()
    server, _ = await _authenticated(url)
    client, sink = _client(url, TransportOptions(auth=TOKEN)), ClientInbox()
    loop = asyncio.get_running_loop()
    again = None
    try:
        driver = await _lose_the_server_unseen(client, sink, server, echo)
        assert driver.connected.is_set()  # the client does not know yet

        blocked = asyncio.create_task(client.send([b"blocked"]))
        await asyncio.sleep(0)  # one loop turn: it found no room and waits
        assert not blocked.done()
        loop.add_reader(driver._monitor_fd, driver.catch_up)
        again, _ = await _authenticated(url)
        async with _deadline():
            await blocked  # sent on the new connection, after its handshake
        with pytest.raises(ConnectionLost):
            await sink.recv(WAIT)
        assert await sink.recv(WAIT) == [b"blocked"]
        stats = again.stats()
        assert (stats["auth_ok"], stats["auth_failed"], stats["unauthenticated"]) == (1, 0, 0)
        assert sink.losses == 1
    finally:
        await client.close()
        await server.close()
        if again is not None:
            await again.close()


# ------------------------------------------------------------------ the user's edges


async def test_an_ipc_server_removes_its_socket_file_when_closed(tmp_path: Path) -> None:
    path = tmp_path / "kv.sock"
    server = create_server(f"zmq+ipc://{path}")
    await server.start(Inbox())
    assert path.is_socket()
    await server.close()
    assert not path.exists()


async def test_an_ipc_server_leaves_a_socket_file_that_another_server_made(tmp_path: Path) -> None:
    # Another server may find ours stale and take its path; its file must outlive our close.
    path = tmp_path / "kv.sock"
    server = create_server(f"zmq+ipc://{path}")
    await server.start(Inbox())
    path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(str(path))
        await server.close()
        assert path.is_socket()
    finally:
        other.close()


async def test_a_host_that_does_not_resolve_is_named_at_connect() -> None:
    # .invalid never resolves (RFC 6761): the error says so at once, not after a timeout.
    client = connect_client("zmq+tcp://no-such-host.invalid:5555")
    try:
        with pytest.raises(TransportError, match=r"'no-such-host\.invalid' does not resolve"):
            await client.connect(ClientInbox())
    finally:
        await client.close()


async def test_the_client_reports_the_unresolved_host_not_a_missing_server() -> None:
    client = AsyncClient("zmq+tcp://no-such-host.invalid:5555", connect_timeout=60.0)
    with pytest.raises(TransportError) as failed:
        await client.connect()
    assert "no-such-host.invalid" in str(failed.value)
    assert "is the server running" not in str(failed.value)
