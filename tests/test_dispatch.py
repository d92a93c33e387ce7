"""The server's Dispatcher as a specification: plain synchronous calls, no I/O.

No event loop, no socket and no sleep: a request is a decoded :class:`Message` (or the frames
of one), a decision is a plain value, and a run ends when the test says so.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from kvrpc import codec
from kvrpc.codec import Message, MessageKind
from kvrpc.config import ServerConfig
from kvrpc.dispatch import (
    CallInline,
    Dispatcher,
    Drop,
    Noted,
    ReplyError,
    Run,
    RunInPool,
    RunOnLoop,
    RunStream,
    RunStreamInPool,
    StopStream,
    WakeStream,
)
from kvrpc.errors import (
    MessageTooLarge,
    PayloadValidationError,
    ProtocolError,
    ServerBusy,
    UnknownProtocol,
    VersionMismatch,
)
from kvrpc.handlers import HandlerTable
from kvrpc.protocol import HandlerType, ProtocolDefinition, ProtocolRegistry
from kvrpc.transport import Oversized

ADD = ProtocolDefinition("t.add", (int, int), int)
WAIT = ProtocolDefinition("t.wait", (int,), int)
HASH = ProtocolDefinition("t.hash", (bytes,), str, handler_type=HandlerType.BLOCKING)

A, B = b"peer-a", b"peer-b"


def add(a: int, b: int) -> int:
    return a + b


async def wait(n: int) -> int:
    return n


def hash_(data: bytes) -> str:
    return data.hex()


def dispatcher(**limits: Any) -> Dispatcher:
    handlers = HandlerTable(ProtocolRegistry())
    handlers.register(ADD, add)
    handlers.register(WAIT, wait)
    handlers.register(HASH, hash_)
    return Dispatcher(handlers, ServerConfig(**limits))


def request(request_id: int, name: str, *args: Any) -> Message:
    return Message(MessageKind.REQUEST, request_id, name, list(args))


def run(d: Dispatcher, peer: bytes, request_id: int = 1) -> Run:
    decision = d.on_message(peer, request(request_id, "t.wait", request_id))
    assert isinstance(decision, RunOnLoop)
    return decision


def refusal(decision: object) -> Exception:
    assert isinstance(decision, ReplyError), decision
    return decision.error


# ------------------------------------------------------------------ how a request runs


def test_a_plain_nonblocking_handler_is_called_inline_with_its_validated_arguments() -> None:
    d = dispatcher()
    decision = d.on_message(A, request(7, "t.add", 2, 3))
    assert decision == CallInline(7, add, (2, 3))
    assert (d.stats.requests, d.in_flight, d.in_flight_of(A)) == (1, 0, 0)


def test_an_async_handler_runs_on_the_loop_holding_a_slot_of_its_peer_and_the_server() -> None:
    d = dispatcher()
    decision = d.on_message(A, request(4, "t.wait", 9))
    assert isinstance(decision, RunOnLoop)
    assert (decision.peer, decision.request_id, decision.fn, decision.args) == (A, 4, wait, (9,))
    assert (d.in_flight, d.in_flight_of(A), d.stats.in_flight) == (1, 1, 1)


def test_a_blocking_handler_runs_in_the_pool_holding_a_slot() -> None:
    d = dispatcher()
    decision = d.on_message(A, request(5, "t.hash", b"\x01"))
    assert isinstance(decision, RunInPool)
    assert (decision.fn, decision.args) == (hash_, (b"\x01",))
    assert d.in_flight_of(A) == 1


def test_frames_are_decoded_then_decided_like_a_message() -> None:
    d = dispatcher()
    decision = d.on_frames(A, codec.encode_request(3, "t.add", [1, 1]))
    assert decision == CallInline(3, add, (1, 1))


# ------------------------------------------------------------------ error replies and drops


def test_an_unknown_protocol_is_answered_with_unknown_protocol() -> None:
    d = dispatcher()
    error = refusal(d.on_message(A, request(2, "t.nope")))
    assert isinstance(error, UnknownProtocol)
    assert str(error) == "server has no protocol 't.nope'"
    assert (d.stats.requests, d.stats.unknown_protocol) == (1, 1)


def test_a_bad_payload_is_answered_with_payload_validation_error_and_runs_nothing() -> None:
    d = dispatcher()
    decision = d.on_message(A, request(2, "t.wait", "not an int"))
    assert isinstance(refusal(decision), PayloadValidationError)
    assert decision.request_id == 2  # type: ignore[union-attr]
    assert (d.stats.invalid_payload, d.in_flight) == (1, 0)


@pytest.mark.parametrize("kind", [MessageKind.RESPONSE, MessageKind.ERROR, MessageKind.ITEMS])
def test_responses_and_errors_sent_to_a_server_are_dropped_and_counted(kind: MessageKind) -> None:
    d = dispatcher()
    payload = (1, "RemoteError", "x") if kind is MessageKind.ERROR else [5]
    decision = d.on_message(A, Message(kind, 1, "", payload))
    assert isinstance(decision, Drop)
    assert (d.stats.unexpected, d.stats.dropped, d.stats.requests) == (1, 1, 0)


def test_a_request_of_another_wire_version_is_answered_with_version_mismatch() -> None:
    d = dispatcher()
    frames = [msgpack.packb([1, int(MessageKind.REQUEST), 8, "t.add", [1, 2]])]
    decision = d.on_frames(A, frames)
    assert isinstance(refusal(decision), VersionMismatch)
    assert decision.request_id == 8  # type: ignore[union-attr]
    assert d.stats.malformed == 1


def test_a_malformed_message_without_a_readable_id_is_dropped_and_counted() -> None:
    d = dispatcher()
    decision = d.on_frames(A, [b"\xc1 not msgpack"])
    assert isinstance(decision, Drop)
    assert (d.stats.malformed, d.stats.dropped) == (1, 1)


def test_a_malformed_request_with_a_readable_id_is_answered_with_protocol_error() -> None:
    d = dispatcher()
    frames = [msgpack.packb([codec.WIRE_VERSION, int(MessageKind.REQUEST), 6, "t.add"])]
    error = refusal(d.on_frames(A, frames))
    assert type(error) is ProtocolError
    assert d.stats.malformed == 1


def test_a_request_over_max_message_size_is_answered_with_message_too_large() -> None:
    d = dispatcher(max_message_size=64)
    frames = codec.encode_request(9, "t.hash", [b"x" * 200])
    error = refusal(d.on_frames(A, frames))
    assert isinstance(error, MessageTooLarge)
    assert "exceeds the server's max_message_size of 64" in str(error)
    assert (d.stats.oversized, d.stats.requests) == (1, 0)


def test_a_message_the_transport_discarded_as_oversized_is_judged_by_its_announced_size() -> None:
    d = dispatcher(max_message_size=64)
    head = bytes(codec.encode_request(9, "t.add", [1, 2])[0])
    decision = d.on_frames(A, Oversized(head, 10_000))
    assert isinstance(refusal(decision), MessageTooLarge)
    assert decision.request_id == 9  # type: ignore[union-attr]


# ------------------------------------------------------------------ in-flight caps


def test_a_request_over_the_peers_cap_is_refused_with_server_busy() -> None:
    d = dispatcher(max_in_flight_per_peer=2)
    run(d, A, 1)
    run(d, A, 2)
    error = refusal(d.on_message(A, request(3, "t.hash", b"")))
    assert isinstance(error, ServerBusy)
    assert "more than 2 requests in flight from this client" in str(error)
    assert (d.stats.busy, d.in_flight_of(A)) == (1, 2)
    run(d, B, 4)  # another peer is not held back by this one


def test_inline_calls_take_no_slot_so_the_peers_cap_does_not_refuse_them() -> None:
    d = dispatcher(max_in_flight_per_peer=1)
    run(d, A)
    assert isinstance(d.on_message(A, request(2, "t.add", 1, 2)), CallInline)


def test_a_request_over_the_global_cap_is_refused_with_server_busy() -> None:
    d = dispatcher(max_in_flight=2)
    run(d, A, 1)
    run(d, B, 2)
    error = refusal(d.on_message(b"peer-c", request(3, "t.wait", 3)))
    assert isinstance(error, ServerBusy)
    assert "max_in_flight" in str(error)
    assert (d.stats.busy, d.in_flight) == (1, 2)


def test_an_awaitable_returned_by_an_inline_call_takes_a_slot_or_is_refused_at_the_cap() -> None:
    d = dispatcher(max_in_flight_per_peer=1)
    marker = object()
    adopted = d.awaitable_returned(A, 1, marker)
    assert isinstance(adopted, RunOnLoop)
    assert adopted.fn(*adopted.args) is marker  # the shell awaits exactly what was returned
    assert d.in_flight_of(A) == 1
    assert isinstance(refusal(d.awaitable_returned(A, 2, object())), ServerBusy)


# ------------------------------------------------------------------ runs ending, peers leaving


def test_a_finished_run_gives_its_slot_back_to_its_peer_and_the_global_count() -> None:
    d = dispatcher(max_in_flight_per_peer=1)
    first = run(d, A)
    outcome = d.finished(first)
    assert (outcome.deliver, outcome.idle) == (True, False)
    assert (d.in_flight_of(A), d.in_flight) == (0, 0)
    run(d, A, 2)  # the slot is free again


def test_a_failed_run_counts_a_handler_error_and_still_delivers_its_error() -> None:
    d = dispatcher()
    outcome = d.finished(run(d, A), failed=True)
    assert outcome.deliver
    assert d.stats.handler_errors == 1


def test_a_forgotten_peer_frees_its_slots_and_its_late_results_are_dropped() -> None:
    d = dispatcher(max_in_flight_per_peer=1)
    late = run(d, A)
    assert d.forget(A) == 1
    assert d.in_flight_of(A) == 0
    # Its run still occupies the loop, so the server's own count keeps it until it ends.
    assert d.in_flight == 1
    fresh = run(d, A, 2)  # a new connection with the same identity starts afresh
    assert not d.finished(late).deliver
    assert (d.in_flight, d.in_flight_of(A)) == (1, 1)
    assert d.finished(fresh).deliver


def test_forgetting_an_unknown_peer_does_nothing() -> None:
    d = dispatcher()
    assert d.forget(A) == 0
    assert d.in_flight == 0


# ------------------------------------------------------------------ draining


def test_draining_refuses_new_requests_and_reports_idle_when_the_last_run_ends() -> None:
    d = dispatcher()
    first, second = run(d, A, 1), run(d, B, 2)
    assert d.drain() is False
    assert not d.accepting
    error = refusal(d.on_message(A, request(3, "t.add", 1, 2)))  # inline ones too
    assert isinstance(error, ServerBusy)
    assert str(error) == "server is shutting down"
    assert d.finished(first).idle is False
    last = d.finished(second)
    assert (last.deliver, last.idle) == (True, True)


def test_draining_an_idle_dispatcher_reports_idle_at_once() -> None:
    assert dispatcher().drain() is True


def test_draining_still_answers_an_unknown_protocol_as_unknown() -> None:
    d = dispatcher()
    d.drain()
    assert isinstance(refusal(d.on_message(A, request(1, "t.nope"))), UnknownProtocol)


def test_a_dispatcher_accepts_again_after_a_drain_when_the_server_restarts() -> None:
    d = dispatcher()
    d.drain()
    d.accept()
    assert isinstance(d.on_message(A, request(1, "t.add", 1, 2)), CallInline)


# ------------------------------------------------------------------ what the shell reports


def test_the_shell_reports_replies_and_handler_errors_into_the_same_counters() -> None:
    d = dispatcher()
    d.response_sent()
    d.error_reply_sent()
    d.handler_failed()
    stats = d.stats.as_dict()
    assert (stats["responses"], stats["error_replies"], stats["handler_errors"]) == (1, 1, 1)


def test_a_handler_registered_after_the_dispatcher_was_made_is_dispatched() -> None:
    d = dispatcher()
    late = ProtocolDefinition("t.late", (), str)
    d.handlers.register(late, lambda: "here")
    assert isinstance(d.on_message(A, request(1, "t.late")), CallInline)


# ------------------------------------------------------------------ streams

COUNT = ProtocolDefinition("t.count", (int,), int, stream=True)
BCOUNT = ProtocolDefinition("t.bcount", (int,), int, HandlerType.BLOCKING, stream=True)


async def count(n: int) -> Any:
    for i in range(n):
        yield i


def bcount(n: int) -> Any:
    yield from range(n)


def streaming(**limits: Any) -> Dispatcher:
    d = dispatcher(**limits)
    d.handlers.register(COUNT, count)
    d.handlers.register(BCOUNT, bcount)
    return d


def open_(request_id: int, name: str, credits: int, *args: Any) -> Message:
    return Message(MessageKind.OPEN, request_id, name, (credits, args))


def control(kind: MessageKind, request_id: int, *payload: int) -> Message:
    return Message(kind, request_id, "", payload)


def test_an_open_runs_the_generator_holding_a_slot_with_the_credit_granted() -> None:
    d = streaming()
    decision = d.on_message(A, open_(3, "t.count", 16, 100))
    assert isinstance(decision, RunStream)
    assert (decision.args, decision.stream.available, decision.stream.request_id) == ((100,), 16, 3)
    assert d.in_flight_of(A) == 1 and d.stats.streams_opened == 1
    assert d.streams_of(A) == [decision.stream]


def test_a_blocking_generator_runs_in_the_pool() -> None:
    d = streaming()
    assert isinstance(d.on_message(A, open_(3, "t.bcount", 4, 10)), RunStreamInPool)


def test_a_stream_called_as_a_call_and_a_call_opened_as_a_stream_are_refused() -> None:
    d = streaming()
    assert "client.stream()" in str(refusal(d.on_message(A, request(1, "t.count", 5))))
    assert "client.call()" in str(refusal(d.on_message(A, open_(2, "t.add", 4, 1, 2))))
    assert d.in_flight == 0


def test_a_stream_open_twice_under_one_id_is_refused() -> None:
    d = streaming()
    d.on_message(A, open_(3, "t.count", 4, 10))
    assert isinstance(refusal(d.on_message(A, open_(3, "t.count", 4, 10))), ProtocolError)
    assert isinstance(d.on_message(B, open_(3, "t.count", 4, 10)), RunStream)  # another peer's


def test_streams_count_against_the_peers_cap() -> None:
    d = streaming(max_in_flight_per_peer=1)
    d.on_message(A, open_(1, "t.count", 4, 10))
    assert isinstance(refusal(d.on_message(A, open_(2, "t.count", 4, 10))), ServerBusy)


def test_credit_wakes_a_producer_that_had_none_and_is_only_noted_otherwise() -> None:
    d = streaming()
    decision = d.on_message(A, open_(3, "t.count", 2, 100))
    assert isinstance(decision, RunStream)
    assert isinstance(d.on_message(A, control(MessageKind.CREDIT, 3, 1)), Noted)
    decision.stream.took(3)
    woke = d.on_message(A, control(MessageKind.CREDIT, 3, 2))
    assert isinstance(woke, WakeStream) and woke.stream is decision.stream


def test_credit_and_cancels_for_no_open_stream_are_counted_strays() -> None:
    d = streaming()
    d.on_message(A, open_(3, "t.count", 2, 100))
    assert isinstance(d.on_message(B, control(MessageKind.CREDIT, 3, 1)), Noted)  # not B's
    assert isinstance(d.on_message(A, control(MessageKind.CANCEL, 4)), Noted)
    assert d.stats.stream_strays == 2


def test_a_cancel_stops_the_stream_once() -> None:
    d = streaming()
    decision = d.on_message(A, open_(3, "t.count", 2, 100))
    assert isinstance(decision, RunStream)
    stop = d.on_message(A, control(MessageKind.CANCEL, 3))
    assert isinstance(stop, StopStream) and stop.stream.cancelled
    assert isinstance(d.on_message(A, control(MessageKind.CANCEL, 3)), Noted)
    assert d.stats.streams_cancelled == 1


def test_a_finished_stream_is_forgotten_and_its_slot_comes_back() -> None:
    d = streaming()
    decision = d.on_message(A, open_(3, "t.count", 2, 100))
    assert isinstance(decision, RunStream)
    d.finished(decision)
    assert d.streams_of(A) == [] and d.in_flight == 0
    assert isinstance(d.on_message(A, control(MessageKind.CREDIT, 3, 1)), Noted)
    assert d.stats.stream_strays == 1


def test_a_lost_peer_has_its_streams_cancelled() -> None:
    d = streaming()
    first = d.on_message(A, open_(1, "t.count", 2, 100))
    second = d.on_message(A, open_(2, "t.bcount", 2, 100))
    other = d.on_message(B, open_(1, "t.count", 2, 100))
    assert isinstance(first, RunStream) and isinstance(second, RunStreamInPool)
    assert isinstance(other, RunStream)
    d.forget(A)
    assert first.stream.cancelled and second.stream.cancelled
    assert not other.stream.cancelled
    assert d.stats.streams_cancelled == 2
    assert d.open_streams() == [other.stream]
    assert d.finished(first).deliver is False  # nobody takes its end
    # The identity is back with a new connection: its stream 1 is a new one.
    again = d.on_message(A, open_(1, "t.count", 2, 100))
    assert isinstance(again, RunStream)
    d.finished(second)  # the old run's end leaves the new stream alone
    assert d.streams_of(A) == [again.stream]
