"""The ``kv.*`` handlers: validate, ask the state core, run the I/O, settle.

:class:`KVService` is a thin facade. The decisions (who owns what, which slot a chunk goes
to, what a lookup pins) are :class:`~kvrpc.kv.server.state.KVState`'s; the copies, saves and
loads are the I/O shell's (:mod:`~kvrpc.kv.server.cpu_copies`,
:mod:`~kvrpc.kv.server.gpu_copies`, :mod:`~kvrpc.kv.server.tiering`); the worker's mapped
memory is kept here by instance id, beside the state's record of it.

Integrity: every stored chunk gets its checksum (:mod:`kvrpc.kv.integrity`) as it is stored,
in the copy executor for ``shm`` and ``inline`` stores and on the GPU beside the copy for
``cuda_ipc`` ones; L1 keeps it with the chunk and the tiers store and verify it. With
``verify_retrieves`` every retrieve is read back out of the blocks and checked too
(:mod:`~kvrpc.kv.server.verify`).

Threading model: every handler runs on the server's event loop thread, the only thread that
reads or changes the state, so nothing is locked. Copies run in the copy executor or a GPU's
copy engine while the slots they touch are reserved (a store) or pinned (a retrieve).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
import torch

from kvrpc._lifetime import OwnedTaskGroup
from kvrpc.cuda import CudaEventHandle
from kvrpc.errors import KVConfigError, KVError
from kvrpc.kv import integrity, protocols
from kvrpc.kv.keys import KeyBatch
from kvrpc.kv.layout import gather_chunks, scatter_chunks
from kvrpc.kv.outcomes import WORKER_GONE, KeyFailure, StoreReply, copy_failed, outcome_fields
from kvrpc.kv.protocols import (
    CudaCopyReply,
    EventsRequest,
    KVCacheRegistration,
    KVEvent,
    LayerCopyReply,
    RetrieveReply,
)
from kvrpc.kv.server.access import caller_of, current_caller, memory_owner
from kvrpc.kv.server.caps import ClientCaps
from kvrpc.kv.server.chunk_events import ChunkEvents
from kvrpc.kv.server.copy_engine import Transfer
from kvrpc.kv.server.cpu_copies import CpuCopies, check_inline_chunks, clone_into, copy_all
from kvrpc.kv.server.event_stream import kv_events
from kvrpc.kv.server.events import EventHub
from kvrpc.kv.server.gpu_copies import CudaCache, GpuCopies
from kvrpc.kv.server.mappings import Mappings
from kvrpc.kv.server.observer import Enumerable, Observable
from kvrpc.kv.server.pool import ChunkPool
from kvrpc.kv.server.records import Instance, Principal, RetrievePlan, StorePlan
from kvrpc.kv.server.state import KVState
from kvrpc.kv.server.tiering import Tiering
from kvrpc.kv.server.tiers import LowerTier, RemoteTier
from kvrpc.kv.server.verify import blocks_checksums, judge, slot_checksums
from kvrpc.loopwatch import LoopLagProbe
from kvrpc.server import PeerInfo, RPCServer, current_peer

__all__ = ["KVService"]

logger = logging.getLogger("kvrpc.kv")


class KVService:
    """The KV-cache server's handlers; :meth:`register` puts them on a server.

    ``chunk_size`` is tokens per chunk; ``cpu_buffer_bytes`` bounds the L1 pool (its slots
    are sized by the first registered layout); ``copy_workers`` is the number of copy
    threads; a client silent for ``client_timeout`` seconds is dropped with everything it
    owns. ``lower_tier`` is this host's disk tier, ``remote_tier`` a store shared by many
    servers (Redis), each optional. ``cuda_group_bytes`` sizes each of a GPU copy engine's
    two staging buffers. On a host with CUDA the pool is pinned, so that GPU copies run at
    PCIe speed. ``checksums`` off stores chunks without their checksum (the tiers then
    compute it when they write; for measuring its cost); ``verify_retrieves`` checks every
    retrieve's bytes in the blocks (a debug mode, see :mod:`~kvrpc.kv.server.verify`).
    ``store_copies`` is how a GPU store moves blocks: ``"kernels"`` or ``"dma"``
    (:class:`~kvrpc.kv.server.copy_engine.StoreCopies`). ``caps`` bounds what each client
    may hold (:class:`ClientCaps`' defaults if None).
    :attr:`events` is the hub of ``kv.events``: what L1 and the tiers hold, as it changes.
    Open it (``async with``) on the server's loop before serving: that starts the task
    that drops silent clients (and a remote tier's writers and probe).
    """

    def __init__(
        self,
        *,
        chunk_size: int = 256,
        cpu_buffer_bytes: int = 1 << 30,
        copy_workers: int = 2,
        client_timeout: float = 8.0,
        lower_tier: LowerTier | None = None,
        remote_tier: RemoteTier | None = None,
        cuda_group_bytes: int = 256 << 20,
        loop_probe: bool = False,
        checksums: bool = True,
        verify_retrieves: bool = False,
        caps: ClientCaps | None = None,
        store_copies: str = "kernels",
    ) -> None:
        if cpu_buffer_bytes < 1:
            raise KVConfigError(f"the CPU buffer must be at least 1 byte, not {cpu_buffer_bytes}")
        self.state = KVState(
            chunk_size=chunk_size,
            client_timeout=client_timeout,
            tier=lower_tier,
            remote=remote_tier,
            caps=caps,
        )
        self.cpu_buffer_bytes = cpu_buffer_bytes
        self.checksums = checksums
        self.verify_retrieves = verify_retrieves
        self.lower_tier = lower_tier
        self.remote_tier = remote_tier
        self.cpu = CpuCopies(copy_workers)
        self.gpu = GpuCopies(cuda_group_bytes, client_timeout, self._start, store_copies)
        listed = lower_tier if isinstance(lower_tier, Enumerable) else None
        chunk_events = ChunkEvents(self.state, disk=listed)
        self.events: EventHub = chunk_events.hub
        """The event hub: subscribe to it for what the cache holds (see ``kv.events``)."""
        self.state.observer = chunk_events
        for tier in (lower_tier, remote_tier):
            if isinstance(tier, Observable):
                tier.observe(chunk_events)
        self.tiering = (
            None
            if lower_tier is None and remote_tier is None
            else Tiering(
                self.state, self._start, disk=lower_tier, remote=remote_tier, observer=chunk_events
            )
        )
        self.mappings = Mappings(self.state, self.cpu, self.gpu, cpu_buffer_bytes)
        self._loop_probe = loop_probe
        self._probe: LoopLagProbe | None = None
        self._tasks: OwnedTaskGroup | None = None

    @property
    def chunk_size(self) -> int:
        """Tokens per chunk."""
        return self.state.chunk_size

    @property
    def pool(self) -> ChunkPool | None:
        """The L1 pool, once the first KV cache registered."""
        return self.state.pool

    # ------------------------------------------------------------------ lifecycle

    def register(self, server: RPCServer) -> None:
        """Handle every ``kv.*`` protocol on ``server``."""
        handlers: dict[str, Callable[..., Any]] = {
            protocols.REGISTER_KV_CACHE.name: self.register_kv_cache,
            protocols.UNREGISTER_KV_CACHE.name: self.unregister_kv_cache,
            protocols.STORE.name: self.store,
            protocols.RETRIEVE.name: self.retrieve,
            protocols.STORE_CUDA.name: self.store_cuda,
            protocols.RETRIEVE_CUDA.name: self.retrieve_cuda,
            protocols.RETRIEVE_CUDA_LAYERS.name: self.retrieve_cuda_layers,
            protocols.LOOKUP.name: self.lookup,
            protocols.QUERY_PREFETCH_STATUS.name: self.query_prefetch_status,
            protocols.END_SESSION.name: self.end_session,
            protocols.RELEASE_PINS.name: self.release_pins,
            protocols.GET_CHUNK_SIZE.name: lambda: self.chunk_size,
            protocols.STATS.name: self.stats,
            protocols.CLEAR.name: self.clear,
            protocols.KEEPALIVE.name: self.keepalive,
            protocols.GOODBYE.name: self.goodbye,
        }
        server.register(protocols.EVENTS, self.subscribe_events)
        for definition in protocols.KV_PROTOCOLS:
            if definition.stream:
                continue
            handler = handlers[definition.name]
            if definition.name not in _NO_CLIENT_ID:
                handler = _caller_checked(self.state.check_caller, handler)
            server.register(definition, _settling_first(self.gpu.settle_completed, handler))

    async def subscribe_events(self, request: EventsRequest) -> AsyncIterator[KVEvent]:
        """``kv.events``: what the cache holds, as it changes (see :mod:`.event_stream`)."""
        async for event in kv_events(self.events, request):
            yield event

    async def __aenter__(self) -> KVService:
        self._tasks = OwnedTaskGroup("kvrpc-kv-service")
        group = await self._tasks.open()
        group.start_soon(self._expire_silent_clients)
        if self.remote_tier is not None:
            group.start_soon(self.remote_tier.run)
        if self._loop_probe:
            self._probe = LoopLagProbe(asyncio.get_running_loop()).start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop background work, drop every client, release mappings and the tier.

        Every event subscription is closed first (its stream ends).
        """
        self.events.close()
        tasks, self._tasks = self._tasks, None
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.stop()
        if tasks is not None:
            await tasks.close()
        for client_id in list(self.state.clients):
            self.mappings.close(self.state.drop_client(client_id))
        self.cpu.close()
        await self.gpu.aclose()
        if self.lower_tier is not None:
            await self.lower_tier.aclose()
        if self.remote_tier is not None:
            await self.remote_tier.aclose()

    def _start(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Run ``fn(*args)`` in the service's task group, from a task or a read callback."""
        if self._tasks is None:
            raise KVError("the KV service is not open: use 'async with service' while serving")
        self._tasks.spawn(fn, *args)

    async def _expire_silent_clients(self) -> None:
        period = max(0.05, min(1.0, self.state.client_timeout / 4))
        while True:
            await anyio.sleep(period)
            self.expire_clients()

    def expire_clients(self, now: float | None = None) -> int:
        """Drop the clients silent for longer than ``client_timeout``; returns how many."""
        before = self.state.counters.clients_expired
        self.mappings.close(self.state.expire(time.monotonic() if now is None else now))
        return self.state.counters.clients_expired - before

    def keepalive(self, client_id: bytes) -> None:
        """``kv.keepalive``: the client is alive."""
        self.state.client(client_id, time.monotonic(), current_caller())

    def goodbye(self, client_id: bytes) -> None:
        """``kv.goodbye``: the client closes; drop what it owns now, without a warning."""
        self.mappings.close(self.state.drop_client(client_id))

    # ------------------------------------------------------------------ registration

    async def register_kv_cache(
        self, client_id: bytes, spec: KVCacheRegistration, peer: PeerInfo | None = None
    ) -> int:
        """``kv.register_kv_cache``: check the layout, map the tensors, return an instance id.

        Memory is mapped only for a peer that owns it (see :mod:`kvrpc.kv.server.access`);
        ``peer`` is the requesting one, by default the peer of the request being handled.
        """
        peer = current_peer() if peer is None else peer
        owner = memory_owner(spec.mode, peer)
        caller = caller_of(peer)
        per_chunk, chunk_nbytes = self.state.check_registration(
            client_id, spec, time.monotonic(), caller
        )
        now = time.monotonic()
        recheck = functools.partial(self.state.check_registration, client_id, spec, now, caller)
        mapped = await self.mappings.open(spec, owner, per_chunk, recheck)
        try:  # back on the loop: the state checks again that the layout still fits
            instance = self.state.add_instance(client_id, spec, per_chunk, chunk_nbytes)
        except BaseException:
            self.mappings.release(mapped)
            raise
        self.mappings.keep(instance.id, mapped)
        _log_registration(spec, chunk_nbytes, instance.id)
        return instance.id

    async def unregister_kv_cache(self, client_id: bytes, instance_id: int) -> bool:
        """``kv.unregister_kv_cache``: forget the instance; False if the client had no such."""
        instance = self.state.unregister(client_id, instance_id, time.monotonic())
        self.mappings.close([] if instance is None else [instance])
        return instance is not None

    # ------------------------------------------------------------------ store / retrieve

    async def store(
        self,
        client_id: bytes,
        instance_id: int,
        keys: KeyBatch,
        block_ids: torch.Tensor,
        chunks: list[torch.Tensor],
    ) -> StoreReply:
        """``kv.store``: copy each key's blocks into a pool slot; a status per key."""
        instance = self.state.instance(client_id, instance_id, time.monotonic(), "shm", "inline")
        if instance.mode == "inline":
            check_inline_chunks(chunks, len(keys), instance.chunk_nbytes)
        elif chunks:
            raise KVError("chunk bytes travel in the message only in the inline mode")
        plan = await self._admit_store(instance, keys, block_ids)
        if plan.reserved and instance.closed:  # it left while the store waited for a slot
            self._settle_store(plan, WORKER_GONE)
        elif plan.reserved:
            outs = self.mappings.slots(plan.reserved, instance.chunk_nbytes)
            if instance.mode == "inline":
                srcs = [chunks[i] for i, _ in plan.reserved]
                works: list[Callable[[], None]] = [functools.partial(copy_all, outs, srcs)]
            else:
                works = self.mappings.by_layers(
                    gather_chunks, instance, plan.reserved, block_ids, outs
                )
            late = functools.partial(self.state.abandon_store, plan)
            error = await self.cpu.run(works, on_late_finish=late)
            if error is None and self.checksums:
                error = await self._checksum_slots(plan, outs, late)
            self._settle_store(plan, error)
        return StoreReply(**outcome_fields(plan.results))

    async def _checksum_slots(
        self, plan: StorePlan, outs: list[torch.Tensor], late: Callable[[], None]
    ) -> KeyFailure | None:
        """Each filled slot's checksum, into ``plan.checksums``, spread over the copy threads."""
        sums: list[int] = [0] * len(outs)
        parts = max(1, min(self.cpu.workers, len(outs)))
        bounds = [len(outs) * k // parts for k in range(parts + 1)]

        def fold(first: int, end: int) -> None:
            for n in range(first, end):
                sums[n] = integrity.checksum(outs[n])

        works: list[Callable[[], None]] = [
            functools.partial(fold, a, b) for a, b in itertools.pairwise(bounds)
        ]
        error = await self.cpu.run(works, on_late_finish=late)
        plan.checksums = sums
        return error

    async def store_cuda(
        self,
        client_id: bytes,
        instance_id: int,
        keys: KeyBatch,
        block_ids: torch.Tensor,
        ready: CudaEventHandle,
    ) -> CudaCopyReply:
        """``kv.store_cuda``: the GPU copy engine gathers the blocks into pinned pool slots.

        Replies once the copy is enqueued, with the event the engine records after it: the
        worker may reuse the blocks once that event completed. The chunks become visible to
        lookups when the copy has completed (all of them at once, settled in the background).
        """
        started = time.perf_counter()
        instance = self.state.instance(client_id, instance_id, time.monotonic(), "cuda_ipc")
        plan = await self._admit_store(instance, keys, block_ids)
        if plan.reserved and instance.closed:  # it left while the store waited for a slot
            self._settle_store(plan, WORKER_GONE)
        if not plan.reserved or instance.closed:
            return CudaCopyReply(**outcome_fields(plan.results))
        cache = self.mappings.cuda(instance)
        made: list[Transfer] = []

        def transfer(ready: Any) -> Transfer:
            job = self.mappings.transfer(cache, block_ids, plan.reserved, None, ready)
            job.checksum = self.checksums  # the engine folds each chunk on the GPU
            made.append(job)
            return job

        late = functools.partial(self.state.abandon_store, plan)
        error, result = await self.gpu.copy(cache, cache.engine.submit_store, transfer, ready, late)
        if error is not None:
            self._settle_store(plan, error)
            return CudaCopyReply(**outcome_fields(plan.results))
        job = made[0]
        settle = functools.partial(self._settle_cuda_store, plan, job)
        answered = self.gpu.settle_later(
            cache.engine, plan.results, settle, result, started, after=job.folded
        )
        return CudaCopyReply(**outcome_fields(answered), cuda_event=result[1])

    async def _admit_store(
        self, instance: Instance, keys: KeyBatch, block_ids: torch.Tensor
    ) -> StorePlan:
        plan = self.state.begin_store(instance, keys, block_ids)
        try:
            while plan.waiting:
                assert self.tiering is not None  # only disk saves make a key wait
                await self.tiering.save_finished()
                self.state.reserve(plan)
        except BaseException:  # cancelled while waiting: its slots would stay reserved
            self.state.abandon_store(plan)
            raise
        return plan

    def _settle_cuda_store(
        self, plan: StorePlan, transfer: Transfer, error: KeyFailure | None
    ) -> None:
        """Settle a completed GPU store, with its checksums where they are on the host.

        A kernel store's are, with its completion event. A DMA store's are folded on the
        CPU as its groups land (:attr:`Transfer.folded`): a handler that finds the event
        completed commits the chunks at once all the same, so that a lookup sent after the
        worker saw the store finish finds them, and they get their checksums as the folds
        end (:meth:`KVState.add_checksums`). The worker's event is never held back for them.
        """
        folded = transfer.folded
        if error is None and transfer.checksums is not None:
            if folded is None or _succeeded(folded):
                plan.checksums = integrity.combine(transfer.checksums)
            else:
                self._checksums_later(plan, folded, transfer.checksums)
        self._settle_store(plan, error)

    def _checksums_later(
        self, plan: StorePlan, folded: concurrent.futures.Future[None], sums: torch.Tensor
    ) -> None:
        """Once ``folded`` resolves, give ``plan``'s chunks (committed now) their checksums."""
        fills = self.state.fills(plan)  # before the commit: the slots are still filling
        loop = asyncio.get_running_loop()

        def on_loop() -> None:
            values = integrity.combine(sums) if _succeeded(folded) else None
            if self.state.pool is not None:
                self.state.add_checksums(plan, fills, values)

        def folds_done(_: object) -> None:  # in a fold thread, or here if already done
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to add to
                loop.call_soon_threadsafe(on_loop)

        folded.add_done_callback(folds_done)

    def _settle_store(self, plan: StorePlan, error: KeyFailure | None) -> None:
        saves = self.state.settle_store(plan, error)
        if self.tiering is not None:
            self.tiering.stored(plan, saves, committed=error is None)

    async def retrieve(
        self,
        client_id: bytes,
        instance_id: int,
        request_ids: list[str],
        keys: KeyBatch,
        block_ids: torch.Tensor,
    ) -> RetrieveReply:
        """``kv.retrieve``: copy each key's chunk into its blocks (or into the reply)."""
        instance = self.state.instance(client_id, instance_id, time.monotonic(), "shm", "inline")
        plan = self.state.begin_retrieve(instance, request_ids, keys, block_ids)
        srcs = self.mappings.slots(plan.found, instance.chunk_nbytes)
        copies: list[torch.Tensor] = []
        if not plan.found:
            works: list[Callable[[], None]] = []
        elif instance.mode == "inline":
            works = [functools.partial(clone_into, srcs, copies)]
        else:
            works = self.mappings.by_layers(scatter_chunks, instance, plan.found, block_ids, srcs)
        late = functools.partial(self.state.abandon_retrieve, plan)
        error = await self.cpu.run(works, on_late_finish=late)
        failed: list[int] = []
        bad: list[int] = []
        if error is None and self.verify_retrieves and plan.found:
            verdict: list[tuple[list[int], list[int]]] = []
            check = functools.partial(
                self._verify_on_cpu, instance, plan, block_ids, srcs, copies, verdict
            )
            error = await self.cpu.run([check], on_late_finish=late)
            if verdict:
                failed, bad = verdict[0]
        self.state.settle_retrieve(plan, error, failed, bad)
        if instance.mode != "inline":
            return RetrieveReply(**outcome_fields(plan.results))
        by_index = dict(zip((i for i, _ in plan.found), copies, strict=False))
        empty = torch.empty(0, dtype=torch.uint8)
        results = plan.results
        chunks = [by_index.get(i, empty) if results[i] is None else empty for i in range(len(keys))]
        return RetrieveReply(**outcome_fields(results), chunks=chunks)

    def _verify_on_cpu(
        self,
        instance: Instance,
        plan: RetrievePlan,
        block_ids: torch.Tensor,
        srcs: list[torch.Tensor],
        copies: list[torch.Tensor],
        verdict: list[tuple[list[int], list[int]]],
    ) -> None:
        """In a copy thread: the retrieve's failed and bad-in-L1 key indices, into ``verdict``."""
        if instance.mode == "inline":
            in_blocks: list[int | None] = [integrity.checksum(copy) for copy in copies]
        else:
            rows = block_ids[[i for i, _ in plan.found]]
            layers = self.mappings.shared_layers(instance)
            in_blocks = blocks_checksums(layers, instance.layout, rows)
        verdict.append(self._verdict(plan, in_blocks, slot_checksums(srcs)))

    def _verdict(
        self, plan: RetrievePlan, in_blocks: list[int | None], in_slots: list[int]
    ) -> tuple[list[int], list[int]]:
        """:func:`judge`'s positions as key indices; each failure logged."""
        failed, bad = judge(plan.checksums, in_blocks, list(in_slots))
        for n in failed:
            logger.error(
                "--verify-retrieves: a retrieved chunk's bytes do not match its checksum; %s",
                "L1's copy is bad and is dropped"
                if n in bad
                else "L1's copy is good: the copy into the blocks went wrong",
            )
        return [plan.found[n][0] for n in failed], [plan.found[n][0] for n in bad]

    async def _verify_cuda(
        self, cache: CudaCache, plan: RetrievePlan, block_ids: torch.Tensor
    ) -> tuple[list[int], list[int]]:
        """Check a completed GPU retrieve's blocks: its failed and bad-in-L1 key indices."""
        engine = cache.engine
        rows = block_ids[[i for i, _ in plan.found]]

        def in_engine() -> list[int | None]:
            with torch.cuda.device(engine.device):
                return blocks_checksums(cache.layers, cache.layout, rows)

        srcs = self.mappings.slots(plan.found, plan.instance.chunk_nbytes)
        in_blocks = await asyncio.wrap_future(engine.executor.submit(in_engine))
        in_slots = await asyncio.to_thread(slot_checksums, srcs)
        return self._verdict(plan, in_blocks, in_slots)

    async def retrieve_cuda(
        self,
        client_id: bytes,
        instance_id: int,
        request_ids: list[str],
        keys: KeyBatch,
        block_ids: torch.Tensor,
        ready: CudaEventHandle,
        deadline: float | None,
    ) -> CudaCopyReply:
        """``kv.retrieve_cuda``: the GPU copy engine writes the chunks into the blocks.

        Replies once the copy is enqueued, with the event the engine records after it: the
        blocks hold the chunks once that event completed. The slots stay pinned, and the
        sessions' pins held, until then (settled in the background). With a ``deadline``
        (seconds from now), a copy that has not started by then never starts, and the keys
        fail with a reason (the reply then carries no event, and no byte was written).
        """
        answered, result = await self._cuda_retrieve(
            client_id, instance_id, request_ids, keys, block_ids, ready, deadline, layers=False
        )
        event = None if result is None else result[1]
        return CudaCopyReply(**outcome_fields(answered), cuda_event=event)

    async def retrieve_cuda_layers(
        self,
        client_id: bytes,
        instance_id: int,
        request_ids: list[str],
        keys: KeyBatch,
        block_ids: torch.Tensor,
        ready: CudaEventHandle,
        deadline: float | None,
    ) -> LayerCopyReply:
        """``kv.retrieve_cuda_layers``: a retrieve in layer order, answered before it is enqueued.

        The reply carries one event per layer and the stamps that say which of them are
        recorded yet (:mod:`kvrpc.kv.stamps`), so that the worker waits for layer 0 while
        the engine still enqueues the rest. The slots stay pinned, and the sessions' pins
        held, until the whole copy has completed (settled in the background). With
        ``--verify-retrieves`` the reply waits for the copy and its check, as for
        ``kv.retrieve_cuda``.
        """
        if self.verify_retrieves:
            answered, result = await self._cuda_retrieve(
                client_id, instance_id, request_ids, keys, block_ids, ready, deadline, layers=True
            )
            events = [] if result is None else result[2]
            return LayerCopyReply(**outcome_fields(answered), layer_events=events)
        started = time.perf_counter()
        plan, cache, expires, transfer, late = self._begin_cuda_retrieve(
            client_id, instance_id, request_ids, keys, block_ids, deadline
        )
        if not plan.found:
            return LayerCopyReply(**outcome_fields(plan.results))
        settle = functools.partial(self.state.settle_retrieve, plan)
        error, announced = await self.gpu.copy_announced(
            cache, transfer, ready, late, settle, started, expires
        )
        if error is not None or announced is None:
            self.state.settle_retrieve(plan, error)
            return LayerCopyReply(**outcome_fields(plan.results))
        # Copied: the settle that follows (in the background) must not change the answer.
        return LayerCopyReply(
            **outcome_fields(list(plan.results)),
            layer_events=announced.handles,
            stamps=announced.stamps.ref,
            first_turn=announced.first_turn,
        )

    def _begin_cuda_retrieve(
        self,
        client_id: bytes,
        instance_id: int,
        request_ids: list[str],
        keys: KeyBatch,
        block_ids: torch.Tensor,
        deadline: float | None,
    ) -> tuple[
        RetrievePlan, CudaCache, float | None, Callable[[Any], Transfer], Callable[[], None]
    ]:
        """A ``cuda_ipc`` retrieve's state decided: (plan, cache, expiry, job maker, abandon).

        The deadline (seconds) counts from here; the job maker builds the engine's
        :class:`Transfer` once the worker's event is ready.
        """
        now = time.monotonic()
        instance = self.state.instance(client_id, instance_id, now, "cuda_ipc")
        plan = self.state.begin_retrieve(instance, request_ids, keys, block_ids)
        cache = self.mappings.cuda(instance)
        expires = None if deadline is None else now + deadline
        transfer = functools.partial(self.mappings.transfer, cache, block_ids, plan.found, expires)
        late = functools.partial(self.state.abandon_retrieve, plan)
        return plan, cache, expires, transfer, late

    async def _cuda_retrieve(
        self,
        client_id: bytes,
        instance_id: int,
        request_ids: list[str],
        keys: KeyBatch,
        block_ids: torch.Tensor,
        ready: CudaEventHandle,
        deadline: float | None,
        *,
        layers: bool,
    ) -> tuple[list[KeyFailure | None], Any]:
        """A ``cuda_ipc`` retrieve up to its enqueued copy: (what to answer, engine's result).

        The deadline counts from here. The engine's result is None when nothing is copied
        (nothing found, or the copy refused); else the copy settles once it completed.
        """
        started = time.perf_counter()
        plan, cache, expires, transfer, late = self._begin_cuda_retrieve(
            client_id, instance_id, request_ids, keys, block_ids, deadline
        )
        if not plan.found:
            return plan.results, None
        engine = cache.engine
        submit = engine.submit_retrieve_layers if layers else engine.submit_retrieve
        error, result = await self.gpu.copy(cache, submit, transfer, ready, late, expires)
        if error is not None:
            self.state.settle_retrieve(plan, error)
            return plan.results, None
        if self.verify_retrieves:
            return await self._verified_cuda_retrieve(cache, plan, block_ids, result), result
        settle = functools.partial(self.state.settle_retrieve, plan)
        return self.gpu.settle_later(cache.engine, plan.results, settle, result, started), result

    async def _verified_cuda_retrieve(
        self, cache: CudaCache, plan: RetrievePlan, block_ids: torch.Tensor, result: Any
    ) -> list[KeyFailure | None]:
        """``--verify-retrieves``: wait for the copy, check the blocks, then settle and answer.

        The reply waits for the copy (its event has completed when the worker gets it), so
        that a key whose blocks fail their checksum is answered as failed.
        """
        waited = cache.engine.wait(result[0], result[1])
        try:
            await asyncio.wrap_future(waited)
            failed, bad = await self._verify_cuda(cache, plan, block_ids)
        except asyncio.CancelledError:  # settle once the GPU no longer reads the slots
            loop = asyncio.get_running_loop()
            gone = copy_failed("the server shut down")

            def late(_: object) -> None:
                loop.call_soon_threadsafe(self.state.settle_retrieve, plan, gone)

            waited.add_done_callback(late)
            raise
        except Exception as exc:
            logger.error("verifying a GPU retrieve failed", exc_info=exc)
            self.state.settle_retrieve(plan, copy_failed(exc))
            return plan.results
        self.state.settle_retrieve(plan, None, failed, bad)
        return plan.results

    # ------------------------------------------------------------------ lookup / sessions

    def lookup(
        self, client_id: bytes, request_id: str, keys: KeyBatch, engine_id: str | None
    ) -> int | str:
        """``kv.lookup``: leading chunks present on every rank, pinned for ``request_id``.

        Replaces the pins of an earlier lookup for the same request. Answers a prefetch job
        id instead when some of those chunks must first be loaded from the lower tier. The
        session belongs to ``engine_id``, the client's engine (the server binds it).
        """
        now, caller = time.monotonic(), current_caller()
        found = self.state.lookup(client_id, request_id, keys, now, caller, engine_id)
        if isinstance(found, int):
            return found
        assert self.tiering is not None  # only a tier makes a job
        self.tiering.prefetch(found)
        return found.id

    def query_prefetch_status(self, client_id: bytes, job_id: str) -> int | None:
        """``kv.query_prefetch_status``: None while running, then the count, exactly once."""
        return self.state.query_prefetch_status(client_id, job_id, time.monotonic())

    def end_session(
        self, client_id: bytes, model_name: str, world_size: int, request_id: str
    ) -> int:
        """``kv.end_session``: release the request's pins; returns how many were released."""
        now = time.monotonic()
        return self.state.end_session(client_id, model_name, world_size, request_id, now)

    def release_pins(self, client_id: bytes, request_id: str, keys: KeyBatch) -> int:
        """``kv.release_pins``: unpin these chunks of the request's session, on every rank.

        The session stays open for the rest of its pins. Chunks the session never pinned are
        ignored, so releasing twice releases once. Returns how many pins were released.
        """
        return self.state.release_pins(client_id, request_id, keys, time.monotonic())

    # ------------------------------------------------------------------ stats / clear

    def stats(self) -> dict[str, int]:
        """``kv.stats``: counters and the pool's occupancy."""
        report = self.state.stats(self.cpu_buffer_bytes)
        report["shm_orphans_removed"] = self.mappings.orphans_removed
        report["event_subscribers"] = self.events.subscriptions
        report["events_published"] = self.events.seq
        if self.lower_tier is not None:
            for name, value in self.lower_tier.stats().items():
                report[f"tier_{name}"] = value
        if self.remote_tier is not None:
            for name, value in self.remote_tier.stats().items():
                report[f"redis_{name}"] = value
        report.update(self.gpu.stats())
        if self._probe is not None:
            report.update(self._probe.take())  # since the last kv.stats
        return report

    def clear(self) -> int:
        """``kv.clear``: drop every unpinned stored chunk; returns how many were dropped."""
        return self.state.clear()


def _log_registration(spec: KVCacheRegistration, chunk_nbytes: int, instance_id: int) -> None:
    logger.info(
        "registered %s worker %d/%d (%s, %s): %d-byte chunks, instance %x",
        spec.model_name,
        spec.worker_id,
        spec.world_size,
        spec.mode,
        spec.layout.describe(),
        chunk_nbytes,
        instance_id,
    )


#: The ``kv.*`` protocols that name no client: they act on no client's state.
_NO_CLIENT_ID = frozenset(
    {protocols.GET_CHUNK_SIZE.name, protocols.STATS.name, protocols.CLEAR.name}
)


def _caller_checked(
    check: Callable[[bytes, Principal | None], None], handler: Callable[..., Any]
) -> Callable[..., Any]:
    """``handler``, refusing first a call whose client id is bound to another process.

    Every ``kv.*`` call that names a client passes this one gate before it can renew, read
    or change anything of that client (see :meth:`KVState.check_caller`).
    """
    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def checked_then(client_id: bytes, *args: Any) -> Any:
            check(client_id, current_caller())
            return await handler(client_id, *args)

        return checked_then

    @functools.wraps(handler)
    def checked_first(client_id: bytes, *args: Any) -> Any:
        check(client_id, current_caller())
        return handler(client_id, *args)

    return checked_first


def _succeeded(future: concurrent.futures.Future[None]) -> bool:
    """Whether ``future`` has resolved, neither cancelled nor failed."""
    return future.done() and not future.cancelled() and future.exception() is None


def _settling_first(settle: Callable[[], None], handler: Callable[..., Any]) -> Callable[..., Any]:
    """``handler``, calling ``settle`` (the answered GPU copies that completed) first.

    A worker sees a copy's event complete before the engine's waiter thread has told the
    loop, so every kv.* call settles those copies before it reads the state: a lookup sent
    after a store was reported finished finds the store's chunks.
    """
    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def settled_then(*args: Any) -> Any:
            settle()
            return await handler(*args)

        return settled_then

    @functools.wraps(handler)
    def settled_first(*args: Any) -> Any:
        settle()
        return handler(*args)

    return settled_first
