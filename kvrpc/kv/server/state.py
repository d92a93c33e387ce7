"""The KV server's state core: every rule about what is stored, pinned and owned, with no I/O.

:class:`KVState` owns the namespaces, the registered instances, the sessions and their pins,
the prefetch jobs, the client leases and the pool's index. Its methods are plain function
calls that decide and change state synchronously, then return what must be done outside:
a :class:`~kvrpc.kv.server.records.StorePlan` whose slots the shell fills, a
:class:`~kvrpc.kv.server.records.RetrievePlan` whose pinned slots it copies out, the chunks
to write through to the lower tier, a :class:`~kvrpc.kv.server.records.Job` to load, the
instances whose mappings to close. Nothing here awaits, copies bytes or reads a clock: a
method that renews or expires a lease takes ``now``.

So the rules that matter most (pins released exactly once, a superseded prefetch pins
nothing, a lookup sees all of a store or none of it) are tested by calling these methods.
It is used from one thread, the server's event loop, so nothing is locked.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Collection, Sequence

import torch

from kvrpc.errors import ClientLimitReached, KVConfigError, KVError, NotOwner, UnknownInstance
from kvrpc.kv.keys import KeyBatch, blocks_per_chunk
from kvrpc.kv.layout import SKIP_BLOCK, KVLayout
from kvrpc.kv.outcomes import (
    ALREADY_STORED,
    BEING_STORED,
    CHECKSUM_MISMATCH,
    NO_FREE_SLOT,
    NOT_IN_CACHE,
    KeyFailure,
    KeyStatus,
)
from kvrpc.kv.protocols import KVCacheRegistration
from kvrpc.kv.server import poolkeys
from kvrpc.kv.server.caps import ClientCaps, refuse
from kvrpc.kv.server.observer import CLEARED, DELETED, EVICTED, L1, ChunkObserver
from kvrpc.kv.server.pool import ChunkPool, Reserve
from kvrpc.kv.server.records import (
    Client,
    Counters,
    Instance,
    Job,
    Namespace,
    Principal,
    RetrievePlan,
    StorePlan,
)
from kvrpc.kv.server.sessions import RemoteIndex, SessionBook, TierIndex

__all__ = ["KVState", "batch_problems"]

logger = logging.getLogger("kvrpc.kv")

_MODE_CALLS = {"cuda_ipc": "kv.store_cuda / kv.retrieve_cuda", "shm": "kv.store / kv.retrieve"}


class KVState:
    """The decisions of a KV server; see the module docstring.

    ``chunk_size`` is tokens per chunk; a client silent for ``client_timeout`` seconds is
    dropped by :meth:`expire`; ``tier`` is the lower tier's index, if there is one, and
    ``remote`` a remote tier's breaker (lookups ask it what L1 and ``tier`` lack); ``caps``
    bounds what each client may hold (the defaults of :class:`ClientCaps` if None). The pool
    is made by the shell (pinning gigabytes takes a while) and given with :meth:`set_pool`.
    """

    def __init__(
        self,
        *,
        chunk_size: int,
        client_timeout: float,
        tier: TierIndex | None = None,
        remote: RemoteIndex | None = None,
        caps: ClientCaps | None = None,
    ) -> None:
        if chunk_size < 1:
            raise KVConfigError(f"chunk size must be at least 1 token, not {chunk_size}")
        self.chunk_size = chunk_size
        self.client_timeout = client_timeout
        self.caps = ClientCaps() if caps is None else caps
        self.tier = tier
        self.pool: ChunkPool | None = None
        #: Told of every change to what L1 holds (stores, evictions, drops, clears), if set.
        self.observer: ChunkObserver | None = None
        self._evictions: list[bytes] | None = None  # evicted while reserve() runs
        self.counters = Counters()
        #: Write-through saves in flight, each holding a pin on its slot.
        self.saving = 0
        self.namespaces: dict[tuple[str, int], Namespace] = {}
        self.instances: dict[int, Instance] = {}
        self.clients: dict[bytes, Client] = {}
        #: The sessions' pins and the lookups' prefetch jobs (the session rules).
        self.sessions = SessionBook(
            self.clients, self.namespaces, self.counters, tier, remote, self.caps
        )

    # ------------------------------------------------------------------ client leases

    def client(self, client_id: bytes, now: float, principal: Principal | None = None) -> Client:
        """The client's record, made on first sight (bound to ``principal``); renews its lease.

        Only the calls a client starts with make a record: a keepalive, a registration that
        passes its checks, a lookup. The others act on what a client owns and only renew a
        known client's lease (:meth:`renew`), so an expired client's refused call leaves no
        record behind that owns nothing and would expire again.
        """
        self.check_caller(client_id, principal)
        client = self.renew(client_id, now)
        if client is None:
            client = self.clients[client_id] = Client(now, principal)
        return client

    def check_caller(self, client_id: bytes, principal: Principal | None) -> None:
        """Refuse a call naming a client id that is bound to another process.

        A client id is bound to the first process the transport identifies as using it
        (``principal``: the kernel's uid and pid of a local socket's peer; see
        :mod:`kvrpc.kv.server.access`), and from then on only that process may name it:
        another process, or a peer the transport cannot identify, gets
        :class:`~kvrpc.errors.NotOwner`. Where no peer is identified (TCP, zmq+ipc,
        inproc), the 16 random bytes of the id are the proof, as a bearer secret. An
        unknown id passes: the call that makes its record binds it.
        """
        client = self.clients.get(client_id)
        if client is None or client.principal == principal:
            return
        if client.principal is None:  # first seen unidentified: the first identified peer
            client.principal = principal
            return
        self.counters.not_owner += 1
        raise NotOwner(
            "this client id belongs to another process on this server; each adapter makes "
            "its own (a client id must not be copied to, or inherited by, another process)"
        )

    def bind_engine(self, client: Client, engine_id: str | None) -> None:
        """Bind the client to the engine it declares; refuse another than it is bound to.

        A client's first registration or lookup declares its engine id (None: no engine
        id), and the server keeps it: its instances and sessions belong to that engine, so
        that a worker's retrieve releases only the pins of its own engine's sessions (see
        :meth:`SessionBook.release_copied`). Every later declaration must be the same;
        another is :class:`~kvrpc.errors.NotOwner`, counted, and changes nothing. A
        keepalive declares nothing.
        """
        self._check_engine(client, engine_id)
        if not client.engine_bound:
            client.engine_id, client.engine_bound = engine_id, True

    def _check_engine(self, client: Client | None, engine_id: str | None) -> None:
        """Refuse a declaration of another engine than the one the client is bound to."""
        if client is not None and client.engine_bound and client.engine_id != engine_id:
            self.counters.not_owner += 1
            raise NotOwner(
                f"this client id speaks for engine {client.engine_id!r} on this server, not "
                f"{engine_id!r}: a client serves one engine (make an adapter per engine)"
            )

    def renew(self, client_id: bytes, now: float) -> Client | None:
        """Renew a known client's lease and return its record; None (and no record) if unknown."""
        if len(client_id) < 8:
            raise KVError("client id must be at least 8 random bytes (the adapters make one)")
        client = self.clients.get(client_id)
        if client is not None:
            client.last_seen = now
        return client

    def expire(self, now: float) -> list[Instance]:
        """Drop the clients silent since before ``now - client_timeout``; their instances."""
        deadline = now - self.client_timeout
        silent = [cid for cid, client in self.clients.items() if client.last_seen < deadline]
        closed: list[Instance] = []
        for client_id in silent:
            logger.warning(
                "client %s silent for over %.1f s: releasing its KV caches, sessions and jobs",
                client_id.hex()[:8],
                self.client_timeout,
            )
            closed += self.drop_client(client_id)
        self.counters.clients_expired += len(silent)
        return closed

    def drop_client(self, client_id: bytes) -> list[Instance]:
        """Release all the client owns now; returns its instances, whose mappings must close."""
        client = self.clients.pop(client_id, None)
        if client is None:
            return []
        for session_key in list(client.sessions):
            self.sessions.end(session_key)
        self.sessions.drop_jobs(client.jobs)
        return [i for i in map(self._forget_instance, list(client.instances)) if i is not None]

    # ------------------------------------------------------------------ registration

    def check_registration(
        self,
        client_id: bytes,
        spec: KVCacheRegistration,
        now: float,
        principal: Principal | None = None,
    ) -> tuple[int, int]:
        """Refuse a registration that cannot work; else (blocks per chunk, chunk bytes).

        Checked again by :meth:`add_instance` once the shell has mapped the tensors, since
        another worker may have registered meanwhile. Refused past the client's cap of
        registrations too (:class:`~kvrpc.errors.ClientLimitReached`).
        """
        self.check_caller(client_id, principal)
        self.renew(client_id, now)
        layout = spec.layout
        if spec.worker_id >= spec.world_size:
            raise KVError(f"worker id {spec.worker_id} is not below world size {spec.world_size}")
        if layout.block_size != spec.block_size:
            raise KVConfigError(
                f"the KV tensors hold blocks of {layout.block_size} tokens, but block size "
                f"{spec.block_size} was given"
            )
        given = len(spec.cuda_tensors) if spec.mode == "cuda_ipc" else len(spec.tensors)
        if spec.mode != "cuda_ipc" and spec.cuda_tensors:
            raise KVError("only the cuda_ipc transfer mode registers CUDA tensors")
        if spec.mode == "cuda_ipc" and spec.tensors:
            raise KVError("the cuda_ipc transfer mode registers CUDA tensors, not shared ones")
        if spec.mode == "inline" and spec.tensors:
            raise KVError("the inline transfer mode registers no tensors")
        if spec.mode != "inline" and given != layout.num_layers:
            what = "CUDA tensors" if spec.mode == "cuda_ipc" else "tensors"
            raise KVConfigError(
                f"layout has {layout.num_layers} layers but {given} {what} were registered"
            )
        per_chunk = blocks_per_chunk(self.chunk_size, spec.block_size)
        chunk_nbytes = layout.chunk_nbytes(per_chunk)
        self._check_fits(spec, chunk_nbytes)
        known = self.clients.get(client_id)
        self._check_engine(known, spec.engine_id)
        self._check_registrations(known)
        # Passed: add_instance will look for its record, bound to the registration's engine.
        self.bind_engine(self.client(client_id, now, principal), spec.engine_id)
        return per_chunk, chunk_nbytes

    def _check_registrations(self, client: Client | None) -> None:
        limit = self.caps.registrations
        if client is not None and len(client.instances) >= limit:
            raise self._refuse("registrations", len(client.instances), 1, limit)

    def _refuse(self, cap: str, held: int, wanted: int, limit: int) -> ClientLimitReached:
        self.counters.client_limits += 1
        return refuse(cap, held, wanted, limit)

    def _check_fits(self, spec: KVCacheRegistration, chunk_nbytes: int) -> None:
        """Refuse a chunk form that differs from its model's, or chunks that outgrow slots."""
        known = self.namespaces.get((spec.model_name, spec.world_size))
        if known is not None and known.form != poolkeys.chunk_form(spec.layout):
            raise KVConfigError(
                f"model {spec.model_name!r} (world size {spec.world_size}) is registered with "
                f"layout {known.layout.describe()}; this worker's is {spec.layout.describe()}. "
                "Chunks of one model must share a layout: fix the worker, or restart the server"
            )
        if self.pool is not None and chunk_nbytes > self.pool.slot_nbytes:
            raise KVConfigError(
                f"a chunk of this layout takes {chunk_nbytes} bytes, but this server's pool "
                f"has {self.pool.slot_nbytes}-byte slots (set by the first registered model); "
                "run a server per model shape"
            )

    def set_pool(self, pool: ChunkPool) -> None:
        """Adopt the pool the shell made for the first registration; once."""
        if self.pool is not None:
            raise KVError("the pool is made once")
        self.pool = self.sessions.pool = pool
        if pool.on_evict is None:  # a pool made with a hook of its own keeps it
            pool.on_evict = self._evicted

    def _evicted(self, key: bytes, slot: int) -> None:
        """The pool's eviction hook: the chunk is no longer in L1 (for the observer)."""
        observer = self.observer
        if observer is not None and observer.watching:
            if self._evictions is not None:  # within reserve(): told once it is done
                self._evictions.append(key)
            else:
                observer.removed(L1, (key,), EVICTED)

    def add_instance(
        self, client_id: bytes, spec: KVCacheRegistration, per_chunk: int, chunk_nbytes: int
    ) -> Instance:
        """Record a registration whose tensors the shell mapped; checks it fits again."""
        self._check_fits(spec, chunk_nbytes)
        client = self.clients.get(client_id)
        if client is None:  # it left while its tensors were mapped
            raise KVError("this client said goodbye or went silent while registering")
        self._check_registrations(client)  # its other registrations may have landed meanwhile
        # Bound by the check already, unless the record was made again meanwhile (a goodbye,
        # then a keepalive): then it binds now.
        self.bind_engine(client, spec.engine_id)
        key = (spec.model_name, spec.world_size)
        ns = self.namespaces.get(key)
        if ns is None:
            ns_id = poolkeys.namespace_id(
                spec.model_name, spec.world_size, spec.block_size, spec.layout
            )
            suffixes = [poolkeys.worker_suffix(ns_id, w) for w in range(spec.world_size)]
            form = poolkeys.chunk_form(spec.layout)
            ns = Namespace(ns_id, *key, spec.block_size, form, spec.layout, chunk_nbytes, suffixes)
            self.namespaces[key] = ns
        if spec.worker_id not in ns.ranks:
            ns.ranks[spec.worker_id] = ns.suffixes[spec.worker_id]
            ns.ranks = dict(sorted(ns.ranks.items()))
        instance_id = secrets.randbits(62)
        while instance_id in self.instances:
            instance_id = secrets.randbits(62)
        instance = Instance(
            instance_id,
            client_id,
            ns,
            spec.worker_id,
            spec.mode,
            spec.layout,
            per_chunk,
            chunk_nbytes,
            ns.suffixes[spec.worker_id],
            client.engine_id,
        )
        self.instances[instance_id] = instance
        client.instances.add(instance_id)
        return instance

    def unregister(self, client_id: bytes, instance_id: int, now: float) -> Instance | None:
        """Forget the client's instance; returns it (to close), None if it had no such.

        Another client's instance is left alone and the call refused
        (:class:`~kvrpc.errors.NotOwner`): only the worker that registered it unregisters it.
        """
        client = self.renew(client_id, now)
        if client is None or instance_id not in client.instances:
            other = self.instances.get(instance_id)
            if other is not None and other.owner != client_id:
                self.counters.not_owner += 1
                raise NotOwner(
                    f"instance id {instance_id:x} is another client's KV cache: only the "
                    "client that registered it may unregister it"
                )
            return None
        return self._forget_instance(instance_id)

    def _forget_instance(self, instance_id: int) -> Instance | None:
        instance = self.instances.pop(instance_id, None)
        if instance is None:
            return None
        owner = self.clients.get(instance.owner)
        if owner is not None:
            owner.instances.discard(instance_id)
        still_there = any(
            other.namespace is instance.namespace and other.worker_id == instance.worker_id
            for other in self.instances.values()
        )
        if not still_there:  # nobody can retrieve this rank's chunks now: their pins go
            self.sessions.release_rank(instance.namespace.id, instance.worker_id)
        instance.closed = True
        return instance

    def instance(self, client_id: bytes, instance_id: int, now: float, *modes: str) -> Instance:
        """The client's instance for a copy in one of ``modes``; raises a clear error if not."""
        self.renew(client_id, now)
        instance = self.instances.get(instance_id)
        if instance is None or instance.owner != client_id:
            raise UnknownInstance(
                f"no KV cache is registered under instance id {instance_id:x} for this client; "
                "register_kv_caches first (a server restart or a long silence forgets it)"
            )
        if instance.mode not in modes:
            which = _MODE_CALLS.get(instance.mode, "kv.store / kv.retrieve")
            raise KVError(
                f"this KV cache was registered in the {instance.mode} transfer mode: use {which}"
            )
        return instance

    # ------------------------------------------------------------------ store

    def begin_store(self, instance: Instance, keys: KeyBatch, block_ids: torch.Tensor) -> StorePlan:
        """Check a store and reserve a slot per storable key (see :meth:`reserve`).

        Refused (:class:`~kvrpc.errors.ClientLimitReached`) if its chunks would take the
        client's bytes in flight past the cap; the reserved slots count in them until the
        plan is settled or abandoned.
        """
        self._check_inflight(instance, len(keys))
        results = batch_problems(instance, keys, block_ids, retrieve=False)
        plan = StorePlan(
            instance, results, poolkeys.pool_keys(keys.hashes, instance.suffix), block_ids
        )
        plan.waiting = [i for i, problem in enumerate(results) if problem is None]
        self.reserve(plan)
        return plan

    def reserve(self, plan: StorePlan) -> bool:
        """Reserve slots for the plan's waiting keys; False while some must wait for a save.

        A pool full of slots pinned only while the lower tier copies them frees up soon, so
        the tier's write speed throttles stores instead of refusing them: the shell waits
        for a save to finish and calls this again.
        """
        pool = self._require_pool()
        counters = self.counters
        waiting, plan.waiting = plan.waiting, []
        # The chunks a batch evicts are told as one event, not one each: a store of many
        # chunks into a full pool would otherwise be a burst past a small event buffer.
        self._evictions = []
        try:
            for n, i in enumerate(waiting):
                slot = pool.reserve(plan.keys[i])
                if slot is Reserve.FULL and self.saving:
                    plan.waiting = waiting[n:]
                    return False
                if slot is Reserve.EXISTS or slot is Reserve.FILLING:
                    counters.store_duplicates += 1
                    plan.results[i] = ALREADY_STORED if slot is Reserve.EXISTS else BEING_STORED
                elif slot is Reserve.FULL:
                    counters.store_refused += 1
                    plan.results[i] = NO_FREE_SLOT
                else:
                    assert isinstance(slot, int)
                    plan.reserved.append((i, slot))
        finally:
            evicted, self._evictions = self._evictions, None
            if evicted and self.observer is not None:
                self.observer.removed(L1, evicted, EVICTED)
        self._charge(plan, len(plan.reserved))
        return True

    def _check_inflight(self, instance: Instance, chunks: int) -> None:
        """Refuse a copy of ``chunks`` that would take its client past its bytes in flight.

        A client with nothing in flight is always admitted, however large the call: the cap
        bounds what one client adds to the copies running, and never stops it for good.
        """
        client = self.clients.get(instance.owner)
        wanted = chunks * instance.chunk_nbytes
        limit = self.caps.inflight_bytes
        if client is not None and client.inflight_bytes and client.inflight_bytes + wanted > limit:
            raise self._refuse("inflight_bytes", client.inflight_bytes, wanted, limit)

    def _charge(self, plan: StorePlan | RetrievePlan, chunks: int) -> None:
        """Count ``chunks`` of the plan (all it holds so far) in its client's bytes in flight."""
        nbytes = chunks * plan.instance.chunk_nbytes
        client = self.clients.get(plan.instance.owner)
        if client is not None:
            client.inflight_bytes += nbytes - plan.charged
            plan.charged = nbytes

    def _discharge(self, plan: StorePlan | RetrievePlan) -> None:
        """The plan's copies are over: its bytes leave its client's count (once)."""
        client = self.clients.get(plan.instance.owner)
        if client is not None and plan.charged:
            client.inflight_bytes = max(0, client.inflight_bytes - plan.charged)
        plan.charged = 0

    def settle_store(self, plan: StorePlan, error: KeyFailure | None) -> list[tuple[bytes, int]]:
        """Commit the copied slots (or abort them all); returns the chunks to write through.

        Those ``(key, slot)`` pairs are pinned and counted in :attr:`saving` until
        :meth:`saved` is called with them, so that the tier reads bytes nobody rewrites.
        """
        pool = self._require_pool()
        self._discharge(plan)
        sums = plan.checksums
        for n, (i, slot) in enumerate(plan.reserved):
            if error is None:
                pool.commit(slot, None if sums is None else sums[n])
            else:
                pool.abort(slot)
                plan.results[i] = error
        if error is not None:
            return []
        self.counters.stores += len(plan.reserved)
        self.counters.store_bytes += len(plan.reserved) * plan.instance.chunk_nbytes
        observer = self.observer
        if observer is not None and observer.watching and plan.reserved:
            observer.stored(L1, [plan.keys[i] for i, _ in plan.reserved])
        tier = self.tier
        if tier is None:
            return []
        saves = [(plan.keys[i], slot) for i, slot in plan.reserved]
        saves = [(key, slot) for key, slot in saves if not tier.contains(key)]
        pool.pin_many([slot for _, slot in saves])
        self.saving += len(saves)
        return saves

    def fills(self, plan: StorePlan) -> list[int]:
        """The pool's fill number of each reserved slot (see :meth:`add_checksums`)."""
        pool = self._require_pool()
        return [pool.fill(slot) for _, slot in plan.reserved]

    def add_checksums(
        self, plan: StorePlan, fills: Sequence[int], sums: Sequence[int] | None
    ) -> int:
        """Checksums folded after ``plan`` was committed without them; returns how many taken.

        ``fills`` are :meth:`fills` read before the commit, ``sums`` the checksums in
        ``reserved``'s order (None: the fold failed). A chunk whose slot was freed or filled
        again since keeps what it has now (:meth:`ChunkPool.add_checksum`); the rest are
        counted in ``checksums_late``, those left out in ``checksums_missed``.
        """
        pool = self._require_pool()
        taken = 0
        if sums is not None:
            pairs = zip(plan.reserved, fills, sums, strict=True)
            taken = sum(pool.add_checksum(slot, fill, value) for (_, slot), fill, value in pairs)
        self.counters.checksums_late += taken
        self.counters.checksums_missed += len(fills) - taken
        return taken

    def saved(self, saves: Sequence[tuple[bytes, int]]) -> None:
        """The lower tier is done reading these slots (saved or not): unpin them together.

        Together and in the order they were stored, so the LRU order does not depend on
        which write ended first.
        """
        self._require_pool().unpin_many(slot for _, slot in saves)
        self.saving -= len(saves)

    def lend(self, slot: int) -> None:
        """Pin a committed slot while a remote tier's writer reads it.

        Unlike a disk save it is not counted in :attr:`saving`: a store never waits for a
        remote write (their bytes are bounded by the tier's write budget instead).
        """
        self._require_pool().pin(slot)

    def returned(self, slot: int) -> None:
        """The remote tier's writer is done with a slot :meth:`lend` pinned."""
        self._require_pool().unpin(slot)

    def abandon_store(self, plan: StorePlan) -> None:
        """A cancelled store's copies are over: free its reserved slots unwritten."""
        pool = self._require_pool()
        self._discharge(plan)
        for _, slot in plan.reserved:
            pool.abort(slot)
        plan.reserved = []  # so that abandoning twice frees nothing twice

    # ------------------------------------------------------------------ retrieve

    def begin_retrieve(
        self,
        instance: Instance,
        request_ids: list[str],
        keys: KeyBatch,
        block_ids: torch.Tensor,
    ) -> RetrievePlan:
        """Check a retrieve and pin each key's slot for the copy, so it is not evicted.

        Refused past the client's bytes in flight, as :meth:`begin_store` is.
        """
        if len(request_ids) != len(keys):
            raise KVError(f"{len(keys)} keys but {len(request_ids)} request ids; give one per key")
        self._check_inflight(instance, len(keys))
        results = batch_problems(instance, keys, block_ids, retrieve=True)
        plan = RetrievePlan(instance, request_ids, results, block_ids)
        pool = self._require_pool()
        plan.keys = poolkeys.pool_keys(keys.hashes, instance.suffix)
        for i, key in enumerate(plan.keys):
            if results[i] is not None:
                continue
            slot = pool.lookup(key)
            if slot is None:
                self.counters.retrieve_misses += 1
                results[i] = NOT_IN_CACHE
                continue
            pool.pin(slot)
            pool.touch(slot)
            plan.found.append((i, slot))
            plan.checksums.append(pool.checksum(slot))
        self._charge(plan, len(plan.found))
        return plan

    def settle_retrieve(
        self,
        plan: RetrievePlan,
        error: KeyFailure | None,
        corrupt: Collection[int] = (),
        bad_in_l1: Collection[int] = (),
    ) -> None:
        """Unpin the copied slots; release the sessions' pins on what reached the worker.

        Only the sessions of the worker's own engine release theirs: a request id naming
        another engine's session is copied all the same (the chunks are the cache's), its
        pins left alone and the key counted in ``retrieve_other_engine``
        (:meth:`SessionBook.release_copied`).

        ``corrupt`` holds the key indices whose bytes in the blocks failed their checksum
        (``--verify-retrieves``): they fail with ``CHECKSUM_MISMATCH``, counted, and their
        sessions' pins go as well (the engine recomputes those tokens). Those in
        ``bad_in_l1`` failed because L1's own copy is bad: it is dropped once nobody pins
        it, so no later lookup finds it (a copy another session still pins stays until
        evicted, and fails every verified retrieve meanwhile).
        """
        pool = self._require_pool()
        self._discharge(plan)
        ns_id, engine_id = plan.instance.namespace.id, plan.instance.engine_id
        corrupt, bad_in_l1 = set(corrupt), set(bad_in_l1)
        for i, slot in plan.found:
            pool.unpin(slot)
            if error is not None:
                plan.results[i] = error
                continue
            if i in corrupt:
                plan.results[i] = CHECKSUM_MISMATCH
                self.counters.retrieve_corrupt += 1
            self.sessions.release_copied(ns_id, plan.request_ids[i], slot, engine_id)
            if i in bad_in_l1 and pool.remove(plan.keys[i]):
                observer = self.observer
                if observer is not None and observer.watching:
                    observer.removed(L1, (plan.keys[i],), DELETED)
        if error is None:
            copied = len(plan.found) - len(corrupt)
            self.counters.retrieves += copied
            self.counters.retrieve_bytes += copied * plan.instance.chunk_nbytes

    def abandon_retrieve(self, plan: RetrievePlan) -> None:
        """A cancelled retrieve's copies are over: unpin its slots, sessions keep theirs."""
        self._discharge(plan)
        self._require_pool().unpin_many(slot for _, slot in plan.found)

    # ------------------------------------------------------------------ lookups and sessions

    def lookup(
        self,
        client_id: bytes,
        request_id: str,
        keys: KeyBatch,
        now: float,
        principal: Principal | None = None,
        engine_id: str | None = None,
    ) -> int | Job:
        """The client's lookup (see :meth:`SessionBook.lookup`); renews its lease.

        ``engine_id`` is the engine the client declares (:meth:`bind_engine`): the session
        the lookup opens belongs to it.
        """
        if keys.worker_id is not None:  # refused before the client is recorded
            raise KVError("lookup keys carry no worker id: use CacheKey.no_worker_id_version()")
        self.bind_engine(self.client(client_id, now, principal), engine_id)
        return self.sessions.lookup(client_id, request_id, keys)

    def query_prefetch_status(self, client_id: bytes, job_id: str, now: float) -> int | None:
        """None while the client's job runs, then its count, exactly once."""
        self.renew(client_id, now)
        return self.sessions.query_prefetch_status(client_id, job_id)

    def end_session(
        self, client_id: bytes, model_name: str, world_size: int, request_id: str, now: float
    ) -> int:
        """End the client's session of the request (see :meth:`SessionBook.end_session`)."""
        self.renew(client_id, now)
        return self.sessions.end_session(client_id, model_name, world_size, request_id)

    def release_pins(self, client_id: bytes, request_id: str, keys: KeyBatch, now: float) -> int:
        """Unpin these chunks of the client's request on every rank; the session stays."""
        self.renew(client_id, now)
        return self.sessions.release_pins(client_id, request_id, keys)

    # ------------------------------------------------------------------ report

    def stats(self, cpu_buffer_bytes: int) -> dict[str, int]:
        """The state's part of ``kv.stats``: counters, pool occupancy, tables' sizes."""
        counters, pool = self.counters, self.pool
        return {
            "hits": counters.hits,
            "misses": counters.misses,
            "lookups": counters.lookups,
            "stores": counters.stores,
            "store_refused": counters.store_refused,
            "store_duplicates": counters.store_duplicates,
            "retrieves": counters.retrieves,
            "retrieve_misses": counters.retrieve_misses,
            "retrieve_corrupt": counters.retrieve_corrupt,
            "store_bytes": counters.store_bytes,
            "retrieve_bytes": counters.retrieve_bytes,
            "evictions": pool.evictions if pool is not None else 0,
            "chunks": pool.ready_slots if pool is not None else 0,
            "bytes_used": pool.bytes_used if pool is not None else 0,
            "bytes_free": pool.bytes_free if pool is not None else cpu_buffer_bytes,
            "slot_bytes": pool.slot_nbytes if pool is not None else 0,
            "pinned_chunks": pool.pinned_slots if pool is not None else 0,
            "sessions": len(self.sessions.sessions),
            "clients": len(self.clients),
            "clients_expired": counters.clients_expired,
            "client_limits": counters.client_limits,
            "not_owner": counters.not_owner,
            "retrieve_other_engine": counters.retrieve_other_engine,
            "checksums_late": counters.checksums_late,
            "checksums_missed": counters.checksums_missed,
            "instances": len(self.instances),
            "prefetch_jobs": counters.prefetch_jobs,
            "prefetch_jobs_open": len(self.sessions.jobs),
            "prefetched": counters.prefetched,
            "chunk_size": self.chunk_size,
        }

    def clear(self) -> int:
        """Drop every unpinned stored chunk from L1; returns how many were dropped.

        The observer hears :meth:`~ChunkObserver.cleared` if L1 holds nothing after, else
        the dropped keys (pinned chunks stay).
        """
        pool, observer = self.pool, self.observer
        if pool is None:
            return 0
        if observer is None or not observer.watching:
            return pool.clear()
        freed: list[bytes] = []
        count = pool.clear(freed)
        if pool.ready_slots == 0:
            observer.cleared(L1)
        elif freed:
            observer.removed(L1, freed, CLEARED)
        return count

    def _require_pool(self) -> ChunkPool:
        if self.pool is None:  # unreachable with a registered instance; kept for clarity
            raise KVError("no KV cache has been registered on this server yet")
        return self.pool


def batch_problems(
    instance: Instance, keys: KeyBatch, block_ids: torch.Tensor, *, retrieve: bool
) -> list[KeyFailure | None]:
    """Per key: None if it may be copied, else why not (``SKIP_BLOCK`` only in retrieves)."""
    n = len(keys)
    ns = instance.namespace
    if keys.model_name != ns.model_name or keys.world_size != ns.world_size:
        wrong = KeyFailure(
            KeyStatus.WRONG_NAMESPACE,
            f"keys are for model {keys.model_name!r} world size {keys.world_size}, but "
            f"this instance serves {ns.model_name!r} world size {ns.world_size}",
        )
        return [wrong] * n
    if keys.worker_id != instance.worker_id:
        other = KeyFailure(
            KeyStatus.WRONG_WORKER,
            f"keys carry worker id {keys.worker_id}, this instance is worker {instance.worker_id}",
        )
        return [other] * n
    if instance.mode == "inline":
        return [None] * n
    per_chunk = instance.blocks_per_chunk
    if block_ids.dtype != torch.int64 or tuple(block_ids.shape) != (n, per_chunk):
        raise KVError(
            f"block ids must be an int64 tensor of shape [{n}, {per_chunk}] (one row of "
            f"blocks_per_chunk ids per key), not {block_ids.dtype} {list(block_ids.shape)}"
        )
    return _block_problems(block_ids, instance.layout, SKIP_BLOCK if retrieve else 0)


def _block_problems(block_ids: torch.Tensor, layout: KVLayout, low: int) -> list[KeyFailure | None]:
    """Per row of ``block_ids``: None if every id is in ``[low, num_blocks)``, else why not."""
    num_blocks = layout.num_blocks
    outside = (block_ids < low) | (block_ids >= num_blocks)
    results: list[KeyFailure | None] = [None] * len(block_ids)
    for i, bad in enumerate(outside.any(dim=1).tolist()):
        if bad:
            wrong = block_ids[i][outside[i]][0].item()
            results[i] = KeyFailure(
                KeyStatus.BAD_BLOCK_ID,
                f"block id {wrong} is outside this KV cache's 0..{num_blocks - 1}",
            )
    return results
