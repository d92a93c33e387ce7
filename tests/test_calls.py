"""The client's call table as a specification: plain synchronous calls, an explicit clock.

No event loop, no socket and no sleep: a reply is a decoded :class:`Message`, time is the
``now`` each call is given, and futures are tiny recording sinks.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvrpc.calls import CallTable
from kvrpc.codec import Message, MessageKind
from kvrpc.errors import (
    ConnectionLost,
    PayloadValidationError,
    RemoteError,
    RequestTimeout,
    ServerBusy,
    Status,
)
from kvrpc.protocol import ProtocolDefinition

ECHO = ProtocolDefinition("t.echo", (int,), int)


class Sink:
    """Records how it was resolved; resolving it twice is a bug the table must not make."""

    def __init__(self) -> None:
        self.outcome: tuple[str, Any] | None = None
        self.cancelled = False

    def done(self) -> bool:
        return self.outcome is not None or self.cancelled

    def set_result(self, value: Any, /) -> None:
        assert not self.done(), "resolved twice"
        self.outcome = ("result", value)

    def set_exception(self, exc: BaseException, /) -> None:
        assert not self.done(), "resolved twice"
        self.outcome = ("error", exc)

    @property
    def error(self) -> BaseException:
        assert self.outcome is not None and self.outcome[0] == "error"
        return self.outcome[1]


def reply(request_id: int, value: Any) -> Message:
    return Message(MessageKind.RESPONSE, request_id, "", value)


def error(request_id: int, code: int, name: str, text: str) -> Message:
    return Message(MessageKind.ERROR, request_id, "", (code, name, text))


def table(**options: Any) -> CallTable:
    return CallTable("unix:///t.sock", **options)


def test_a_reply_resolves_its_own_call_and_is_validated() -> None:
    calls = table()
    a, b = Sink(), Sink()
    calls.add(1, a, ECHO, 5.0, now=0.0)
    calls.add(2, b, ECHO, 5.0, now=0.0)
    calls.settle(reply(2, 20))
    assert b.outcome == ("result", 20) and a.outcome is None
    calls.settle(reply(1, "not an int"))
    assert isinstance(a.error, PayloadValidationError)
    assert len(calls) == 0 and calls.stats.replies == 2


def test_without_validation_a_response_passes_as_it_came() -> None:
    calls = table(validate=False)
    sink = Sink()
    calls.add(1, sink, ECHO, None, now=0.0)
    calls.settle(reply(1, "anything"))
    assert sink.outcome == ("result", "anything")


def test_an_error_reply_raises_the_class_of_its_code() -> None:
    calls = table()
    busy, own = Sink(), Sink()
    calls.add(1, busy, ECHO, None, now=0.0)
    calls.add(2, own, ECHO, None, now=0.0)
    calls.settle(error(1, int(Status.SERVER_BUSY), "ServerBusy", "too many"))
    calls.settle(error(2, int(Status.UNKNOWN), "ValueError", "bad"))
    assert type(busy.error) is ServerBusy
    assert isinstance(own.error, RemoteError) and own.error.status == Status.UNKNOWN


def test_a_reply_for_no_pending_call_is_counted_late_and_a_request_malformed() -> None:
    calls = table()
    calls.settle(reply(7, 1))
    calls.settle(Message(MessageKind.REQUEST, 8, "t.echo", (1,)))
    assert (calls.stats.late_replies, calls.stats.malformed, calls.stats.replies) == (1, 1, 0)


def test_a_call_expires_at_its_deadline_and_not_a_moment_before() -> None:
    calls = table()
    sink = Sink()
    calls.add(1, sink, ECHO, 2.0, now=10.0)
    assert calls.next_deadline() == 12.0
    assert calls.expire(11.999) == 0 and sink.outcome is None
    assert calls.expire(12.0) == 1
    assert isinstance(sink.error, RequestTimeout)
    assert "t.echo got no reply from unix:///t.sock within 2.0s" in str(sink.error)
    assert calls.next_deadline() is None and calls.stats.timeouts == 1
    calls.settle(reply(1, 1))  # the reply after all: late, and the sink keeps its error
    assert calls.stats.late_replies == 1


def test_deadlines_of_mixed_timeouts_expire_each_at_its_own_time() -> None:
    calls = table()
    sinks = {i: Sink() for i in range(1, 6)}
    calls.add(1, sinks[1], ECHO, 5.0, now=0.0)  # 5
    calls.add(2, sinks[2], ECHO, 1.0, now=0.0)  # 1
    calls.add(3, sinks[3], ECHO, 5.0, now=1.0)  # 6
    calls.add(4, sinks[4], ECHO, None, now=0.0)  # never
    calls.add(5, sinks[5], ECHO, 1.0, now=3.0)  # 4
    order = []
    while (when := calls.next_deadline()) is not None:
        calls.expire(when)
        order.append((when, sorted(i for i, s in sinks.items() if s.done())))
    assert order == [(1.0, [2]), (4.0, [2, 5]), (5.0, [1, 2, 5]), (6.0, [1, 2, 3, 5])]
    assert not sinks[4].done() and len(calls) == 1


def test_a_settled_call_never_expires_and_leaves_no_deadline_behind() -> None:
    calls = table()
    sink, later = Sink(), Sink()
    calls.add(1, sink, ECHO, 1.0, now=0.0)
    calls.add(2, later, ECHO, 1.0, now=0.5)
    calls.settle(reply(1, 1))
    assert calls.next_deadline() == 1.5  # the settled head is gone
    assert calls.expire(1.0) == 0 and sink.outcome == ("result", 1)
    calls.pop(2)
    assert calls.next_deadline() is None


def test_on_done_runs_once_however_a_call_ends() -> None:
    calls = table()
    ended: list[int] = []
    for request_id in (1, 2, 3, 4):
        calls.add(request_id, Sink(), ECHO, 1.0, 0.0, lambda r=request_id: ended.append(r))
    calls.settle(reply(1, 1))
    calls.expire(1.0)  # 2, 3 and 4 expire
    calls.pop(2)  # already gone: nothing again
    calls.fail_all(ConnectionLost("gone"))
    assert sorted(ended) == [1, 2, 3, 4]


def test_a_lost_connection_fails_every_pending_call_and_only_those() -> None:
    calls = table()
    done, pending = Sink(), [Sink(), Sink()]
    calls.add(1, done, ECHO, None, now=0.0)
    calls.settle(reply(1, 1))
    for i, sink in enumerate(pending, start=2):
        calls.add(i, sink, ECHO, 3.0, now=0.0)
    assert calls.fail_all(ConnectionLost("reset")) == 2
    assert all(isinstance(s.error, ConnectionLost) for s in pending)
    assert done.outcome == ("result", 1) and calls.next_deadline() is None


def test_a_caller_that_gave_up_gets_no_resolution_but_its_reply_is_counted() -> None:
    calls = table()
    sink = Sink()
    calls.add(1, sink, ECHO, None, now=0.0)
    sink.cancelled = True
    calls.settle(reply(1, 1))  # matched (not late), never resolved into a cancelled sink
    assert calls.stats.replies == 1 and sink.outcome is None


def test_an_id_already_pending_is_refused() -> None:
    calls = table()
    calls.add(1, Sink(), ECHO, None, now=0.0)
    with pytest.raises(ValueError, match="already pending"):
        calls.add(1, Sink(), ECHO, None, now=0.0)
    assert calls.stats.requests == 1
