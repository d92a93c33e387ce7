"""A task group held by a task of its own, so that it may be opened and closed anywhere.

anyio requires a task group to be exited by the task that entered it. A server or client is
often opened in one task and closed in another (pytest fixtures, ``connect``/``close`` pairs
in engine code), so each owns a small task whose only job is to hold its task group: the
background tasks are still structured, and still cancelled and awaited on close.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc

TaskFn = Callable[..., Coroutine[Any, Any, None]]


class OwnedTaskGroup:
    """An anyio task group living in a dedicated owner task; see the module docstring."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._owner: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        # Tasks asked for outside any task (a transport's read callback), started by _starter.
        self._to_start: deque[tuple[TaskFn, tuple[Any, ...]]] = deque()
        self._start_ready = asyncio.Event()

    async def open(self) -> anyio.abc.TaskGroup:
        """Start the owner task and return its task group, ready for ``start_soon``."""
        ready: asyncio.Future[anyio.abc.TaskGroup] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._owner = asyncio.create_task(self._hold(ready, self._stop), name=self._name)
        self._task_group = await ready
        self._task_group.start_soon(self._starter)
        return self._task_group

    def spawn(self, fn: TaskFn, *args: Any) -> None:
        """``start_soon(fn, *args)`` that also works outside any task, from a loop callback.

        anyio starts tasks only from inside a task; a call from a plain callback is queued
        for a task of the group that starts it. Raises ``RuntimeError`` when not open.
        """
        task_group = self._task_group
        if task_group is None:
            raise RuntimeError(f"{self._name}: the task group is not open")
        if asyncio.current_task() is not None:
            task_group.start_soon(fn, *args)
            return
        self._to_start.append((fn, args))
        self._start_ready.set()

    async def _starter(self) -> None:
        while True:
            await self._start_ready.wait()
            self._start_ready.clear()
            while self._to_start and self._task_group is not None:
                fn, args = self._to_start.popleft()
                self._task_group.start_soon(fn, *args)

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
        self._task_group = None
        self._to_start.clear()
        if owner is None or stop is None:
            return
        stop.set()
        await owner
