"""The I/O shell's tier half: saves and prefetch loads, as background tasks.

The state core decides what to save (the chunks a store committed that the disk tier lacks,
pinned while they are read) and what to load (a lookup's :class:`~kvrpc.kv.server.records.Job`);
this module moves the bytes between the pool and the tiers and hands each outcome back.

Two tiers, each optional: a disk :class:`~kvrpc.kv.server.tiers.LowerTier` of this host, and a
:class:`~kvrpc.kv.server.tiers.RemoteTier` shared by many (Redis). A committed store goes
to both: to the disk as a save the store may wait for (the disk's speed throttles stores),
to the remote tier as an offer it may drop (a store never waits for the network). A job
loads the disk's chunks first, then asks the remote tier about the rest in one round
trip and loads the leading run it holds.

Each chunk's checksum goes down with it (the one L1 keeps for its slot) and comes back up
with a load, verified by the tier against the bytes it read: a copy that fails is a miss.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from kvrpc.kv.server.observer import DISK, L1, REDIS, ChunkObserver
from kvrpc.kv.server.records import Job, StorePlan
from kvrpc.kv.server.state import KVState
from kvrpc.kv.server.tiers import LowerTier, RemoteTier
from kvrpc.kv.server.tiers.values import Header

__all__ = ["Tiering"]

logger = logging.getLogger("kvrpc.kv")

Spawn = Callable[..., None]
"""``spawn(coroutine function, *args)``: run it in the service's task group."""


class Tiering:
    """Saves to and loads from the tiers for ``state``; tasks start through ``spawn``.

    ``observer`` hears of each chunk a prefetch loaded up into L1 (the tiers report their
    own saves and evictions).
    """

    def __init__(
        self,
        state: KVState,
        spawn: Spawn,
        *,
        disk: LowerTier | None = None,
        remote: RemoteTier | None = None,
        observer: ChunkObserver | None = None,
    ) -> None:
        self.state = state
        self.disk = disk
        self.remote = remote
        self.observer = observer
        self._spawn = spawn
        self._save_finished = asyncio.Event()

    def stored(self, plan: StorePlan, saves: list[tuple[bytes, int]], committed: bool) -> None:
        """A store settled: write ``saves`` (pinned by the state) to disk, offer it remotely."""
        nbytes = plan.instance.chunk_nbytes
        if saves:
            self._spawn(self._save, saves, nbytes)
        remote = self.remote
        if remote is None or not committed:
            return
        state = self.state
        pool = state.pool
        assert pool is not None
        ns = plan.instance.namespace
        for i, slot in plan.reserved:
            done = functools.partial(state.returned, slot)
            data = pool.slot_view(slot)[:nbytes]
            if remote.offer(ns, plan.keys[i], data, done, pool.checksum(slot)):
                state.lend(slot)  # before the writer runs: it starts on a later loop turn

    async def _save(self, saves: list[tuple[bytes, int]], nbytes: int) -> None:
        pool = self.state.pool
        assert pool is not None and self.disk is not None
        try:
            # The slots are pinned for the save: their keys and checksums hold still.
            views = [
                (key, pool.slot_view(slot)[:nbytes], pool.checksum(slot)) for key, slot in saves
            ]
            disk = self.disk
            await asyncio.gather(*(disk.save(key, view, sum_) for key, view, sum_ in views))
        finally:
            self.state.saved(saves)
            self._save_finished.set()

    async def save_finished(self) -> None:
        """Return once some disk save has ended (its slots are unpinned)."""
        self._save_finished.clear()
        await self._save_finished.wait()

    def prefetch(self, job: Job) -> None:
        """Load the job's chunks in the background, then settle it in the state."""
        self._spawn(self._prefetch, job)

    async def _prefetch(self, job: Job) -> None:
        try:
            complete = await self._load_from_disk(job)
            if complete and job.remote and not job.dropped and self.remote is not None:
                await self._load_from_remote(job, self.remote)
        finally:
            self.state.sessions.finish_prefetch(job)

    async def _load_from_disk(self, job: Job) -> bool:
        """Load the job's disk chunks in order; False if one failed (the run ends there)."""
        sessions = self.state.sessions
        pool = self.state.pool
        assert pool is not None
        nbytes = job.namespace.chunk_nbytes
        complete = True
        for key in job.to_load:
            if job.dropped:  # the request is over: load nothing more for it
                return False
            assert self.disk is not None  # only a disk tier fills to_load
            slot = sessions.prefetch_slot(job, key)
            if slot is None:
                continue
            try:
                checksum = await self.disk.load(key, pool.slot_view(slot)[:nbytes])
            except Exception:
                logger.exception("prefetch of a chunk from the lower tier failed")
                checksum = None
            ok = checksum is not None
            sessions.prefetched(job, key, slot, ok, checksum)
            if ok:
                self._loaded(key, DISK)
            complete = complete and ok
        return complete

    async def _load_from_remote(self, job: Job, remote: RemoteTier) -> None:
        """Ask the remote tier about the job's remaining chunks; load its leading run."""
        ns = job.namespace
        flat = [key for keys in job.remote for key in keys]
        found = dict(zip(flat, await remote.find(ns, flat), strict=True))
        wanted: list[tuple[bytes, Header]] = []
        for keys in job.remote:
            headers = [found[key] for key in keys]
            if any(header is None for header in headers):
                break  # past a chunk some rank lacks, nothing counts
            wanted += [(key, h) for key, h in zip(keys, headers, strict=True) if h is not None]
        if wanted and not job.dropped:
            await asyncio.gather(*(self._load_one(job, remote, key, h) for key, h in wanted))

    async def _load_one(self, job: Job, remote: RemoteTier, key: bytes, header: Header) -> None:
        sessions = self.state.sessions
        pool = self.state.pool
        assert pool is not None
        slot = sessions.prefetch_slot(job, key)
        if slot is None:
            return
        try:
            out = pool.slot_view(slot)[: job.namespace.chunk_nbytes]
            ok = await remote.load(job.namespace, key, header, out)
        except Exception:
            logger.exception("prefetch of a chunk from the remote tier failed")
            ok = False
        sessions.prefetched(job, key, slot, ok, header.checksum)
        if ok:
            self._loaded(key, REDIS)

    def _loaded(self, key: bytes, source: str) -> None:
        """A load committed ``key`` into L1 (just now, in ``prefetched``): tell the observer."""
        observer = self.observer
        if observer is not None and observer.watching:
            observer.stored(L1, (key,), source=source)
