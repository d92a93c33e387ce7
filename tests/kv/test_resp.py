"""The RESP reply parser that lands values straight in their slots: rules without sockets.

A :class:`BulkReplies` is fed as a socket would feed it: whatever fits in the buffer it
offers, in receives of any size. Whatever the split, each value must end up in its own
target and every other reply must be named, and anything that is not Redis talking must
raise rather than be half understood.
"""

from __future__ import annotations

import random

import pytest

from kvrpc.kv.server.tiers.resp import (
    BulkReplies,
    Reply,
    ReplyKind,
    RespProtocolError,
    command,
)


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def feed(replies: BulkReplies, stream: bytes, sizes: list[int] | None = None) -> int:
    """Receive ``stream`` as a socket would, ``sizes[i]`` bytes at most per receive.

    Returns how many bytes were taken when the replies were done.
    """
    at, turn = 0, 0
    while not replies.done and at < len(stream):
        buffer = replies.buffer()
        assert len(buffer) > 0
        most = len(buffer) if sizes is None else sizes[turn % len(sizes)]
        n = min(len(buffer), most, len(stream) - at)
        buffer[:n] = stream[at : at + n]
        replies.received(n)
        at, turn = at + n, turn + 1
    return at


def targets(*sizes: int) -> list[memoryview]:
    return [memoryview(bytearray(size)) for size in sizes]


VALUES = [random.Random(seed).randbytes(size) for seed, size in ((1, 300_000), (2, 5), (3, 70_000))]
STREAM = b"".join(bulk(v) for v in VALUES)


@pytest.mark.parametrize("sizes", [None, [1], [2], [3, 7], [65_536], [100_000, 1]], ids=str)
def test_values_land_in_their_targets_whatever_the_receives_split(
    sizes: list[int] | None,
) -> None:
    into = targets(*(len(v) for v in VALUES))
    replies = BulkReplies(into)
    assert feed(replies, STREAM, sizes) == len(STREAM)
    assert replies.done
    assert replies.replies == [Reply(ReplyKind.VALUE)] * 3
    assert [bytes(t) for t in into] == VALUES


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_and_reply_kinds_parse_the_same(seed: int) -> None:
    rng = random.Random(seed)
    stream, expected, sizes, values = b"", [], [], []
    for _ in range(rng.randint(1, 12)):
        pick = rng.randrange(5)
        size = rng.choice([0, 1, 2, 100, 70_000])
        value = rng.randbytes(size)
        if pick == 0:
            stream += bulk(value)
            expected.append(Reply(ReplyKind.VALUE))
            sizes.append(size)
            values.append(value)
        elif pick == 1:
            stream += b"$-1\r\n"
            expected.append(Reply(ReplyKind.NIL))
            sizes.append(size)
            values.append(bytes(size))  # left as it was
        elif pick == 2:
            stream += bulk(value + b"extra")
            expected.append(Reply(ReplyKind.WRONG_LENGTH))
            sizes.append(size)
            values.append(bytes(size))
        elif pick == 3:
            stream += b"-WRONGTYPE Operation against a key\r\n"
            expected.append(Reply(ReplyKind.ERROR, "WRONGTYPE Operation against a key"))
            sizes.append(size)
            values.append(bytes(size))
        else:
            stream += b":42\r\n"
            expected.append(Reply(ReplyKind.SIMPLE, "42"))
            sizes.append(size)
            values.append(bytes(size))
    into = targets(*sizes)
    replies = BulkReplies(into)
    splits = [rng.randint(1, 9000) for _ in range(50)]
    assert feed(replies, stream, splits) == len(stream)
    assert replies.done and replies.replies == expected
    assert [bytes(t) for t in into] == values


def test_a_value_is_received_into_its_target_not_into_a_copy() -> None:
    into = targets(200_000)
    replies = BulkReplies(into)
    head = b"$200000\r\n"
    buffer = replies.buffer()
    buffer[: len(head) + 10] = head + b"0123456789"
    replies.received(len(head) + 10)
    body = replies.buffer()  # the rest of the value: the target's own memory
    assert len(body) == 200_000 - 10
    body[:5] = b"abcde"
    assert bytes(into[0][10:15]) == b"abcde"
    body[5:] = b"z" * (len(body) - 5)
    replies.received(len(body))
    assert not replies.done  # the CRLF after the value is still to come
    replies.buffer()[:2] = b"\r\n"
    replies.received(2)
    assert replies.done and bytes(into[0][:10]) == b"0123456789"


def test_a_wrong_length_value_is_discarded_and_never_touches_its_target() -> None:
    into = targets(4, 4)
    replies = BulkReplies(into)
    feed(replies, bulk(b"toolong!") + bulk(b"good"), [3])
    assert replies.replies == [Reply(ReplyKind.WRONG_LENGTH), Reply(ReplyKind.VALUE)]
    assert bytes(into[0]) == bytes(4) and bytes(into[1]) == b"good"


def test_a_discarded_value_never_reads_past_its_own_crlf() -> None:
    replies = BulkReplies(targets(1))
    feed(replies, b"$5\r\n", [100])
    assert len(replies.buffer()) == 5 + 2  # only this value and its CRLF


def test_status_replies_answer_zero_length_targets() -> None:
    replies = BulkReplies(targets(0, 0))
    feed(replies, b"+OK\r\n-ERR invalid password\r\n")
    assert replies.replies == [
        Reply(ReplyKind.SIMPLE, "OK"),
        Reply(ReplyKind.ERROR, "ERR invalid password"),
    ]


def test_no_targets_is_done_at_once() -> None:
    assert BulkReplies([]).done


@pytest.mark.parametrize(
    ("stream", "says"),
    [
        (b"*2\r\n$1\r\na\r\n$1\r\nb\r\n", "unexpected reply"),
        (b"%1\r\n", "unexpected reply"),  # a RESP3 map
        (b"$abc\r\n", "bad bulk length"),
        (b"$-5\r\n", "bad bulk length"),
        (b"$4\r\nabcdXY", "not followed by CRLF"),
        (b"$" + b"9" * 5000, "longer than any Redis sends"),
        (b"$4\r\nabcd\r\n$-1\r\n", "more replies than commands"),
    ],
    ids=["array", "resp3", "not-a-number", "negative", "no-crlf", "endless-line", "extra"],
)
def test_anything_that_is_not_a_reply_to_these_commands_raises(stream: bytes, says: str) -> None:
    replies = BulkReplies(targets(4))
    with pytest.raises(RespProtocolError, match=says):
        feed(replies, stream)


def test_a_receive_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        BulkReplies(targets(4)).received(0)


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert command(b"GET", b"k:0") == b"*2\r\n$3\r\nGET\r\n$3\r\nk:0\r\n"
    assert command(b"AUTH", b"user", b"") == b"*3\r\n$4\r\nAUTH\r\n$4\r\nuser\r\n$0\r\n\r\n"
