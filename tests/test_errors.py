"""Errors travel by stable status codes: the table, the round trip, and extensions' codes."""

from __future__ import annotations

import pytest

from kvrpc import errors
from kvrpc.errors import (
    AuthenticationFailed,
    ClientLimitReached,
    CudaUnavailable,
    DeadlinePassed,
    EncodeError,
    KVConfigError,
    KVError,
    KvrpcError,
    MessageTooLarge,
    NotOwner,
    NotSharedMemory,
    PayloadValidationError,
    ProtocolError,
    RemoteError,
    ServerBusy,
    Status,
    StreamIdle,
    TransportError,
    TransportNotFound,
    UnknownInstance,
    UnknownJob,
    UnknownProtocol,
    VersionMismatch,
    error_from_wire,
    error_to_wire,
    register_error,
)

#: The released codes. A code never changes meaning: this table only ever grows.
CODES: dict[type[KvrpcError], int] = {
    ProtocolError: 2,
    EncodeError: 3,
    VersionMismatch: 4,
    MessageTooLarge: 5,
    PayloadValidationError: 6,
    UnknownProtocol: 7,
    ServerBusy: 8,
    TransportError: 9,
    CudaUnavailable: 10,
    AuthenticationFailed: 11,
    StreamIdle: 12,
    KVError: 100,
    KVConfigError: 101,
    UnknownInstance: 102,
    NotSharedMemory: 103,
    UnknownJob: 104,
    DeadlinePassed: 105,
    ClientLimitReached: 106,
    NotOwner: 107,
}


class CalcOverflow(KvrpcError):
    """An extension's own error, with a code of its own."""


class CalcUnregistered(KvrpcError):
    """An extension's error that nobody gave a code."""


class TooManyKeys(KVError):
    """A KVError subclass that has no code of its own."""


register_error(1234, CalcOverflow)


def round_trip(exc: BaseException) -> KvrpcError:
    return error_from_wire(*error_to_wire(exc))


def test_every_status_but_unknown_names_exactly_one_class_and_keeps_its_number() -> None:
    assert {Status(code) for code in CODES.values()} == set(Status) - {Status.UNKNOWN}
    assert Status.UNKNOWN == 1
    for cls, code in CODES.items():
        assert error_to_wire(cls("m")) == (code, cls.__name__, "m")


@pytest.mark.parametrize("cls", list(CODES), ids=lambda cls: cls.__name__)
def test_each_coded_class_comes_back_as_itself_with_its_message(cls: type[KvrpcError]) -> None:
    back = round_trip(cls("what went wrong"))
    assert type(back) is cls
    assert str(back) == "what went wrong"
    assert back.status == CODES[cls]


def test_a_subclass_without_a_code_travels_as_its_nearest_coded_ancestor() -> None:
    back = round_trip(TooManyKeys("64 keys at most"))
    assert type(back) is KVError and back.status == Status.KV
    assert str(back) == "TooManyKeys: 64 keys at most"
    assert type(round_trip(TransportNotFound("no plugin"))) is TransportError


def test_a_handlers_own_exception_is_a_remote_error_naming_its_type() -> None:
    assert error_to_wire(ZeroDivisionError("division by zero"))[:2] == (
        Status.UNKNOWN,
        "ZeroDivisionError",
    )
    back = round_trip(ZeroDivisionError("division by zero"))
    assert isinstance(back, RemoteError) and back.status == Status.UNKNOWN
    assert (back.remote_type, back.remote_message) == ("ZeroDivisionError", "division by zero")
    # A kvrpc error that has no code (and no coded ancestor) is no different.
    assert round_trip(CalcUnregistered("x")).status == Status.UNKNOWN
    # Passed on by a second server, it keeps its name, message and code.
    assert error_to_wire(back) == (Status.UNKNOWN, "ZeroDivisionError", "division by zero")


def test_an_extensions_error_comes_back_as_itself_by_its_own_code() -> None:
    assert error_to_wire(CalcOverflow("too big")) == (1234, "CalcOverflow", "too big")
    back = round_trip(CalcOverflow("too big"))
    assert type(back) is CalcOverflow and back.status == 1234


def test_a_code_this_side_does_not_know_is_a_remote_error_keeping_the_code() -> None:
    back = error_from_wire(4321, "SomeoneElsesError", "m")
    assert isinstance(back, RemoteError)
    assert (back.status, back.remote_type, back.remote_message) == (4321, "SomeoneElsesError", "m")


@pytest.mark.parametrize("code", [0, 1, 105, 999, errors.LAST_EXTENSION_STATUS + 1, -5])
def test_extensions_register_only_inside_their_range(code: int) -> None:
    class Late(KvrpcError):
        pass

    with pytest.raises(ValueError, match="extension status codes lie in 1000-9999"):
        register_error(code, Late)


def test_a_code_or_a_class_registers_once_and_only_kvrpc_errors_register() -> None:
    class Other(KvrpcError):
        pass

    with pytest.raises(ValueError, match="already CalcOverflow's"):
        register_error(1234, Other)
    with pytest.raises(ValueError, match="already has status 1234"):
        register_error(1235, CalcOverflow)
    with pytest.raises(ValueError, match="KvrpcError subclass"):
        register_error(1236, ValueError)  # type: ignore[arg-type]
    assert type(round_trip(Other("x"))) is RemoteError  # the refused ones changed nothing
