"""Per-protocol call counts, outcomes and latency histograms, at near-zero cost per call.

:class:`CallObserver` wraps handlers (through :meth:`kvrpc.server.RPCServer.instrument`):
each call reads the clock twice and adds to a few plain ints and a list of fixed bucket
counts. Nothing is locked. A NONBLOCKING handler only ever runs on the server's loop thread,
so its record is written by that thread alone; a BLOCKING handler runs in pool threads, so
each thread writes a record of its own (a ``threading.local``), and a scrape sums them.
Reads happen at scrape time, on the loop: a count read while a thread adds to it is at worst
one call behind.
"""

from __future__ import annotations

import inspect
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kvrpc.errors import Status, error_to_wire
from kvrpc.protocol import HandlerType, ProtocolDefinition

__all__ = ["LATENCY_BOUNDS", "OK", "CallObserver", "ProtocolCalls", "status_name"]

#: Upper bounds (seconds) of the latency histogram's buckets; a last bucket holds the rest.
#: From 25 us (an inline lookup) to 10 s (a deadline-bound copy), about 2.5x apart.
LATENCY_BOUNDS: tuple[float, ...] = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: The status a call that returned counts under.
OK = 0

_STATUS_NAMES = {int(status): status.name for status in Status}


def status_name(code: int) -> str:
    """The label of a status code: ``OK``, a :class:`~kvrpc.errors.Status` name, or the number.

    Extension codes are their numbers: a bounded set (each is registered once), unlike the
    handlers' exception class names, which are not labels for that reason.
    """
    if code == OK:
        return "OK"
    return _STATUS_NAMES.get(code, str(code))


@dataclass
class ProtocolCalls:
    """One thread's record of one protocol: calls by status, and handler time.

    ``buckets[i]`` counts calls that took at most ``LATENCY_BOUNDS[i]`` seconds and more
    than the bound before it (not cumulative); the last one counts the slower rest.
    """

    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    seconds: float = 0.0  #: total handler time
    ok: int = 0  #: calls that returned
    errors: dict[int, int] = field(default_factory=dict)  #: raised calls, by status code

    def add(self, other: ProtocolCalls) -> None:
        """Add ``other``'s counts to these (for merging threads' records)."""
        for i, count in enumerate(other.buckets):
            self.buckets[i] += count
        self.seconds += other.seconds
        self.ok += other.ok
        for code, count in list(other.errors.items()):
            self.errors[code] = self.errors.get(code, 0) + count

    @property
    def calls(self) -> int:
        """Every call recorded, whatever its outcome."""
        return sum(self.buckets)


class _ThreadRecords(threading.local):
    """A BLOCKING protocol's records, one per pool thread, each listed once made."""

    def __init__(self, made: list[ProtocolCalls]) -> None:
        self.calls = ProtocolCalls()
        made.append(self.calls)  # list.append is atomic: a scrape sees it whole or not yet


class CallObserver:
    """Times the handlers it wraps; :meth:`snapshot` sums what every thread recorded.

    Use ``server.instrument(observer.wrap)``, for one server or several (their calls add up
    by protocol). The labels are protocol names and status codes, both bounded sets.
    """

    def __init__(self) -> None:
        self._records: dict[str, list[ProtocolCalls]] = {}
        self._clock = time.perf_counter

    def wrap(self, definition: ProtocolDefinition, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed: a callable of the same kind (``async def`` stays ``async def``)."""
        made = self._records.setdefault(definition.name, [])
        clock = self._clock
        if definition.handler_type is HandlerType.BLOCKING:
            local = _ThreadRecords(made)

            def blocking(*args: Any) -> Any:
                started = clock()
                try:
                    result = fn(*args)
                except Exception as exc:
                    _record_error(local.calls, clock() - started, exc)
                    raise
                _record_ok(local.calls, clock() - started)
                return result

            return blocking
        record = ProtocolCalls()
        made.append(record)
        if inspect.iscoroutinefunction(fn):

            async def on_loop(*args: Any) -> Any:
                started = clock()
                try:
                    result = await fn(*args)
                except Exception as exc:
                    _record_error(record, clock() - started, exc)
                    raise
                _record_ok(record, clock() - started)
                return result

            return on_loop

        def inline(*args: Any) -> Any:
            started = clock()
            try:
                result = fn(*args)
            except Exception as exc:
                _record_error(record, clock() - started, exc)
                raise
            # inspect.isawaitable costs more than the rest of this wrapper together: the
            # common plain results skip it.
            if type(result) not in _PLAIN_RESULTS and inspect.isawaitable(result):
                # A plain handler that returned work to await: the server runs it in a task,
                # and the call ends when it does.
                return _finish(result, record, started, clock)
            took = clock() - started
            record.buckets[bisect_left(LATENCY_BOUNDS, took)] += 1
            record.seconds += took
            record.ok += 1
            return result

        return inline

    def snapshot(self) -> Iterator[tuple[str, ProtocolCalls]]:
        """Per protocol (sorted by name): the sum of every thread's record, as of now."""
        for name in sorted(self._records):
            total = ProtocolCalls()
            for record in list(self._records[name]):
                total.add(record)
            yield name, total


#: Result types no handler returns as work to await (checked before ``inspect.isawaitable``).
_PLAIN_RESULTS: frozenset[type] = frozenset(
    {type(None), bool, int, float, str, bytes, bytearray, list, tuple, dict}
)


def _record_ok(record: ProtocolCalls, took: float) -> None:
    record.buckets[bisect_left(LATENCY_BOUNDS, took)] += 1
    record.seconds += took
    record.ok += 1


def _record_error(record: ProtocolCalls, took: float, exc: BaseException) -> None:
    record.buckets[bisect_left(LATENCY_BOUNDS, took)] += 1
    record.seconds += took
    code = error_to_wire(exc)[0]  # the code the client is sent for it
    record.errors[code] = record.errors.get(code, 0) + 1


async def _finish(
    awaitable: Awaitable[Any], record: ProtocolCalls, started: float, clock: Callable[[], float]
) -> Any:
    try:
        result = await awaitable
    except Exception as exc:
        _record_error(record, clock() - started, exc)
        raise
    _record_ok(record, clock() - started)
    return result
