"""Typed protocol definitions and the registry that names them.

A protocol is a dotted name (``rpc.ping``, ``kv.lookup``) with the types of its positional
payload, the type of its response, and how the server runs its handler. Third parties add
their own protocol groups to a :class:`ProtocolRegistry` without editing kvrpc.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from kvrpc.errors import DuplicateProtocol, PayloadValidationError, UnknownProtocol

if TYPE_CHECKING:
    from pydantic import TypeAdapter, ValidationError

__all__ = [
    "BUILTIN_PROTOCOLS",
    "COUNT",
    "PING",
    "ECHO",
    "LIST_PROTOCOLS",
    "STATS",
    "HandlerType",
    "ProtocolDefinition",
    "ProtocolRegistry",
]

_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")


class HandlerType(enum.Enum):
    """How the server runs a protocol's handler."""

    #: On the event loop (plain or ``async def``); must never block.
    NONBLOCKING = "nonblocking"
    #: In the server's bounded thread pool, through ``run_in_executor``.
    BLOCKING = "blocking"


@dataclass(frozen=True)
class ProtocolDefinition:
    """One typed protocol: name, positional payload types, response type, handler type.

    Payloads are validated strictly (no coercion: ``"1"`` is not an ``int``) with pydantic
    ``TypeAdapter``s built once per definition. Any type pydantic validates may be used;
    the codec carries ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``list``,
    ``tuple``, ``dict``, pydantic models, CPU tensors and registered ext types.
    """

    name: str
    payload: tuple[Any, ...] = ()
    response: Any = None
    handler_type: HandlerType = HandlerType.NONBLOCKING
    doc: str = field(default="", compare=False)
    #: True: the response is a stream of ``response`` items, not one value. Its handler is
    #: an async generator (NONBLOCKING) or a generator (BLOCKING, run in one pool thread),
    #: and clients read it with ``client.stream`` (docs/core.md, "Streams").
    stream: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _NAME.fullmatch(self.name) is None:
            raise ValueError(
                f"protocol name {self.name!r} must be dotted lower-case words, like 'rpc.ping'"
            )
        if not isinstance(self.payload, tuple):
            raise TypeError(f"{self.name}: payload must be a tuple of types")
        if not isinstance(self.handler_type, HandlerType):
            raise TypeError(f"{self.name}: handler_type must be a HandlerType")
        if type(self.stream) is not bool:
            raise TypeError(f"{self.name}: stream must be a bool")

    @property
    def group(self) -> str:
        """The name's prefix before the last dot (``kv`` for ``kv.lookup``)."""
        return self.name.rpartition(".")[0]

    # pydantic is imported on first validation, not with kvrpc: it costs ~60 ms at start-up.
    @cached_property
    def _payload_adapter(self) -> TypeAdapter[Any]:
        return _adapter(self.name, "payload", tuple.__class_getitem__(self.payload or ((),)))

    @cached_property
    def _response_adapter(self) -> TypeAdapter[Any]:
        # Wrapped in a 1-tuple so that one config (arbitrary types allowed) applies to every
        # response type, models included: pydantic refuses a config for a bare model.
        response = type(None) if self.response is None else self.response
        return _adapter(self.name, "response", tuple[response])  # type: ignore[valid-type]

    @cached_property
    def _items_adapter(self) -> TypeAdapter[Any]:
        # A whole batch is checked in one call: per-item calls cost more than the items.
        item = type(None) if self.response is None else self.response
        return _adapter(self.name, "item", list[item])  # type: ignore[valid-type]

    def check_types(self) -> None:
        """Build the payload and response validators now.

        Raises ``TypeError`` naming the protocol if one of its types cannot be validated.
        :meth:`RPCServer.register <kvrpc.server.RPCServer.register>` calls it, so a bad
        definition fails at start-up rather than on its first request.
        """
        _ = self._payload_adapter, self._response_adapter
        if self.stream:
            _ = self._items_adapter

    def validate_payload(self, args: Iterable[Any]) -> tuple[Any, ...]:
        """Check positional ``args`` against the payload types and return the validated tuple.

        Raises :class:`PayloadValidationError` naming the argument and what was expected.
        """
        args = tuple(args)
        if len(args) != len(self.payload):
            raise PayloadValidationError(
                f"{self.name} takes {len(self.payload)} argument(s), got {len(args)}"
            )
        adapter = self._payload_adapter
        try:
            result: tuple[Any, ...] = adapter.validate_python(args, strict=True)
        except _validation_error() as exc:
            raise PayloadValidationError(f"{self.name}: {_describe(exc)}") from None
        return result

    def validate_response(self, value: Any) -> Any:
        """Check a response against the response type and return the validated value."""
        adapter = self._response_adapter
        try:
            return adapter.validate_python((value,), strict=True)[0]
        except _validation_error() as exc:
            raise PayloadValidationError(f"{self.name} response: {_describe(exc)}") from None

    def validate_items(self, items: list[Any]) -> list[Any]:
        """Check a batch of a stream's items against the item type (``response``)."""
        adapter = self._items_adapter
        try:
            result: list[Any] = adapter.validate_python(items, strict=True)
        except _validation_error() as exc:
            raise PayloadValidationError(f"{self.name} item: {_describe(exc)}") from None
        return result


def _adapter(name: str, what: str, annotation: Any) -> TypeAdapter[Any]:
    from pydantic import ConfigDict, PydanticSchemaGenerationError, PydanticUserError, TypeAdapter

    # Types pydantic has no schema for (memoryview, torch.Tensor, an ext type's plain class)
    # are checked with isinstance: the codec, not pydantic, decides how they travel.
    try:
        adapter = TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True))
        if not adapter.pydantic_complete:
            # An unresolved forward reference would otherwise fail only on first validation.
            adapter.rebuild(raise_errors=True)
        return adapter
    except (PydanticSchemaGenerationError, PydanticUserError, NameError) as exc:
        raise TypeError(f"{name}: its {what} type {annotation!r} cannot be validated: {exc}") from (
            exc
        )


def _validation_error() -> type[ValidationError]:
    from pydantic import ValidationError

    return ValidationError


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"argument {where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


class ProtocolRegistry:
    """Protocol definitions by name; adding a name twice raises :class:`DuplicateProtocol`.

    Not locked: fill it at start-up, before servers and clients that use it run.
    """

    def __init__(self, definitions: Iterable[ProtocolDefinition] = ()) -> None:
        self._by_name: dict[str, ProtocolDefinition] = {}
        self.extend(definitions)

    @classmethod
    def with_builtins(cls) -> ProtocolRegistry:
        """A registry holding kvrpc's built-in ``rpc.*`` protocols."""
        return cls(BUILTIN_PROTOCOLS)

    def add(self, definition: ProtocolDefinition) -> ProtocolDefinition:
        """Add one definition and return it (so it can be used as a module constant)."""
        if definition.name in self._by_name:
            raise DuplicateProtocol(f"protocol {definition.name!r} is already registered")
        self._by_name[definition.name] = definition
        return definition

    def extend(self, definitions: Iterable[ProtocolDefinition]) -> None:
        """Add a group of definitions; on a duplicate nothing of the group is added."""
        new = list(definitions)
        names = [d.name for d in new]
        clash = sorted({n for n in names if n in self._by_name or names.count(n) > 1})
        if clash:
            raise DuplicateProtocol(f"protocols already registered: {', '.join(clash)}")
        for definition in new:
            self._by_name[definition.name] = definition

    def get(self, name: str) -> ProtocolDefinition:
        """The definition named ``name``; raises :class:`UnknownProtocol` if there is none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownProtocol(f"no protocol named {name!r} is registered") from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[ProtocolDefinition]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)


PING = ProtocolDefinition("rpc.ping", (), str, doc="Liveness check; answers 'pong'.")
ECHO = ProtocolDefinition("rpc.echo", (Any,), Any, doc="Returns its argument unchanged.")
LIST_PROTOCOLS = ProtocolDefinition(
    "rpc.list_protocols", (), list[str], doc="Names of the protocols the server handles."
)
STATS = ProtocolDefinition(
    "rpc.stats", (), dict[str, int], doc="The server's counters (requests, errors, drops...)."
)

COUNT = ProtocolDefinition(
    "rpc.count",
    (int,),
    int,
    stream=True,
    doc="Streams the integers 0 to n-1: a stream's liveness check and its benchmark.",
)

#: The protocols every :class:`~kvrpc.server.RPCServer` answers.
BUILTIN_PROTOCOLS: tuple[ProtocolDefinition, ...] = (PING, ECHO, LIST_PROTOCOLS, STATS, COUNT)
