"""RPCServer: the shell around the :class:`~kvrpc.dispatch.Dispatcher`.

Every request is checked before its handler runs: size, decoding, protocol name, the payload
against the protocol's types, and the per-peer and global in-flight limits. Anything that
fails gets an error reply when its request id could be read, and is dropped and counted
otherwise; the server keeps serving either way. Those rules are the Dispatcher's
(:mod:`kvrpc.dispatch`), which decides without I/O; this module carries out what it decides:
it wires the transport, calls handlers (inline, in tasks, in the thread pool), sends replies
(:mod:`kvrpc.replies`) and runs the lifecycle.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, Unpack, cast

import anyio

from kvrpc._lifetime import OwnedTaskGroup
from kvrpc._memory import max_rss_bytes
from kvrpc.codec import Buffer
from kvrpc.dispatch import (
    CallInline,
    Decision,
    Dispatcher,
    Drop,
    Finished,
    Noted,
    ReplyError,
    Run,
    RunInPool,
    RunStream,
    RunStreamInPool,
    ServerStats,
    StopStream,
    WakeStream,
)
from kvrpc.handlers import HandlerTable, HandlerWrapper
from kvrpc.protocol import (
    COUNT,
    ECHO,
    LIST_PROTOCOLS,
    PING,
    STATS,
    ProtocolDefinition,
    ProtocolRegistry,
)
from kvrpc.replies import Replies
from kvrpc.stop_signal import StopSignal
from kvrpc.stream_runner import StreamRunner
from kvrpc.transport import (
    Inbox,
    Peer,
    PeerCredentials,
    ServerTransport,
    SupportsPeerCredentials,
    TransportOptions,
    create_server,
    parse_url,
)

if TYPE_CHECKING:
    from kvrpc.config import ServerConfig, ServerSettings

__all__ = ["HandlerWrapper", "PeerInfo", "RPCServer", "ServerStats", "current_peer"]

logger = logging.getLogger("kvrpc.server")

F = TypeVar("F", bound=Callable[..., Any])


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


class RPCServer:
    """Serves the protocols of a registry over the transport named by ``url``.

    Use it as an async context manager (it serves in the background while the body runs) or
    ``await server.serve()`` (it serves until :meth:`stop`). Handlers are registered before
    or after start, with :meth:`handler` as a decorator or :meth:`register`.

    The settings are :class:`~kvrpc.config.ServerConfig`'s, whose defaults they take: pass a
    ``config``, keywords (which override its fields), or both. ``max_workers`` bounds the
    thread pool of BLOCKING handlers; ``max_in_flight_per_peer`` bounds the requests one
    client may have running at once and ``max_in_flight`` those of all clients (more get
    :class:`ServerBusy`); ``shutdown_grace`` is how long shutdown waits for running requests
    before cancelling them; ``peer_stall_timeout`` is how long a client may leave replies
    unread, with more waiting, before the transport gives up on it (no other client ever
    waits for it meanwhile).
    """

    def __init__(
        self,
        url: str,
        *,
        registry: ProtocolRegistry | None = None,
        config: ServerConfig | None = None,
        **settings: Unpack[ServerSettings],
    ) -> None:
        from kvrpc.config import ServerConfig, load
        from kvrpc.curve import check_curve_url, server_curve_keys
        from kvrpc.token_file import load_authenticator

        values: dict[str, Any] = config.model_dump() if config is not None else {}
        values.update(settings)
        self.config = load(ServerConfig, "RPCServer", **values)
        self.url = url
        self.registry = registry if registry is not None else ProtocolRegistry.with_builtins()
        self.max_workers = self.config.max_workers
        self.max_message_size = self.config.max_message_size
        self.max_in_flight_per_peer = self.config.max_in_flight_per_peer
        self.shutdown_grace = self.config.shutdown_grace
        # Read now, so that a bad token file fails the construction, not the start.
        self._auth = load_authenticator(self.config.auth_token_file)
        if self.config.curve_secret_file is not None:
            check_curve_url(url)
        self._curve = server_curve_keys(self.config.curve_secret_file)
        self._handlers = HandlerTable(self.registry)
        self._dispatcher = Dispatcher(self._handlers, self.config)
        self._replies = Replies(self._dispatcher)
        self._streams = StreamRunner(
            self._dispatcher, self._replies, self.config.stream_idle_timeout, self._run_ended
        )
        self._inbox: Inbox | None = None
        self._transport: ServerTransport | None = None
        self._credentials = False  # whether the transport tells peers' credentials
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: OwnedTaskGroup | None = None
        self._exit_stack: AsyncExitStack | None = None
        self._stop = StopSignal()
        self._idle: asyncio.Event | None = None  # set while draining, when the last run ends
        self._scheme = parse_url(url).scheme
        _register_builtins(self)

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
        self._handlers.register(protocol, fn)

    def instrument(self, wrap: HandlerWrapper) -> None:
        """Pass every handler, registered now or later, through ``wrap(definition, fn)``.

        For observers (:mod:`kvrpc.metrics` times calls this way): the request path itself
        is unchanged, and a server never instrumented pays nothing. ``wrap`` must return a
        callable of the same kind as ``fn`` (``async def`` for ``async def``), since how a
        handler runs (inline, in a task, in a thread) is decided from the original. One
        wrapper per server: a second call raises ``RuntimeError``.
        """
        self._handlers.instrument(wrap)

    # ------------------------------------------------------------------ lifecycle

    @property
    def serving(self) -> bool:
        """True from a completed :meth:`start` until shutdown begins."""
        return self._exit_stack is not None and self._dispatcher.accepting

    @property
    def stats(self) -> ServerStats:
        """The live counters (read them on the server's event loop)."""
        return self._dispatcher.stats

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
                self.max_message_size,
                peer_stall_timeout=self.config.peer_stall_timeout,
                auth=self._auth,
                curve=self._curve,
            )
            transport = create_server(self.url, options)
            # Requests are handled straight from the transport's read callbacks, through the
            # inbox's bounds; the pool and the task group exist before the first one can come.
            self._executor = ThreadPoolExecutor(self.max_workers, "kvrpc-blocking")
            stack.callback(self._executor.shutdown, wait=False, cancel_futures=True)
            tasks = OwnedTaskGroup(f"kvrpc-server {self.url}")
            await tasks.open()
            stack.push_async_callback(tasks.close)
            self._tasks = tasks
            self._transport = self._replies.transport = transport
            # Asked once: an isinstance against a runtime-checkable Protocol walks its
            # members every time, and every request that asks for its peer would pay it.
            self._credentials = isinstance(transport, SupportsPeerCredentials)
            inbox = Inbox(
                self._on_frames,
                self._peer_lost,
                limit=self.config.inbox_limit,
                burst=self.config.inbox_burst,
                burst_bytes=self.config.inbox_burst_bytes,
            )
            inbox.bind(transport)
            self._dispatcher.accept()
            await transport.start(inbox)
            # Closed before the tasks (the stack unwinds in reverse): no request is delivered
            # into a task group that is closing.
            stack.push_async_callback(transport.close)
            stack.callback(inbox.close)
        except BaseException:
            self._transport = self._replies.transport = None
            self._tasks = None
            await stack.aclose()
            raise
        self._inbox = inbox
        self._exit_stack = stack
        self._stop.arm()
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
            await stack.aclose()  # the inbox and the transport, then the tasks, then the pool
            self._tasks = None
            self._inbox = None
        logger.info("kvrpc server on %s stopped", self.url)

    async def serve(self) -> None:
        """Serve until :meth:`stop` is called, then shut down gracefully."""
        async with self:
            await self.wait_for_stop()

    async def wait_for_stop(self) -> None:
        """Wait, while serving, until :meth:`stop` is called."""
        await self._stop.wait()

    def stop(self) -> None:
        """Ask :meth:`serve` / :meth:`wait_for_stop` to return; safe from any thread."""
        self._stop.set()

    async def _drain(self) -> None:
        """Refuse new requests, then give running ones up to ``shutdown_grace`` to finish."""
        drained = self._dispatcher.drain()
        # A stream may never end by itself (a subscription): each is ended now, told why.
        self._streams.end_all()
        if drained:
            return
        # The Dispatcher reports the last run's end, so the hot path keeps no event per run.
        self._idle = idle = asyncio.Event()
        with anyio.move_on_after(self.shutdown_grace):
            await idle.wait()
        self._idle = None
        if self._dispatcher.in_flight:
            logger.warning(
                "cancelling %d requests still running at shutdown", self._dispatcher.in_flight
            )

    # ------------------------------------------------------------------ the receive path

    def _peer_lost(self, peer: Peer) -> None:
        # Its slots free now; the results of its runs still going will be dropped unsent,
        # and its streams stop (their producers' finally blocks run).
        streams = self._dispatcher.streams_of(peer)
        self._dispatcher.forget(peer)
        for stream in streams:
            stream.stop()

    def _on_frames(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        try:
            self._carry_out(peer, self._dispatcher.on_frames(peer, frames))
        except Exception:  # a bug here must not stop the server for everyone
            logger.exception("unexpected error while handling a message from %r", peer)

    def _carry_out(self, peer: Peer, decision: Decision) -> None:
        """Do what the Dispatcher decided."""
        if type(decision) is CallInline:
            self._call_inline(peer, decision)
        elif type(decision) is ReplyError:
            self._replies.error(peer, decision.request_id, decision.error)
        elif type(decision) is Noted:
            pass
        elif type(decision) is WakeStream:
            decision.stream.wake()
        elif type(decision) is StopStream:
            decision.stream.stop()
        elif type(decision) is Drop:
            logger.debug("dropped a message from %r: %s", peer, decision.reason)
        elif type(decision) is RunStream:
            self._require_tasks().spawn(self._run_stream, decision)
        elif type(decision) is RunStreamInPool:
            self._require_tasks().spawn(self._run_stream_in_pool, decision)
        else:
            assert isinstance(decision, Run)
            self._require_tasks().spawn(self._run, decision)

    def _call_inline(self, peer: Peer, call: CallInline) -> None:
        # Plain non-blocking handlers run here: no task, no thread, the fastest path.
        token = _current.set((self, peer))
        try:
            result = call.fn(*call.args)
        except Exception as exc:
            self._dispatcher.handler_failed()
            self._replies.error(peer, call.request_id, exc)
            return
        finally:
            _current.reset(token)
        if not inspect.isawaitable(result):
            self._replies.result(peer, call.request_id, result)
            return
        # What it returned still has to run: it takes a slot like an ``async def`` handler,
        # or a plain handler could start unbounded work.
        decision = self._dispatcher.awaitable_returned(peer, call.request_id, result)
        if isinstance(decision, ReplyError):
            _discard(result)
            self._replies.error(peer, decision.request_id, decision.error)
        else:
            self._require_tasks().spawn(self._run, decision)

    async def _run(self, run: Run) -> None:
        # Set here, in the request's own task: a task spawned from a read callback is started
        # by another task and would otherwise inherit that one's context.
        _current.set((self, run.peer))
        try:
            if type(run) is RunInPool:
                # The thread sees this task's context: current_peer() works in BLOCKING handlers.
                call = functools.partial(contextvars.copy_context().run, run.fn, *run.args)
                result = await asyncio.get_running_loop().run_in_executor(self._executor, call)
            else:
                result = await run.fn(*run.args)
        except Exception as exc:
            outcome = self._dispatcher.finished(run, failed=True)
            if outcome.deliver:
                self._replies.error(run.peer, run.request_id, exc)
        except BaseException:  # cancelled at shutdown: the slot goes back, nothing is sent
            self._dispatcher.finished(run)
            raise
        else:
            outcome = self._dispatcher.finished(run)
            if outcome.deliver:
                self._replies.result(run.peer, run.request_id, result)
        if outcome.idle and self._idle is not None:
            self._idle.set()

    async def _run_stream(self, run: RunStream) -> None:
        _current.set((self, run.peer))  # see _run
        await self._streams.run(run)

    async def _run_stream_in_pool(self, run: RunStreamInPool) -> None:
        _current.set((self, run.peer))
        assert self._executor is not None
        await self._streams.run_in_pool(run, self._executor)

    def _run_ended(self, outcome: Finished) -> None:
        if outcome.idle and self._idle is not None:
            self._idle.set()

    def _require_tasks(self) -> OwnedTaskGroup:
        assert self._tasks is not None
        return self._tasks

    def _peer_info(self, peer: Peer) -> PeerInfo:
        transport = self._transport
        credentials = None
        if self._credentials and transport is not None:
            credentials = cast(SupportsPeerCredentials, transport).peer_credentials(peer)
        return PeerInfo(peer, self._scheme, credentials)


def _register_builtins(server: RPCServer) -> None:
    """Handle the registry's ``rpc.*`` protocols (a registry without them goes without)."""
    for definition, fn in (
        (PING, lambda: "pong"),
        (ECHO, lambda value: value),
        (LIST_PROTOCOLS, server._handlers.names),
        (STATS, functools.partial(_stats_report, server)),
        (COUNT, _count),
    ):
        if definition.name in server.registry:
            server.register(definition.name, fn)


async def _count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


def _stats_report(server: RPCServer) -> dict[str, int]:
    report = server.stats.as_dict()
    for key, value in server.transport_stats().items():
        report[f"transport_{key}"] = value
    report["max_rss_bytes"] = max_rss_bytes()
    return report


def _discard(awaitable: Awaitable[Any]) -> None:
    """Drop an awaitable that will never be awaited, without a "never awaited" warning."""
    if inspect.iscoroutine(awaitable):
        awaitable.close()
    elif isinstance(awaitable, asyncio.Future):
        awaitable.cancel()
