"""Specification of protocol definitions, their strict payload validation, and the registry."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from kvrpc.errors import DuplicateProtocol, PayloadValidationError, UnknownProtocol
from kvrpc.protocol import (
    BUILTIN_PROTOCOLS,
    ECHO,
    LIST_PROTOCOLS,
    PING,
    STATS,
    HandlerType,
    ProtocolDefinition,
    ProtocolRegistry,
)


class Block(pydantic.BaseModel):
    key: str
    tokens: tuple[int, ...]


def define(name: str, *payload: Any, response: Any = None) -> ProtocolDefinition:
    return ProtocolDefinition(name, payload, response)


# --------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name", ["rpc.ping", "kv.lookup", "a.b.c", "kv2.get_block", "x_y.z9", "a.b.c.d.e"]
)
def test_dotted_lower_case_names_are_valid(name: str) -> None:
    assert define(name).name == name


@pytest.mark.parametrize(
    "name",
    [
        "ping",
        "Rpc.ping",
        "rpc.Ping",
        "rpc.",
        ".ping",
        "",
        "rpc..x",
        "rpc.ping.",
        "rpc.2ping",
        "_rpc.ping",
        "rpc.pi-ng",
        "rpc.pi ng",
        " rpc.ping",
        "rpc.ping\n",
    ],
)
def test_names_that_are_not_dotted_lower_case_words_raise_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="dotted"):
        define(name)


def test_a_name_that_is_not_a_string_raises_value_error() -> None:
    with pytest.raises(ValueError):
        ProtocolDefinition(b"rpc.ping")  # type: ignore[arg-type]


def test_payload_must_be_a_tuple_of_types() -> None:
    with pytest.raises(TypeError, match="tuple"):
        ProtocolDefinition("a.b", [int])  # type: ignore[arg-type]


def test_handler_type_must_be_a_handler_type() -> None:
    with pytest.raises(TypeError, match="HandlerType"):
        ProtocolDefinition("a.b", (), None, "blocking")  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "group"), [("kv.lookup", "kv"), ("a.b.c", "a.b")])
def test_group_is_the_name_before_the_last_dot(name: str, group: str) -> None:
    assert define(name).group == group


def test_definitions_default_to_no_payload_none_response_and_nonblocking_handler() -> None:
    definition = ProtocolDefinition("a.b")
    assert definition.payload == ()
    assert definition.response is None
    assert definition.handler_type is HandlerType.NONBLOCKING


# ------------------------------------------------------------------------------ registry


def test_registry_adds_and_gets_definitions_by_name() -> None:
    registry = ProtocolRegistry()
    lookup = registry.add(define("kv.lookup", str))
    assert registry.get("kv.lookup") is lookup
    assert "kv.lookup" in registry
    assert "kv.store" not in registry
    assert len(registry) == 1
    assert list(registry) == [lookup]


def test_adding_a_name_twice_raises_duplicate_protocol_and_keeps_the_first() -> None:
    registry = ProtocolRegistry()
    first = registry.add(define("kv.lookup", str))
    with pytest.raises(DuplicateProtocol, match=r"kv\.lookup"):
        registry.add(define("kv.lookup", int))
    assert registry.get("kv.lookup") is first


def test_extend_with_a_clash_adds_nothing_of_the_group() -> None:
    registry = ProtocolRegistry([define("kv.lookup")])
    group = [define("kv.store"), define("kv.lookup"), define("kv.evict")]
    with pytest.raises(DuplicateProtocol, match=r"kv\.lookup"):
        registry.extend(group)
    assert registry.names() == ["kv.lookup"]


def test_extend_with_a_name_twice_in_the_group_adds_nothing() -> None:
    registry = ProtocolRegistry()
    with pytest.raises(DuplicateProtocol, match=r"kv\.store"):
        registry.extend([define("kv.evict"), define("kv.store"), define("kv.store")])
    assert len(registry) == 0


def test_extend_accepts_any_iterable_including_a_generator() -> None:
    registry = ProtocolRegistry()
    registry.extend(define(f"calc.op{i}") for i in range(3))
    assert registry.names() == ["calc.op0", "calc.op1", "calc.op2"]


def test_constructor_with_duplicates_raises_duplicate_protocol() -> None:
    with pytest.raises(DuplicateProtocol):
        ProtocolRegistry([define("a.b"), define("a.b")])


def test_get_of_an_unknown_name_raises_unknown_protocol_naming_it() -> None:
    registry = ProtocolRegistry.with_builtins()
    with pytest.raises(UnknownProtocol, match=r"kv\.nothing"):
        registry.get("kv.nothing")


def test_names_are_sorted() -> None:
    registry = ProtocolRegistry([define("z.a"), define("a.z"), define("m.m")])
    assert registry.names() == ["a.z", "m.m", "z.a"]


def test_with_builtins_holds_the_rpc_protocols() -> None:
    registry = ProtocolRegistry.with_builtins()
    assert registry.names() == [
        "rpc.count",
        "rpc.echo",
        "rpc.list_protocols",
        "rpc.ping",
        "rpc.stats",
    ]
    assert registry.get("rpc.ping") is PING
    assert registry.get("rpc.echo") is ECHO
    assert registry.get("rpc.list_protocols") is LIST_PROTOCOLS
    assert registry.get("rpc.stats") is STATS
    assert set(BUILTIN_PROTOCOLS) == set(registry)


def test_each_with_builtins_registry_is_independent() -> None:
    first, second = ProtocolRegistry.with_builtins(), ProtocolRegistry.with_builtins()
    first.add(define("calc.add"))
    assert "calc.add" not in second


def test_iterating_a_registry_while_adding_to_it_is_safe() -> None:
    registry = ProtocolRegistry([define("a.a"), define("b.b")])
    for definition in registry:
        registry.add(define(definition.name + "x"))
    assert registry.names() == ["a.a", "a.ax", "b.b", "b.bx"]


def test_builtin_protocols_declare_their_types() -> None:
    assert PING.validate_payload(()) == ()
    assert PING.validate_response("pong") == "pong"
    assert ECHO.validate_payload([{"any": ("thing",)}]) == ({"any": ("thing",)},)
    assert LIST_PROTOCOLS.validate_response(["rpc.ping"]) == ["rpc.ping"]
    assert STATS.validate_response({"requests": 3}) == {"requests": 3}
    with pytest.raises(PayloadValidationError):
        STATS.validate_response({"requests": "3"})


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("payload_type", "bad"),
    [
        (int, "1"),
        (int, 1.0),
        (int, True),
        (int, None),
        (str, 1),
        (str, b"x"),
        (bytes, "x"),
        (bool, 1),
        (float, "1.5"),
        (list[int], (1, 2)),
        (list[int], [1, "2"]),
        (tuple[int, int], [1, 2]),
        (dict[str, int], {"a": "1"}),
    ],
    ids=repr,
)
def test_payload_validation_is_strict(payload_type: Any, bad: Any) -> None:
    definition = define("kv.strict", payload_type)
    with pytest.raises(PayloadValidationError, match=r"kv\.strict"):
        definition.validate_payload((bad,))


@pytest.mark.parametrize(
    ("payload_type", "good"),
    [
        (int, 1),
        (str, "1"),
        (bytes, b"\x00"),
        (float, 1.5),
        (bool, False),
        (list[int], [1, 2]),
        (dict[str, int], {"a": 1}),
        (tuple[int, str], (1, "a")),
        (tuple[int, ...], ()),
        (int | None, None),
    ],
    ids=repr,
)
def test_payload_of_the_declared_types_validates_to_itself(payload_type: Any, good: Any) -> None:
    assert define("kv.ok", payload_type).validate_payload([good]) == (good,)


def test_validated_payload_is_a_tuple_even_from_a_list() -> None:
    result = define("kv.pair", int, str).validate_payload([1, "a"])
    assert type(result) is tuple
    assert result == (1, "a")


def test_tuple_fields_accept_tuples_and_stay_tuples() -> None:
    (value,) = define("kv.coords", tuple[int, int]).validate_payload([(3, 4)])
    assert type(value) is tuple
    assert value == (3, 4)


@pytest.mark.parametrize(("args", "got"), [((), 0), ((1,), 1), ((1, "a", 2.0), 3)])
def test_wrong_arity_names_the_protocol_and_both_counts(args: tuple[Any, ...], got: int) -> None:
    definition = define("kv.pair", int, str)
    with pytest.raises(PayloadValidationError) as info:
        definition.validate_payload(args)
    message = str(info.value)
    assert "kv.pair" in message
    assert "2" in message
    assert f"got {got}" in message


def test_validation_error_names_the_failing_argument() -> None:
    with pytest.raises(PayloadValidationError, match=r"argument 1\b"):
        define("kv.pair", int, str).validate_payload((1, 2))


def test_payload_builds_pydantic_models_from_dicts() -> None:
    definition = define("kv.put", Block, int)
    block, count = definition.validate_payload(({"key": "k", "tokens": (1, 2, 3)}, 7))
    assert isinstance(block, Block)
    assert block == Block(key="k", tokens=(1, 2, 3))
    assert count == 7


def test_payload_accepts_model_instances_as_they_are() -> None:
    block = Block(key="k", tokens=(1,))
    assert define("kv.put", Block).validate_payload([block]) == (block,)


def test_model_fields_are_strict_too() -> None:
    with pytest.raises(PayloadValidationError, match=r"kv\.put"):
        define("kv.put", Block).validate_payload([{"key": "k", "tokens": ("1",)}])


def test_no_argument_protocol_accepts_only_no_arguments() -> None:
    definition = define("kv.count", response=int)
    assert definition.validate_payload(()) == ()
    with pytest.raises(PayloadValidationError, match="0"):
        definition.validate_payload((None,))


def test_validate_payload_accepts_any_iterable() -> None:
    assert define("kv.pair", int, int).validate_payload(iter([1, 2])) == (1, 2)


# ------------------------------------------------------------------------------ response


def test_response_none_accepts_only_none() -> None:
    definition = define("kv.evict")
    assert definition.validate_response(None) is None
    with pytest.raises(PayloadValidationError, match=r"kv\.evict response"):
        definition.validate_response(0)


@pytest.mark.parametrize(
    ("response_type", "bad"),
    [(int, "1"), (str, 1), (list[str], ["a", 1]), (tuple[int, int], [1, 2]), (Block, 3)],
    ids=repr,
)
def test_response_validation_is_strict(response_type: Any, bad: Any) -> None:
    definition = define("kv.get", response=response_type)
    with pytest.raises(PayloadValidationError, match=r"kv\.get response"):
        definition.validate_response(bad)


def test_response_builds_pydantic_models_from_dicts() -> None:
    definition = define("kv.get", response=Block)
    block = definition.validate_response({"key": "k", "tokens": (4, 5)})
    assert block == Block(key="k", tokens=(4, 5))


def test_response_tuple_stays_a_tuple() -> None:
    value = define("kv.span", response=tuple[int, int]).validate_response((0, 8))
    assert type(value) is tuple
    assert value == (0, 8)


# ------------------------------------------------------------------ types pydantic cannot schema


class Opaque:
    """A plain class with no pydantic schema, as an extension's ext type might be."""


@pytest.mark.parametrize(
    ("payload_type", "good", "bad"),
    [(memoryview, memoryview(b"ab"), b"ab"), (Opaque, Opaque(), object())],
    ids=["memoryview", "plain_class"],
)
def test_types_without_a_pydantic_schema_are_checked_with_isinstance(
    payload_type: Any, good: Any, bad: Any
) -> None:
    definition = define("ext.take", payload_type, response=payload_type)
    assert definition.validate_payload([good]) == (good,)
    assert definition.validate_response(good) is good
    with pytest.raises(PayloadValidationError, match=r"argument 0"):
        definition.validate_payload([bad])


def test_a_type_that_cannot_be_validated_raises_type_error_naming_the_protocol() -> None:
    definition = define("ext.broken", "NoSuchType")
    with pytest.raises(TypeError, match=r"ext\.broken: its payload type"):
        definition.check_types()


def test_check_types_builds_both_validators_of_a_sound_definition() -> None:
    definition = define("ext.fine", int, response=list[str])
    assert definition.check_types() is None
    # Both validators exist and check what they were built for.
    assert definition.validate_payload([3]) == (3,)
    assert definition.validate_response(["a", "b"]) == ["a", "b"]
    with pytest.raises(PayloadValidationError, match=r"argument 0"):
        definition.validate_payload(["3"])
    with pytest.raises(PayloadValidationError, match=r"ext\.fine response"):
        definition.validate_response([1])
