"""The server's decisions, without I/O: what to do with each message that arrives.

:class:`Dispatcher` is to :class:`~kvrpc.server.RPCServer` what h11's ``Connection`` is to a
socket: the shell hands it a message and the peer it came from, and gets back a decision, a
small frozen value saying what to do. The Dispatcher changes its own state (counters, the
in-flight counts) synchronously, before it returns; the shell then does the I/O the decision
names (encode and send a reply, call a handler, start a task or a thread). Nothing here reads
a clock, awaits or touches a socket, so every rule is tested as a plain function call
(tests/test_dispatch.py).

The decisions, in the order the rules are tried:

- :class:`Drop`: nothing can be answered (no request id could be read, or a response or an
  error was sent to the server, which takes only requests).
- :class:`ReplyError`: answer at once with an error: the message is too large, malformed or
  of another wire version, the protocol is unknown, the server is draining, the payload
  fails validation, or the peer or the whole server is at its in-flight cap
  (:class:`~kvrpc.errors.ServerBusy`).
- :class:`CallInline`: a plain NONBLOCKING function; the shell calls it on the loop at once,
  with no task and no slot taken (it cannot outlive the call, so it cannot pile up).
- :class:`RunOnLoop` / :class:`RunInPool`: an ``async def`` handler (a task on the loop) or a
  BLOCKING one (a thread of the pool). Its slot, one of the peer's and one of the server's,
  is taken now; the shell gives it back with :meth:`Dispatcher.finished` when the run ends.

A plain inline function that returns an awaitable has started work that still has to run:
:meth:`Dispatcher.awaitable_returned` takes a slot for it, or refuses it, as for ``async def``.

Streams (:mod:`kvrpc.streams`): an OPEN of a streamed protocol passes the same checks and
becomes a :class:`RunStream` / :class:`RunStreamInPool`, holding a slot until it ends; the
Dispatcher keeps each open stream's :class:`~kvrpc.streams.ServerStream` by peer and id. A
CREDIT grants it more (:class:`WakeStream` when its producer was out of credit), a CANCEL
stops it (:class:`StopStream`); either, for no open stream, is only counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

from kvrpc import codec
from kvrpc.codec import Buffer, Message, MessageKind
from kvrpc.errors import (
    MessageTooLarge,
    PayloadValidationError,
    ProtocolError,
    ServerBusy,
    UnknownProtocol,
)
from kvrpc.handlers import Handler, HandlerTable
from kvrpc.streams import ServerStream
from kvrpc.transport import Oversized, Peer

if TYPE_CHECKING:
    from kvrpc.config import ServerConfig

__all__ = [
    "CallInline",
    "Decision",
    "Dispatcher",
    "Drop",
    "Finished",
    "ReplyError",
    "Run",
    "RunInPool",
    "RunOnLoop",
    "RunStream",
    "RunStreamInPool",
    "ServerStats",
    "StopStream",
    "WakeStream",
]


@dataclass
class ServerStats:
    """Counters of everything the server received; read them with ``rpc.stats``."""

    requests: int = 0  #: requests decoded
    responses: int = 0  #: successful replies sent
    error_replies: int = 0  #: error replies sent, for any reason
    handler_errors: int = 0  #: handlers that raised
    malformed: int = 0  #: messages that could not be decoded
    oversized: int = 0  #: messages over max_message_size
    unknown_protocol: int = 0  #: requests naming no handled protocol
    invalid_payload: int = 0  #: payloads failing validation
    busy: int = 0  #: requests refused with ServerBusy
    unexpected: int = 0  #: responses or errors sent to the server, which takes only requests
    dropped: int = 0  #: messages dropped without any reply (no request id could be read)
    abandoned: int = 0  #: results left unsent because their client had disconnected
    in_flight: int = 0  #: requests running in tasks or threads right now
    streams_opened: int = 0  #: streams started
    streams_cancelled: int = 0  #: streams stopped by their client, its loss, or shutdown
    stream_strays: int = 0  #: credits or cancels for no open stream (one that had ended)

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


# ------------------------------------------------------------------ decisions


@dataclass(frozen=True, slots=True)
class Drop:
    """Send nothing: the message cannot be answered. ``reason`` is for the debug log."""

    reason: str


@dataclass(frozen=True, slots=True)
class ReplyError:
    """Answer request ``request_id`` with ``error`` now; no handler runs."""

    request_id: int
    error: Exception


@dataclass(frozen=True, slots=True)
class CallInline:
    """Call ``fn(*args)`` on the loop now and reply with what it returns; no slot is taken."""

    request_id: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]


class _Account:
    """One peer's in-flight runs. A forgotten peer's account outlives it until they end."""

    __slots__ = ("count", "forgotten")

    def __init__(self) -> None:
        self.count = 0
        self.forgotten = False


@dataclass(frozen=True, slots=True, eq=False)
class Run:
    """A run that holds a slot of ``peer`` and of the server until :meth:`Dispatcher.finished`.

    Compared by identity: two runs of the same request are still two slots.
    """

    peer: Peer
    request_id: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    account: _Account


@dataclass(frozen=True, slots=True, eq=False)
class RunOnLoop(Run):
    """Await ``fn(*args)`` in a task on the loop (an ``async def`` handler, or an awaitable)."""


@dataclass(frozen=True, slots=True, eq=False)
class RunInPool(Run):
    """Call ``fn(*args)`` in a thread of the pool (a BLOCKING handler)."""


@dataclass(frozen=True, slots=True, eq=False)
class RunStream(Run):
    """Drive the async generator ``fn(*args)`` in a task, sending its items against credit."""

    stream: ServerStream


@dataclass(frozen=True, slots=True, eq=False)
class RunStreamInPool(Run):
    """Drive the generator ``fn(*args)`` in a thread of the pool, against credit."""

    stream: ServerStream


@dataclass(frozen=True, slots=True)
class WakeStream:
    """Credit arrived for a producer that had none: call ``stream.wake()``."""

    stream: ServerStream


@dataclass(frozen=True, slots=True)
class StopStream:
    """The client cancelled: call ``stream.stop()`` (its producer's ``finally`` runs)."""

    stream: ServerStream


@dataclass(frozen=True, slots=True)
class Noted:
    """Nothing to do: a credit for a producer that still had some."""


_NOTED: Final = Noted()

Decision = (
    Drop
    | ReplyError
    | CallInline
    | RunOnLoop
    | RunInPool
    | RunStream
    | RunStreamInPool
    | WakeStream
    | StopStream
    | Noted
)
"""Everything :meth:`Dispatcher.on_message` may decide."""


@dataclass(frozen=True, slots=True)
class Finished:
    """What to do when a run ends: send its reply or not, and whether draining is done."""

    deliver: bool  #: False: the peer was forgotten, so nobody takes the reply
    idle: bool  #: True once, when the server drains and this was its last run


_FINISHED: Final = {
    (deliver, idle): Finished(deliver, idle) for deliver in (True, False) for idle in (True, False)
}


def _given(awaitable: Any) -> Any:
    return awaitable


def _wrong_call(name: str, handler: Handler) -> ProtocolError:
    if handler.definition.stream:
        return ProtocolError(f"{name} answers with a stream: read it with client.stream()")
    return ProtocolError(f"{name} answers with one value, not a stream: use client.call()")


# ------------------------------------------------------------------ the dispatcher


class Dispatcher:
    """Decides what the server does with each message; owns the counts and the drain state.

    ``handlers`` is the server's table (read on every request, so registering while serving
    works); ``config`` gives ``max_message_size``, ``max_in_flight_per_peer`` and
    ``max_in_flight`` (None: no global cap). Not thread-safe: the shell calls it from its
    event loop only, BLOCKING runs included (their end is reported from the loop).
    """

    def __init__(self, handlers: HandlerTable, config: ServerConfig) -> None:
        self.handlers = handlers
        self.max_message_size = config.max_message_size
        self.max_in_flight_per_peer = config.max_in_flight_per_peer
        self.max_in_flight = config.max_in_flight
        self.stats = ServerStats()
        self._accounts: dict[Peer, _Account] = {}
        self._streams: dict[Peer, dict[int, ServerStream]] = {}
        self._accepting = True

    # -------------------------------------------------------------- what arrives

    def on_frames(self, peer: Peer, frames: Sequence[Buffer]) -> Decision:
        """Decide about a message as the transport delivered it: size, decoding, then the rest.

        A transport that threw an oversized message away delivers an
        :class:`~kvrpc.transport.Oversized` head, whose ``size`` is what it announced.
        """
        stats = self.stats
        size = frames.size if type(frames) is Oversized else codec.message_size(frames)
        if size > self.max_message_size:
            stats.oversized += 1
            kind, request_id = codec.peek(frames)
            return self._unusable(
                kind,
                request_id,
                MessageTooLarge(
                    f"message of {size} bytes exceeds the server's "
                    f"max_message_size of {self.max_message_size}"
                ),
            )
        try:
            message = codec.decode(frames)
        except ProtocolError as exc:  # VersionMismatch included
            stats.malformed += 1
            return self._unusable(exc.kind, exc.request_id, exc)
        return self.on_message(peer, message)

    def on_message(self, peer: Peer, message: Message) -> Decision:
        """Decide about a decoded message from ``peer``; a run's slot is taken before return."""
        kind = message.kind
        if kind is MessageKind.REQUEST:
            return self._on_request(peer, message.request_id, message.name, message.payload)
        if kind is MessageKind.CREDIT:
            stream = self._stream(peer, message.request_id)
            if stream is None:
                return _NOTED
            return WakeStream(stream) if stream.grant(message.payload[0]) else _NOTED
        if kind is MessageKind.CANCEL:
            stream = self._stream(peer, message.request_id)
            if stream is None or not stream.cancel():
                return _NOTED
            self.stats.streams_cancelled += 1
            return StopStream(stream)
        if kind is MessageKind.OPEN:
            credits, args = message.payload
            return self._on_request(peer, message.request_id, message.name, args, credits)
        self.stats.unexpected += 1
        self.stats.dropped += 1
        return Drop(f"a {kind.name.lower()} sent to the server")

    def _on_request(
        self,
        peer: Peer,
        request_id: int,
        name: str,
        payload: tuple[Any, ...],
        credits: int | None = None,
    ) -> Decision:
        """A REQUEST (``credits`` None) or an OPEN: the checks, then how it runs."""
        stats = self.stats
        stats.requests += 1
        handler = self.handlers.get(name)
        if handler is None:
            stats.unknown_protocol += 1
            return ReplyError(request_id, UnknownProtocol(f"server has no protocol {name!r}"))
        if handler.definition.stream is (credits is None):
            stats.invalid_payload += 1
            return ReplyError(request_id, _wrong_call(name, handler))
        if not self._accepting:
            stats.busy += 1
            return ReplyError(request_id, ServerBusy("server is shutting down"))
        try:
            args = handler.definition.validate_payload(payload)
        except PayloadValidationError as exc:
            stats.invalid_payload += 1
            return ReplyError(request_id, exc)
        if credits is not None:
            return self._open(peer, request_id, handler, args, credits)
        if handler.inline:
            return CallInline(request_id, handler.fn, args)
        refusal = self._refusal(peer, request_id)
        if refusal is not None:
            return refusal
        account = self._take_slot(peer)
        if handler.is_async:
            return RunOnLoop(peer, request_id, handler.fn, args, account)
        return RunInPool(peer, request_id, handler.fn, args, account)

    def _open(
        self, peer: Peer, request_id: int, handler: Handler, args: tuple[Any, ...], credits: int
    ) -> Decision:
        streams = self._streams.get(peer)
        if streams is not None and request_id in streams:
            return ReplyError(
                request_id, ProtocolError(f"stream {request_id} of this client is already open")
            )
        refusal = self._refusal(peer, request_id)
        if refusal is not None:
            return refusal
        stream = ServerStream(peer, request_id, credits)
        if streams is None:
            streams = self._streams[peer] = {}
        streams[request_id] = stream
        self.stats.streams_opened += 1
        account = self._take_slot(peer)
        if handler.is_async:
            return RunStream(peer, request_id, handler.fn, args, account, stream)
        return RunStreamInPool(peer, request_id, handler.fn, args, account, stream)

    def _stream(self, peer: Peer, request_id: int) -> ServerStream | None:
        streams = self._streams.get(peer)
        stream = streams.get(request_id) if streams is not None else None
        if stream is None:
            self.stats.stream_strays += 1
        return stream

    def streams_of(self, peer: Peer) -> list[ServerStream]:
        """``peer``'s open streams (the shell stops them when it is lost)."""
        streams = self._streams.get(peer)
        return list(streams.values()) if streams is not None else []

    def open_streams(self) -> list[ServerStream]:
        """Every open stream (the shell ends them at shutdown)."""
        return [s for streams in self._streams.values() for s in streams.values()]

    def awaitable_returned(
        self, peer: Peer, request_id: int, awaitable: Any
    ) -> RunOnLoop | ReplyError:
        """An inline call returned ``awaitable``: run it with a slot, or refuse it when full.

        On :class:`ReplyError` the shell discards the awaitable unawaited.
        """
        refusal = self._refusal(peer, request_id)
        if refusal is not None:
            return refusal
        return RunOnLoop(peer, request_id, _given, (awaitable,), self._take_slot(peer))

    # -------------------------------------------------------------- runs ending, peers leaving

    def finished(self, run: Run, *, failed: bool = False) -> Finished:
        """``run`` ended (``failed``: its handler raised); its slots are given back.

        ``deliver`` is False for a run of a forgotten peer: its result is dropped. ``idle``
        is True when the server is draining and no run is left.
        """
        stats = self.stats
        if failed:
            stats.handler_errors += 1
        stats.in_flight -= 1
        if type(run) is RunStream or type(run) is RunStreamInPool:
            self._close_stream(run.peer, run.stream)
        account = run.account
        account.count -= 1
        if not account.count and not account.forgotten:
            del self._accounts[run.peer]
        idle = not self._accepting and not stats.in_flight
        if account.forgotten:
            stats.abandoned += 1
        return _FINISHED[not account.forgotten, idle]

    def _close_stream(self, peer: Peer, stream: ServerStream) -> None:
        streams = self._streams.get(peer)
        # Only this very stream: a forgotten peer's identity may be back with a new one.
        if streams is not None and streams.get(stream.request_id) is stream:
            del streams[stream.request_id]
            if not streams:
                del self._streams[peer]

    def forget(self, peer: Peer) -> int:
        """``peer`` disconnected: free its slots now; returns how many of its runs go on.

        Those runs still hold the server's global slots (they still occupy the loop or a
        thread) until they end, and their results are then dropped. A new connection that
        reuses the identity starts with an empty account.
        """
        for stream in self._streams.pop(peer, {}).values():
            if stream.cancel():
                self.stats.streams_cancelled += 1
        account = self._accounts.pop(peer, None)
        if account is None:
            return 0
        account.forgotten = True
        return account.count

    def in_flight_of(self, peer: Peer) -> int:
        """How many runs ``peer`` has holding slots right now."""
        account = self._accounts.get(peer)
        return account.count if account is not None else 0

    # -------------------------------------------------------------- draining

    @property
    def accepting(self) -> bool:
        """False once :meth:`drain` was called: new requests get ``ServerBusy``."""
        return self._accepting

    @property
    def in_flight(self) -> int:
        """Runs holding a slot right now, over all peers (forgotten ones included)."""
        return self.stats.in_flight

    def accept(self) -> None:
        """Accept new requests again: a server started anew after a shutdown."""
        self._accepting = True

    def drain(self) -> bool:
        """Refuse new requests from now on; True if no run is left (idle already).

        Otherwise the :meth:`finished` of the last run reports ``idle``.
        """
        self._accepting = False
        return not self.stats.in_flight

    # -------------------------------------------------------------- what the shell saw

    def handler_failed(self) -> None:
        """Count a handler error the shell saw: an inline call raised, or a result is unsendable."""
        self.stats.handler_errors += 1

    def response_sent(self) -> None:
        """Count a successful reply the transport took."""
        self.stats.responses += 1

    def error_reply_sent(self) -> None:
        """Count an error reply the transport took."""
        self.stats.error_replies += 1

    # -------------------------------------------------------------- rules

    def _unusable(
        self, kind: MessageKind | None, request_id: int | None, exc: Exception
    ) -> ReplyError | Drop:
        """Answer an unusable message if it was a request whose id could be read."""
        if kind is MessageKind.REQUEST and request_id is not None:
            return ReplyError(request_id, exc)
        self.stats.dropped += 1
        return Drop(str(exc))

    def _refusal(self, peer: Peer, request_id: int) -> ReplyError | None:
        """ServerBusy when ``peer`` or the whole server is at its in-flight cap."""
        if self.in_flight_of(peer) >= self.max_in_flight_per_peer:
            self.stats.busy += 1
            return ReplyError(
                request_id,
                ServerBusy(
                    f"more than {self.max_in_flight_per_peer} requests in flight from "
                    "this client; wait for replies before sending more"
                ),
            )
        cap = self.max_in_flight
        if cap is not None and self.stats.in_flight >= cap:
            self.stats.busy += 1
            return ReplyError(
                request_id,
                ServerBusy(
                    f"the server has {cap} requests in flight, its max_in_flight; "
                    "retry once some replies have come back"
                ),
            )
        return None

    def _take_slot(self, peer: Peer) -> _Account:
        account = self._accounts.get(peer)
        if account is None:
            account = self._accounts[peer] = _Account()
        account.count += 1
        self.stats.in_flight += 1
        return account
