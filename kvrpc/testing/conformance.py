"""The transport conformance suite: what every kvrpc transport must do, as pytest tests.

A transport author subclasses :class:`TransportConformance` in a test module and provides a
``transport_case`` fixture returning a :class:`TransportCase`; pytest then runs every test
below against that transport, through a real :class:`~kvrpc.server.RPCServer` and real
clients. Needs pytest and pytest-asyncio.

The server runs on the test's own event loop (so its counters and file descriptors can be
read directly); raw misbehaving peers run in worker threads with plain blocking sockets, and
one test kills a server process with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import signal
import time
from typing import Any

import anyio
import pytest

from kvrpc.client import SyncClient
from kvrpc.codec import decode, encode_request
from kvrpc.errors import ConnectionLost, MessageTooLarge
from kvrpc.protocol import ECHO, PING
from kvrpc.server import RPCServer
from kvrpc.testing.raw import RawClient, RawServer
from kvrpc.testing.stream_conformance import StreamConformance
from kvrpc.testing.suite_server import (
    BLOCK,
    CALL_TIMEOUT,
    LOSS_DEADLINE,
    RECORD,
    SLEEP,
    TransportCase,
    client,
    open_fds,
    serve_conformance,
    serving_child,
)
from kvrpc.testing.waiting import until
from kvrpc.transport import (
    ClientInbox,
    ClientTransport,
    Inbox,
    Peer,
    ServerTransport,
    SupportsTrySend,
    TransportOptions,
    connect_client,
    create_server,
)

__all__ = [
    "BLOCK",
    "RECORD",
    "SLEEP",
    "TransportCase",
    "TransportConformance",
    "open_fds",
    "serve_conformance",
]

MiB = 1024 * 1024

_client = client


class TransportConformance(StreamConformance):
    """Subclass with a ``transport_case`` fixture to run the suite against a transport.

    Its stream tests are :class:`~kvrpc.testing.stream_conformance.StreamConformance`'s.
    """

    # ------------------------------------------------------------------ basic traffic

    @pytest.mark.asyncio
    async def test_round_trip(self, transport_case: TransportCase) -> None:
        """Values of every kind, small to several MiB, come back equal."""
        url = transport_case.make_url()
        values: list[Any] = [
            None,
            "text",
            [1, 2.5, {"k": b"v"}],
            b"",
            os.urandom(5),
            os.urandom(64 * 1024),  # at the out-of-band threshold of most transports
            os.urandom(3 * MiB + 7),
        ]
        async with serve_conformance(url), _client(url) as client:
            assert await client.call(PING) == "pong"
            for value in values:
                assert await client.call(ECHO, value) == value

    @pytest.mark.asyncio
    async def test_a_64_mib_message_round_trips_intact(self, transport_case: TransportCase) -> None:
        """A 64 MiB payload crosses both ways byte for byte."""
        url = transport_case.make_url()
        payload = os.urandom(64 * MiB)
        async with serve_conformance(url), _client(url) as client:
            assert await client.call(ECHO, payload) == payload

    @pytest.mark.asyncio
    async def test_a_hundred_clients_at_once(self, transport_case: TransportCase) -> None:
        """A hundred clients connect and call concurrently; each gets its own replies."""
        url = transport_case.make_url()
        async with serve_conformance(url) as server:

            async def one(index: int) -> list[Any]:
                async with _client(url) as client:
                    return [await client.call(ECHO, [index, n]) for n in range(5)]

            async with anyio.create_task_group() as tasks:
                results: dict[int, list[Any]] = {}

                async def run(index: int) -> None:
                    results[index] = await one(index)

                for index in range(100):
                    tasks.start_soon(run, index)
            assert results == {i: [[i, n] for n in range(5)] for i in range(100)}
            assert server.stats.requests == 500
            assert server.transport_stats()["connections"] >= 100

    @pytest.mark.asyncio
    async def test_messages_on_one_connection_arrive_in_order(
        self, transport_case: TransportCase
    ) -> None:
        """Requests of one client reach the server in the order they were sent."""
        url = transport_case.make_url()
        record: list[tuple[int, int]] = []
        async with serve_conformance(url, record), _client(url) as one, _client(url) as two:
            futures = []
            for seq in range(500):
                futures.append(await one.submit(RECORD, 1, seq))
                futures.append(await two.submit(RECORD, 2, seq))
            assert await asyncio.gather(*futures) == [seq for seq in range(500) for _ in "12"]
        for sender in (1, 2):
            assert [seq for who, seq in record if who == sender] == list(range(500))

    @pytest.mark.asyncio
    async def test_a_sync_clients_requests_from_one_thread_arrive_in_order(
        self, transport_case: TransportCase
    ) -> None:
        """Requests a thread submits reach the server in the order submitted.

        Sent at once where the transport can (``SupportsTrySend``), else queued behind what
        the loop still owes.
        """
        url = transport_case.make_url()
        record: list[tuple[int, int]] = []
        async with serve_conformance(url, record):

            def submit_all() -> list[int]:
                with SyncClient(url, timeout=CALL_TIMEOUT) as client:
                    futures = [client.submit(RECORD, 1, seq) for seq in range(2000)]
                    payload = os.urandom(2 * MiB)  # a large one between small ones
                    futures.append(client.submit(ECHO, payload))
                    futures += [client.submit(RECORD, 1, seq) for seq in range(2000, 2100)]
                    results = [future.result() for future in futures]
                    assert results[2000] == payload
                    return [r for r in results if isinstance(r, int)]

            assert await anyio.to_thread.run_sync(submit_all) == list(range(2100))
        assert [seq for _, seq in record] == list(range(2100))

    @pytest.mark.asyncio
    async def test_try_send_sends_only_when_it_can(self, transport_case: TransportCase) -> None:
        """``try_send`` says False and sends nothing when it cannot, and keeps the order.

        For a transport that declares ``SupportsTrySend``: False before it is connected and
        after it is closed; messages it sends and ones ``send`` sends arrive in order.
        """
        url = transport_case.make_url()
        transport = connect_client(url, TransportOptions())
        if not isinstance(transport, SupportsTrySend):
            await transport.close()
            pytest.skip(f"{transport_case.name} does not declare SupportsTrySend")
        async with serve_conformance(url):
            assert transport.try_send(encode_request(1, PING.name, ())) is False
            inbox = ClientInbox()
            await transport.connect(inbox)
            assert transport.try_send(encode_request(2, ECHO.name, ("a",)))
            await transport.send(encode_request(3, ECHO.name, ("b",)))
            assert transport.try_send(encode_request(4, ECHO.name, ("c",)))
            replies = [decode(await inbox.recv(CALL_TIMEOUT)) for _ in range(3)]
            assert [(r.request_id, r.payload) for r in replies] == [(2, "a"), (3, "b"), (4, "c")]
            await transport.close()
            assert transport.try_send(encode_request(5, PING.name, ())) is False

    @pytest.mark.asyncio
    async def test_peer_loss_is_reported_once_per_connection(
        self, transport_case: TransportCase
    ) -> None:
        """A hang-up is reported once, after the peer's messages, never at close.

        For a server transport that declares ``reports_peer_loss``.
        """
        url = transport_case.make_url()
        server = RawServer(url)
        if not server.transport.reports_peer_loss:
            pytest.skip(f"{transport_case.name} does not report peer loss")
        await server.start()
        try:
            first, second = (RawClient(url) for _ in range(2))
            peers = []
            for client in (first, second):
                await client.connect()
                await client.send(encode_request(1, PING.name, ()))
                peers.append((await server.recv(CALL_TIMEOUT))[0])
            await first.send(encode_request(2, PING.name, ()))
            await first.close()
            # Its last message comes first, then the loss (the inbox keeps their order).
            assert await server.recv(CALL_TIMEOUT) == (peers[0], encode_request(2, PING.name, ()))
            await server.wait(lambda: bool(server.lost), CALL_TIMEOUT)
            assert server.lost == [peers[0]]
            # The other connection still works, and closing the server reports nothing.
            await second.send(encode_request(3, PING.name, ()))
            assert (await server.recv(CALL_TIMEOUT))[0] == peers[1]
        finally:
            await server.close()
        await second.close()
        assert server.lost == [peers[0]]

    # ------------------------------------------------------------------ the seam

    @pytest.mark.asyncio
    async def test_the_transport_declares_the_seam(self, transport_case: TransportCase) -> None:
        """Both sides satisfy the interface: a plain ``send``, pause and resume, a declaration."""
        url = transport_case.make_url()
        server = create_server(url, TransportOptions())
        client = connect_client(url, TransportOptions())
        try:
            assert isinstance(server, ServerTransport)
            assert isinstance(client, ClientTransport)
            assert isinstance(server.reports_peer_loss, bool)
            assert not asyncio.iscoroutinefunction(server.send)
            assert not asyncio.iscoroutinefunction(server.pause_reading)
            assert not asyncio.iscoroutinefunction(server.resume_reading)
        finally:
            await client.close()
            await server.close()

    @pytest.mark.asyncio
    async def test_a_full_inbox_pauses_reading_and_nothing_is_lost(
        self, transport_case: TransportCase
    ) -> None:
        """Past the inbox's limit the transport is paused; read again, every message comes.

        Sent by two clients, 300 messages of 16 KiB each against a limit of 8: the inbox
        pauses the transport, resumes it as ``recv`` catches up, and each client's messages
        arrive whole and in order.
        """
        url = transport_case.make_url()
        pad = b"p" * (16 * 1024)
        async with RawServer(url, limit=8) as server, RawClient(url) as one, RawClient(url) as two:
            clients = {b"1": one, b"2": two}

            async def send_all(tag: bytes, client: RawClient) -> None:
                for seq in range(150):
                    await client.send([tag, b"%d" % seq, pad])

            sending = [asyncio.create_task(send_all(t, c)) for t, c in clients.items()]
            # Nothing is read until the inbox has filled and paused the transport.
            await server.wait(lambda: server.inbox.paused, CALL_TIMEOUT)
            got: dict[bytes, list[int]] = {b"1": [], b"2": []}
            for _ in range(300):
                _, frames = await server.recv(CALL_TIMEOUT)
                tag, seq, body = (bytes(f) for f in frames)
                assert body == pad
                got[tag].append(int(seq))
            await asyncio.gather(*sending)
            assert got == {b"1": list(range(150)), b"2": list(range(150))}
            assert server.inbox.pauses >= 1
            assert not server.inbox.paused

    @pytest.mark.asyncio
    async def test_each_read_ends_with_read_done_before_the_loop_moves_on(
        self, transport_case: TransportCase
    ) -> None:
        """After delivering, a transport calls ``read_done`` within the same callback."""
        url = transport_case.make_url()
        loop = asyncio.get_running_loop()
        inbox = Inbox()
        unfinished: list[int] = []  # deliveries whose read had not ended by the next turn
        pending = [0]

        class Watch:
            def deliver(self, peer: Peer, frames: list[Any]) -> None:
                if not pending[0]:
                    loop.call_soon(check)
                pending[0] += 1
                inbox.deliver(peer, frames)

            def read_done(self) -> None:
                pending[0] = 0
                inbox.read_done()

            def peer_lost(self, peer: Peer) -> None:
                inbox.peer_lost(peer)

        def check() -> None:
            if pending[0]:
                unfinished.append(pending[0])

        server = create_server(url, TransportOptions())
        inbox.bind(server)
        await server.start(Watch())
        try:
            async with RawClient(url) as client:
                for seq in range(200):
                    await client.send([b"%d" % seq])
                got = [bytes((await asyncio.wait_for(inbox.recv(), CALL_TIMEOUT))[1][0])]
                got += [bytes((await inbox.recv())[1][0]) for _ in range(199)]
            assert got == [b"%d" % seq for seq in range(200)]
            assert unfinished == []
        finally:
            inbox.close()
            await server.close()

    @pytest.mark.asyncio
    async def test_handlers_of_every_type_answer(self, transport_case: TransportCase) -> None:
        """Inline, async and thread-pool handlers all answer, also beside a large reply."""
        url = transport_case.make_url()
        big = os.urandom(8 * MiB)
        async with serve_conformance(url), _client(url) as client:
            results = await asyncio.gather(
                *(client.call(SLEEP, 0.01) for _ in range(20)),
                *(client.call(BLOCK, 0.01) for _ in range(5)),
                client.call(ECHO, big),
                *(client.call(ECHO, n) for n in range(20)),
            )
        assert results == ["slept"] * 20 + ["blocked"] * 5 + [big] + list(range(20))

    @pytest.mark.asyncio
    async def test_a_thousand_concurrent_calls_from_many_tasks(
        self, transport_case: TransportCase
    ) -> None:
        """Fifty tasks sharing one client make 1,000 calls; every reply matches its call."""
        url = transport_case.make_url()
        async with serve_conformance(url), _client(url) as client:
            results: dict[int, Any] = {}

            async def worker(first: int) -> None:
                for n in range(first, first + 20):
                    results[n] = await client.call(ECHO, {"n": n, "pad": b"x" * (n % 300)})

            async with anyio.create_task_group() as tasks:
                for first in range(0, 1000, 20):
                    tasks.start_soon(worker, first)
        assert results == {n: {"n": n, "pad": b"x" * (n % 300)} for n in range(1000)}

    # ------------------------------------------------------------------ connection loss

    @pytest.mark.asyncio
    async def test_a_client_reconnects_after_the_server_restarts(
        self, transport_case: TransportCase
    ) -> None:
        """Once a client has seen its server go, a new server at the URL serves it."""
        url = transport_case.make_url()
        async with serve_conformance(url):
            client = _client(url, reconnect_timeout=5.0)
            await client.connect()
            try:
                assert await client.call(ECHO, "before") == "before"
            except BaseException:
                await client.aclose()
                raise
        try:
            # A restart takes a while in real life; by then the client has seen the loss. (A
            # request sent in the instant between the two can fail with ConnectionLost.)
            await until(lambda: client.stats.disconnects > 0, "the loss seen", LOSS_DEADLINE)
            async with serve_conformance(url):
                assert await client.call(ECHO, "after") == "after"
        finally:
            await client.aclose()

    @pytest.mark.asyncio
    async def test_a_server_closing_mid_call_fails_pending_calls_with_connection_lost(
        self, transport_case: TransportCase
    ) -> None:
        """Calls pending when the server closes fail with ConnectionLost, not a timeout."""
        url = transport_case.make_url()
        client = _client(url, timeout=60.0, reconnect_timeout=0.2)
        async with serve_conformance(url) as server:
            await client.connect()
            pending = [await client.submit(SLEEP, 30.0) for _ in range(3)]
            await until(lambda: server.stats.in_flight == 3, "all three running", LOSS_DEADLINE)
        try:
            await _all_fail_with_connection_lost(pending)
            with pytest.raises(ConnectionLost):  # nobody there: fails, does not hang
                await client.call(PING)
        finally:
            await client.aclose()

    @pytest.mark.asyncio
    async def test_a_killed_server_process_fails_pending_calls_with_connection_lost(
        self, transport_case: TransportCase
    ) -> None:
        """Calls pending when the server process is SIGKILLed fail with ConnectionLost."""
        url = transport_case.make_url()
        async with (
            serving_child(url) as pid,
            _client(url, timeout=60.0, reconnect_timeout=0.2) as client,
        ):
            pending = [await client.submit(SLEEP, 30.0) for _ in range(3)]
            assert await client.call(PING) == "pong"  # the sleeps are running
            os.kill(pid, signal.SIGKILL)
            await _all_fail_with_connection_lost(pending)

    # ------------------------------------------------------------------ bad input

    @pytest.mark.asyncio
    async def test_malformed_messages_are_counted_and_everyone_else_is_served(
        self, transport_case: TransportCase
    ) -> None:
        """Undecodable messages are answered or dropped and counted; others are unaffected."""
        url = transport_case.make_url()
        good_header = bytes(encode_request(7, ECHO.name, ("x",))[0])
        bad_messages: list[list[bytes]] = [
            [os.urandom(40)],
            [b""],
            # Frames nobody refers to.
            [bytes(encode_request(9, ECHO.name, ("x",))[0]), os.urandom(10), os.urandom(10)],
            [b"\x95\x09\x00\x08\xa8rpc.ping\x90"],  # another wire version, request 8
            [good_header[:-3]],
        ]
        async with serve_conformance(url) as server, _client(url) as good:
            raw = await RawClient(url).connect()
            try:
                for frames in bad_messages:
                    await raw.send(frames)
                assert await good.call(ECHO, "still here") == "still here"
                await raw.send([good_header])
                with anyio.fail_after(CALL_TIMEOUT):
                    while True:  # error replies and the good reply come back in order
                        if codec_reply_id(await raw.recv()) == 7:
                            break
            finally:
                await raw.close()
            counted = server.stats.malformed + server.stats.dropped + server.stats.error_replies
            assert counted >= len(bad_messages) - 1  # an unused frame may be tolerated
            assert await good.call(ECHO, "after") == "after"

    @pytest.mark.asyncio
    async def test_a_client_that_never_reads_delays_no_other_client(
        self, transport_case: TransportCase
    ) -> None:
        """The server's send never waits for one peer: another's pings stay prompt."""
        url = transport_case.make_url()
        async with serve_conformance(url, peer_stall_timeout=60.0), _client(url) as good:
            flood = await RawClient(url).connect()
            echo = encode_request(1, ECHO.name, (b"x" * (64 * 1024),))

            async def send_without_reading() -> None:
                for _ in range(3000):  # ~200 MiB of replies, none of them read
                    await flood.send(echo)

            sending = asyncio.create_task(send_without_reading())
            try:
                slowest = 0.0
                for _ in range(100):
                    started = time.perf_counter()
                    assert await good.call(PING, timeout=5.0) == "pong"
                    slowest = max(slowest, time.perf_counter() - started)
                    await asyncio.sleep(0.01)
            finally:
                sending.cancel()
                with contextlib.suppress(BaseException):
                    await sending
                await flood.close()
        assert slowest < 1.0, f"a ping took {slowest:.3f} s while another client read nothing"

    @pytest.mark.asyncio
    async def test_the_size_cap_is_enforced_and_the_server_keeps_serving(
        self, transport_case: TransportCase
    ) -> None:
        """A message over the server's cap fails that call only; the server keeps serving."""
        url = transport_case.make_url()
        cap = 1 * MiB
        async with (
            serve_conformance(url, max_message_size=cap),
            _client(url, max_message_size=64 * MiB, reconnect_timeout=5.0) as big,
            _client(url) as bystander,
        ):
            started = time.monotonic()
            with pytest.raises((MessageTooLarge, ConnectionLost)):
                await big.call(ECHO, b"x" * (2 * cap))
            assert time.monotonic() - started < LOSS_DEADLINE
            assert await bystander.call(ECHO, "fine") == "fine"
            assert await big.call(ECHO, "small") == "small"  # reconnected if it was dropped
            local = _client(url, max_message_size=cap)
            async with local:
                with pytest.raises(MessageTooLarge):  # refused before anything is sent
                    await local.call(ECHO, b"x" * (2 * cap))

    @pytest.mark.asyncio
    async def test_raw_garbage_and_half_frames_are_dropped_and_counted(
        self, transport_case: TransportCase
    ) -> None:
        """Garbage and half frames, then a hang or a hang-up, disturb no other client."""
        if transport_case.raw_connect is None:
            pytest.skip(f"{transport_case.name} has no socket to send raw bytes to")
        url = transport_case.make_url()
        cap = 1 * MiB
        inputs = dict(transport_case.raw_inputs(cap))
        assert inputs, "a socket transport should name its malformed inputs"
        connect = transport_case.raw_connect
        async with serve_conformance(url, max_message_size=cap) as server, _client(url) as good:
            for name, data in inputs.items():
                for then_hang in (True, False):
                    sock = await anyio.to_thread.run_sync(connect, url)
                    try:
                        await anyio.to_thread.run_sync(sock.sendall, data)
                        if then_hang:  # a stalled peer must not stall anyone else
                            assert await good.call(ECHO, name) == name
                    finally:
                        sock.close()
            assert await good.call(ECHO, "after") == "after"
            await until(
                lambda: server.transport_stats()["malformed"] + server.stats.dropped >= 1,
                "a malformed input counted",
                CALL_TIMEOUT,
            )

    @pytest.mark.asyncio
    async def test_ten_thousand_bad_connections_leak_no_descriptors_or_memory(
        self, transport_case: TransportCase
    ) -> None:
        """After 10,000 malformed connections, descriptors and memory are back where they were."""
        if transport_case.raw_connect is None:
            pytest.skip(f"{transport_case.name} has no socket to send raw bytes to")
        url = transport_case.make_url()
        cap = 1 * MiB
        payloads = list(transport_case.raw_inputs(cap).values())
        connect = transport_case.raw_connect

        def storm(count: int) -> None:
            rng = random.Random(count)
            for _ in range(count):
                sock = connect(url)
                try:
                    sock.sendall(rng.choice(payloads))
                except OSError:
                    pass  # the server may hang up first: that is allowed
                finally:
                    sock.close()

        async with serve_conformance(url, max_message_size=cap) as server, _client(url) as good:
            await anyio.to_thread.run_sync(storm, 1_000)  # warm caches and pools
            await _settle(server)
            gc.collect()
            fds_before, rss_before = open_fds(), _rss_bytes()
            await anyio.to_thread.run_sync(storm, 10_000)
            assert await good.call(ECHO, "alive") == "alive"
            await _settle(server)
            gc.collect()
            fds_after, rss_after = open_fds(), _rss_bytes()
            stats = server.transport_stats()
        assert fds_after - fds_before <= 2, (fds_before, fds_after)
        assert rss_after - rss_before < 16 * MiB, (rss_before, rss_after)
        assert stats["connections"] >= 10_000 or stats["malformed"] >= 1, stats


async def _all_fail_with_connection_lost(pending: list[asyncio.Future[Any]]) -> None:
    """Every pending call fails with ConnectionLost, well before its own timeout."""
    results = await asyncio.wait_for(
        asyncio.gather(*pending, return_exceptions=True), LOSS_DEADLINE
    )
    assert all(isinstance(r, ConnectionLost) for r in results), results


def codec_reply_id(frames: list[Any]) -> int | None:
    """The request id a reply answers, or None if it cannot be read."""
    from kvrpc.codec import peek

    return peek(frames)[1]


async def _settle(server: RPCServer) -> None:
    """Wait until the server has seen every raw connection close (its counters tell)."""

    def settled() -> bool:
        stats = server.transport_stats()
        return stats["connections"] <= stats["disconnects"] + 1  # +1: the good client

    await until(settled, "every raw connection seen closed", 10)


def _rss_bytes() -> int:
    with contextlib.suppress(OSError), open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0
