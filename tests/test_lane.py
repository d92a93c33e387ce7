"""A SyncClient's direct lane: a call with nothing pending does its own I/O in its thread.

Against a real server on a socket transport (the lane needs a blocking connection, which
inproc has not), on its own loop thread, as an engine process would talk to a separate one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvrpc import (
    ClientClosed,
    ConnectionLost,
    HandlerType,
    ProtocolDefinition,
    RequestTimeout,
    RPCServer,
    SyncClient,
)
from kvrpc.errors import MessageTooLarge
from kvrpc.lane import NOT_TAKEN, DirectLane, LaneFuture
from kvrpc.transport import TransportOptions

ECHO = ProtocolDefinition("lane.echo", (object,), object)
# LATE(1) is held until LATE(2) runs; LATE(2) answers once LATE(1) has: a late reply first.
LATE = ProtocolDefinition("lane.late", (int,), int)
RECORD = ProtocolDefinition("lane.record", (int,), int)
HOLD = ProtocolDefinition("lane.hold", (), str, HandlerType.BLOCKING)  # waits for release
BIG = ProtocolDefinition("lane.big", (int,), bytes)


class Served:
    """A server on its own loop thread, with what its handlers saw."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.record: list[int] = []
        self.release = threading.Event()
        self.holding = threading.Event()
        self._started = threading.Event()
        self._server: RPCServer | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._started.wait(10)

    async def _main(self) -> None:
        server = RPCServer(self.url, max_workers=4, shutdown_grace=0.2)

        second_running, first_answered = asyncio.Event(), asyncio.Event()

        async def late(tag: int) -> int:
            if tag == 1:
                await second_running.wait()
                first_answered.set()  # its reply goes out as this returns
            else:
                second_running.set()
                await first_answered.wait()
            return tag

        def record(seq: int) -> int:
            self.record.append(seq)
            return seq

        def hold() -> str:
            self.holding.set()
            self.release.wait(30)
            return "held"

        server.register(ECHO, lambda value: value)
        server.register(LATE, late)
        server.register(RECORD, record)
        server.register(HOLD, hold)
        server.register(BIG, lambda size: b"x" * size)
        self._server = server
        async with server:
            self._started.set()
            await server.wait_for_stop()

    @property
    def registry(self):  # type: ignore[no-untyped-def]
        assert self._server is not None
        return self._server.registry

    def begin_stop(self) -> None:
        """Stop the server (its connections close) without waiting for it, nor releasing HOLD."""
        assert self._server is not None
        self._server.stop()

    def stop(self) -> None:
        self.release.set()
        self.begin_stop()
        self._thread.join(10)
        assert not self._thread.is_alive()


@pytest.fixture(params=["unix", "zmq+ipc"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    pytest.importorskip("kvrpc_unix" if request.param == "unix" else "kvrpc_zmq")
    running = Served(f"{request.param}://{tmp_path}/lane.sock")
    yield running
    running.stop()


def test_a_call_with_nothing_pending_is_answered_on_the_callers_own_connection(
    served: Served,
) -> None:
    with SyncClient(served.url, registry=served.registry) as client:
        assert [client.call(ECHO, n) for n in range(50)] == list(range(50))
        assert client.stats.direct_calls == 50
        assert client.stats.requests == client.stats.replies == 50


def test_without_direct_every_call_goes_through_the_loop_thread(served: Served) -> None:
    with SyncClient(served.url, registry=served.registry, direct=False) as client:
        assert client.call(ECHO, "x") == "x"
        assert client.stats.direct_calls == 0


def test_a_call_never_overtakes_a_request_the_same_thread_submitted_before_it(
    served: Served,
) -> None:
    with SyncClient(served.url, registry=served.registry) as client:
        for round_ in range(20):
            earlier = client.submit(RECORD, 2 * round_)
            assert client.call(RECORD, 2 * round_ + 1) == 2 * round_ + 1
            assert earlier.result(10) == 2 * round_
        # While the submitted one was pending, the call went the loop path, behind it.
        assert served.record == list(range(40))


def test_calls_from_many_threads_all_get_their_own_answers(served: Served) -> None:
    with SyncClient(served.url, registry=served.registry) as client:

        def run(worker: int) -> list[object]:
            return [client.call(ECHO, [worker, n]) for n in range(100)]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(run, range(8)))
        assert results == [[[w, n] for n in range(100)] for w in range(8)]
        stats = client.stats
        assert stats.requests == stats.replies == 800
        assert stats.direct_calls >= 1  # the lane took whatever it found free


def test_a_lane_call_past_its_deadline_times_out_and_its_late_reply_is_skipped(
    served: Served,
) -> None:
    with SyncClient(served.url, registry=served.registry) as client:
        with pytest.raises(RequestTimeout, match=r"lane\.late"):
            client.call(LATE, 1, timeout=0.05)  # held until the next call runs
        # The next call on the lane reads the late reply first, and skips it.
        assert client.call(LATE, 2) == 2
        assert client.stats.late_replies == 1
        assert client.stats.direct_calls == 1


def test_a_server_gone_mid_call_fails_the_lane_call_with_connection_lost(
    served: Served,
) -> None:
    client = SyncClient(served.url, registry=served.registry, timeout=60.0)
    try:
        failure: list[BaseException] = []

        def call() -> None:
            try:
                client.call(HOLD)
            except BaseException as exc:
                failure.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        assert served.holding.wait(10)
        served.begin_stop()  # closes every connection, the lane's too, long before the deadline
        caller.join(20)
        assert not caller.is_alive()
        assert len(failure) == 1 and isinstance(failure[0], ConnectionLost), failure
    finally:
        client.close()


def test_after_the_server_comes_back_calls_reconnect(tmp_path: Path) -> None:
    pytest.importorskip("kvrpc_unix")
    url = f"unix://{tmp_path}/again.sock"
    first = Served(url)
    with SyncClient(url, registry=first.registry, reconnect_timeout=10.0) as client:
        assert client.call(ECHO, "before") == "before"
        first.stop()
        second = Served(url)
        try:
            # The lane's connection died with the first server: its send fails whole, and
            # the call goes the loop path, which reconnects.
            assert client.call(ECHO, "after") == "after"
            assert client.call(ECHO, "again") == "again"
        finally:
            second.stop()


def test_a_reply_over_the_clients_size_cap_fails_only_that_call(tmp_path: Path) -> None:
    # Unix only: over zmq, libzmq's MAXMSGSIZE drops the whole connection instead (the loop
    # path's calls then fail with ConnectionLost too).
    pytest.importorskip("kvrpc_unix")
    served = Served(f"unix://{tmp_path}/cap.sock")
    with SyncClient(served.url, registry=served.registry, max_message_size=64 * 1024) as client:
        with pytest.raises(MessageTooLarge, match="exceeds this client's max_message_size"):
            client.call(BIG, 100_000)  # a small request, a reply over the cap
        assert client.call(ECHO, "small") == "small"
        assert client.stats.direct_calls == 1
    served.stop()


def test_a_lane_busy_with_one_threads_call_is_not_waited_for_by_another(
    served: Served,
) -> None:
    with SyncClient(served.url, registry=served.registry) as client:
        held = ThreadPoolExecutor(1).submit(client.call, HOLD)
        assert served.holding.wait(10)  # that call is on the lane, waiting for its reply
        assert client.call(ECHO, "beside") == "beside"  # the loop path, at once
        assert client.stats.direct_calls == 0
        served.release.set()
        assert held.result(10) == "held"
        assert client.stats.direct_calls == 1


def test_a_closed_lane_takes_no_call(served: Served) -> None:
    lane = DirectLane(
        served.url, TransportOptions(), connect_timeout=5.0, retry_interval=1.0, validate=False
    )
    assert lane.open()
    lane.close()
    assert lane.call(1, None, [b""], 1.0) is NOT_TAKEN
    assert lane.stats.requests == 0


def test_a_call_after_a_settled_submit_finishes_after_that_submits_done_callbacks(
    served: Served,
) -> None:
    # A future's result is visible before its done-callbacks have run (they run on the loop
    # thread right after). A call made in that gap must not take the lane and finish first.
    with SyncClient(served.url, registry=served.registry) as client:
        ran: list[int] = []

        def slow_callback(_: object) -> None:
            time.sleep(0.05)  # widens the gap; the order asserted below does not depend on it
            ran.append(1)

        for _ in range(5):
            ran.clear()
            submitted = client.submit(ECHO, "first")
            submitted.add_done_callback(slow_callback)
            assert submitted.result(10) == "first"
            assert client.call(ECHO, "second") == "second"
            assert ran == [1]


# ------------------------------------------------------------- send now, read later


def test_direct_submits_go_out_at_once_and_their_futures_read_their_own_replies(
    served: Served,
) -> None:
    with SyncClient(served.url, registry=served.registry) as client:
        futures = [client.submit_direct(RECORD, n) for n in range(40)]
        assert all(isinstance(f, LaneFuture) for f in futures)
        assert [f.result(10) for f in futures] == list(range(40))
        assert served.record == list(range(40))
        assert client.stats.direct_calls == 40
        assert client.stats.requests == client.stats.replies == 40


def test_polling_done_alone_settles_a_direct_submit(served: Served) -> None:
    with SyncClient(served.url, registry=served.registry) as client:
        future = client.submit_direct(ECHO, "polled")
        polls = 0
        while not future.done():  # nothing else reads the lane: each poll reads what came
            polls += 1
            assert polls < 10_000_000, "a polled direct submit never settled"
        assert future.result(0) == "polled"


def test_a_threads_later_calls_and_submits_never_overtake_its_direct_submits(
    served: Served,
) -> None:
    with SyncClient(served.url, registry=served.registry) as client:
        for round_ in range(10):
            base = 4 * round_
            first = client.submit_direct(RECORD, base)
            assert client.call(RECORD, base + 1) == base + 1  # on the lane, behind it
            second = client.submit_direct(RECORD, base + 2)
            plain = client.submit(RECORD, base + 3)  # waits for both, then the loop path
            assert second.done() and first.done()
            assert plain.result(10) == base + 3
        assert served.record == list(range(40))


def test_another_threads_calls_take_the_loop_path_while_one_thread_owns_the_lane(
    served: Served,
) -> None:
    with SyncClient(served.url, registry=served.registry) as client:
        held = client.submit_direct(HOLD)
        assert served.holding.wait(10)
        with ThreadPoolExecutor(1) as other:
            assert other.submit(client.call, ECHO, "beside").result(10) == "beside"
            assert client.stats.direct_calls == 1  # only the HOLD
        served.release.set()
        assert held.result(10) == "held"


def test_more_direct_submits_than_slots_are_all_answered(served: Served) -> None:
    with SyncClient(served.url, registry=served.registry, max_in_flight=4) as client:
        futures = [client.submit_direct(ECHO, n) for n in range(50)]  # reads to free slots
        assert [f.result(10) for f in futures] == list(range(50))


def test_a_cancelled_direct_submit_gives_its_slot_back_at_once(served: Served) -> None:
    with SyncClient(served.url, registry=served.registry, max_in_flight=1) as client:
        held = client.submit_direct(HOLD)
        assert served.holding.wait(10)
        assert held.cancel()
        # The only slot is free again, though HOLD's reply has not come.
        assert client.submit_direct(ECHO, "next").result(10) == "next"
        served.release.set()


def test_a_direct_submit_past_its_deadline_times_out_and_its_late_reply_is_skipped(
    served: Served,
) -> None:
    with SyncClient(served.url, registry=served.registry) as client:
        late = client.submit_direct(LATE, 1, timeout=0.05)
        with pytest.raises(RequestTimeout, match=r"lane\.late"):
            late.result(10)  # reading the lane notices the deadline
        assert client.submit_direct(LATE, 2).result(10) == 2
        assert client.stats.late_replies == 1


def test_a_server_gone_fails_the_pending_direct_submits_with_connection_lost(
    served: Served,
) -> None:
    client = SyncClient(served.url, registry=served.registry, timeout=60.0)
    try:
        held = [client.submit_direct(HOLD) for _ in range(3)]
        assert served.holding.wait(10)
        served.begin_stop()
        for future in held:
            assert isinstance(future.exception(20), ConnectionLost)
    finally:
        client.close()


def test_closing_the_client_fails_its_pending_direct_submits(served: Served) -> None:
    client = SyncClient(served.url, registry=served.registry, timeout=60.0)
    held = client.submit_direct(HOLD)
    assert served.holding.wait(10)
    client.close()
    assert isinstance(held.exception(10), ClientClosed)
    served.release.set()


async def test_a_direct_submits_future_can_be_awaited(served: Served) -> None:
    client = await asyncio.to_thread(SyncClient, served.url, registry=served.registry)
    try:
        future = client.submit_direct(ECHO, "awaited")
        assert await asyncio.wait_for(future, 10) == "awaited"
    finally:
        await asyncio.to_thread(client.close)
