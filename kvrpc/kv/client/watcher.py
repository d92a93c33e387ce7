"""One thread that polls the server's CUDA events and calls back as each one completes.

A ``cuda_ipc`` store or retrieve is answered once the server's copy engine has enqueued it;
the reply carries the event the engine records after the copy. The worker must not make a
stream wait on that event, nor block in ``synchronize`` on it: both never return if the
server dies mid-copy (see :mod:`kvrpc.cuda`). It polls instead, and one thread polls every
pending event of the adapter, so that a store and a retrieve in flight together are both
noticed as soon as each completes and the adapter's other threads stay free.

The pause between polls grows from ``first_pause`` to ``max_pause`` while the events stay
pending, and starts again at the first when a new one is added: a copy of a few
milliseconds is noticed within tens of microseconds, a long one costs up to ten thousand
cheap wake-ups a second while it lasts (each a ``query()``, a few microseconds), and an
idle adapter costs none (the thread sleeps until it is given an event).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvrpc.cuda import CudaEventHandle

__all__ = ["EventWatcher", "Pollable"]

logger = logging.getLogger("kvrpc.kv")


class Pollable(Protocol):
    """What the watcher needs of an event: ``query()``, true once it has completed."""

    def query(self) -> bool:
        """True once the work recorded before the event has completed; never blocks."""
        ...


@dataclass(eq=False)
class _Watch:
    handle: CudaEventHandle | None
    event: Pollable | None
    deadline: float
    then: Callable[[bool], object]


class EventWatcher:
    """Polls events on its own thread (started on first use); calls ``then(ok)`` for each.

    ``then(True)`` once the event completed; ``then(False)`` when it did not within its
    timeout, could not be opened, or was still pending when :meth:`close` gave up on it.
    ``then`` runs on the watcher's thread, so it must be quick (count, settle): a slow one
    delays every other event's notice. ``open_event`` turns a handle into its event (by
    default :meth:`CudaEventHandle.open`, which needs CUDA).
    """

    def __init__(
        self,
        name: str = "kvrpc-kv-events",
        *,
        first_pause: float = 10e-6,
        max_pause: float = 100e-6,
        open_event: Callable[[CudaEventHandle], Pollable] = CudaEventHandle.open,
    ) -> None:
        self._name = name
        self._open_event = open_event
        self._first_pause = first_pause
        self._max_pause = max_pause
        self._lock = threading.Condition()
        self._added: list[_Watch] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._close_by = 0.0

    def watch(
        self, handle: CudaEventHandle, timeout: float, then: Callable[[bool], object]
    ) -> None:
        """Call ``then`` once ``handle``'s event completed (opened on the watcher's thread)."""
        self._add(_Watch(handle, None, time.monotonic() + timeout, then))

    def watch_event(self, event: Pollable, timeout: float, then: Callable[[bool], object]) -> None:
        """Call ``then`` once ``event`` (already opened, or any pollable) has completed."""
        self._add(_Watch(None, event, time.monotonic() + timeout, then))

    def _add(self, watch: _Watch) -> None:
        with self._lock:
            if not self._closed:
                self._added.append(watch)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
                self._lock.notify()
                return
        _call(watch.then, False)  # closed: nothing will poll it

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking events; wait up to ``timeout`` seconds for the pending ones to finish.

        Each event still pending then is called back with False, as is any given later.
        """
        with self._lock:
            self._closed = True
            self._close_by = time.monotonic() + timeout
            thread = self._thread
            self._lock.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout + 1.0)

    def _run(self) -> None:
        pending: list[_Watch] = []
        pause = self._first_pause
        while True:
            with self._lock:
                while not pending and not self._added and not self._closed:
                    self._lock.wait()
                if self._added:
                    pending.extend(self._added)
                    self._added.clear()
                    pause = self._first_pause
                if self._closed and (not pending or time.monotonic() >= self._close_by):
                    break
            pending = [watch for watch in pending if not _settled(watch, self._open_event)]
            if pending:
                time.sleep(pause)
                pause = min(2 * pause, self._max_pause)
        for watch in pending:
            _call(watch.then, False)


def _settled(watch: _Watch, open_event: Callable[[CudaEventHandle], Pollable]) -> bool:
    """Poll one watch; True once it was called back (completed, timed out or unopenable)."""
    try:
        if watch.event is None:
            assert watch.handle is not None
            watch.event = open_event(watch.handle)  # a handle's first open can take a while
        done = bool(watch.event.query())
    except Exception as exc:
        logger.warning("cannot poll the server's CUDA event: %s", exc)
        _call(watch.then, False)
        return True
    if done:
        _call(watch.then, True)
        return True
    if time.monotonic() >= watch.deadline:
        _call(watch.then, False)
        return True
    return False


def _call(then: Callable[[bool], object], ok: bool) -> None:
    try:
        then(ok)
    except Exception:  # one bad callback must not stop the others' notices
        logger.exception("a completion callback failed")
