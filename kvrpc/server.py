"""RPCServer: receive, validate, dispatch, reply.

Every request is checked before its handler runs: size, decoding, protocol name, the per-peer
in-flight limit, and the payload against the protocol's types. Anything that fails gets an
error reply when its request id could be read, and is dropped and counted otherwise; the
server keeps serving either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc

from kvrpc import codec
from kvrpc._lifetime import OwnedTaskGroup
from kvrpc._memory import max_rss_bytes
from kvrpc.codec import Buffer, MessageKind
from kvrpc.errors import (
    ConnectionLost,
    DuplicateProtocol,
    MessageTooLarge,
    PayloadValidationError,
    ProtocolError,
    ServerBusy,
    TransportError,
    UnknownProtocol,
    error_to_wire,
)
from kvrpc.protocol import (
    ECHO,
    LIST_PROTOCOLS,
    PING,
    STATS,
    HandlerType,
    ProtocolDefinition,
    ProtocolRegistry,
)
from kvrpc.transport import (
    Oversized,
    Peer,
    PeerCredentials,
    ServerTransport,
    SupportsPeerCredentials,
    SupportsServerReceiver,
    TransportOptions,
    create_server,
    parse_url,
)

__all__ = ["PeerInfo", "RPCServer", "ServerStats", "current_peer"]

logger = logging.getLogger("kvrpc.server")

F = TypeVar("F", bound=Callable[..., Any])

HandlerWrapper = Callable[[ProtocolDefinition, Callable[..., Any]], Callable[..., Any]]
"""``wrap(definition, fn) -> fn'``: what :meth:`RPCServer.instrument` takes."""


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
    in_flight: int = 0  #: requests running in tasks or threads right now

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The client whose request a handler is running for.

    ``peer`` is the transport's opaque identity of the connection; ``scheme`` is the URL
    scheme the server listens on (``unix``, ``zmq+tcp``...); ``credentials`` are the
    kernel-reported process credentials where the transport knows them (Unix sockets) and
    None elsewhere: over TCP nothing about the peer is known.
    """

    peer: Peer
    scheme: str
    credentials: PeerCredentials | None


# (server, peer) of the request being handled; turned into a PeerInfo only when asked for.
_current: contextvars.ContextVar[tuple[RPCServer, Peer]] = contextvars.ContextVar("kvrpc_peer")


def current_peer() -> PeerInfo:
    """The :class:`PeerInfo` of the request the calling handler is running for.

    Works in every handler type (inline, ``async def``, BLOCKING threads). Raises
    ``RuntimeError`` outside a handler.
    """
    try:
        server, peer = _current.get()
    except LookupError:
        raise RuntimeError("current_peer() is only available inside a request handler") from None
    return server._peer_info(peer)


@dataclass(frozen=True, slots=True)
class _Handler:
    definition: ProtocolDefinition
    fn: Callable[..., Any]
    is_async: bool


class RPCServer:
    """Serves the protocols of a registry over the transport named by ``url``.

    Use it as an async context manager (it serves in the background while the body runs) or
    ``await server.serve()`` (it serves until :meth:`stop`). Handlers are registered before
    or after start, with :meth:`handler` as a decorator or :meth:`register`.

    ``max_workers`` bounds the thread pool of BLOCKING handlers; ``max_in_flight_per_peer``
    bounds the requests one client may have running at once (more get :class:`ServerBusy`);
    ``shutdown_grace`` is how long shutdown waits for running requests before cancelling them;
    ``peer_stall_timeout`` is how long a client may leave replies unread, with more waiting,
    before the transport gives up on it (no other client ever waits for it meanwhile).
    """

    def __init__(
        self,
        url: str,
        *,
        registry: ProtocolRegistry | None = None,
        max_workers: int = 8,
        max_message_size: int = 256 * 1024 * 1024,
        max_in_flight_per_peer: int = 256,
        shutdown_grace: float = 5.0,
        peer_stall_timeout: float = 10.0,
    ) -> None:
        from kvrpc.config import ServerConfig, load

        self.config = load(
            ServerConfig,
            "RPCServer",
            max_workers=max_workers,
            max_message_size=max_message_size,
            max_in_flight_per_peer=max_in_flight_per_peer,
            shutdown_grace=shutdown_grace,
            peer_stall_timeout=peer_stall_timeout,
        )
        self.url = url
        self.registry = registry if registry is not None else ProtocolRegistry.with_builtins()
        self.max_workers = self.config.max_workers
        self.max_message_size = self.config.max_message_size
        self.max_in_flight_per_peer = self.config.max_in_flight_per_peer
        self.shutdown_grace = self.config.shutdown_grace
        self._stats = ServerStats()
        self._handlers: dict[str, _Handler] = {}
        self._wrap: HandlerWrapper | None = None
        self._per_peer: dict[Peer, int] = {}
        self._accepting = False
        # True while a reply begun in _offer waits to be sent; later messages go to recv().
        self._reply_waiting = False
        # _offer takes messages only while the task group can still start tasks.
        self._offers_open = False
        self._transport: ServerTransport | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._tasks: OwnedTaskGroup | None = None
        self._exit_stack: AsyncExitStack | None = None
        self._stop_requested: anyio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheme = parse_url(url).scheme
        self._register_builtins()

    # ------------------------------------------------------------------ registration

    def handler(self, protocol: str | ProtocolDefinition) -> Callable[[F], F]:
        """Decorator form of :meth:`register`."""

        def decorate(fn: F) -> F:
            self.register(protocol, fn)
            return fn

        return decorate

    def register(self, protocol: str | ProtocolDefinition, fn: Callable[..., Any]) -> None:
        """Handle ``protocol`` with ``fn(*payload)``.

        A definition not yet in the server's registry is added to it; a name must already be
        there. ``fn`` may be ``async def`` or return an awaitable only if the protocol is
        NONBLOCKING. Registering a second handler raises :class:`DuplicateProtocol`.
        """
        if isinstance(protocol, ProtocolDefinition):
            definition = protocol
            known = self.registry.get(protocol.name) if protocol.name in self.registry else None
            if known is not None and known != protocol:
                raise DuplicateProtocol(
                    f"the registry defines {protocol.name!r} differently from the definition given"
                )
        else:
            definition = known = self.registry.get(protocol)
        definition.check_types()  # a bad type fails here, at start-up, not on a request
        if definition.name in self._handlers:
            raise DuplicateProtocol(f"{definition.name!r} already has a handler")
        is_async = inspect.iscoroutinefunction(fn)
        if is_async and definition.handler_type is HandlerType.BLOCKING:
            raise TypeError(
                f"{definition.name} is BLOCKING, so its handler runs in a thread: give a plain "
                "function, or declare the protocol NONBLOCKING to use 'async def'"
            )
        # Only a registration that succeeds adds its definition to the registry.
        if known is None:
            self.registry.add(definition)
        if self._wrap is not None:
            fn = self._wrap(definition, fn)
        self._handlers[definition.name] = _Handler(definition, fn, is_async)

    def instrument(self, wrap: HandlerWrapper) -> None:
        """Pass every handler, registered now or later, through ``wrap(definition, fn)``.

        For observers (:mod:`kvrpc.metrics` times calls this way): the request path itself
        is unchanged, and a server never instrumented pays nothing. ``wrap`` must return a
        callable of the same kind as ``fn`` (``async def`` for ``async def``), since how a
        handler runs (inline, in a task, in a thread) is decided from the original. One
        wrapper per server: a second call raises ``RuntimeError``.
        """
        if self._wrap is not None:
            raise RuntimeError("this RPCServer is already instrumented")
        self._wrap = wrap
        for name, handler in self._handlers.items():
            wrapped = wrap(handler.definition, handler.fn)
            self._handlers[name] = _Handler(handler.definition, wrapped, handler.is_async)

    def _register_builtins(self) -> None:
        for definition, fn in (
            (PING, lambda: "pong"),
            (ECHO, lambda value: value),
            (LIST_PROTOCOLS, lambda: sorted(self._handlers)),
            (STATS, self._stats_report),
        ):
            if definition.name in self.registry:
                self.register(definition.name, fn)

    def _stats_report(self) -> dict[str, int]:
        report = self._stats.as_dict()
        if self._transport is not None:
            for key, value in self._transport.stats().items():
                report[f"transport_{key}"] = value
        report["max_rss_bytes"] = max_rss_bytes()
        return report

    # ------------------------------------------------------------------ lifecycle

    @property
    def serving(self) -> bool:
        """True from a completed :meth:`start` until shutdown begins."""
        return self._exit_stack is not None and self._accepting

    @property
    def stats(self) -> ServerStats:
        """The live counters (read them on the server's event loop)."""
        return self._stats

    def transport_stats(self) -> dict[str, int]:
        """The transport's counters (see ``ServerTransport.stats``); empty before start."""
        return self._transport.stats() if self._transport is not None else {}

    async def __aenter__(self) -> RPCServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> RPCServer:
        """Bind the transport and serve in the background; :meth:`aclose` undoes it.

        Start and close may happen in different tasks of the same event loop.
        """
        if self._exit_stack is not None:
            raise RuntimeError("this RPCServer is already running")
        stack = AsyncExitStack()
        try:
            options = TransportOptions(
                self.max_message_size, peer_stall_timeout=self.config.peer_stall_timeout
            )
            transport = create_server(self.url, options)
            await transport.start()
            stack.push_async_callback(transport.close)
            self._executor = ThreadPoolExecutor(self.max_workers, "kvrpc-blocking")
            stack.callback(self._executor.shutdown, wait=False, cancel_futures=True)
            tasks = OwnedTaskGroup(f"kvrpc-server {self.url}")
            self._task_group = await tasks.open()
            self._tasks = tasks
            stack.push_async_callback(tasks.close)
        except BaseException:
            await stack.aclose()
            raise
        self._transport = transport
        self._exit_stack = stack
        self._stop_requested = anyio.Event()
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._task_group.start_soon(self._receive_loop, transport)
        if isinstance(transport, SupportsServerReceiver):
            self._offers_open = True
            transport.set_receiver(self._offer)  # requests straight from the read callback
        logger.info("kvrpc server listening on %s", self.url)
        return self

    async def aclose(self) -> None:
        """Shut down gracefully; idempotent.

        Refuses new requests, lets running ones finish within ``shutdown_grace`` seconds,
        cancels the rest, then closes the transport.
        """
        stack = self._exit_stack
        if stack is None:
            return
        try:
            await self._drain()
        finally:
            self._exit_stack = None
            self._offers_open = False  # a read callback may still fire until the transport closes
            await stack.aclose()  # cancels the tasks, then the pool, then the transport
            self._task_group = self._tasks = None
        logger.info("kvrpc server on %s stopped", self.url)

    async def serve(self) -> None:
        """Serve until :meth:`stop` is called, then shut down gracefully."""
        async with self:
            await self.wait_for_stop()

    async def wait_for_stop(self) -> None:
        """Wait, while serving, until :meth:`stop` is called."""
        if self._stop_requested is None:
            raise RuntimeError("the server is not running")
        await self._stop_requested.wait()

    def stop(self) -> None:
        """Ask :meth:`serve` / :meth:`wait_for_stop` to return; safe from any thread."""
        loop, requested = self._loop, self._stop_requested
        if loop is None or requested is None:
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            requested.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop already closed: nothing to stop
                loop.call_soon_threadsafe(requested.set)

    async def _drain(self) -> None:
        """Refuse new requests, then give running ones up to ``shutdown_grace`` to finish."""
        self._accepting = False
        with anyio.move_on_after(self.shutdown_grace):
            while self._stats.in_flight:  # noqa: ASYNC110
                # Polling keeps the hot path free of per-request event bookkeeping.
                await anyio.sleep(0.005)
        if self._stats.in_flight:
            logger.warning(
                "cancelling %d requests still running at shutdown", self._stats.in_flight
            )

    # ------------------------------------------------------------------ the receive path

    async def _receive_loop(self, transport: ServerTransport) -> None:
        while True:
            try:
                peer, frames = await transport.recv()
            except ConnectionLost:
                return
            try:
                await self._handle(peer, frames)
            except Exception:  # a bug here must not stop the server for everyone
                logger.exception("unexpected error while handling a message from %r", peer)
            # Waiting for the next message can take a while: do not hold this one's buffers
            # (possibly many MiB) meanwhile.
            del frames

    def _offer(self, peer: Peer, frames: list[Buffer]) -> bool:
        """Handle a message from the transport's read callback; False leaves it to recv().

        The handling coroutine is run eagerly, here: a ping, or any request whose handler is
        plain NONBLOCKING and whose reply the transport takes at once, finishes without a
        task or a further event-loop turn. If it has to wait (a full send queue), a task
        finishes it, and until then later messages are declined, so the transport queues them
        for the receive loop in order.
        """
        if self._reply_waiting or not self._offers_open:
            return False
        handling = self._handle(peer, frames)
        try:
            waiting_on = handling.send(None)
        except StopIteration:
            return True
        except Exception:  # a bug here must not stop the server for everyone
            logger.exception("unexpected error while handling a message from %r", peer)
            return True
        self._reply_waiting = True
        self._spawn(self._finish, handling, waiting_on)
        return True

    async def _finish(self, handling: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        """Drive a handling coroutine that :meth:`_offer` started, to its end."""
        try:
            await _Resumed(handling, waiting_on)
        except Exception:
            logger.exception("unexpected error while finishing a reply")
        finally:
            self._reply_waiting = False

    async def _handle(self, peer: Peer, frames: list[Buffer]) -> None:
        stats = self._stats
        # A transport that threw an oversized message away hands over only its head.
        size = frames.size if type(frames) is Oversized else codec.message_size(frames)
        if size > self.max_message_size:
            stats.oversized += 1
            kind, request_id = codec.peek(frames)
            await self._refuse(
                peer,
                kind,
                request_id,
                MessageTooLarge(
                    f"message of {size} bytes exceeds the server's "
                    f"max_message_size of {self.max_message_size}"
                ),
            )
            return
        try:
            message = codec.decode(frames)
        except ProtocolError as exc:
            stats.malformed += 1
            await self._refuse(peer, exc.kind, exc.request_id, exc)
            return
        if message.kind is not MessageKind.REQUEST:
            stats.unexpected += 1
            stats.dropped += 1
            return
        stats.requests += 1
        request_id = message.request_id
        handler = self._handlers.get(message.name)
        if handler is None:
            stats.unknown_protocol += 1
            await self._send_error(
                peer, request_id, UnknownProtocol(f"server has no protocol {message.name!r}")
            )
            return
        if not self._accepting:
            stats.busy += 1
            await self._send_error(peer, request_id, ServerBusy("server is shutting down"))
            return
        try:
            args = handler.definition.validate_payload(message.payload)
        except PayloadValidationError as exc:
            stats.invalid_payload += 1
            await self._send_error(peer, request_id, exc)
            return
        inline = not handler.is_async and handler.definition.handler_type is HandlerType.NONBLOCKING
        if inline:
            # Plain non-blocking handlers run inline: no task, no thread, the fastest path.
            token = _current.set((self, peer))
            try:
                result = handler.fn(*args)
            except Exception as exc:
                stats.handler_errors += 1
                await self._send_error(peer, request_id, exc)
                return
            finally:
                _current.reset(token)
            if not inspect.isawaitable(result):
                await self._send_result(peer, request_id, result)
                return
            # What it returned still has to run: it counts against the peer's limit like an
            # ``async def`` handler, or a plain handler could start unbounded work.
            if self._at_peer_limit(peer):
                _discard(result)
                await self._refuse_busy(peer, request_id)
                return
            self._start(peer, request_id, functools.partial(_await, result))
            return
        if self._at_peer_limit(peer):
            await self._refuse_busy(peer, request_id)
            return
        if handler.is_async:
            self._start(peer, request_id, functools.partial(handler.fn, *args))
        else:
            self._start(peer, request_id, functools.partial(self._in_thread, handler.fn, args))

    def _at_peer_limit(self, peer: Peer) -> bool:
        return self._per_peer.get(peer, 0) >= self.max_in_flight_per_peer

    async def _refuse_busy(self, peer: Peer, request_id: int) -> None:
        self._stats.busy += 1
        await self._send_error(
            peer,
            request_id,
            ServerBusy(
                f"more than {self.max_in_flight_per_peer} requests in flight from "
                "this client; wait for replies before sending more"
            ),
        )

    def _peer_info(self, peer: Peer) -> PeerInfo:
        transport = self._transport
        credentials = None
        if isinstance(transport, SupportsPeerCredentials):
            credentials = transport.peer_credentials(peer)
        return PeerInfo(peer, self._scheme, credentials)

    def _start(self, peer: Peer, request_id: int, call: Callable[[], Awaitable[Any]]) -> None:
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._stats.in_flight += 1
        self._spawn(self._run, peer, request_id, call)

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Start ``fn(*args)`` in the server's task group, from a task or a read callback."""
        assert self._tasks is not None
        self._tasks.spawn(fn, *args)

    async def _in_thread(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        # The thread sees this task's context, so current_peer() works in BLOCKING handlers.
        run = functools.partial(contextvars.copy_context().run, fn, *args)
        return await loop.run_in_executor(self._executor, run)

    async def _run(self, peer: Peer, request_id: int, call: Callable[[], Awaitable[Any]]) -> None:
        # Set here, in the request's own task: a task spawned from a read callback is started
        # by another task and would otherwise inherit that one's context.
        _current.set((self, peer))
        try:
            result = await call()
        except Exception as exc:
            self._stats.handler_errors += 1
            await self._send_error(peer, request_id, exc)
        else:
            await self._send_result(peer, request_id, result)
        finally:
            self._stats.in_flight -= 1
            left = self._per_peer[peer] - 1
            if left:
                self._per_peer[peer] = left
            else:
                del self._per_peer[peer]

    # ------------------------------------------------------------------ replies

    async def _send_result(self, peer: Peer, request_id: int, result: Any) -> None:
        try:
            frames = codec.encode_response(request_id, result)
        except ProtocolError as exc:
            self._stats.handler_errors += 1
            await self._send_error(peer, request_id, exc)
            return
        try:
            await self._send(peer, frames)
        except TransportError as exc:  # the transport cannot carry this reply (its frames)
            self._stats.handler_errors += 1
            await self._send_error(peer, request_id, exc)
            return
        self._stats.responses += 1

    async def _send_error(self, peer: Peer, request_id: int, exc: BaseException) -> None:
        logger.debug("request %d from %r failed", request_id, peer, exc_info=exc)
        frames = codec.encode_error(request_id, *error_to_wire(exc))
        try:
            await self._send(peer, frames)
        except TransportError:
            logger.exception("could not send an error reply to %r", peer)
            return
        self._stats.error_replies += 1

    async def _refuse(
        self, peer: Peer, kind: MessageKind | None, request_id: int | None, exc: Exception
    ) -> None:
        """Answer an unusable message with an error if it was a request with a readable id."""
        if kind is MessageKind.REQUEST and request_id is not None:
            await self._send_error(peer, request_id, exc)
        else:
            self._stats.dropped += 1
            logger.debug("dropped a message from %r: %s", peer, exc)

    async def _send(self, peer: Peer, frames: list[Buffer]) -> None:
        assert self._transport is not None
        with contextlib.suppress(ConnectionLost):  # a peer gone away takes no replies
            await self._transport.send(peer, frames)


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _discard(awaitable: Awaitable[Any]) -> None:
    """Drop an awaitable that will never be awaited, without a "never awaited" warning."""
    if inspect.iscoroutine(awaitable):
        awaitable.close()
    elif isinstance(awaitable, asyncio.Future):
        awaitable.cancel()


class _Resumed:
    """Awaits the rest of a coroutine that was started by hand and has suspended once.

    ``yielded`` is what the coroutine's first ``send(None)`` gave: a future (or None for a
    bare yield). It is handed to the task unchanged, exactly as ``yield from`` would, so the
    task sees the future in the state the coroutine left it in. Awaiting that future again
    instead fails with "await wasn't used with future": its blocking flag is already set
    by the coroutine's own await, and only a task may clear it.
    """

    __slots__ = ("_coroutine", "_yielded")

    def __init__(self, coroutine: Coroutine[Any, Any, None], yielded: Any) -> None:
        self._coroutine = coroutine
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, None]:
        coroutine, yielded = self._coroutine, self._yielded
        while True:
            try:
                sent = yield yielded
            except BaseException as exc:  # cancellation included: the coroutine sees it
                try:
                    yielded = coroutine.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                yielded = coroutine.send(sent)
            except StopIteration:
                return
