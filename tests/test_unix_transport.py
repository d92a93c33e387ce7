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
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from kvrpc_unix import UnixClientTransport, UnixPlugin, UnixServerTransport

from kvrpc import AsyncClient, RPCServer
from kvrpc.errors import ConnectionLost, InvalidURL, TransportError
from kvrpc.transport import (
    Oversized,
    TransportOptions,
    connect_client,
    create_server,
    parse_url,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix-domain sockets")


@pytest.fixture
def sock_path() -> Iterator[str]:
    # pytest's tmp_path can exceed the 107-byte socket path limit.
    directory = tempfile.mkdtemp(prefix="kvu-", dir="/tmp")
    yield os.path.join(directory, "s.sock")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def server(sock_path: str) -> AsyncIterator[UnixServerTransport]:
    transport = create_server(f"unix://{sock_path}", TransportOptions(max_message_size=1 << 20))
    assert isinstance(transport, UnixServerTransport)
    await transport.start()
    yield transport
    await transport.close()


async def connected(path: str, reconnect_timeout: float = 2.0) -> UnixClientTransport:
    client = connect_client(f"unix://{path}", TransportOptions(reconnect_timeout=reconnect_timeout))
    assert isinstance(client, UnixClientTransport)
    await client.connect()
    return client


async def raw_connection(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, path)
    return sock


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    # Polling: the counters tested here have no event to wait on, by design.
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


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
    server = UnixServerTransport(sock_path, TransportOptions())
    await server.start()
    client = await connected(sock_path)
    await client.send([b"hello"])
    assert (await server.recv())[1] == [b"hello"]
    await client.close()
    await server.close()


async def test_a_live_servers_path_is_refused(server: UnixServerTransport, sock_path: str) -> None:
    with pytest.raises(TransportError, match="already listening"):
        await UnixServerTransport(sock_path, TransportOptions()).start()
    client = await connected(sock_path)  # the first server is undisturbed
    await client.send([b"still here"])
    assert (await server.recv())[1] == [b"still here"]
    await client.close()


async def test_close_removes_the_socket_file_and_is_idempotent(sock_path: str) -> None:
    server = UnixServerTransport(sock_path, TransportOptions())
    await server.start()
    assert exists(sock_path)
    await server.close()
    assert not exists(sock_path)
    await server.close()


async def test_close_leaves_a_socket_file_that_another_server_has_since_bound(
    sock_path: str,
) -> None:
    first = UnixServerTransport(sock_path, TransportOptions())
    await first.start()
    os.unlink(sock_path)
    second = UnixServerTransport(sock_path, TransportOptions())
    await second.start()
    await first.close()
    assert exists(sock_path)
    await second.close()
    assert not exists(sock_path)


async def test_recv_on_a_closed_server_raises_connection_lost(sock_path: str) -> None:
    server = UnixServerTransport(sock_path, TransportOptions())
    await server.start()
    waiting = asyncio.ensure_future(server.recv())
    await asyncio.sleep(0)
    await server.close()
    with pytest.raises(ConnectionLost):
        await waiting
    with pytest.raises(ConnectionLost):
        await server.recv()


# ----------------------------------------------------------------------------- bad peers


async def test_a_length_prefix_far_over_the_cap_disconnects_that_peer_and_is_counted(
    server: UnixServerTransport, sock_path: str
) -> None:
    loop = asyncio.get_running_loop()
    good = await connected(sock_path)
    bad = await raw_connection(sock_path)
    await loop.sock_sendall(bad, struct.pack("!IQ", 1, 1 << 40))
    assert await loop.sock_recv(bad, 1) == b""  # the server hung up
    bad.close()
    assert server.stats()["malformed"] == 1
    await good.send([b"unaffected"])
    assert (await server.recv())[1] == [b"unaffected"]
    await good.close()


async def test_a_message_over_the_cap_arrives_as_oversized_and_the_peer_stays(
    server: UnixServerTransport, sock_path: str
) -> None:
    client = await connected(sock_path)
    await client.send([b"header", bytes(1 << 20)])
    peer, oversized = await server.recv()
    assert type(oversized) is Oversized
    assert oversized == [b"header"] and oversized.size == (1 << 20) + 6
    await client.send([b"next"])
    assert await server.recv() == (peer, [b"next"])
    assert server.stats()["malformed"] == 0
    await client.close()


async def test_a_peer_that_hangs_up_mid_message_is_counted_as_malformed(
    server: UnixServerTransport, sock_path: str
) -> None:
    loop = asyncio.get_running_loop()
    sock = await raw_connection(sock_path)
    await loop.sock_sendall(sock, struct.pack("!IQ", 1, 100) + b"only part")
    sock.close()
    await until(lambda: server.stats()["disconnects"] == 1)
    assert server.stats()["connections"] == 1
    assert server.stats()["disconnects"] == 1
    assert server.stats()["malformed"] == 1


async def test_a_clean_hang_up_is_a_disconnect_not_malformed(
    server: UnixServerTransport, sock_path: str
) -> None:
    client = await connected(sock_path)
    await client.send([b"bye"])
    await server.recv()
    await client.close()
    await until(lambda: server.stats()["disconnects"] == 1)
    assert server.stats()["malformed"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
async def test_many_bad_connections_leak_no_file_descriptors(
    server: UnixServerTransport, sock_path: str
) -> None:
    loop = asyncio.get_running_loop()
    before = open_fds()
    for round_ in range(1, 11):
        socks = [await raw_connection(sock_path) for _ in range(50)]
        for index, sock in enumerate(socks):
            if index % 2:
                await loop.sock_sendall(sock, b"\0\0\0\0")  # zero frames
            sock.close()
        async with asyncio.timeout(5):
            while server.stats()["disconnects"] < 50 * round_:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    # At most as many as before: an earlier test's client that the collector closes meanwhile
    # can only lower the count, and a leak here would raise it.
    assert open_fds() <= before
    assert server.stats()["malformed"] == 250


# ----------------------------------------------------------------------------- messages


async def test_frames_of_every_buffer_kind_arrive_byte_identical(
    server: UnixServerTransport, sock_path: str
) -> None:
    client = await connected(sock_path)
    # 960 kB of 2-D float64s: more than a socket buffer, so it goes out in parts.
    floats: Any = memoryview(array.array("d", range(120_000))).cast("B").cast("d", (400, 300))
    frames: list[Any] = [b"bytes", bytearray(b"bytearray"), memoryview(b"view")[1:], floats, b""]
    await client.send(frames)
    peer, got = await server.recv()
    assert [bytes(f) for f in got] == [bytes(memoryview(f).cast("B")) for f in frames]
    await server.send(peer, got)
    assert [bytes(f) for f in await client.recv()] == [bytes(f) for f in got]
    await client.close()


async def test_a_message_of_1024_frames_crosses_the_iov_limit_in_order(
    server: UnixServerTransport, sock_path: str
) -> None:
    client = await connected(sock_path)
    frames = [b"%d" % i * (i % 7) for i in range(1024)]
    await client.send(frames)
    await client.send([b"next"])
    assert (await server.recv())[1] == frames
    assert (await server.recv())[1] == [b"next"]
    await client.close()


async def test_messages_from_concurrent_senders_never_interleave(sock_path: str) -> None:
    server = UnixServerTransport(sock_path, TransportOptions())
    await server.start()
    client = await connected(sock_path)
    payloads = {i: bytes([i]) * (300_000 + i) for i in range(20)}

    async def sender(i: int) -> None:
        await client.send([b"%d" % i, payloads[i]])

    await asyncio.gather(*(sender(i) for i in payloads))
    for _ in payloads:
        _, (tag, body) = await server.recv()
        assert body == payloads[int(tag)]
    await client.close()
    await server.close()


async def test_a_server_that_is_not_read_stops_reading_until_recv_catches_up(
    server: UnixServerTransport, sock_path: str
) -> None:
    client = await connected(sock_path)
    count = 3000
    for index in range(count):
        await client.send([b"%d" % index, bytes(1000)])
    # White-box: reading stops once the inbox reaches its bound of 1024, give or take what
    # one 256 KiB read holds, while the rest waits in the socket and the client's write queue.
    await until(lambda: server._paused)
    assert 1024 <= len(server._inbox) <= 1024 + 256
    for index in range(count):
        assert (await server.recv())[1][0] == b"%d" % index
    await client.close()


async def test_a_send_to_a_peer_that_left_is_skipped(
    server: UnixServerTransport, sock_path: str
) -> None:
    client = await connected(sock_path)
    await client.send([b"hi"])
    peer, _ = await server.recv()
    await client.close()
    await until(lambda: server.stats()["disconnects"] == 1)
    assert server.stats()["skipped"] == 0
    await server.send(peer, [b"nobody listens"])
    assert server.stats()["skipped"] == 1
    other = await connected(sock_path)  # and the server goes on serving others
    await other.send([b"still here"])
    peer2, frames = await server.recv()
    assert frames == [b"still here"] and peer2 != peer
    await server.send(peer2, [b"answer"])
    assert await other.recv() == [b"answer"]
    assert server.stats()["skipped"] == 1
    await other.close()


# ----------------------------------------------------------------------------- the client


async def test_connecting_where_no_server_listens_names_the_path(sock_path: str) -> None:
    client = UnixClientTransport(sock_path, TransportOptions())
    with pytest.raises(TransportError, match=f"{sock_path}.*is the server running"):
        await client.connect()


async def test_a_lost_connection_is_reported_once_and_the_next_send_reconnects(
    sock_path: str,
) -> None:
    first = UnixServerTransport(sock_path, TransportOptions())
    await first.start()
    client = await connected(sock_path)
    await first.close()
    with pytest.raises(ConnectionLost):
        await client.recv()
    second = UnixServerTransport(sock_path, TransportOptions())
    await second.start()
    await client.send([b"again"])
    peer, frames = await second.recv()
    assert frames == [b"again"]
    await second.send(peer, [b"welcome back"])
    assert await client.recv() == [b"welcome back"]  # no second ConnectionLost
    await client.close()
    await second.close()


async def test_a_send_right_after_a_restart_goes_to_the_new_server(sock_path: str) -> None:
    first = UnixServerTransport(sock_path, TransportOptions())
    await first.start()
    client = await connected(sock_path)
    await first.close()
    second = UnixServerTransport(sock_path, TransportOptions())
    await second.start()
    # No chance yet for the client to notice the hang-up: the send finds it.
    await client.send([b"first after restart"])
    assert (await second.recv())[1] == [b"first after restart"]
    with pytest.raises(ConnectionLost):
        await client.recv()
    await client.close()
    await second.close()


async def test_a_send_gives_up_when_the_server_stays_away(sock_path: str) -> None:
    server = UnixServerTransport(sock_path, TransportOptions())
    await server.start()
    client = await connected(sock_path, reconnect_timeout=0.2)
    await server.close()
    with pytest.raises(ConnectionLost):
        await client.recv()
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(
        *(client.send([b"x"]) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionLost) for r in results)
    # One reconnect attempt, shared by every sender, not ten in a row.
    assert loop.time() - started < 1.0
    await client.close()


async def test_close_wakes_a_waiting_recv_and_refuses_later_calls(
    server: UnixServerTransport, sock_path: str
) -> None:
    client = await connected(sock_path)
    waiting = asyncio.ensure_future(client.recv())
    await asyncio.sleep(0)  # one loop turn: the task runs until recv waits
    assert not waiting.done()
    await client.close()
    with pytest.raises(ConnectionLost):
        await waiting
    with pytest.raises(ConnectionLost):
        await client.send([b"late"])
    with pytest.raises(ConnectionLost):
        await client.recv()
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
        await until(lambda: client.stats.disconnects == 1)
        async with RPCServer(url):
            assert await client.call("rpc.ping") == "pong"
    finally:
        await client.aclose()


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
