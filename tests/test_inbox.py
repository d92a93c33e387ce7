"""The core's inbox, as a specification: plain calls, no sockets, no event loop, no sleeps.

Loop turns are made explicit: the inbox's ``schedule`` appends to a list, and ``turn()``
runs what was scheduled, as the event loop would in its next iteration.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvrpc.codec import Buffer, encode_request
from kvrpc.config import ServerConfig
from kvrpc.protocol import ECHO, PING
from kvrpc.transport import Inbox, Peer

A, B, C = b"A", b"B", b"C"


class Harness:
    """An inbox whose handler records, whose transport is a pause flag, whose loop is a list."""

    def __init__(self, *, limit: int = 100, burst: int = 4, burst_bytes: int | None = None) -> None:
        self.handled: list[tuple[Peer, bytes]] = []
        self.events: list[str] = []
        self.later: list[Callable[[], None]] = []
        self.inbox = Inbox(
            self.handle,
            self.lost,
            limit=limit,
            burst=burst,
            burst_bytes=burst_bytes,
            schedule=self.later.append,
        )
        self.inbox.bind(self)

    def handle(self, peer: Peer, frames: list[Buffer]) -> None:
        self.handled.append((peer, bytes(frames[0])))
        self.events.append(f"{peer.decode()}:{bytes(frames[0]).decode()}")

    def lost(self, peer: Peer) -> None:
        self.events.append(f"lost {peer.decode()}")

    def pause_reading(self) -> None:
        self.events.append("pause")

    def resume_reading(self) -> None:
        self.events.append("resume")

    def read(self, *messages: tuple[Peer, str]) -> None:
        """One read callback of the transport: deliver each message, then read_done."""
        for peer, body in messages:
            self.inbox.deliver(peer, [body.encode()])
        self.inbox.read_done()

    def read_sized(self, *messages: tuple[Peer, str, int]) -> None:
        """One read of messages of a given size: the body, then a frame padding it out."""
        for peer, body, size in messages:
            head = body.encode()
            self.inbox.deliver(peer, [head, bytes(size - len(head))])
        self.inbox.read_done()

    def turn(self) -> None:
        """The next loop turn: run what was scheduled for it."""
        due, self.later[:] = list(self.later), []
        for fn in due:
            fn()


def test_a_message_is_handled_within_the_read_that_delivered_it() -> None:
    h = Harness()
    h.read((A, "1"))
    assert h.events == ["A:1"]
    assert h.later == []  # no loop turn, no task: the fast path


def test_a_read_handles_at_most_a_burst_at_once_and_queues_the_rest() -> None:
    h = Harness(burst=4)
    h.read(*((A, str(n)) for n in range(10)))
    assert h.events == ["A:0", "A:1", "A:2", "A:3"]
    assert h.inbox.queued == 6
    h.turn()
    assert h.events[4:] == ["A:4", "A:5", "A:6", "A:7"]
    h.turn()
    assert h.events[8:] == ["A:8", "A:9"]
    assert h.inbox.queued == 0 and h.later == []


def test_queued_messages_are_taken_one_peer_at_a_time() -> None:
    """A flood of one peer delays another peer's request by at most one of its own."""
    h = Harness(burst=2)
    h.read(*((A, str(n)) for n in range(8)))
    h.read((B, "ping"))  # a new read: B has nothing queued, so it goes straight through
    assert h.events == ["A:0", "A:1", "B:ping"]
    h.read((B, "x"), (B, "y"), (B, "z"))  # a burst of B's own is allowed again
    h.read((C, "1"), (C, "2"), (C, "3"))
    assert h.events[3:] == ["B:x", "B:y", "C:1", "C:2"]
    # Queued now: A 2..7, B z, C 3. Each turn takes one from each peer in turn.
    h.turn()
    assert h.events[7:] == ["A:2", "B:z"]
    h.turn()
    assert h.events[9:] == ["C:3", "A:3"]


def test_a_peer_with_messages_queued_queues_the_next_one_too() -> None:
    """Order within a peer never changes, even when a new read could burst."""
    h = Harness(burst=1)
    h.read((A, "1"), (A, "2"))
    h.read((A, "3"))
    assert h.events == ["A:1"]
    h.turn()
    h.turn()
    assert h.events == ["A:1", "A:2", "A:3"]


def test_the_transport_is_paused_at_the_limit_and_resumed_at_half() -> None:
    h = Harness(limit=6, burst=1)
    h.read(*((A, str(n)) for n in range(7)))  # 1 handled, 6 queued: the limit
    assert h.events == ["A:0", "pause"]
    assert h.inbox.paused and h.inbox.pauses == 1
    h.turn()  # queued 5
    h.turn()  # queued 4
    assert "resume" not in h.events
    h.turn()  # queued 3: half the limit
    assert h.events[-2:] == ["A:3", "resume"] or h.events[-2:] == ["resume", "A:3"]
    assert not h.inbox.paused
    h.read((A, "7"))  # queued behind A's own, so not at once
    h.turn()
    h.turn()
    h.turn()
    h.turn()
    assert [e for e in h.events if e.startswith("A:")] == [f"A:{n}" for n in range(8)]
    assert h.events.count("pause") == 1 and h.events.count("resume") == 1


def test_a_lost_peer_is_reported_after_its_queued_messages() -> None:
    h = Harness(burst=1)
    h.read((A, "1"), (A, "2"))
    h.inbox.peer_lost(A)
    assert h.events == ["A:1"]
    h.turn()
    assert h.events == ["A:1", "A:2", "lost A"]


def test_a_lost_peer_with_nothing_queued_is_reported_at_once() -> None:
    h = Harness()
    h.read((A, "1"))
    h.inbox.peer_lost(A)
    assert h.events == ["A:1", "lost A"]


def test_a_handler_that_raises_stops_nothing() -> None:
    h = Harness()
    calls: list[bytes] = []

    def flaky(peer: Peer, frames: list[Buffer]) -> None:
        calls.append(bytes(frames[0]))
        raise RuntimeError("a bug in the core")

    inbox = Inbox(flaky, burst=8, schedule=h.later.append)
    for body in (b"1", b"2"):
        inbox.deliver(A, [body])
    assert calls == [b"1", b"2"]


def test_after_close_nothing_is_handled() -> None:
    h = Harness(burst=1)
    h.read((A, "1"), (A, "2"))
    h.inbox.close()
    h.read((A, "3"))
    h.inbox.peer_lost(A)
    h.turn()
    assert h.events == ["A:1"]
    assert h.inbox.queued == 0


def test_a_read_of_large_messages_handles_only_what_fits_the_byte_budget() -> None:
    h = Harness(burst=64, burst_bytes=1000)
    h.read_sized(*((A, str(n), 300) for n in range(10)))
    assert h.events == ["A:0", "A:1", "A:2"]  # 900 bytes; a fourth would make 1200
    assert h.inbox.queued == 7
    h.turn()  # each turn of the queue has the same budget
    assert h.events[3:] == ["A:3", "A:4", "A:5"]
    h.turn()
    h.turn()
    assert h.events[6:] == ["A:6", "A:7", "A:8", "A:9"]
    assert h.inbox.queued == 0 and h.later == []


def test_small_messages_still_burst_by_count_under_a_byte_budget() -> None:
    h = Harness(burst=4, burst_bytes=1000)
    h.read_sized(*((A, str(n), 10) for n in range(6)))
    assert h.events == ["A:0", "A:1", "A:2", "A:3"]  # 40 bytes: the count ends the burst
    h.turn()
    assert h.events[4:] == ["A:4", "A:5"]


def test_the_server_defaults_let_64_pings_go_at_once_and_few_64_kib_requests() -> None:
    """The reason for ``inbox_burst_bytes``' default, with the frames a client really sends."""
    config = ServerConfig()
    handled: list[Peer] = []
    later: list[Callable[[], None]] = []
    inbox = Inbox(
        lambda peer, frames: handled.append(peer),
        burst=config.inbox_burst,
        burst_bytes=config.inbox_burst_bytes,
        schedule=later.append,
    )
    ping = encode_request(1, PING.name, ())
    for _ in range(100):
        inbox.deliver(A, ping)
    inbox.read_done()
    assert len(handled) == 64 == config.inbox_burst
    handled.clear()
    echo = encode_request(2, ECHO.name, (bytes(64 * 1024),))
    for _ in range(16):  # what the zmq transport reads in one callback
        inbox.deliver(B, echo)
    inbox.deliver(C, ping)  # another client's ping in the same read
    inbox.read_done()
    assert handled == [B, B, B, C]


def test_a_message_larger_than_the_budget_is_handled_alone_and_not_starved() -> None:
    h = Harness(burst=8, burst_bytes=1000)
    h.read_sized((A, "big", 5000), (A, "after", 10), (B, "small", 10))
    assert h.events == ["A:big"]  # the first of a read always goes, however large
    h.turn()
    assert h.events[1:] == ["A:after", "B:small"]
    # One that comes after others in a read waits for a turn of its own, and gets it.
    h.read_sized((A, "0", 600), (B, "huge", 5000), (A, "1", 600), (C, "2", 100))
    assert h.events[3:] == ["A:0", "C:2"]  # A:1 would pass the budget; C:2 fits beside A:0
    h.turn()
    assert h.events[5:] == ["B:huge"]  # alone: A:1 would pass the budget after it
    h.turn()
    assert h.events[6:] == ["A:1"]
    assert h.inbox.queued == 0 and h.later == []


def test_queued_turns_obey_the_byte_budget_and_alternate_peers() -> None:
    h = Harness(burst=64, burst_bytes=1000)
    h.read_sized(*((A, str(n), 400) for n in range(6)))
    h.read_sized(*((B, str(n), 400) for n in range(4)))  # a new read, a new budget
    assert h.events == ["A:0", "A:1", "B:0", "B:1"]
    h.turn()
    assert h.events[4:] == ["A:2", "B:2"]  # A:3 next would make 1200 bytes
    h.turn()
    assert h.events[6:] == ["A:3", "B:3"]
    h.turn()
    assert h.events[8:] == ["A:4", "A:5"]
    assert h.inbox.queued == 0 and h.later == []


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        Inbox(limit=1)
    with pytest.raises(ValueError, match="burst"):
        Inbox(burst=0)
    with pytest.raises(ValueError, match="burst_bytes"):
        Inbox(burst_bytes=0)


async def test_without_a_handler_messages_wait_for_recv_in_turn_order() -> None:
    lost: list[Peer] = []
    inbox = Inbox(on_peer_lost=lost.append)
    for peer, body in ((A, b"1"), (A, b"2"), (B, b"1")):
        inbox.deliver(peer, [body])
    inbox.peer_lost(A)
    assert await inbox.recv() == (A, [b"1"])
    assert await inbox.recv() == (B, [b"1"])
    assert lost == []
    assert await inbox.recv() == (A, [b"2"])
    assert lost == [A]  # reported as soon as its last message is out


async def test_recv_on_a_closed_inbox_raises_connection_lost() -> None:
    from kvrpc.errors import ConnectionLost

    inbox = Inbox()
    inbox.close()
    with pytest.raises(ConnectionLost):
        await inbox.recv()


async def test_recv_refuses_on_an_inbox_with_a_handler() -> None:
    inbox = Inbox(lambda peer, frames: None)
    with pytest.raises(RuntimeError, match="handler"):
        await inbox.recv()
