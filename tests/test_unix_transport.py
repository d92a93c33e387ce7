"""What is particular to unix://: the socket file, its mode and ownership, real-socket framing
errors, reconnection, and the whole RPC stack over it."""

from __future__ import annotations

import array
import asyncio
import os
import shutil
import socket
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from kvrpc_unix import (
    FrameReader,
    UnixClientTransport,
    UnixPlugin,
    UnixServerTransport,
    frame_prefix,
)

from kvrpc import AsyncClient, RPCServer, SyncClient
from kvrpc.auth import Authenticator, ServerHandshake, Verdict
from kvrpc.codec import Buffer
from kvrpc.errors import AuthenticationFailed, ConnectionLost, InvalidURL, TransportError
from kvrpc.testing.waiting import until, wait_until
from kvrpc.transport import (
    ClientInbox,
    Inbox,
    Oversized,
    ReadControl,
    ServerSink,
    TransportOptions,
    connect_client,
    create_server,
    parse_url,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix-domain sockets")

TOKEN = b"unix transport test token, 32 b"


@pytest.fixture
def sock_path() -> Iterator[str]:
    # pytest's tmp_path can exceed the 107-byte socket path limit.
    directory = tempfile.mkdtemp(prefix="kvu-", dir="/tmp")
    yield os.path.join(directory, "s.sock")
    shutil.rmtree(directory, ignore_errors=True)


class WatchedInbox(Inbox):
    """The core's :class:`Inbox`, read by hand, that also says when its state changes.

    ``lost`` lists the peers the transport reported lost (the inbox tells of each after its
    queued messages); :meth:`wait` re-checks a condition at each loss, pause or resume, so
    a test waits on what the transport did rather than polling its counters.
    """

    def __init__(self) -> None:
        self.lost: list[bytes] = []
        self._changed = asyncio.Event()
        super().__init__(on_peer_lost=self._peer_reported_lost)

    def bind(self, control: ReadControl) -> None:
        """Drive ``control``'s reading, noting each pause and resume."""
        inbox = self

        class Noted:
            def pause_reading(self) -> None:
                control.pause_reading()
                inbox._changed.set()

            def resume_reading(self) -> None:
                control.resume_reading()
                inbox._changed.set()

        super().bind(Noted())

    async def wait(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def _peer_reported_lost(self, peer: bytes) -> None:
        self.lost.append(peer)
        self._changed.set()


@pytest.fixture
def inbox() -> WatchedInbox:
    """The ``server`` fixture's sink, to read it by hand."""
    return WatchedInbox()


@pytest.fixture
async def server(sock_path: str, inbox: WatchedInbox) -> AsyncIterator[UnixServerTransport]:
    transport = create_server(f"unix://{sock_path}", TransportOptions(max_message_size=1 << 20))
    assert isinstance(transport, UnixServerTransport)
    inbox.bind(transport)
    await transport.start(inbox)
    yield transport
    await transport.close()


async def started(
    path: str, options: TransportOptions | None = None, sink: ServerSink | None = None
) -> tuple[UnixServerTransport, WatchedInbox]:
    """A started server delivering into ``sink``, or into the inbox returned with it."""
    server = UnixServerTransport(path, options or TransportOptions())
    inbox = WatchedInbox()
    inbox.bind(server)
    await server.start(sink if sink is not None else inbox)
    return server, inbox


async def connected(
    path: str, reconnect_timeout: float = 2.0
) -> tuple[UnixClientTransport, ClientInbox]:
    client = connect_client(f"unix://{path}", TransportOptions(reconnect_timeout=reconnect_timeout))
    assert isinstance(client, UnixClientTransport)
    sink = ClientInbox()
    await client.connect(sink)
    return client, sink


async def raw_connection(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, path)
    return sock


def wire(*frames: bytes) -> bytes:
    """One message as the framing puts it on the socket."""
    return frame_prefix(frames)[0] + b"".join(frames)


async def selector_round() -> None:
    """Return once the loop has polled its sockets and run the callbacks of all ready ones.

    A byte written to one end of a socket pair is in the other end's queue when ``send``
    returns (AF_UNIX), so the poll that reports it readable reports every socket that was
    readable already, and the loop runs all their callbacks in that iteration, before it
    resumes this coroutine. Whatever a transport's registered readers would read from data
    already sent has then been read.
    """
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    try:
        theirs.setblocking(False)
        polled = loop.create_future()
        loop.add_reader(theirs.fileno(), lambda: polled.done() or polled.set_result(None))
        try:
            ours.send(b"x")
            await polled
        finally:
            loop.remove_reader(theirs.fileno())
    finally:
        ours.close()
        theirs.close()


class Recorder:
    """A server sink that records every call a transport makes of it, in order.

    ``("deliver", peer, frames)``, ``("read_done",)`` and ``("lost", peer)``; ``on_deliver``
    runs inside each delivery, as the core's handler would.
    """

    def __init__(self, on_deliver: Callable[[bytes, list[Buffer]], None] | None = None) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._on_deliver = on_deliver
        self._changed = asyncio.Event()

    def deliver(self, peer: bytes, frames: list[Buffer]) -> None:
        self.events.append(("deliver", peer, tuple(bytes(frame) for frame in frames)))
        self._changed.set()
        if self._on_deliver is not None:
            self._on_deliver(peer, frames)

    def read_done(self) -> None:
        self.events.append(("read_done",))
        self._changed.set()

    def peer_lost(self, peer: bytes) -> None:
        self.events.append(("lost", peer))
        self._changed.set()

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [event for event in self.events if event[0] == kind]

    async def wait(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


class ClientRecorder:
    """A client sink that records ``("deliver", frames)`` and ``("lost", reason)`` in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._changed = asyncio.Event()

    def deliver(self, frames: list[Buffer]) -> None:
        self.events.append(("deliver", tuple(bytes(frame) for frame in frames)))
        self._changed.set()

    def connection_lost(self, reason: str) -> None:
        self.events.append(("lost", reason))
        self._changed.set()

    def losses(self) -> int:
        return sum(event[0] == "lost" for event in self.events)

    async def wait(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


def exists(path: str) -> bool:
    # A stat of a file in /tmp; not worth a thread in a test.
    return os.path.exists(path)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ----------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("unix://relative/path.sock", "no host"),
        ("unix://", "names no socket path"),
        ("unix:///" + "x" * 120, "limited to"),
    ],
)
def test_a_unix_url_needs_a_short_absolute_path(url: str, reason: str) -> None:
    with pytest.raises(InvalidURL, match=reason) as caught:
        UnixPlugin().create_server(parse_url(url), TransportOptions())
    assert "unix:///" in str(caught.value) or "bytes" in str(caught.value)


def test_the_plugin_is_found_by_its_url_scheme() -> None:
    from kvrpc.transport import get_plugin

    assert isinstance(get_plugin("unix"), UnixPlugin)


def test_the_raw_baseline_is_found_apart_from_the_plugin_and_has_a_blocking_client() -> None:
    from kvrpc_unix.baseline import RAW_BASELINE

    from kvrpc.bench.baselines import SyncRawBaseline, baseline_for

    assert baseline_for("unix") is RAW_BASELINE
    assert isinstance(RAW_BASELINE, SyncRawBaseline)
    assert RAW_BASELINE.server_argv(parse_url("unix:///tmp/x"))[-1] == "/tmp/x"


# ----------------------------------------------------------------------------- the socket file


async def test_the_socket_file_is_readable_and_writable_by_its_owner_only(
    server: UnixServerTransport, sock_path: str
) -> None:
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600


async def test_a_socket_file_left_by_a_dead_server_is_replaced(sock_path: str) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # the file stays, with nobody listening
    server, inbox = await started(sock_path)
    client, _ = await connected(sock_path)
    await client.send([b"hello"])
    assert (await inbox.recv())[1] == [b"hello"]
    await client.close()
    await server.close()


async def test_a_live_servers_path_is_refused(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    with pytest.raises(TransportError, match="already listening"):
        await UnixServerTransport(sock_path, TransportOptions()).start(Inbox())
    client, _ = await connected(sock_path)  # the first server is undisturbed
    await client.send([b"still here"])
    assert (await inbox.recv())[1] == [b"still here"]
    await client.close()


async def test_close_removes_the_socket_file_and_is_idempotent(sock_path: str) -> None:
    server, _ = await started(sock_path)
    assert exists(sock_path)
    await server.close()
    assert not exists(sock_path)
    await server.close()


async def test_close_leaves_a_socket_file_that_another_server_has_since_bound(
    sock_path: str,
) -> None:
    first, _ = await started(sock_path)
    os.unlink(sock_path)
    second, _ = await started(sock_path)
    await first.close()
    assert exists(sock_path)
    await second.close()
    assert not exists(sock_path)


async def test_a_closed_server_delivers_nothing_more_and_reports_no_peer_lost(
    sock_path: str,
) -> None:
    recorder = Recorder()
    server, _ = await started(sock_path, sink=recorder)
    client, sink = await connected(sock_path)
    await client.send([b"first"])
    await recorder.wait(lambda: bool(recorder.of("read_done")))
    # Written into the server's socket, and the server closed before its loop can read it.
    await client.send([b"unread"])
    await server.close()
    with pytest.raises(ConnectionLost):
        await sink.recv(timeout=5)  # the client has seen the hang-up
    await selector_round()
    peer = recorder.events[0][1]
    assert recorder.events == [("deliver", peer, (b"first",)), ("read_done",)]
    with pytest.raises(TransportError, match="closed"):
        await server.start(recorder)
    await client.close()


# ----------------------------------------------------------------------------- bad peers


async def test_a_length_prefix_far_over_the_cap_disconnects_that_peer_and_is_counted(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    loop = asyncio.get_running_loop()
    good, _ = await connected(sock_path)
    bad = await raw_connection(sock_path)
    await loop.sock_sendall(bad, struct.pack("!IQ", 1, 1 << 40))
    assert await loop.sock_recv(bad, 1) == b""  # the server hung up
    bad.close()
    assert server.stats()["malformed"] == 1
    await good.send([b"unaffected"])
    assert (await inbox.recv())[1] == [b"unaffected"]
    await good.close()


async def test_a_message_over_the_cap_arrives_as_oversized_and_the_peer_stays(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    client, _ = await connected(sock_path)
    await client.send([b"header", bytes(1 << 20)])
    peer, oversized = await inbox.recv()
    assert type(oversized) is Oversized
    assert oversized == [b"header"] and oversized.size == (1 << 20) + 6
    await client.send([b"next"])
    assert await inbox.recv() == (peer, [b"next"])
    assert server.stats()["malformed"] == 0
    await client.close()


async def test_a_peer_that_hangs_up_mid_message_is_counted_as_malformed(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    loop = asyncio.get_running_loop()
    sock = await raw_connection(sock_path)
    await loop.sock_sendall(sock, struct.pack("!IQ", 1, 100) + b"only part")
    sock.close()
    await inbox.wait(lambda: len(inbox.lost) == 1)  # the transport reports the hang-up
    assert server.stats()["connections"] == 1
    assert server.stats()["disconnects"] == 1
    assert server.stats()["malformed"] == 1


async def test_a_clean_hang_up_is_a_disconnect_not_malformed(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    client, _ = await connected(sock_path)
    await client.send([b"bye"])
    await inbox.recv()
    await client.close()
    await inbox.wait(lambda: len(inbox.lost) == 1)
    assert server.stats()["disconnects"] == 1
    assert server.stats()["malformed"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
async def test_many_bad_connections_leak_no_file_descriptors(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    loop = asyncio.get_running_loop()
    before = open_fds()
    for round_ in range(1, 11):
        socks = [await raw_connection(sock_path) for _ in range(50)]
        for index, sock in enumerate(socks):
            if index % 2:
                await loop.sock_sendall(sock, b"\0\0\0\0")  # zero frames
            sock.close()
        await inbox.wait(lambda round_=round_: len(inbox.lost) == 50 * round_)
        assert server.stats()["disconnects"] == 50 * round_
    # At most as many as before: an earlier test's client that the collector closes meanwhile
    # can only lower the count, and a leak here would raise it.
    assert open_fds() <= before
    assert server.stats()["malformed"] == 250


# ----------------------------------------------------------------------------- messages


async def test_frames_of_every_buffer_kind_arrive_byte_identical(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    client, sink = await connected(sock_path)
    # 960 kB of 2-D float64s: more than a socket buffer, so it goes out in parts.
    floats: Any = memoryview(array.array("d", range(120_000))).cast("B").cast("d", (400, 300))
    frames: list[Any] = [b"bytes", bytearray(b"bytearray"), memoryview(b"view")[1:], floats, b""]
    await client.send(frames)
    peer, got = await inbox.recv()
    assert [bytes(f) for f in got] == [bytes(memoryview(f).cast("B")) for f in frames]
    server.send(peer, got)
    assert [bytes(f) for f in await sink.recv()] == [bytes(f) for f in got]
    await client.close()


async def test_a_message_of_1024_frames_crosses_the_iov_limit_in_order(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    client, _ = await connected(sock_path)
    frames = [b"%d" % i * (i % 7) for i in range(1024)]
    await client.send(frames)
    await client.send([b"next"])
    assert (await inbox.recv())[1] == frames
    assert (await inbox.recv())[1] == [b"next"]
    await client.close()


async def test_messages_from_concurrent_senders_never_interleave(sock_path: str) -> None:
    server, inbox = await started(sock_path)
    client, _ = await connected(sock_path)
    payloads = {i: bytes([i]) * (300_000 + i) for i in range(20)}

    async def sender(i: int) -> None:
        await client.send([b"%d" % i, payloads[i]])

    await asyncio.gather(*(sender(i) for i in payloads))
    for _ in payloads:
        _, (tag, body) = await inbox.recv()
        assert body == payloads[int(tag)]
    await client.close()
    await server.close()


async def test_a_full_inbox_pauses_the_server_until_recv_catches_up(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    client, _ = await connected(sock_path)
    count = 3000
    for index in range(count):
        await client.send([b"%d" % index, bytes(1000)])
    # The inbox pauses the transport once it holds its limit of 1024, give or take what one
    # 256 KiB read holds; the rest waits in the sockets and the client's write queue.
    await inbox.wait(lambda: inbox.paused)
    queued = inbox.queued
    assert inbox.limit <= queued <= inbox.limit + 256
    await selector_round()
    assert inbox.queued == queued  # no connection is read meanwhile
    assert client._connection is not None and client._connection.out_bytes > 0  # white-box
    for index in range(count):
        assert (await inbox.recv())[1][0] == b"%d" % index
    assert not inbox.paused and inbox.pauses >= 1
    await client.close()


async def test_a_send_to_a_peer_that_left_is_skipped(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    client, _ = await connected(sock_path)
    await client.send([b"hi"])
    peer, _ = await inbox.recv()
    await client.close()
    await inbox.wait(lambda: len(inbox.lost) == 1)
    assert server.stats()["skipped"] == 0
    server.send(peer, [b"nobody listens"])
    assert server.stats()["skipped"] == 1
    other, sink = await connected(sock_path)  # and the server goes on serving others
    await other.send([b"still here"])
    peer2, frames = await inbox.recv()
    assert frames == [b"still here"] and peer2 != peer
    server.send(peer2, [b"answer"])
    assert await sink.recv() == [b"answer"]
    assert server.stats()["skipped"] == 1
    await other.close()


# ----------------------------------------------------------------------------- the sink


async def test_pause_reading_stops_every_connection_until_resume_reading(
    sock_path: str,
) -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    server, _ = await started(sock_path, sink=recorder)
    a, _ = await connected(sock_path)
    b, _ = await connected(sock_path)
    await a.send([b"a0"])
    await b.send([b"b0"])
    await recorder.wait(lambda: len(recorder.of("deliver")) == 2)
    server.pause_reading()
    server.pause_reading()  # idempotent
    await a.send([b"a1"])
    await b.send([b"b1"])
    c = await raw_connection(sock_path)  # accepted while paused: not read either
    await loop.sock_sendall(c, wire(b"c1"))
    # The first round accepts c; the second would read whatever a reader was registered for.
    await selector_round()
    await selector_round()
    assert server.stats()["connections"] == 3
    assert [event[2] for event in recorder.of("deliver")] == [(b"a0",), (b"b0",)]
    server.resume_reading()
    server.resume_reading()  # idempotent
    await recorder.wait(lambda: len(recorder.of("deliver")) == 5)
    later = sorted(event[2] for event in recorder.of("deliver")[2:])
    assert later == [(b"a1",), (b"b1",), (b"c1",)]
    c.close()
    await a.close()
    await b.close()
    await server.close()


async def test_resume_reading_leaves_a_peer_backlogged_by_unread_replies_unread(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    loop = asyncio.get_running_loop()
    sock = await raw_connection(sock_path)
    await loop.sock_sendall(sock, wire(b"hello"))
    peer, _ = await inbox.recv()
    reply = bytes(1 << 20)
    for _ in range(5):  # over the 4 MiB high-water mark: the peer is not read meanwhile
        server.send(peer, [reply])
    assert server.stats()["backlogged"] == 1
    server.pause_reading()
    server.resume_reading()
    await loop.sock_sendall(sock, wire(b"while backlogged"))
    await selector_round()
    assert inbox.queued == 0  # the backlog still holds
    server.pause_reading()
    expected = 5 * len(wire(reply))
    received = 0
    while received < expected:
        received += len(await loop.sock_recv(sock, 1 << 20))
    assert received == expected
    connection = server._connections[peer]  # white-box: the backlog has no event of its own
    await until(lambda: not connection.backlogged, "the backlog to drain")
    await selector_round()
    assert inbox.queued == 0  # drained, but the pause still holds
    server.resume_reading()
    assert await inbox.recv() == (peer, [b"while backlogged"])
    sock.close()


async def test_read_done_follows_each_read_callback_that_delivered_something(
    sock_path: str,
) -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    server, _ = await started(sock_path, sink=recorder)
    sock = await raw_connection(sock_path)
    await loop.sock_sendall(sock, wire(b"zero"))
    await recorder.wait(lambda: len(recorder.events) == 2)
    peer = recorder.events[0][1]
    assert recorder.events == [("deliver", peer, (b"zero",)), ("read_done",)]
    # Three messages waiting together are one read: three deliveries, then one read_done.
    server.pause_reading()
    await loop.sock_sendall(sock, wire(b"1") + wire(b"2") + wire(b"3"))
    server.resume_reading()
    await recorder.wait(lambda: len(recorder.events) == 6)
    assert recorder.events[2:] == [
        ("deliver", peer, (b"1",)),
        ("deliver", peer, (b"2",)),
        ("deliver", peer, (b"3",)),
        ("read_done",),
    ]
    # A read that completes no message delivers nothing, and calls no read_done.
    message = wire(b"split across two reads")
    await loop.sock_sendall(sock, message[:7])
    await selector_round()
    assert len(recorder.events) == 6
    await loop.sock_sendall(sock, message[7:])
    await recorder.wait(lambda: len(recorder.events) == 8)
    assert recorder.events[6:] == [("deliver", peer, (b"split across two reads",)), ("read_done",)]
    sock.close()
    await server.close()


async def test_peer_lost_follows_a_connections_last_message_once_and_not_for_close(
    sock_path: str,
) -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    server, _ = await started(sock_path, sink=recorder)
    leaving = await raw_connection(sock_path)
    staying = await raw_connection(sock_path)
    server.pause_reading()
    await loop.sock_sendall(leaving, wire(b"last words"))
    leaving.close()  # its message and its hang-up wait in the socket together
    server.resume_reading()
    await recorder.wait(lambda: bool(recorder.of("lost")))
    await selector_round()
    peer = recorder.events[0][1]
    assert recorder.events == [
        ("deliver", peer, (b"last words",)),
        ("read_done",),
        ("lost", peer),
    ]
    assert server.stats()["disconnects"] == 1
    await server.close()  # ends ``staying``'s connection: not a loss to report
    assert await loop.sock_recv(staying, 1) == b""
    await selector_round()
    assert recorder.of("lost") == [("lost", peer)]
    assert server.stats()["disconnects"] == 2
    staying.close()


async def test_a_peer_lost_while_its_read_is_delivered_gets_nothing_more_delivered(
    sock_path: str,
) -> None:
    # The sink answers each message at once, as the core's handler does; the peer has hung
    # up, so the first answer fails and ends the connection in the middle of the read.
    loop = asyncio.get_running_loop()
    recorder = Recorder(on_deliver=lambda peer, _: server.send(peer, [b"answer"]))
    server, _ = await started(sock_path, sink=recorder)
    sock = await raw_connection(sock_path)
    server.pause_reading()
    await loop.sock_sendall(sock, wire(b"1") + wire(b"2") + wire(b"3"))
    sock.close()
    server.resume_reading()
    await recorder.wait(lambda: bool(recorder.of("read_done")))
    await selector_round()
    peer = recorder.events[0][1]
    assert recorder.events == [("deliver", peer, (b"1",)), ("lost", peer), ("read_done",)]
    assert server.stats()["disconnects"] == 1
    assert server.stats()["malformed"] == 0
    await server.close()


async def test_with_auth_only_a_peer_that_passed_its_handshake_is_delivered_or_lost(
    sock_path: str,
) -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    options = TransportOptions(auth=Authenticator(TOKEN))
    server, _ = await started(sock_path, options, sink=recorder)
    client = UnixClientTransport(sock_path, options)
    await client.connect(ClientInbox())
    await client.send([b"authenticated"])
    await recorder.wait(lambda: bool(recorder.of("read_done")))
    peer = recorder.events[0][1]
    skipper = await raw_connection(sock_path)  # a request instead of a HELLO: refused
    await loop.sock_sendall(skipper, wire(b"\x95\x02\x00\x07\xa8rpc.ping\x90"))
    assert await loop.sock_recv(skipper, 1 << 16) != b""  # the refusal
    quitter = await raw_connection(sock_path)  # hangs up in the middle of its handshake
    quitter.close()
    impostor = UnixClientTransport(
        sock_path, TransportOptions(auth=Authenticator(b"not the token, but as long as it"))
    )
    impostor_sink = ClientRecorder()
    with pytest.raises(AuthenticationFailed, match="wrong token"):
        await impostor.connect(impostor_sink)
    await client.close()
    # Three of the four never passed the handshake, so only the counter tells of them.
    await until(lambda: server.stats()["disconnects"] == 4, "four disconnects")
    await selector_round()
    assert recorder.events == [
        ("deliver", peer, (b"authenticated",)),
        ("read_done",),
        ("lost", peer),
    ]
    counts = server.stats()
    assert (counts["auth_ok"], counts["auth_failed"], counts["unauthenticated"]) == (1, 3, 1)
    assert impostor_sink.events == []  # its failure was raised, not reported to its sink
    skipper.close()
    await impostor.close()
    await server.close()


# ----------------------------------------------------------------------------- the client


async def test_connecting_where_no_server_listens_names_the_path(sock_path: str) -> None:
    client = UnixClientTransport(sock_path, TransportOptions())
    with pytest.raises(TransportError, match=f"{sock_path}.*is the server running"):
        await client.connect(ClientInbox())


async def test_a_send_before_connect_is_refused_clearly(sock_path: str) -> None:
    server, _ = await started(sock_path)
    client = UnixClientTransport(sock_path, TransportOptions())
    with pytest.raises(TransportError, match="call connect"):
        await client.send([b"where to?"])
    assert server.stats()["connections"] == 0
    await server.close()


async def test_a_lost_connection_is_reported_once_and_the_next_send_reconnects(
    sock_path: str,
) -> None:
    first, _ = await started(sock_path)
    client, sink = await connected(sock_path)
    await first.close()
    with pytest.raises(ConnectionLost):
        await sink.recv(timeout=5)
    second, inbox = await started(sock_path)
    await client.send([b"again"])
    peer, frames = await inbox.recv()
    assert frames == [b"again"]
    second.send(peer, [b"welcome back"])
    assert await sink.recv(timeout=5) == [b"welcome back"]  # no second ConnectionLost
    assert sink.losses == 1
    await client.close()
    await second.close()


async def test_a_send_right_after_a_restart_goes_to_the_new_server(sock_path: str) -> None:
    first, _ = await started(sock_path)
    client, sink = await connected(sock_path)
    await first.close()
    second, inbox = await started(sock_path)
    # No chance yet for the client to notice the hang-up: the send finds it.
    await client.send([b"first after restart"])
    assert (await inbox.recv())[1] == [b"first after restart"]
    with pytest.raises(ConnectionLost):
        await sink.recv(timeout=5)
    assert sink.losses == 1
    await client.close()
    await second.close()


async def test_a_send_gives_up_when_the_server_stays_away(sock_path: str) -> None:
    server, _ = await started(sock_path)
    client, sink = await connected(sock_path, reconnect_timeout=0.2)
    await server.close()
    with pytest.raises(ConnectionLost):
        await sink.recv(timeout=5)
    results = await asyncio.gather(
        *(client.send([b"x"]) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionLost) for r in results)
    # One reconnect attempt, shared by every sender, not ten in a row (white-box count).
    assert client._failed_reconnects == 1
    assert sink.losses == 1  # a connection that never came is no loss to report
    await client.close()


async def test_a_client_reports_each_lost_connection_once_and_not_the_one_close_ends(
    sock_path: str,
) -> None:
    client = UnixClientTransport(sock_path, TransportOptions())
    sink = ClientRecorder()
    first, _ = await started(sock_path)
    await client.connect(sink)
    await first.close()
    await sink.wait(lambda: sink.losses() == 1)
    second, inbox = await started(sock_path)
    await client.send([b"again"])
    peer, _ = await inbox.recv()
    second.send(peer, [b"reply"])
    await sink.wait(lambda: len(sink.events) == 2)
    await second.close()
    await sink.wait(lambda: sink.losses() == 2)
    third, inbox = await started(sock_path)
    await client.send([b"once more"])
    peer, _ = await inbox.recv()
    # A reply that reaches the client's socket as it closes: never delivered.
    third.send(peer, [b"too late"])
    await client.close()
    await inbox.wait(lambda: len(inbox.lost) == 1)
    await selector_round()
    assert [event[0] for event in sink.events] == ["lost", "deliver", "lost"]
    assert sink.events[1] == ("deliver", (b"reply",))
    assert "unix://" in sink.events[0][1]
    await third.close()


async def test_a_message_right_behind_the_servers_accept_is_delivered_at_once(
    sock_path: str,
) -> None:
    # A hand-made server answers the handshake and writes a message in the same write as its
    # ACCEPT, so that the client's last handshake read holds both.
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.setblocking(False)
    listener.bind(sock_path)
    listener.listen()

    async def serve() -> socket.socket:
        sock, _ = await loop.sock_accept(listener)
        reader = FrameReader(1 << 20)
        handshake = ServerHandshake(TOKEN)
        while True:
            while not reader.messages:
                reader.buffer_updated(await loop.sock_recv_into(sock, reader.get_buffer()))
            step = handshake.receive(reader.messages.popleft())
            if step.verdict is Verdict.ACCEPTED:
                await loop.sock_sendall(sock, wire(step.reply) + wire(b"pushed"))
                return sock
            await loop.sock_sendall(sock, wire(step.reply))

    serving = asyncio.ensure_future(serve())
    client = UnixClientTransport(sock_path, TransportOptions(auth=Authenticator(TOKEN)))
    sink = ClientRecorder()
    try:
        await client.connect(sink)
        accepted = await serving
        await sink.wait(lambda: bool(sink.events))
        assert sink.events == [("deliver", (b"pushed",))]
        accepted.close()
        await sink.wait(lambda: sink.losses() == 1)
    finally:
        serving.cancel()
        await client.close()
        listener.close()


async def test_close_fails_a_waiting_send_refuses_later_ones_and_reports_no_loss(
    server: UnixServerTransport, inbox: WatchedInbox, sock_path: str
) -> None:
    client, sink = await connected(sock_path)
    server.pause_reading()  # nothing is read: the large send waits for room
    waiting = asyncio.ensure_future(client.send([bytes(8 << 20)]))
    await asyncio.sleep(0)  # one loop turn: the task runs until its send waits
    assert not waiting.done()
    await client.close()
    with pytest.raises(ConnectionLost):
        await waiting
    with pytest.raises(ConnectionLost):
        await client.send([b"late"])
    assert not client.try_send([b"late"])
    server.resume_reading()  # a paused server would not see the hang-up either
    await inbox.wait(lambda: len(inbox.lost) == 1)
    await selector_round()
    assert sink.losses == 0
    await client.close()


# ----------------------------------------------------------------------------- the RPC stack


async def test_rpc_over_unix_echoes_ten_mebibytes(sock_path: str) -> None:
    url = f"unix://{sock_path}"
    payload = os.urandom(10 * 1024 * 1024)
    async with RPCServer(url), AsyncClient(url) as client:
        assert await client.call("rpc.echo", payload) == payload


async def test_rpc_over_unix_serves_many_clients_at_once(sock_path: str) -> None:
    url = f"unix://{sock_path}"
    async with RPCServer(url):
        clients = [await AsyncClient(url).connect() for _ in range(50)]
        try:
            replies = await asyncio.gather(
                *(
                    c.call("rpc.echo", f"client {i} call {j}")
                    for i, c in enumerate(clients)
                    for j in range(10)
                )
            )
            assert replies == [f"client {i} call {j}" for i in range(50) for j in range(10)]
        finally:
            for client in clients:
                await client.aclose()


async def test_a_client_calls_again_after_the_server_restarts(sock_path: str) -> None:
    url = f"unix://{sock_path}"
    async with RPCServer(url):
        client = await AsyncClient(url).connect()
        assert await client.call("rpc.ping") == "pong"
    assert not exists(sock_path)
    try:
        # The hang-up fails whatever was pending; wait for it, as a real restart (which takes
        # longer than one loop iteration) would.
        await until(lambda: client.stats.disconnects == 1, "the client to see the hang-up")
        async with RPCServer(url):
            assert await client.call("rpc.ping") == "pong"
    finally:
        await client.aclose()


def test_sync_calls_queued_while_the_server_is_away_fail_together_not_one_timeout_each(
    sock_path: str,
) -> None:
    """Calls queued behind a send that gave up on the server share its ConnectionLost.

    Each waiting ``reconnect_timeout`` again in turn would take 40 x 0.25 s, far past the
    calls' 5 s deadline, and most would end in RequestTimeout (a lost call the caller cannot
    tell from a slow server).
    """
    url = f"unix://{sock_path}"
    started, stop = threading.Event(), threading.Event()

    async def serve() -> None:
        async with RPCServer(url):
            started.set()
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    assert started.wait(10)
    client = SyncClient(url, direct=False, reconnect_timeout=0.25, timeout=5.0)
    try:
        assert client.call("rpc.ping") == "pong"
        stop.set()
        thread.join(10)
        wait_until(
            lambda: client.stats.disconnects, lambda n: n == 1, "the client to see the hang-up"
        )
        futures = [client.submit("rpc.ping") for _ in range(40)]
        errors = [type(future.exception(timeout=30)) for future in futures]
        assert errors == [ConnectionLost] * 40
    finally:
        stop.set()
        client.close()


# ----------------------------------------------------------------------------- the baseline


async def test_the_raw_baseline_echoes_in_its_own_process_and_cleans_up(sock_path: str) -> None:
    import signal

    from kvrpc_unix.baseline import RAW_BASELINE

    url = parse_url(f"unix://{sock_path}")
    process = await asyncio.create_subprocess_exec(
        *RAW_BASELINE.server_argv(url), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            assert await process.stdout.readline() == b"ready\n"
        client = await RAW_BASELINE.connect(url)
        assert await client.call(b"ping") == b"ping"
        replies = [await client.submit(b"%d" % i) for i in range(100)]
        assert await asyncio.gather(*replies) == [b"%d" % i for i in range(100)]
        assert await client.call(b"after") == b"after"
        await client.close()
        blocking = RAW_BASELINE.connect_sync(url)
        big = bytes(range(256)) * 1024  # more than one recv's worth
        for payload in (b"one", b"", big, b"two"):
            blocking.send(payload)
        assert [blocking.recv() for _ in range(4)] == [b"one", b"", big, b"two"]
        blocking.close()
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    assert not exists(sock_path)
