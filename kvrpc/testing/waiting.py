"""Waiting, in tests, for a state that only a counter or a flag shows.

Wait on an event where there is one: a handler that sets one as it starts, a sink that
records each call a transport makes of it, a line a child process prints. Some states have
no event without a hook on the hot path (a transport's counters, a flag that a shutdown
flips): for those, :func:`until` (on an event loop) and :func:`wait_until` (in a thread)
check a condition again every few milliseconds. Their deadline only bounds a hang, so that
a broken test fails naming what it waited for; it never decides a test's outcome, and how
often the condition is checked changes nothing but the CPU time spent checking.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["INTERVAL", "WAIT", "until", "wait_until"]

T = TypeVar("T")

#: Seconds a wait gives up after: long enough for a loaded machine, short enough for a hang.
WAIT = 10.0
#: Seconds between two checks of the condition, unless told otherwise.
INTERVAL = 0.005


async def until(
    condition: Callable[[], bool], what: str, timeout: float = WAIT, interval: float = INTERVAL
) -> None:
    """Return once ``condition()`` is true; checked now, then every ``interval`` seconds.

    Call it on the event loop that changes the state (the condition runs on it, between the
    loop's other callbacks). Raises ``AssertionError`` naming ``what`` once ``timeout``
    seconds have passed without it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until(
    read: Callable[[], T],
    done: Callable[[T], bool],
    what: str,
    timeout: float = WAIT,
    interval: float = INTERVAL,
) -> T:
    """Return ``read()``'s first value for which ``done`` holds, blocking the calling thread.

    For a state another thread or process changes (a served process's counters, a worker's
    finished requests); ``interval`` is the pause between two reads (longer where a read
    costs the other side work, as an HTTP request does). Raises ``AssertionError`` naming
    ``what``, and the last value read, once ``timeout`` seconds have passed without it.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}; last value {value!r}"
            )
        time.sleep(interval)
