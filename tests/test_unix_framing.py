"""The unix:// framing, byte by byte, without a socket: prefix encoding and the FrameReader."""

from __future__ import annotations

import mmap
import struct
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvrpc_unix.framing import (
    DIRECT_THRESHOLD,
    MAX_FRAMES,
    MMAP_THRESHOLD,
    OVERSIZED_HEAD,
    RECV_BUFFER_SIZE,
    FrameReader,
    FramingError,
    encode_prefix,
    frame_prefix,
)

from kvrpc.errors import TransportError
from kvrpc.transport import Oversized

CAP = 64 * 1024 * 1024


def wire(*messages: list[bytes]) -> bytes:
    """The bytes a sender puts on the stream for ``messages``."""
    return b"".join(encode_prefix(frames) + b"".join(frames) for frames in messages)


def received(reader: FrameReader) -> list[list[bytes]]:
    out = [[bytes(frame) for frame in message] for message in reader.messages]
    reader.messages.clear()
    return out


def feed_in_pieces(reader: FrameReader, data: bytes, cuts: list[int]) -> None:
    """Feed ``data`` split at ``cuts``, the way separate reads of a socket would see it."""
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if start < cut <= len(data):
            reader.feed(data[start:cut])
            start = cut


def pattern(size: int, seed: int = 7) -> bytes:
    """Bytes that differ along their length, so a misplaced chunk shows."""
    block = bytes((seed + i * 31) % 251 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


# ----------------------------------------------------------------------------- the prefix


def test_the_prefix_is_the_frame_count_then_each_length_in_network_order() -> None:
    assert encode_prefix([b"ab", b"", b"cde"]) == struct.pack("!I3Q", 3, 2, 0, 3)


def test_the_prefix_counts_bytes_of_a_memoryview_of_wider_items() -> None:
    floats: Any = memoryview(struct.pack("4d", 1, 2, 3, 4)).cast("d", (2, 2))
    assert encode_prefix([floats]) == struct.pack("!IQ", 1, 32)


def test_frame_prefix_reports_the_whole_message_size_on_the_wire() -> None:
    prefix, total = frame_prefix([b"abc", bytearray(5)])
    assert total == len(prefix) + 8 == 4 + 2 * 8 + 8


@pytest.mark.parametrize("count", [0, MAX_FRAMES + 1])
def test_a_frame_count_outside_1_to_1024_cannot_be_sent(count: int) -> None:
    with pytest.raises(FramingError, match="1 to 1024 frames"):
        encode_prefix([b"x"] * count)


def test_framing_errors_are_transport_errors() -> None:
    assert issubclass(FramingError, TransportError)


# ----------------------------------------------------------------------------- round trips

frame_lists = st.lists(
    st.lists(st.binary(max_size=300), min_size=1, max_size=6), min_size=1, max_size=6
)


@given(messages=frame_lists, cuts=st.lists(st.integers(min_value=0, max_value=4000)))
def test_messages_split_anywhere_come_out_whole_and_in_order(
    messages: list[list[bytes]], cuts: list[int]
) -> None:
    reader = FrameReader(CAP)
    feed_in_pieces(reader, wire(*messages), cuts)
    assert received(reader) == messages
    assert not reader.in_message


@given(messages=frame_lists)
@settings(max_examples=30)
def test_messages_fed_one_byte_at_a_time_come_out_whole(messages: list[list[bytes]]) -> None:
    reader = FrameReader(CAP)
    data = wire(*messages)
    for index in range(len(data)):
        reader.feed(data[index : index + 1])
    assert received(reader) == messages


@given(
    sizes=st.lists(
        st.sampled_from([0, 1, 1000, DIRECT_THRESHOLD - 1, DIRECT_THRESHOLD, 100_000]),
        min_size=1,
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=900_000), max_size=12),
)
@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
def test_frames_around_the_direct_receive_threshold_come_out_byte_identical(
    sizes: list[int], cuts: list[int]
) -> None:
    messages = [[pattern(size, seed) for seed, size in enumerate(sizes)], [b"after"]]
    reader = FrameReader(CAP)
    feed_in_pieces(reader, wire(*messages), cuts)
    assert received(reader) == messages


def test_many_small_messages_in_one_feed_all_come_out() -> None:
    messages = [[b"header-%d" % i, pattern(i * 37)] for i in range(2000)]
    reader = FrameReader(CAP)
    data = wire(*messages)
    # Far more than the receive buffer at once, in reads the size of a socket's.
    feed_in_pieces(reader, data, list(range(0, len(data), RECV_BUFFER_SIZE - 3)))
    assert received(reader) == messages


def test_zero_length_frames_are_kept_as_empty_frames() -> None:
    reader = FrameReader(CAP)
    reader.feed(wire([b""], [b"", b"x", b""]))
    assert received(reader) == [[b""], [b"", b"x", b""]]


def test_a_message_may_have_1024_frames() -> None:
    frames = [b"%d" % i for i in range(MAX_FRAMES)]
    reader = FrameReader(CAP)
    reader.feed(wire(frames))
    assert received(reader) == [frames]


# ----------------------------------------------------------------------------- large frames


def test_a_large_frame_arriving_in_pieces_is_received_into_its_own_buffer() -> None:
    body = pattern(200_000)
    data = wire([b"head", body])
    reader = FrameReader(CAP)
    reader.feed(data[:1000])
    # The rest of the frame lands straight in a buffer exactly its size: one copy in total.
    assert len(reader.get_buffer()) == len(data) - 1000
    reader.feed(data[1000:])
    [[head, frame]] = reader.messages
    assert head == b"head"
    assert isinstance(frame, bytearray)
    assert frame == body


def test_a_frame_of_a_mebibyte_or_more_is_delivered_as_a_view_of_an_anonymous_mmap() -> None:
    body = pattern(3 * MMAP_THRESHOLD + 5)
    reader = FrameReader(CAP)
    feed_in_pieces(reader, wire([b"h", body, b"t"]), [10, 5000, 70_000, 2_000_000])
    [[head, frame, tail]] = reader.messages
    assert isinstance(frame, memoryview)
    assert isinstance(frame.obj, mmap.mmap)
    assert (head, bytes(frame), tail) == (b"h", body, b"t")


def test_a_large_frame_already_complete_in_the_receive_buffer_comes_out_as_bytes() -> None:
    body = pattern(DIRECT_THRESHOLD + 10)
    reader = FrameReader(CAP)
    reader.feed(wire([body]))
    assert received(reader) == [[body]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_huge_frame_that_never_arrives_does_not_commit_its_memory() -> None:
    def resident_bytes() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * mmap.PAGESIZE

    announced = 256 * 1024 * 1024
    reader = FrameReader(2 * announced)
    before = resident_bytes()
    reader.feed(struct.pack("!IQ", 1, announced) + b"first bytes")
    assert len(reader.get_buffer()) == announced - len(b"first bytes")
    assert resident_bytes() - before < 16 * 1024 * 1024


# ----------------------------------------------------------------------------- bad input


def test_a_message_of_zero_frames_is_refused() -> None:
    reader = FrameReader(CAP)
    with pytest.raises(FramingError, match="0 frames"):
        reader.feed(struct.pack("!I", 0))


def test_a_message_of_more_than_1024_frames_is_refused_before_its_lengths_arrive() -> None:
    reader = FrameReader(CAP)
    with pytest.raises(FramingError, match="1025 frames"):
        reader.feed(struct.pack("!I", MAX_FRAMES + 1))


def test_a_message_over_the_cap_is_thrown_away_and_stands_as_oversized_with_its_head() -> None:
    reader = FrameReader(1000)
    header = b"H" * 40
    reader.feed(wire([header, pattern(1000)]) + wire([b"next"]))
    oversized, following = reader.messages
    assert type(oversized) is Oversized
    assert oversized.size == 1040
    assert oversized == [header[:OVERSIZED_HEAD]]  # no more than peek needs is kept
    assert following == [b"next"]  # the stream stays in step


def test_an_oversized_message_arriving_byte_by_byte_is_skipped_the_same_way() -> None:
    reader = FrameReader(1000)
    data = wire([b"abc", pattern(2000)]) + wire([b"after"])
    for index in range(len(data)):
        reader.feed(data[index : index + 1])
    assert [type(m) for m in reader.messages] == [Oversized, list]
    assert reader.messages[0] == [b"abc"] and reader.messages[1] == [b"after"]


def test_the_cap_applies_to_all_frames_of_a_message_together() -> None:
    reader = FrameReader(1000)
    reader.feed(struct.pack("!I3Q", 3, 400, 400, 201) + bytes(1001))
    (oversized,) = reader.messages
    assert type(oversized) is Oversized and oversized.size == 1001


def test_a_length_far_over_the_cap_is_refused_before_the_body_arrives() -> None:
    reader = FrameReader(1000, discard_limit=4000)
    with pytest.raises(FramingError, match="4001 bytes, far over the max_message_size of 1000"):
        reader.feed(struct.pack("!IQ", 1, 4001))


def test_a_message_of_exactly_the_cap_is_accepted() -> None:
    reader = FrameReader(1000)
    reader.feed(wire([pattern(600), pattern(400)]))
    assert len(reader.messages) == 1


def test_an_absurd_length_is_refused_not_allocated() -> None:
    reader = FrameReader(CAP)
    with pytest.raises(FramingError, match="max_message_size"):
        reader.feed(struct.pack("!IQ", 1, 2**64 - 1))


def test_garbage_is_refused_as_soon_as_its_first_four_bytes_arrive() -> None:
    reader = FrameReader(CAP)
    with pytest.raises(FramingError, match="is the peer speaking the kvrpc unix framing"):
        reader.feed(b"GET / HTTP/1.1\r\n")


def test_messages_before_a_bad_one_are_still_delivered() -> None:
    reader = FrameReader(CAP)
    with pytest.raises(FramingError):
        reader.feed(wire([b"good"]) + struct.pack("!I", 0))
    assert received(reader) == [[b"good"]]


# ----------------------------------------------------------------------------- progress


def test_in_message_tells_a_clean_end_of_stream_from_a_cut_off_one() -> None:
    reader = FrameReader(CAP)
    assert not reader.in_message
    data = wire([b"abc", pattern(100_000)])
    for end in (2, 4, 12, 30, 50_000):
        partial = FrameReader(CAP)
        partial.feed(data[:end])
        assert partial.in_message, end
    reader.feed(data)
    assert not reader.in_message


def test_get_buffer_is_never_empty() -> None:
    reader = FrameReader(CAP)
    data = wire(*[[pattern(DIRECT_THRESHOLD - 1, i)] for i in range(12)])
    offset = 0
    while offset < len(data):
        target = reader.get_buffer()
        assert len(target) > 0
        size = min(len(target), len(data) - offset, 50_001)
        target[:size] = data[offset : offset + size]
        reader.buffer_updated(size)
        offset += size
    assert len(received(reader)) == 12
