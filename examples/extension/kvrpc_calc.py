"""kvrpc_calc: a protocol group for kvrpc that lives outside the kvrpc package.

An extension needs nothing from kvrpc beyond its public API:

* protocol definitions with dotted names in a group of its own (``calc.*``), as module
  constants that servers and clients both import;
* wire types of its own, registered once per process with :func:`kvrpc.register_ext` under a
  code from 64-127 (0-63 are kvrpc's);
* errors of its own, registered with :func:`kvrpc.register_error` under a status code from
  1000-9999 (lower ones are kvrpc's), so that a caller catches them by their own class;
* an ``install(server)`` function that registers the handlers on an :class:`RPCServer`.

Importing this module registers the ``Vec2`` ext type and the ``NotFinite`` error, so import it
in every process that sends or receives them, client and server alike.
"""

from __future__ import annotations

import math
import statistics
import struct
from dataclasses import dataclass

from pydantic import BaseModel

from kvrpc import (
    HandlerType,
    KvrpcError,
    ProtocolDefinition,
    ProtocolRegistry,
    RPCServer,
    register_error,
    register_ext,
)

__all__ = [
    "ADD",
    "NORM",
    "PROTOCOLS",
    "SCALE",
    "STATS",
    "NOT_FINITE_STATUS",
    "VEC2_EXT_CODE",
    "NotFinite",
    "Summary",
    "Vec2",
    "install",
    "registry",
]


# ----------------------------------------------------------------------------- wire types


@dataclass(frozen=True, slots=True)
class Vec2:
    """A 2-D vector; travels as 16 bytes (two little-endian doubles), not as a map."""

    x: float
    y: float


#: The ext code of Vec2. Codes are process-wide: two extensions loaded together must not
#: pick the same one (register_ext raises ValueError if they do).
VEC2_EXT_CODE = 80

_VEC2 = struct.Struct("<2d")


def _pack_vec2(v: Vec2) -> bytes:
    return _VEC2.pack(v.x, v.y)


def _unpack_vec2(data: bytes) -> Vec2:
    # A wrong length raises struct.error; the codec turns that into a ProtocolError, and a
    # server replies to the request with it instead of failing.
    return Vec2(*_VEC2.unpack(data))


register_ext(VEC2_EXT_CODE, Vec2, _pack_vec2, _unpack_vec2)


class Summary(BaseModel):
    """The response of ``calc.stats``.

    A pydantic model needs no ext code: it travels as its field dict, and the receiver's
    strict validation against the protocol's response type rebuilds the model.
    """

    count: int
    mean: float
    stdev: float
    minimum: float
    maximum: float


# ----------------------------------------------------------------------------- protocols

ADD = ProtocolDefinition("calc.add", (float, float), float, doc="a + b.")
SCALE = ProtocolDefinition("calc.scale", (Vec2, float), Vec2, doc="A vector times a factor.")
NORM = ProtocolDefinition("calc.norm", (Vec2,), float, doc="Euclidean length of a vector.")
STATS = ProtocolDefinition(
    "calc.stats",
    (list[float],),
    Summary,
    # Summaries of long lists are CPU work: keep them off the server's event loop.
    HandlerType.BLOCKING,
    doc="Count, mean, sample standard deviation, min and max of a non-empty list.",
)

#: The whole group, for ProtocolRegistry.extend().
PROTOCOLS: tuple[ProtocolDefinition, ...] = (ADD, SCALE, NORM, STATS)


def registry() -> ProtocolRegistry:
    """A registry of kvrpc's built-ins and the calc group, for clients that call by name."""
    reg = ProtocolRegistry.with_builtins()
    reg.extend(PROTOCOLS)
    return reg


# ----------------------------------------------------------------------------- errors


class NotFinite(KvrpcError):
    """A calc handler was given an infinite or NaN number where it needs a finite one."""


#: NotFinite's status code: like ext codes, process-wide and unique.
NOT_FINITE_STATUS = 1001

register_error(NOT_FINITE_STATUS, NotFinite)


# ----------------------------------------------------------------------------- handlers


def _add(a: float, b: float) -> float:
    return a + b


def _scale(v: Vec2, factor: float) -> Vec2:
    if not math.isfinite(factor):
        raise NotFinite(f"calc.scale needs a finite factor, not {factor}")
    return Vec2(v.x * factor, v.y * factor)


def _norm(v: Vec2) -> float:
    return math.hypot(v.x, v.y)


def _stats(values: list[float]) -> Summary:
    if not values:
        # Raised in the handler, so the caller gets RemoteError(remote_type="ValueError").
        raise ValueError("calc.stats needs at least one value")
    return Summary(
        count=len(values),
        mean=statistics.fmean(values),
        stdev=statistics.stdev(values) if len(values) > 1 else 0.0,
        minimum=min(values),
        maximum=max(values),
    )


def install(server: RPCServer) -> None:
    """Register the calc group and its handlers on ``server`` (before or after it starts).

    Raises kvrpc's DuplicateProtocol if the server already handles a calc protocol.
    """
    server.register(ADD, _add)
    server.register(SCALE, _scale)
    server.register(NORM, _norm)
    server.register(STATS, _stats)
