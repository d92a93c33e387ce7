"""AsyncClient, and SyncClient: the same client driven from a background event-loop thread.

Both keep one table of pending requests (:class:`~kvrpc.calls.CallTable`, which decides
without I/O), resolved by one receive loop: the async client's entries are asyncio futures,
the sync client's are :class:`MessagingFuture`s. Every pending
call ends: with its reply, with :class:`RequestTimeout` when its deadline passes (a late reply
is then dropped and counted), or with :class:`ConnectionLost` when the connection breaks.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack, suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Unpack

import anyio
import anyio.abc

from kvrpc import codec
from kvrpc._lifetime import OwnedTaskGroup
from kvrpc.calls import CallTable, ClientStats, Sink, StreamSink
from kvrpc.client_streams import Stream, SyncSink, SyncStream
from kvrpc.codec import Buffer
from kvrpc.errors import (
    ClientClosed,
    ConnectionLost,
    KvrpcError,
    MessageTooLarge,
    ProtocolError,
    TransportError,
    WrongThread,
)
from kvrpc.futures import MessagingFuture
from kvrpc.lane import NOT_TAKEN, DirectLane
from kvrpc.protocol import ProtocolDefinition, ProtocolRegistry
from kvrpc.streams import DEFAULT_WINDOW
from kvrpc.transport import (
    ClientTransport,
    SupportsTrySend,
    TransportOptions,
    connect_client,
)

if TYPE_CHECKING:
    from kvrpc.config import ClientSettings

__all__ = [
    "DEFAULT",
    "AsyncClient",
    "ClientStats",
    "RequestEncoder",
    "Stream",
    "SyncClient",
    "SyncStream",
]

logger = logging.getLogger("kvrpc.client")


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


#: Stands for "the client's own default timeout" in per-call arguments.
DEFAULT: Final = _Default()

Timeout = float | None | _Default
ProtocolRef = str | ProtocolDefinition

# A SyncClient's lane connects at once or not at all: a failed try must not stall a call.
_LANE_CONNECT_TIMEOUT = 0.5


class RequestEncoder:
    """Turns a call into a request's frames: checks its payload, numbers it, encodes it.

    No I/O and no event loop, so any thread may use it (a :class:`SyncClient`'s callers do).
    """

    def __init__(self, registry: ProtocolRegistry, validate: bool, max_message_size: int) -> None:
        self.registry = registry
        self.validate = validate
        self.max_message_size = max_message_size
        self._ids = itertools.count(1)

    def prepare(
        self, protocol: ProtocolRef, payload: Sequence[Any], window: int | None = None
    ) -> tuple[int, ProtocolDefinition | None, list[Buffer]]:
        """``(request_id, definition, frames)`` for one request, or with ``window`` a stream.

        The definition is None for a name the registry does not know, which is then sent
        unvalidated. Raises :class:`PayloadValidationError` for a payload its definition
        refuses, :class:`MessageTooLarge` for a request over ``max_message_size``, and
        :class:`ProtocolError` for a call of a stream or a stream of a call.
        """
        if isinstance(protocol, ProtocolDefinition):
            definition: ProtocolDefinition | None = protocol
            name = protocol.name
        else:
            name = protocol
            definition = self.registry.get(name) if name in self.registry else None
        if definition is not None:
            if definition.stream is (window is None):
                how = "read it with stream()" if definition.stream else "use call()"
                kind = "a stream" if definition.stream else "one value"
                raise ProtocolError(f"{name} answers with {kind}: {how}")
            if self.validate:
                definition.validate_payload(payload)
        request_id = next(self._ids)  # next() on a count is atomic under the GIL
        if window is None:
            frames = codec.encode_request(request_id, name, payload)
        else:
            frames = codec.encode_open(request_id, name, window, payload)
        size = codec.message_size(frames)
        if size > self.max_message_size:
            raise MessageTooLarge(
                f"request of {size} bytes exceeds max_message_size ({self.max_message_size})"
            )
        return request_id, definition, frames


class _Deadlines:
    """The loop side of a :class:`CallTable`'s deadlines: one timer, at the earliest one."""

    def __init__(self, calls: CallTable, loop: asyncio.AbstractEventLoop) -> None:
        self._calls = calls
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def add(
        self,
        request_id: int,
        sink: Sink,
        definition: ProtocolDefinition | None,
        seconds: float | None,
        on_done: Callable[[], None] | None,
    ) -> None:
        """Put a call in the table; with ``seconds``, it fails that long from now."""
        # The clock is read only for a call that has a deadline.
        now = self._loop.time() if seconds is not None else 0.0
        self._calls.add(request_id, sink, definition, seconds, now, on_done)
        if seconds is not None:
            # The deadline belongs to the request, not to whoever awaits it: a submitted
            # future times out even if nobody is waiting on it yet.
            self._arm(now + seconds)

    def cancel(self) -> None:
        """Stop the timer (the client is closing)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None

    def _arm(self, when: float) -> None:
        if self._timer_at is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._passed)

    def _passed(self) -> None:
        self._timer = self._timer_at = None
        self._calls.expire(self._loop.time())
        upcoming = self._calls.next_deadline()
        if upcoming is not None:
            self._arm(upcoming)


class _ReplySink:
    """The client's :class:`~kvrpc.transport.ClientSink`: replies go straight to the call table."""

    __slots__ = ("connection_lost", "deliver")

    def __init__(self, client: AsyncClient) -> None:
        # Bound once, so a reply costs the transport one call and no attribute lookups.
        self.deliver = client._on_message
        self.connection_lost = client._connection_lost


class AsyncClient:
    """An asyncio client for one server URL; open it with ``async with``.

    ``validate`` checks payloads before sending and responses on arrival against the
    protocol definitions of ``registry``. The other keywords are :class:`ClientSettings`,
    with the defaults of :class:`~kvrpc.config.ClientConfig`: ``timeout`` is the default
    per-call deadline in seconds (None waits forever), ``max_in_flight`` bounds pending calls
    (further submits wait for a free slot), and so on. Use it from the event loop that
    opened it.
    """

    def __init__(
        self,
        url: str,
        *,
        registry: ProtocolRegistry | None = None,
        validate: bool = True,
        **settings: Unpack[ClientSettings],
    ) -> None:
        from kvrpc.config import ClientConfig, load
        from kvrpc.curve import check_curve_url, client_curve_keys
        from kvrpc.token_file import load_authenticator

        # Every setting's default is ClientConfig's: written there and nowhere else.
        self.config = load(ClientConfig, "client", **settings)
        self.url = url
        self.registry = registry if registry is not None else ProtocolRegistry.with_builtins()
        self.timeout = self.config.timeout
        self.connect_timeout = self.config.connect_timeout
        self.reconnect_timeout = self.config.reconnect_timeout
        self.validate = validate
        self.max_message_size = self.config.max_message_size
        self.max_in_flight = self.config.max_in_flight
        #: The handshake's secret, read from ``auth_token_file`` (None: no handshake).
        self.auth = load_authenticator(self.config.auth_token_file)
        if self.config.curve_server_key_file is not None:
            check_curve_url(url)
        #: CURVE keys (a fresh keypair and the server's public key), or None.
        self.curve = client_curve_keys(self.config.curve_server_key_file)
        self._calls = CallTable(url, validate=validate)
        self.stats: ClientStats = self._calls.stats
        self._encoder = RequestEncoder(self.registry, validate, self.max_message_size)
        self._deadlines: _Deadlines | None = None
        self._transport: ClientTransport | None = None
        self._try_send: Callable[[Sequence[Buffer]], bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._exit_stack: AsyncExitStack | None = None
        self._slots: asyncio.Semaphore | None = None
        self._broken: KvrpcError | None = None
        # Requests submitted from other threads, waiting for the outbox task to send them.
        self._outbox: deque[tuple[int, list[Buffer]]] = deque()
        self._outbox_ready = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def connect(self) -> AsyncClient:
        """Connect within ``connect_timeout``; raises :class:`TransportError` if it cannot.

        :meth:`aclose` undoes it, possibly from another task of the same event loop.
        """
        if self._exit_stack is not None:
            raise ClientClosed("this client is already open")
        stack = AsyncExitStack()
        try:
            transport = connect_client(
                self.url,
                TransportOptions(
                    self.max_message_size,
                    self.reconnect_timeout,
                    auth=self.auth,
                    curve=self.curve,
                ),
            )
            # Closed on every failure path too: a half-made connection holds sockets.
            stack.push_async_callback(transport.close)
            try:
                with anyio.fail_after(self.connect_timeout):
                    await transport.connect(_ReplySink(self))
            except TimeoutError:
                hint = (
                    " (a CURVE server whose public key is not the one in "
                    f"{self.config.curve_server_key_file} completes no handshake)"
                    if self.curve is not None
                    else " (a CURVE server completes no handshake without its public key)"
                    if self.url.startswith("zmq+tcp://")
                    else ""
                )
                raise TransportError(
                    f"could not connect to {self.url} within {self.connect_timeout}s; "
                    f"is the server running?{hint}"
                ) from None
            tasks = OwnedTaskGroup(f"kvrpc-client {self.url}")
            self._task_group = await tasks.open()
            stack.push_async_callback(tasks.close)
        except BaseException:
            await stack.aclose()
            raise
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._deadlines = _Deadlines(self._calls, self._loop)
        self._try_send = transport.try_send if isinstance(transport, SupportsTrySend) else None
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._broken = None
        self._exit_stack = stack
        self._task_group.start_soon(self._outbox_loop)
        return self

    async def aclose(self) -> None:
        """Fail pending calls with :class:`ClientClosed` and disconnect; idempotent."""
        stack = self._exit_stack
        if stack is None:
            return
        self._exit_stack = None
        await self._cancel_open_streams()
        self._calls.fail_all(ClientClosed(f"client for {self.url} was closed"))
        if self._deadlines is not None:
            self._deadlines.cancel()
        await stack.aclose()  # stops the receive loop, then closes the transport
        self._task_group = None

    async def _cancel_open_streams(self) -> None:
        # Told, not left to the server to notice: a transport that reports no peer loss
        # (zmq's) would otherwise keep the producers until their idle timeout.
        transport = self._transport
        if transport is None:
            return
        closed = ClientClosed(f"client for {self.url} was closed")
        for request_id in self._calls.open_streams():
            self._calls.fail(request_id, closed)
            with suppress(Exception), anyio.move_on_after(self.reconnect_timeout):
                await transport.send(codec.encode_cancel(request_id))

    # ------------------------------------------------------------------ calling

    async def call(self, protocol: ProtocolRef, *payload: Any, timeout: Timeout = DEFAULT) -> Any:
        """Call ``protocol`` with ``payload`` and return its (validated) response.

        Raises :class:`RequestTimeout`, :class:`ConnectionLost`, the server's error
        (:class:`RemoteError` for a handler's own exception), or
        :class:`PayloadValidationError` before sending anything if the payload is invalid.
        """
        future = await self.submit(protocol, *payload, timeout=timeout)
        return await future

    async def submit(
        self, protocol: ProtocolRef, *payload: Any, timeout: Timeout = DEFAULT
    ) -> asyncio.Future[Any]:
        """Send a request and return the future of its reply, for many calls in flight.

        Waits while ``max_in_flight`` calls are pending. The future fails the same ways
        :meth:`call` does.
        """
        request_id, definition, frames = self.prepare(protocol, payload)
        slots = self._require_open()
        await slots.acquire()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: self.withdraw(request_id))
        self._register(request_id, future, definition, timeout, slots.release)
        try:
            await self._send(request_id, frames)
        except BaseException:
            # Cancelled while the send waited (for a reconnection, say): nobody will get
            # this future, so its entry and its in-flight slot are given back now.
            future.cancel()
            raise
        return future

    def prepare(
        self, protocol: ProtocolRef, payload: Sequence[Any], window: int | None = None
    ) -> tuple[int, ProtocolDefinition | None, list[Buffer]]:
        """Validate and encode a request (see :meth:`RequestEncoder.prepare`); thread-safe."""
        return self._encoder.prepare(protocol, payload, window)

    # ------------------------------------------------------------------ streams

    def stream(
        self,
        protocol: ProtocolRef,
        *payload: Any,
        window: int = DEFAULT_WINDOW,
        timeout: Timeout = DEFAULT,
    ) -> Stream:
        """The items of a streamed protocol, for ``async for`` (or ``async with ... as s``).

        ``window`` is the most items the stream may hold unread (the credit it opens with,
        see docs/core.md, "Streams"); ``timeout`` the most seconds to wait for each next item
        (the client's default; None waits forever, as a subscription should). The request
        goes out when iteration begins; it fails as :meth:`call` does, and the iterator
        raises the server's error or :class:`ConnectionLost` where the stream breaks.
        """
        seconds = self.timeout if isinstance(timeout, _Default) else timeout
        return Stream(self, protocol, payload, window, seconds)

    async def open_stream(
        self, sink: StreamSink, protocol: ProtocolRef, payload: Sequence[Any], window: int
    ) -> int:
        """Send the OPEN of a stream whose items go to ``sink``; returns its request id.

        For stream shells (:class:`Stream` uses it); waits, like :meth:`submit`, for an
        in-flight slot, which the stream holds until it ends.
        """
        request_id, definition, frames = self.prepare(protocol, payload, window)
        slots = self._require_open()
        await slots.acquire()
        self._calls.add_stream(request_id, sink, definition, slots.release)
        await self._send(request_id, frames)
        return request_id

    def open_stream_prepared(
        self,
        request_id: int,
        definition: ProtocolDefinition | None,
        frames: list[Buffer],
        sink: StreamSink,
        on_done: Callable[[], None],
    ) -> None:
        """Register and send a stream made by :meth:`prepare`; call it on the client's loop.

        The stream twin of :meth:`submit_prepared`, for :class:`SyncClient`.
        """
        try:
            self._require_open()
        except KvrpcError as exc:
            on_done()
            sink.set_exception(exc)
            return
        self._calls.add_stream(request_id, sink, definition, on_done)
        self._send_soon(request_id, frames)

    def grant(self, request_id: int, credits: int) -> None:
        """Let stream ``request_id`` send ``credits`` more items; call it on the client's loop."""
        if request_id in self._calls and self._transport is not None:
            self._send_soon(request_id, codec.encode_credit(request_id, credits))

    def cancel_stream(self, request_id: int) -> None:
        """Stop stream ``request_id`` here and on the server; call it on the client's loop.

        Items still on their way are dropped as late.
        """
        if self._calls.pop(request_id) is not None and self._transport is not None:
            self._send_soon(request_id, codec.encode_cancel(request_id))

    def _send_soon(self, request_id: int, frames: list[Buffer]) -> None:
        # In this loop turn when nothing queued is still owed, else after what is (in order).
        if not self._outbox and self._try_send is not None and self._try_send(frames):
            return
        self._outbox.append((request_id, frames))
        self._outbox_ready.set()

    # ------------------------------------------------------------------ pending table

    def _require_open(self) -> asyncio.Semaphore:
        if self._broken is not None:
            raise self._broken
        if self._slots is None or self._exit_stack is None:
            raise ClientClosed(f"client for {self.url} is not open; use 'async with'")
        return self._slots

    def _register(
        self,
        request_id: int,
        sink: Sink,
        definition: ProtocolDefinition | None,
        timeout: Timeout,
        on_done: Callable[[], None] | None,
    ) -> None:
        seconds = self.timeout if isinstance(timeout, _Default) else timeout
        assert self._deadlines is not None
        self._deadlines.add(request_id, sink, definition, seconds, on_done)

    async def _send(self, request_id: int, frames: list[Buffer]) -> ConnectionLost | None:
        """Send one registered request; a failure fails that request, never the client.

        Returns the :class:`ConnectionLost` that failed it, if one did.
        """
        assert self._transport is not None
        try:
            await self._transport.send(frames)
        except ConnectionLost as exc:
            self._calls.fail(request_id, exc)
            return exc
        except TransportError as exc:  # this message could not go (too many frames, say)
            self._calls.fail(request_id, self._send_failure(request_id, exc))
        except Exception as exc:
            # Not an error the transport meant to raise: it cannot be trusted with another
            # message, so this call and every later one fail at once instead of waiting.
            logger.exception("sending to %s failed", self.url)
            self._broken = self._send_failure(request_id, exc)
            self._calls.fail_all(self._broken)
        return None

    def _send_failure(self, request_id: int, exc: Exception) -> TransportError:
        call = self._calls.get(request_id)
        name = call.name if call is not None else "a request"
        error = TransportError(f"sending {name} to {self.url} failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    # ------------------------------------------------------------------ receiving

    def _connection_lost(self, reason: str) -> None:
        # Replies owed on that connection will never come; the next send reconnects.
        pending = len(self._calls)
        self.stats.disconnects += 1
        if pending:
            logger.warning("connection to %s lost with %d calls pending", self.url, pending)
        self._calls.fail_all(ConnectionLost(f"connection to {self.url} lost: {reason}"))

    def _on_message(self, frames: list[Buffer]) -> None:
        self._calls.receive(frames, self.max_message_size)

    # ------------------------------------------------------------------ for other threads

    def submit_prepared(
        self,
        request_id: int,
        definition: ProtocolDefinition | None,
        frames: list[Buffer],
        sink: Sink,
        timeout: Timeout,
        on_done: Callable[[], None],
    ) -> None:
        """Register and queue a request made by :meth:`prepare`; call it on the client's loop.

        For a caller on another thread, which hands it over with ``call_soon_threadsafe``
        (as :class:`SyncClient` does): ``sink`` is resolved as :meth:`submit`'s future is,
        and ``on_done`` runs once when the call leaves the table. Never raises: a closed or
        broken client fails ``sink``.
        """
        try:
            self._require_open()
        except KvrpcError as exc:
            on_done()
            sink.set_exception(exc)
            return
        self._register(request_id, sink, definition, timeout, on_done)
        # Order is kept: the outbox task holds a request in the queue until its send is done.
        self._send_soon(request_id, frames)

    def withdraw(self, request_id: int) -> None:
        """Forget a request whose future finished or whose caller gave up on it.

        Its in-flight slot is free again; a reply that still comes is dropped as late.
        Call it on the client's loop.
        """
        self._calls.pop(request_id)

    async def _outbox_loop(self) -> None:
        """Send what other threads submitted, in order, from one task of the task group."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                request_id, frames = self._outbox[0]
                try:
                    lost = await self._send(request_id, frames)
                finally:
                    self._outbox.popleft()
                if lost is not None:
                    # The requests queued behind this one waited for the same connection: a
                    # send that gave up on it (a server away for the whole reconnect timeout)
                    # fails them too, rather than each waiting that timeout again in turn,
                    # which would outlast their deadlines. Later submissions try afresh.
                    while self._outbox:
                        self._calls.fail(self._outbox.popleft()[0], lost)


class SyncClient:
    """A blocking client: an :class:`AsyncClient` driven by its own event-loop thread.

    Safe to use from many threads at once. ``submit`` returns a :class:`MessagingFuture`,
    ``call`` blocks for the result. Takes the same keyword options as :class:`AsyncClient`,
    and ``direct`` (default True): a ``call`` made while none of this client's calls is
    pending does its own socket I/O in the calling thread, on a connection of its own, where
    the transport offers one (see :mod:`kvrpc.lane`); every other call goes through the loop
    thread. Connects in the constructor; raises :class:`TransportError` if it cannot.
    """

    def __init__(self, url: str, *, direct: bool = True, **options: Any) -> None:
        self._client = AsyncClient(url, **options)
        self._slots = threading.BoundedSemaphore(self._client.max_in_flight)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        # Submissions waiting for the loop thread, handed over with one wake-up per batch.
        self._handover: deque[tuple[Any, ...]] = deque()
        self._handover_lock = threading.Lock()
        self._wake_pending = False
        self._unsettled = 0  # submitted calls not yet settled (guarded by _handover_lock)
        self._thread = threading.Thread(target=self._run, name=f"kvrpc-client {url}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        client = self._client
        self._lane: DirectLane | None = None
        if direct:
            self._lane = DirectLane(
                url,
                TransportOptions(
                    client.max_message_size,
                    client.reconnect_timeout,
                    auth=client.auth,
                    curve=client.curve,
                ),
                connect_timeout=min(client.connect_timeout, _LANE_CONNECT_TIMEOUT),
                retry_interval=client.reconnect_timeout,
                validate=client.validate,
            )
            if not self._lane.open():
                self._lane = None  # this transport has none, or it failed: the loop path

    @property
    def url(self) -> str:
        """The server URL."""
        return self._client.url

    @property
    def stats(self) -> ClientStats:
        """The client's counters: the loop thread's and the direct lane's, summed."""
        loop = self._client.stats
        if self._lane is None:
            return loop
        lane = self._lane.stats.as_dict()
        return ClientStats(**{key: value + lane[key] for key, value in loop.as_dict().items()})

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with self._client:
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def submit(
        self, protocol: ProtocolRef, *payload: Any, timeout: Timeout = DEFAULT
    ) -> MessagingFuture[Any]:
        """Send a request and return a :class:`MessagingFuture` of its reply.

        Validation errors are raised here, in the calling thread. Blocks while
        ``max_in_flight`` calls are pending.
        """
        if self._closed or self._loop is None:
            raise ClientClosed(f"client for {self.url} is closed")
        self._refuse_loop_thread()
        request_id, definition, frames = self._client.prepare(protocol, payload)
        self._settle_direct()
        return self._submit_prepared(request_id, definition, frames, timeout)

    def submit_direct(
        self, protocol: ProtocolRef, *payload: Any, timeout: Timeout = DEFAULT
    ) -> MessagingFuture[Any]:
        """Send a request now from this thread; its reply is read when its future is looked at.

        Send now, read later: on the direct lane (see :mod:`kvrpc.lane`), the request goes
        out in this call, and the returned :class:`~kvrpc.lane.LaneFuture` reads the reply
        in whichever thread polls it (``done``), waits on it, or sends on the lane next; its
        done-callbacks run there, and its deadline is noticed then too. No thread crossing
        either way: for a thread that sends several requests and then polls for them, as a
        scheduler does. Until they are all settled this thread's calls take the lane too, and
        its plain ``submit`` first waits for them, so that nothing overtakes them. Where the
        lane cannot take it (none on this transport, another thread's, or calls of this
        client pending on the loop path) it is an ordinary :meth:`submit`.
        """
        if self._closed or self._loop is None:
            raise ClientClosed(f"client for {self.url} is closed")
        self._refuse_loop_thread()
        request_id, definition, frames = self._client.prepare(protocol, payload)
        lane = self._lane
        if lane is not None and (lane.owned_here() or self._unsettled == 0):
            seconds = self._client.timeout if isinstance(timeout, _Default) else timeout
            # With every slot taken by this thread's own lane calls, only reading frees one.
            while not self._slots.acquire(blocking=False):
                if lane.owned_here():
                    lane.pump(None, None)
                else:
                    self._slots.acquire()
                    break
            future = lane.submit(request_id, definition, frames, seconds, self._slots.release)
            if future is not None:
                return future
            self._slots.release()
        return self._submit_prepared(request_id, definition, frames, timeout)

    def _settle_direct(self) -> None:
        # This thread's lane calls first: a request of it on the loop path must not pass them.
        lane = self._lane
        while lane is not None and lane.owned_here():
            lane.pump(None, None)

    def _hand_over(self) -> None:
        # On the loop thread: everything submitted since the last wake-up, in order.
        with self._handover_lock:
            items = list(self._handover)
            self._handover.clear()
            self._wake_pending = False
        submit = self._client.submit_prepared
        for item in items:
            submit(*item)

    def _call_left(self) -> None:
        # A call left the client's table (settled, expired, withdrawn): its slot comes back.
        # It stops counting as unsettled only after this loop turn, once its future holds the
        # result and has run its done-callbacks (the table hands the result over after this
        # runs): until then a call must not take the lane and finish ahead of them.
        self._slots.release()
        assert self._loop is not None
        self._loop.call_soon(self._settled)

    def _settled(self) -> None:
        with self._handover_lock:
            self._unsettled -= 1

    def _refuse_loop_thread(self) -> None:
        # The loop thread runs the futures' done-callbacks. Blocking it (for a free in-flight
        # slot, or for a reply) would stop every reply and timeout of this client for good.
        if threading.current_thread() is self._thread:
            raise WrongThread(
                f"the SyncClient for {self.url} was called from its own event-loop thread (a "
                "MessagingFuture done-callback runs there), where waiting would deadlock it; "
                "call it from another thread, or use an AsyncClient on that loop"
            )

    def _withdraw_if_cancelled(self, request_id: int, future: MessagingFuture[Any]) -> None:
        # A caller who cancels stops waiting; the request's slot must come back at once rather
        # than when a reply or the timeout eventually arrives.
        if future.cancelled() and self._loop is not None:
            with suppress(RuntimeError):  # the loop has stopped: close() freed everything
                self._loop.call_soon_threadsafe(self._client.withdraw, request_id)

    def call(self, protocol: ProtocolRef, *payload: Any, timeout: Timeout = DEFAULT) -> Any:
        """Call and block for the response; raises what :meth:`AsyncClient.call` raises."""
        lane = self._lane
        if lane is not None and lane.owned_here():  # behind this thread's direct submits
            return self.submit_direct(protocol, *payload, timeout=timeout).result()
        # Only with nothing of this client pending, so that a call never overtakes a request
        # the same thread submitted before it (the lane is another connection).
        if lane is not None and self._unsettled == 0 and not self._closed:
            self._refuse_loop_thread()
            request_id, definition, frames = self._client.prepare(protocol, payload)
            seconds = self._client.timeout if isinstance(timeout, _Default) else timeout
            value = lane.call(request_id, definition, frames, seconds)
            if value is NOT_TAKEN:  # nothing was sent: the loop path takes it as it is
                value = self._submit_prepared(request_id, definition, frames, timeout).result()
            return value
        return self.submit(protocol, *payload, timeout=timeout).result()

    def _submit_prepared(
        self,
        request_id: int,
        definition: ProtocolDefinition | None,
        frames: list[Buffer],
        timeout: Timeout,
    ) -> MessagingFuture[Any]:
        if self._closed or self._loop is None:
            raise ClientClosed(f"client for {self.url} is closed")
        future: MessagingFuture[Any] = MessagingFuture(self._thread)
        self._slots.acquire()
        with self._handover_lock:
            self._unsettled += 1
            self._handover.append(
                (request_id, definition, frames, future, timeout, self._call_left)
            )
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._hand_over)
            except RuntimeError:
                with self._handover_lock:
                    self._handover.clear()
                    self._unsettled -= 1
                self._slots.release()
                raise ClientClosed(f"client for {self.url} is closed") from None
        future.add_done_callback(functools.partial(self._withdraw_if_cancelled, request_id))
        return future

    def stream(
        self,
        protocol: ProtocolRef,
        *payload: Any,
        window: int = DEFAULT_WINDOW,
        timeout: Timeout = DEFAULT,
    ) -> SyncStream:
        """The items of a streamed protocol, for ``for`` (see :meth:`AsyncClient.stream`).

        The request is sent here. A stream goes through the loop thread, never the direct
        lane, and is not ordered against direct calls made while it is open.
        """
        if self._closed or self._loop is None:
            raise ClientClosed(f"client for {self.url} is closed")
        self._refuse_loop_thread()
        self._settle_direct()
        client = self._client
        request_id, definition, frames = client.prepare(protocol, payload, window)
        seconds = client.timeout if isinstance(timeout, _Default) else timeout
        name = protocol if isinstance(protocol, str) else protocol.name
        sink = SyncSink(window)  # a window out of range raises here, before a slot is taken
        self._slots.acquire()
        try:
            self._loop.call_soon_threadsafe(
                client.open_stream_prepared,
                request_id,
                definition,
                frames,
                sink,
                self._slots.release,
            )
        except RuntimeError:
            self._slots.release()
            raise ClientClosed(f"client for {self.url} is closed") from None
        return SyncStream(client, self._loop, request_id, name, sink, seconds)

    def close(self) -> None:
        """Fail pending calls with :class:`ClientClosed`, stop the loop thread; idempotent."""
        if self._closed:
            return
        self._refuse_loop_thread()
        self._closed = True
        if self._lane is not None:
            self._lane.close()
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            with suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
