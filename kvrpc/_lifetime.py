"""A task group held by a task of its own, so that it may be opened and closed anywhere.

anyio requires a task group to be exited by the task that entered it. A server or client is
often opened in one task and closed in another (pytest fixtures, ``connect``/``close`` pairs
in engine code), so each owns a small task whose only job is to hold its task group: the
background tasks are still structured, and still cancelled and awaited on close.
"""

from __future__ import annotations

import asyncio

import anyio
import anyio.abc


class OwnedTaskGroup:
    """An anyio task group living in a dedicated owner task; see the module docstring."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._owner: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None

    async def open(self) -> anyio.abc.TaskGroup:
        """Start the owner task and return its task group, ready for ``start_soon``."""
        ready: asyncio.Future[anyio.abc.TaskGroup] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._owner = asyncio.create_task(self._hold(ready, self._stop), name=self._name)
        return await ready

    async def _hold(self, ready: asyncio.Future[anyio.abc.TaskGroup], stop: asyncio.Event) -> None:
        try:
            async with anyio.create_task_group() as task_group:
                ready.set_result(task_group)
                await stop.wait()
                task_group.cancel_scope.cancel()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
                return
            raise

    async def close(self) -> None:
        """Cancel every task of the group and wait until they have all finished."""
        owner, stop = self._owner, self._stop
        self._owner = self._stop = None
        if owner is None or stop is None:
            return
        stop.set()
        await owner
