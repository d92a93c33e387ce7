"""The client's pending calls: ids, deadlines on an explicit ``now``, and reply matching.

:class:`CallTable` holds every call a client has sent and not yet settled. It decides what a
reply, a deadline or a lost connection does to them, and resolves their futures; it does no
I/O, reads no clock and starts no timer: the shell (:class:`~kvrpc.client.AsyncClient`)
passes ``now`` in and arms one timer at :meth:`CallTable.next_deadline`. Tests drive it with
plain synchronous calls.

Deadlines: calls with the same timeout expire in the order they were made, so each timeout
keeps a FIFO of ``(deadline, request id)``; the earliest deadline is the smallest FIFO head.
A settled call leaves its FIFO when it reaches the head. This keeps a call's cost at one
append and one pop, where a heap or a timer per call was a measurable part of it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from kvrpc import codec
from kvrpc.auth import refusal_error
from kvrpc.codec import Buffer, Message, MessageKind
from kvrpc.errors import MessageTooLarge, ProtocolError, RequestTimeout, error_from_wire
from kvrpc.protocol import ProtocolDefinition
from kvrpc.transport import Oversized

__all__ = [
    "Call",
    "CallTable",
    "ClientStats",
    "Sink",
    "StreamSink",
    "Unreadable",
    "outcome",
    "read_reply",
]


class Sink(Protocol):
    """What a call resolves: an asyncio future or a :class:`~kvrpc.futures.MessagingFuture`."""

    def done(self) -> bool:
        """True once resolved or cancelled."""
        ...

    def set_result(self, value: Any, /) -> None:
        """Resolve with the response."""
        ...

    def set_exception(self, exc: BaseException, /) -> None:
        """Resolve with an error."""
        ...


class StreamSink(Sink, Protocol):
    """What a streamed call resolves: its items as they come, then its end."""

    def push(self, items: list[Any], /) -> bool:
        """A batch of items arrived (checked already); False if beyond the credit granted."""
        ...


@dataclass
class ClientStats:
    """Counters of one client's traffic."""

    requests: int = 0  #: requests sent
    replies: int = 0  #: replies matched to a pending request
    timeouts: int = 0  #: requests failed with RequestTimeout
    late_replies: int = 0  #: replies for no pending request (timed out, cancelled, unknown)
    malformed: int = 0  #: messages from the server that could not be decoded
    disconnects: int = 0  #: connections lost (each failed the calls pending on it)
    direct_calls: int = 0  #: calls a SyncClient's caller answered on its own connection
    items: int = 0  #: stream items received for an open stream

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


class Call:
    """One pending call: what it resolves, what checks its reply, and its deadline."""

    __slots__ = ("definition", "on_done", "sink", "stream", "timeout")

    def __init__(
        self,
        sink: Sink,
        definition: ProtocolDefinition | None,
        timeout: float | None,
        on_done: Callable[[], None] | None,
        stream: StreamSink | None = None,
    ) -> None:
        self.sink = sink
        self.definition = definition
        self.timeout = timeout
        self.on_done = on_done
        #: The same object as ``sink`` for a streamed call, which takes items; else None.
        self.stream = stream

    @property
    def name(self) -> str:
        """The protocol's name, for messages ("a request" when it is not known locally)."""
        return self.definition.name if self.definition is not None else "a request"


class CallTable:
    """The pending calls of one client (see the module doc); ``peer`` names it in errors.

    ``validate`` checks each response against its call's protocol definition.
    """

    def __init__(self, peer: str, *, validate: bool = True) -> None:
        self.peer = peer
        self.validate = validate
        self.stats = ClientStats()
        self._calls: dict[int, Call] = {}
        self._fifos: dict[float, deque[tuple[float, int]]] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._calls

    def get(self, request_id: int) -> Call | None:
        """The pending call, or None."""
        return self._calls.get(request_id)

    # ------------------------------------------------------------------ adding, removing

    def add(
        self,
        request_id: int,
        sink: Sink,
        definition: ProtocolDefinition | None,
        timeout: float | None,
        now: float,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """A call was sent (or is about to be): it is pending until settled.

        With a ``timeout`` it expires at ``now + timeout``. ``on_done`` runs once when the
        call leaves the table, however it ends.
        """
        if request_id in self._calls:
            raise ValueError(f"request {request_id} is already pending")
        self._calls[request_id] = Call(sink, definition, timeout, on_done)
        if timeout is not None:
            fifo = self._fifos.get(timeout)
            if fifo is None:
                fifo = self._fifos[timeout] = deque()
            fifo.append((now + timeout, request_id))
        self.stats.requests += 1

    def add_stream(
        self,
        request_id: int,
        sink: StreamSink,
        definition: ProtocolDefinition | None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """A stream was opened: it takes ITEMS until its end settles it like a call.

        A stream has no deadline here: how long its consumer waits for each item is the
        consumer's own timeout.
        """
        if request_id in self._calls:
            raise ValueError(f"request {request_id} is already pending")
        self._calls[request_id] = Call(sink, definition, None, on_done, sink)
        self.stats.requests += 1

    def open_streams(self) -> list[int]:
        """The request ids of the streams still open."""
        return [rid for rid, call in self._calls.items() if call.stream is not None]

    def pop(self, request_id: int) -> Call | None:
        """Remove a call without resolving it (its future finished, or was cancelled)."""
        call = self._calls.pop(request_id, None)
        if call is not None:
            if call.timeout is not None:
                self._prune(call.timeout)
            if call.on_done is not None:
                call.on_done()
        return call

    def fail(self, request_id: int, exc: BaseException) -> None:
        """Remove the call and fail its future with ``exc`` (nothing if it is not pending)."""
        call = self.pop(request_id)
        if call is not None and not call.sink.done():
            call.sink.set_exception(exc)

    def fail_all(self, exc: BaseException) -> int:
        """Fail every pending call with ``exc``; returns how many there were."""
        ids = list(self._calls)
        for request_id in ids:
            self.fail(request_id, exc)
        return len(ids)

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        """When the earliest pending call expires (None: no call has a deadline)."""
        heads = [fifo[0][0] for fifo in self._fifos.values() if fifo]
        return min(heads) if heads else None

    def expire(self, now: float) -> int:
        """Fail every call whose deadline is at or before ``now`` with :class:`RequestTimeout`.

        Returns how many expired.
        """
        expired = 0
        for timeout, fifo in list(self._fifos.items()):
            while fifo and fifo[0][0] <= now:
                _, request_id = fifo.popleft()
                call = self._calls.get(request_id)
                if call is None:
                    continue
                expired += 1
                self.stats.timeouts += 1
                self.fail(
                    request_id,
                    RequestTimeout(f"{call.name} got no reply from {self.peer} within {timeout}s"),
                )
            if not fifo:  # failing a call may have pruned it away already
                self._fifos.pop(timeout, None)
        return expired

    def _prune(self, timeout: float) -> None:
        fifo = self._fifos.get(timeout)
        calls = self._calls
        while fifo and fifo[0][1] not in calls:
            fifo.popleft()
        # An empty FIFO stays: a client uses few distinct timeouts, and the next call with
        # this one would only make it again.

    # ------------------------------------------------------------------ replies

    def receive(self, frames: list[Buffer], max_message_size: int) -> None:
        """Decode one message from the server and settle the call it answers.

        An :class:`~kvrpc.transport.Oversized` (a reply the transport threw away for being
        over ``max_message_size``) fails its call with :class:`MessageTooLarge`; an
        unreadable reply whose id can be read fails that call with the
        :class:`ProtocolError`. Both are counted as malformed.
        """
        got = read_reply(frames, max_message_size, self.peer)
        if isinstance(got, Message):
            self.settle(got)
            return
        self.stats.malformed += 1
        if got.error is None:
            return
        if got.request_id is None:  # an auth server's answer to a client without a token
            self.fail_all(got.error)
        else:
            self.fail(got.request_id, got.error)

    def settle(self, message: Message) -> None:
        """Resolve the call a decoded reply or error answers; a stray one is only counted.

        A request from the server is malformed; a reply for no pending call (expired,
        cancelled, never sent) is late. A response that fails its protocol's check fails
        the call with :class:`PayloadValidationError`.
        """
        kind = message.kind
        if kind is MessageKind.ITEMS:
            self._items(message.request_id, message.payload)
            return
        if kind is not MessageKind.RESPONSE and kind is not MessageKind.ERROR:
            self.stats.malformed += 1  # a client-side kind sent by the server
            return
        call = self.pop(message.request_id)
        if call is None:
            self.stats.late_replies += 1
            return
        self.stats.replies += 1
        sink = call.sink
        if sink.done():  # cancelled by its caller meanwhile
            return
        try:
            value = outcome(message, call.definition, self.validate)
        except Exception as exc:
            sink.set_exception(exc)
            return
        sink.set_result(value)

    def _items(self, request_id: int, items: list[Any]) -> None:
        call = self._calls.get(request_id)
        if call is None:
            self.stats.late_replies += 1  # a stream this client stopped or gave up on
            return
        stream = call.stream
        if stream is None:
            self.stats.malformed += 1
            self.fail(request_id, ProtocolError(f"{call.name} got stream items from {self.peer}"))
            return
        definition = call.definition
        try:
            if definition is not None and self.validate:
                items = definition.validate_items(items)
        except Exception as exc:
            self.fail(request_id, exc)
            return
        if not stream.push(items):
            self.stats.malformed += 1
            self.fail(
                request_id,
                ProtocolError(f"{self.peer} sent {call.name} more items than were granted"),
            )
            return
        self.stats.items += len(items)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A message from the server that settles no call as a reply (see :func:`read_reply`).

    ``error`` fails the call ``request_id``, or every call where ``request_id`` is None;
    with no ``error`` there is nothing to fail.
    """

    request_id: int | None
    error: BaseException | None


def read_reply(frames: list[Buffer], max_message_size: int, peer: str) -> Message | Unreadable:
    """Decode one message from the server ``peer``, or say what its failure fails.

    An :class:`~kvrpc.transport.Oversized` reply (thrown away by the transport for being over
    ``max_message_size``) fails its call with :class:`MessageTooLarge`; an unreadable reply
    whose id can be read fails that call with the :class:`ProtocolError`; an auth server's
    refusal fails every call. Both clients' paths read replies through this.
    """
    if type(frames) is Oversized:
        kind, request_id = codec.peek(frames)
        if request_id is None or kind is MessageKind.REQUEST:
            return Unreadable(None, None)
        return Unreadable(
            request_id,
            MessageTooLarge(
                f"the reply of {frames.size} bytes exceeds this client's "
                f"max_message_size of {max_message_size}"
            ),
        )
    try:
        return codec.decode(frames)
    except ProtocolError as exc:
        refused = refusal_error(frames, peer)
        if refused is not None:  # an auth server's answer to a client without a token
            return Unreadable(None, refused)
        if exc.request_id is not None and exc.kind is not MessageKind.REQUEST:
            # The reply is unreadable, but we know whose it is: fail that call now.
            return Unreadable(exc.request_id, exc)
        return Unreadable(None, None)


def outcome(message: Message, definition: ProtocolDefinition | None, validate: bool) -> Any:
    """The value a reply carries, checked against ``definition``; raises what an error says.

    An error reply raises the error it names (:func:`~kvrpc.errors.error_from_wire`); with
    ``validate``, a response its protocol's check refuses raises
    :class:`~kvrpc.errors.PayloadValidationError`.
    """
    if message.kind is MessageKind.ERROR:
        raise error_from_wire(*message.payload)
    value = message.payload
    # A stream's end carries no value: its items were checked as they came.
    if definition is not None and validate and not definition.stream:
        value = definition.validate_response(value)
    return value
