"""The I/O shell's tier half: write-through saves and prefetch loads, as background tasks.

The state core decides what to save (the chunks a store committed that the tier lacks,
pinned while they are read) and what to load (a lookup's :class:`~kvrpc.kv.server.records.Job`);
this module moves the bytes between the pool and the lower tier and hands each outcome back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kvrpc.kv.server.records import Job
from kvrpc.kv.server.state import KVState
from kvrpc.kv.server.tiers import LowerTier

__all__ = ["Tiering"]

logger = logging.getLogger("kvrpc.kv")

Spawn = Callable[..., None]
"""``spawn(coroutine function, *args)``: run it in the service's task group."""


class Tiering:
    """Saves to and loads from ``tier`` for ``state``; tasks start through ``spawn``."""

    def __init__(
        self,
        state: KVState,
        tier: LowerTier,
        spawn: Spawn,
    ) -> None:
        self.state = state
        self.tier = tier
        self._spawn = spawn
        self._save_finished = asyncio.Event()

    def write_through(self, saves: list[tuple[bytes, int]], nbytes: int) -> None:
        """Copy a store's chunks ``(key, slot)`` (pinned by the state) to the tier."""
        if saves:
            self._spawn(self._save, saves, nbytes)

    async def _save(self, saves: list[tuple[bytes, int]], nbytes: int) -> None:
        pool = self.state.pool
        assert pool is not None
        try:
            views = [(key, pool.slot_view(slot)[:nbytes]) for key, slot in saves]
            await asyncio.gather(*(self.tier.save(key, view) for key, view in views))
        finally:
            self.state.saved(saves)
            self._save_finished.set()

    async def save_finished(self) -> None:
        """Return once some write-through save has ended (its slots are unpinned)."""
        self._save_finished.clear()
        await self._save_finished.wait()

    def prefetch(self, job: Job) -> None:
        """Load the job's chunks in the background, then settle it in the state."""
        self._spawn(self._prefetch, job)

    async def _prefetch(self, job: Job) -> None:
        state = self.state
        pool = state.pool
        assert pool is not None
        nbytes = job.namespace.chunk_nbytes
        for key in job.to_load:
            if job.dropped:  # the request is over: load nothing more for it
                break
            slot = state.sessions.prefetch_slot(job, key)
            if slot is None:
                continue
            try:
                ok = await self.tier.load(key, pool.slot_view(slot)[:nbytes])
            except Exception:
                logger.exception("prefetch of a chunk from the lower tier failed")
                ok = False
            state.sessions.prefetched(job, key, slot, ok)
        state.sessions.finish_prefetch(job)
