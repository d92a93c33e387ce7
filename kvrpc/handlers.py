"""The server's handler table: which function answers which protocol, and how it may run.

:class:`HandlerTable` holds one :class:`Handler` per protocol name. It checks a registration
once, when it is made (a duplicate, a definition that disagrees with the registry, an
``async def`` for a BLOCKING protocol, a type the validators cannot check), and passes every
handler through the server's instrumentation wrapper. It does no I/O; the
:class:`~kvrpc.dispatch.Dispatcher` reads it to decide how each request runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kvrpc.errors import DuplicateProtocol
from kvrpc.protocol import HandlerType, ProtocolDefinition, ProtocolRegistry

__all__ = ["Handler", "HandlerTable", "HandlerWrapper"]

HandlerWrapper = Callable[[ProtocolDefinition, Callable[..., Any]], Callable[..., Any]]
"""``wrap(definition, fn) -> fn'``: what :meth:`~kvrpc.server.RPCServer.instrument` takes."""


@dataclass(frozen=True, slots=True)
class Handler:
    """One registered handler.

    ``fn`` is what runs (the instrumented function where the server is instrumented);
    ``is_async`` was read from the function as registered, since a wrapper need not keep
    ``async def`` visible to :func:`inspect.iscoroutinefunction`.
    """

    definition: ProtocolDefinition
    fn: Callable[..., Any]
    is_async: bool

    @property
    def inline(self) -> bool:
        """True for a plain NONBLOCKING function: called on the loop, with no task."""
        definition = self.definition
        return (
            not self.is_async
            and definition.handler_type is HandlerType.NONBLOCKING
            and not definition.stream
        )


class HandlerTable:
    """The handlers of one server, by protocol name; filled at start-up or while serving.

    Not thread-safe: register from the server's event loop (or before it starts).
    """

    def __init__(self, registry: ProtocolRegistry) -> None:
        self.registry = registry
        self._handlers: dict[str, Handler] = {}
        self._wrap: HandlerWrapper | None = None

    def get(self, name: str) -> Handler | None:
        """The handler of protocol ``name``; None when there is none."""
        return self._handlers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)

    def names(self) -> list[str]:
        """The names of the protocols handled, sorted."""
        return sorted(self._handlers)

    def register(self, protocol: str | ProtocolDefinition, fn: Callable[..., Any]) -> None:
        """Handle ``protocol`` with ``fn(*payload)``; :meth:`.RPCServer.register` says how."""
        if isinstance(protocol, ProtocolDefinition):
            definition = protocol
            registry = self.registry
            known = registry.get(protocol.name) if protocol.name in registry else None
            if known is not None and known != protocol:
                raise DuplicateProtocol(
                    f"the registry defines {protocol.name!r} differently from the definition given"
                )
        else:
            definition = known = self.registry.get(protocol)
        definition.check_types()  # a bad type fails here, at start-up, not on a request
        if definition.name in self._handlers:
            raise DuplicateProtocol(f"{definition.name!r} already has a handler")
        if definition.stream:
            _check_stream_handler(definition, fn)
            is_async = definition.handler_type is HandlerType.NONBLOCKING
        else:
            if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
                raise TypeError(
                    f"{definition.name} answers with one value, but its handler is a generator: "
                    "declare the protocol with stream=True to stream its items"
                )
            is_async = inspect.iscoroutinefunction(fn)
        if is_async and not definition.stream and definition.handler_type is HandlerType.BLOCKING:
            raise TypeError(
                f"{definition.name} is BLOCKING, so its handler runs in a thread: give a plain "
                "function, or declare the protocol NONBLOCKING to use 'async def'"
            )
        # Only a registration that succeeds adds its definition to the registry.
        if known is None:
            self.registry.add(definition)
        if self._wrap is not None and not definition.stream:
            fn = self._wrap(definition, fn)
        self._handlers[definition.name] = Handler(definition, fn, is_async)

    def instrument(self, wrap: HandlerWrapper) -> None:
        """Pass every handler, registered now or later, through ``wrap``; once per table."""
        if self._wrap is not None:
            raise RuntimeError("this RPCServer is already instrumented")
        self._wrap = wrap
        for name, handler in self._handlers.items():
            if handler.definition.stream:
                continue  # a stream is no call to time: the wrapper sees calls only
            wrapped = wrap(handler.definition, handler.fn)
            self._handlers[name] = Handler(handler.definition, wrapped, handler.is_async)


def _check_stream_handler(definition: ProtocolDefinition, fn: Callable[..., Any]) -> None:
    if definition.handler_type is HandlerType.NONBLOCKING and not inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"{definition.name} is a NONBLOCKING stream: its handler must be an async generator "
            "('async def' with 'yield')"
        )
    if definition.handler_type is HandlerType.BLOCKING and not inspect.isgeneratorfunction(fn):
        raise TypeError(
            f"{definition.name} is a BLOCKING stream: its handler must be a generator function "
            "('def' with 'yield'), run in a thread of the pool"
        )
