"""Sessions, their pins and the prefetch jobs of lookups: the state core's session rules.

A lookup opens a session for its request (replacing its own earlier one; another client's
is refused, :class:`~kvrpc.errors.NotOwner`), within the client's caps
(:mod:`~kvrpc.kv.server.caps`), pins the leading chunks every rank holds, and may start a prefetch
:class:`~kvrpc.kv.server.records.Job` for what the lower tiers add; a retrieve by a worker
of the session's engine releases the pins on what it copied; ending the session releases
the rest, and drops its jobs so that they pin nothing. Every pin taken here is released
exactly once. Part of :class:`~kvrpc.kv.server.state.KVState`, which owns the client
leases; no I/O, no asyncio.
"""

from __future__ import annotations

import itertools
import secrets
from typing import Protocol

from kvrpc.errors import ClientLimitReached, KVError, NotOwner, UnknownJob
from kvrpc.kv.keys import HASH_SIZE, KeyBatch
from kvrpc.kv.server import poolkeys
from kvrpc.kv.server.caps import ClientCaps, refuse
from kvrpc.kv.server.pool import ChunkPool
from kvrpc.kv.server.records import Client, Counters, Job, Namespace, Session, SessionKey

__all__ = ["RemoteIndex", "SessionBook", "TierIndex"]


class TierIndex(Protocol):
    """What the state asks of a lower tier: whether it holds a key (an in-memory index)."""

    def contains(self, key: bytes) -> bool:
        """True if the tier holds ``key``'s bytes now."""
        ...


class RemoteIndex(Protocol):
    """What the state asks of a remote tier: whether to ask it at all now (its breaker)."""

    def available(self) -> bool:
        """True unless the tier is being skipped (down or slow, see its circuit breaker)."""
        ...


class SessionBook:
    """The sessions and prefetch jobs, over the state's clients, namespaces and counters."""

    def __init__(
        self,
        clients: dict[bytes, Client],
        namespaces: dict[tuple[str, int], Namespace],
        counters: Counters,
        tier: TierIndex | None,
        remote: RemoteIndex | None = None,
        caps: ClientCaps | None = None,
    ) -> None:
        self.clients = clients
        self.caps = ClientCaps() if caps is None else caps
        self.namespaces = namespaces
        self.counters = counters
        self.tier = tier
        self.remote = remote
        self.pool: ChunkPool | None = None
        self.sessions: dict[SessionKey, Session] = {}
        self.jobs: dict[str, Job] = {}

    def lookup(self, client_id: bytes, request_id: str, keys: KeyBatch) -> int | Job:
        """Leading chunks present on every rank, pinned for ``request_id`` (pins replaced).

        Every rank means every rank registered on this server (:attr:`Namespace.ranks`).
        Returns a :class:`Job` instead when some of them must first be loaded from a lower
        tier: the disk's chunks it holds (:attr:`Job.to_load`), and, past those, the chunks
        a remote tier may hold (:attr:`Job.remote`: the shell asks it which it has). The
        shell loads them (:meth:`prefetch_slot`, :meth:`prefetched`) and
        :meth:`finish_prefetch` counts and pins the result. The keys carry no worker id
        (:meth:`KVState.lookup <kvrpc.kv.server.state.KVState.lookup>` refuses them first).
        Raises :class:`~kvrpc.errors.NotOwner` if another client has a session of this
        request id open: a request id names one client's session, never another's; and
        :class:`~kvrpc.errors.ClientLimitReached` if the session, its pins or its job would
        take the client past a cap (:class:`~kvrpc.kv.server.caps.ClientCaps`). Either way
        nothing changes, not even the client's earlier session of the request. The session
        belongs to the client's engine (bound first, by
        :meth:`KVState.bind_engine <kvrpc.kv.server.state.KVState.bind_engine>`).
        """
        counters = self.counters
        counters.lookups += 1
        n = len(keys)
        ns = self.namespaces.get((keys.model_name, keys.world_size))
        pool = self.pool
        if ns is None or pool is None:
            counters.misses += n
            return 0
        session_key = (ns.id, request_id)
        earlier = self._check_open(client_id, session_key)
        # Decided into this lookup's own table first, and kept only once the client's caps
        # allow it: a refused lookup changes nothing, not even the session it would replace.
        pins: dict[int, int] = {}
        ranks = list(ns.ranks.items())
        hashes = poolkeys.chunk_hashes(keys.hashes)
        # The hot path of a scheduler's lookup: rank by rank, each scan stopping at the first
        # chunk that rank lacks, so a rank never looks beyond where an earlier one stopped.
        matched = n
        per_rank: list[list[int]] = []
        for _, suffix in ranks:
            slots = pool.lookup_run(hashes if matched == n else hashes[:matched], suffix)
            matched = len(slots)
            per_rank.append(slots)
        to_pin: list[int] = []
        for (worker, _), slots in zip(ranks, per_rank, strict=True):
            del slots[matched:]
            pins.update(zip(slots, itertools.repeat(worker)))
            to_pin += slots
        to_load: list[bytes] = []
        if self.tier is not None:  # past what every rank holds in memory: what the tier adds
            for chunk_hash in hashes[matched:]:
                missing, held = self._split(chunk_hash, ranks)
                if not all(self.tier.contains(key) for key in missing):
                    break
                to_load.extend(missing)
                self._mark(pins, to_pin, held)
                matched += 1
        remote: list[list[bytes]] = []
        if matched < n and self.remote is not None and self.remote.available():
            # Past the local run, a remote tier may hold the rest: the shell asks it about
            # all of them in one round trip. L1's own slots of those chunks are pinned, so
            # that loading the rest cannot evict them; finish_prefetch releases the unused.
            for chunk_hash in hashes[matched:]:
                missing, held = self._split(chunk_hash, ranks)
                remote.append(missing)
                self._mark(pins, to_pin, held)
        # What the job loads is pinned as it lands: counted now, so it fits the cap too.
        loads = len(to_load) + sum(map(len, remote))
        self._check_caps(client_id, earlier, len(pins) + loads, bool(to_load or remote))
        session = self._open_session(client_id, session_key)
        session.pins = pins
        self.clients[client_id].pins += len(pins)
        pool.pin_many(to_pin)
        if not to_load and not remote:
            counters.hits += matched
            counters.misses += n - matched
            return matched
        job = Job(
            secrets.token_urlsafe(16),
            client_id,
            session_key,
            ns,
            keys.hashes[: (matched + len(remote)) * HASH_SIZE],
            to_load,
            n,
            remote=remote,
        )
        self.jobs[job.id] = job
        self.clients[client_id].jobs.add(job.id)
        session.jobs.add(job.id)
        counters.prefetch_jobs += 1
        return job

    def _split(
        self, chunk_hash: bytes, ranks: list[tuple[int, bytes]]
    ) -> tuple[list[bytes], list[tuple[int, int]]]:
        """The chunk's pool keys that L1 lacks, and ``(slot, worker)`` of those it holds."""
        find = self._pool().lookup
        missing: list[bytes] = []
        held: list[tuple[int, int]] = []
        for worker, suffix in ranks:
            slot = find(chunk_hash + suffix)
            if slot is None:
                missing.append(chunk_hash + suffix)
            else:
                held.append((slot, worker))
        return missing, held

    @staticmethod
    def _mark(pins: dict[int, int], to_pin: list[int], held: list[tuple[int, int]]) -> None:
        """Mark held slots to be pinned for the session (each slot once)."""
        for slot, worker in held:
            if slot not in pins:
                pins[slot] = worker
                to_pin.append(slot)

    def prefetch_slot(self, job: Job, key: bytes) -> int | None:
        """A slot to load ``key`` into, or None: the job was dropped, or the key is present."""
        if job.dropped:
            return None
        slot = self._pool().reserve(key)
        return slot if isinstance(slot, int) else None  # present, or no room: counted later

    def prefetched(
        self, job: Job, key: bytes, slot: int, ok: bool, checksum: int | None = None
    ) -> None:
        """A load into ``slot`` ended: keep and pin it for the session at once, or free it.

        Pinned at once, so that loading the next chunk cannot evict it. ``checksum`` is the
        one the tier verified the bytes against, kept with the chunk in L1.
        """
        pool = self._pool()
        if not ok:
            pool.abort(slot)
            return
        pool.commit(slot, checksum)
        self.counters.prefetched += 1
        session = None if job.dropped else self.sessions.get(job.session)
        if session is not None:
            self._pin(session, slot, poolkeys.worker_of(key))

    def finish_prefetch(self, job: Job) -> int:
        """Count and pin the leading chunks now present on every rank: the job's result.

        The session's other pins (chunks past a gap, loaded or pinned by the lookup) are
        released: the engine retrieves only the leading chunks it is told of.
        """
        pool = self._pool()
        matched = 0
        session = None if job.dropped else self.sessions.get(job.session)
        if session is not None:
            counted: set[int] = set()
            ranks = list(job.namespace.ranks.items())
            for chunk_hash in poolkeys.chunk_hashes(job.prefix):
                found = [(pool.lookup(chunk_hash + s), w) for w, s in ranks]
                present = [(slot, worker) for slot, worker in found if slot is not None]
                if len(present) != len(found):
                    break
                # A chunk the owner's pin cap cannot hold is not counted, nor any after it:
                # the engine retrieves only what stays pinned until its retrieve.
                if not all(self._pin(session, slot, worker) for slot, worker in present):
                    break
                counted.update(slot for slot, _ in present)
                matched += 1
            for slot in [slot for slot in session.pins if slot not in counted]:
                self.release_pin(session, slot)
            # Only a job whose count can still be asked for is a lookup's outcome: a
            # dropped one (its request ended, its client left) is neither hit nor miss.
            self.counters.hits += matched
            self.counters.misses += job.total - matched
        job.result = matched
        return matched

    def query_prefetch_status(self, client_id: bytes, job_id: str) -> int | None:
        """None while the job runs, then its count, exactly once."""
        job = self.jobs.get(job_id)
        if job is None or job.owner != client_id:
            raise UnknownJob(
                "no prefetch job with that id for this client: it was never given to this "
                "client, or its result was already taken"
            )
        if job.result is None:
            return None
        del self.jobs[job_id]
        self.clients[client_id].jobs.discard(job_id)
        return job.result

    def end_session(
        self, client_id: bytes, model_name: str, world_size: int, request_id: str
    ) -> int:
        """End the client's session of the request; returns how many pins were released.

        0 if no session of the request is open. A session another client opened is left
        alone and the call refused (:class:`~kvrpc.errors.NotOwner`): only the scheduler
        that looked a request up decides when it is over.
        """
        ns = self.namespaces.get((model_name, world_size))
        if ns is None or self._owned(client_id, ns.id, request_id) is None:
            return 0
        return self.end((ns.id, request_id))

    def release_pins(self, client_id: bytes, request_id: str, keys: KeyBatch) -> int:
        """Unpin these chunks of the request's session on every rank; the session stays.

        Chunks the session never pinned are ignored, so releasing twice releases once.
        Another client's session is left alone and the call refused, as by :meth:`end_session`.
        """
        if keys.worker_id is not None:
            raise KVError("release_pins keys carry no worker id, as a lookup's do")
        ns = self.namespaces.get((keys.model_name, keys.world_size))
        pool = self.pool
        if ns is None or pool is None:
            return 0
        session = self._owned(client_id, ns.id, request_id)
        if session is None:
            return 0
        released = 0
        for chunk_hash in poolkeys.chunk_hashes(keys.hashes):
            for suffix in ns.ranks.values():
                slot = pool.lookup(chunk_hash + suffix)
                if slot is not None and slot in session.pins:
                    self.release_pin(session, slot)
                    released += 1
        return released

    def _owned(self, client_id: bytes, ns_id: bytes, request_id: str) -> Session | None:
        """The request's session, None if none is open; refuses another client's."""
        session = self.sessions.get((ns_id, request_id))
        if session is None:
            return None
        if session.owner != client_id:
            self.counters.not_owner += 1
            raise NotOwner(
                f"request id {request_id!r} names another client's open session on this "
                "server: only the client that looked it up may end it or release its pins"
            )
        return session

    def _check_open(self, client_id: bytes, key: SessionKey) -> Session | None:
        """The client's own open session of ``key`` (None if none); refuses another's."""
        earlier = self.sessions.get(key)
        if earlier is not None and earlier.owner != client_id:
            self.counters.not_owner += 1
            raise NotOwner(
                f"request id {key[1]!r} names another client's open session on this server; "
                "request ids are scoped by their engine (the adapters' engine_id): give "
                "each engine its own"
            )
        return earlier

    def _check_caps(
        self, client_id: bytes, earlier: Session | None, pins: int, makes_job: bool
    ) -> None:
        """Refuse a lookup that would take the client past a cap; ``earlier`` it replaces."""
        client, caps = self.clients[client_id], self.caps
        sessions = len(client.sessions) + (earlier is None)
        if sessions > caps.sessions:
            raise self._refuse("sessions", len(client.sessions), 1, caps.sessions)
        held = client.pins - (0 if earlier is None else len(earlier.pins))
        if held + pins > caps.pins:
            raise self._refuse("pins", held, pins, caps.pins)
        jobs = len(client.jobs) - (0 if earlier is None else len(earlier.jobs & client.jobs))
        if makes_job and jobs + 1 > caps.prefetch_jobs:
            raise self._refuse("prefetch_jobs", jobs, 1, caps.prefetch_jobs)

    def _refuse(self, cap: str, held: int, wanted: int, limit: int) -> ClientLimitReached:
        self.counters.client_limits += 1
        return refuse(cap, held, wanted, limit)

    def _open_session(self, client_id: bytes, key: SessionKey) -> Session:
        self._check_open(client_id, key)
        self.end(key)
        # The session is its opener's engine's: only that engine's workers release its pins.
        session = self.sessions[key] = Session(client_id, self.clients[client_id].engine_id)
        self.clients[client_id].sessions.add(key)
        return session

    def end(self, key: SessionKey) -> int:
        """End a session: drop its jobs, release its pins; returns how many pins it held."""
        session = self.sessions.pop(key, None)
        if session is None:
            return 0
        owner = self.clients.get(session.owner)
        if owner is not None:
            owner.sessions.discard(key)
            owner.pins -= len(session.pins)
        for job_id in session.jobs:  # nobody may ask for them once the request is over
            job = self.jobs.pop(job_id, None)
            if job is None:
                continue
            job.dropped = True
            job_owner = self.clients.get(job.owner)
            if job_owner is not None:
                job_owner.jobs.discard(job_id)
        released = len(session.pins)
        if self.pool is not None:
            self.pool.unpin_many(session.pins)
        session.pins.clear()
        return released

    def _pin(self, session: Session, slot: int, worker: int) -> bool:
        """Pin ``slot`` for the session (once); False if the owner's pin cap forbids it."""
        # No touch: a pinned slot is out of the LRU order, and its last unpin makes it the
        # most recently used.
        if slot in session.pins:
            return True
        owner = self.clients.get(session.owner)
        if owner is not None:
            if owner.pins >= self.caps.pins:
                return False
            owner.pins += 1
        self._pool().pin(slot)
        session.pins[slot] = worker
        return True

    def release_pin(self, session: Session, slot: int) -> None:
        """Release the session's pin on ``slot``, if it holds one (so never twice)."""
        if session.pins.pop(slot, None) is None:
            return
        owner = self.clients.get(session.owner)
        if owner is not None:
            owner.pins -= 1
        if self.pool is not None:
            self.pool.unpin(slot)

    def release_rank(self, ns_id: bytes, worker_id: int) -> None:
        """Release every session's pins on rank ``worker_id`` of a namespace (it left)."""
        for (session_ns, _), session in self.sessions.items():
            if session_ns != ns_id:
                continue
            for slot, worker in list(session.pins.items()):
                if worker == worker_id:
                    self.release_pin(session, slot)

    def release_copied(
        self, ns_id: bytes, request_id: str, slot: int, engine_id: str | None
    ) -> None:
        """A retrieve copied ``slot`` to a worker of ``engine_id``: the request's pin is done.

        Only a session of the worker's own engine is released: one that another engine's
        scheduler opened (the request id is that engine's, named by mistake or on purpose)
        keeps its pin, since that engine's own workers have yet to retrieve it. The copy
        was not refused: the chunk is the cache's, and the worker may read it under any
        request id. The key is counted in ``retrieve_other_engine``. With no engine ids
        (None on both sides: one engine per server) every session is the worker's engine's.
        """
        session = self.sessions.get((ns_id, request_id))
        if session is None:
            return
        if session.engine_id != engine_id:
            self.counters.retrieve_other_engine += 1
            return
        if slot in session.pins:
            self.release_pin(session, slot)

    def drop_jobs(self, job_ids: set[str]) -> None:
        """Forget these jobs (their client left): they load and pin nothing more."""
        for job_id in job_ids:
            job = self.jobs.pop(job_id, None)
            if job is not None:
                job.dropped = True

    def _pool(self) -> ChunkPool:
        if self.pool is None:  # unreachable once a lookup matched; kept for clarity
            raise KVError("no KV cache has been registered on this server yet")
        return self.pool
