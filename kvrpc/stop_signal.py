"""A stop request that any thread may make and one event loop waits for."""

from __future__ import annotations

import asyncio
import contextlib

import anyio

__all__ = ["StopSignal"]


class StopSignal:
    """What :meth:`~kvrpc.server.RPCServer.stop` sets and ``wait_for_stop`` waits on.

    Armed on the serving loop by :meth:`arm`; :meth:`set` is safe from any thread, and does
    nothing before arming or after the loop closed.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requested: anyio.Event | None = None

    def arm(self) -> None:
        """Forget any earlier request and bind to the running loop."""
        self._loop = asyncio.get_running_loop()
        self._requested = anyio.Event()

    async def wait(self) -> None:
        """Wait until :meth:`set`; ``RuntimeError`` if never armed (the server never ran)."""
        if self._requested is None:
            raise RuntimeError("the server is not running")
        await self._requested.wait()

    def set(self) -> None:
        """Request the stop, from the loop's thread or any other."""
        loop, requested = self._loop, self._requested
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
