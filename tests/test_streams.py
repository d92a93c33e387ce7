"""The rules of a streamed call (kvrpc.streams), as plain calls: no sockets, no loop."""

from __future__ import annotations

import pytest

from kvrpc.errors import ConnectionLost
from kvrpc.streams import EMPTY, MAX_WINDOW, ConsumerBuffer, ServerStream

# ------------------------------------------------------------------ the server's credit


def test_a_stream_opens_with_the_credit_its_client_granted() -> None:
    stream = ServerStream(b"peer", 7, 4)
    assert stream.available == 4
    stream.took(3)
    assert stream.available == 1


def test_a_grant_wakes_the_producer_only_when_it_was_out_of_credit() -> None:
    stream = ServerStream(b"peer", 7, 2)
    assert stream.grant(1) is False  # it still had credit: nobody waits
    stream.took(3)
    assert stream.available == 0
    assert stream.grant(2) is True
    assert stream.available == 2
    assert stream.grant(0) is False


def test_the_credit_held_never_exceeds_the_largest_window() -> None:
    stream = ServerStream(b"peer", 7, 10 * MAX_WINDOW)
    assert stream.available == MAX_WINDOW
    stream.grant(2**31)
    assert stream.available == MAX_WINDOW
    stream.took(5)
    stream.grant(2**31)
    assert stream.available == MAX_WINDOW


def test_a_stream_is_cancelled_once() -> None:
    stream = ServerStream(b"peer", 7, 1)
    assert stream.cancel() is True
    assert stream.cancel() is False
    assert stream.cancelled


# ------------------------------------------------------------------ the client's window


def test_items_come_out_in_the_order_they_arrived_then_the_end() -> None:
    buffer = ConsumerBuffer(8)
    assert buffer.take() is EMPTY and buffer.take_would_wait()
    assert buffer.push([1, 2]) and buffer.push([3])
    buffer.finish()
    assert [buffer.take(), buffer.take(), buffer.take()] == [1, 2, 3]
    with pytest.raises(StopIteration):
        buffer.take()


def test_an_error_end_comes_after_the_items_before_it() -> None:
    buffer = ConsumerBuffer(8)
    buffer.push([1])
    lost = ConnectionLost("gone")
    assert buffer.finish(lost) is True
    assert buffer.finish(None) is False  # the first end stays
    assert buffer.take() == 1
    with pytest.raises(ConnectionLost):
        buffer.take()


def test_credit_is_granted_after_half_a_window_as_much_as_was_taken() -> None:
    buffer = ConsumerBuffer(8)
    buffer.push(list(range(8)))
    for _ in range(3):
        buffer.take()
        assert buffer.credit_due() == 0
    buffer.take()
    assert buffer.credit_due() == 4
    assert buffer.credit_due() == 0
    assert buffer.granted == 12
    assert buffer.push([8, 9, 10, 11])  # the 4 granted
    assert buffer.push([12]) is False  # and no more
    assert len(buffer) == 8


def test_unread_items_never_exceed_the_window() -> None:
    window = 16
    buffer = ConsumerBuffer(window)
    received = 0
    for step in range(200):
        # The server sends all it may; the consumer takes a varying amount each turn.
        sendable = buffer.granted - received
        assert buffer.push(list(range(sendable)))
        received += sendable
        assert len(buffer) <= window
        for _ in range(step % 5):
            if buffer.take() is EMPTY:
                break
            buffer.credit_due()


def test_a_batch_beyond_the_credit_is_refused_and_nothing_of_it_kept() -> None:
    buffer = ConsumerBuffer(4)
    assert buffer.push([1, 2, 3])
    assert buffer.push([4, 5]) is False
    assert len(buffer) == 3 and buffer.received == 3


def test_items_after_a_local_end_are_dropped() -> None:
    buffer = ConsumerBuffer(4)
    buffer.finish()
    assert buffer.push([1])
    assert len(buffer) == 0
    assert buffer.credit_due() == 0


@pytest.mark.parametrize("window", [0, -1, MAX_WINDOW + 1])
def test_a_window_outside_its_range_is_refused(window: int) -> None:
    with pytest.raises(ValueError, match="window"):
        ConsumerBuffer(window)


def test_closing_drops_the_unread_items_and_ends_the_stream() -> None:
    buffer = ConsumerBuffer(4)
    buffer.push([1, 2])
    assert buffer.close() is True
    with pytest.raises(StopIteration):
        buffer.take()
    assert buffer.close() is False
