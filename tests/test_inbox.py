"""The core's inbox, as a specification: plain calls, no sockets, no event loop, no sleeps.

Loop turns are made explicit: the inbox's ``schedule`` appends to a list, and ``turn()``
runs what was scheduled, as the event loop would in its next iteration.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvrpc.codec import Buffer
from kvrpc.transport import Inbox, Peer

A, B, C = b"A", b"B", b"C"


class Harness:
    """An inbox whose handler records, whose transport is a pause flag, whose loop is a list."""

    def __init__(self, *, limit: int = 100, burst: int = 4) -> None:
        self.handled: list[tuple[Peer, bytes]] = []
        self.events: list[str] = []
        self.later: list[Callable[[], None]] = []
        self.inbox = Inbox(
            self.handle, self.lost, limit=limit, burst=burst, schedule=self.later.append
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


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        Inbox(limit=1)
    with pytest.raises(ValueError, match="burst"):
        Inbox(burst=0)


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
