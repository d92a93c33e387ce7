"""The KV-cache service: the ``kv.*`` handlers over an L1 pool, sessions and clients.

Threading model: every table here (namespaces, instances, sessions, jobs, clients, the pool's
index) is read and changed only on the server's event loop thread, so nothing is locked.
Byte copies run in the service's own copy executor while the slots they touch are reserved
(a store) or pinned (a retrieve): the pool never hands such a slot to anyone else, so a copy
and the loop never race on the same bytes.

Keys in the pool are ``chunk hash (32 bytes) + namespace id (8 bytes) + worker id (uint16)``,
where a namespace is one ``(model name, world size)`` and its id the first 8 bytes of a
SHA-256 of both, so it is the same on every run (a disk tier's files outlive the process).
This keeps the per-chunk metadata to one small bytes object.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import logging
import os
import secrets
import struct
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.abc
import torch

from kvrpc._lifetime import OwnedTaskGroup
from kvrpc.cuda import CudaEventHandle, device_by_uuid, forget_events
from kvrpc.errors import CudaUnavailable, KVConfigError, KVError, UnknownInstance, UnknownJob
from kvrpc.kv import protocols
from kvrpc.kv.cuda_ipc import CudaIPCWrapper
from kvrpc.kv.keys import HASH_SIZE, KeyBatch, blocks_per_chunk
from kvrpc.kv.layout import SKIP_BLOCK, KVLayout, gather_chunks, scatter_chunks
from kvrpc.kv.protocols import CudaCopyReply, KVCacheRegistration, LayerCopyReply, RetrieveReply
from kvrpc.kv.server.access import memory_owner
from kvrpc.kv.server.copy_engine import CopyEngine, DeadlinePassed, Transfer
from kvrpc.kv.server.pool import ChunkPool, Reserve
from kvrpc.kv.server.tiers import LowerTier
from kvrpc.kv.shm import MemoryOwner, SharedMapping, SharedTensorRef, open_shared
from kvrpc.loopwatch import LoopLagProbe
from kvrpc.server import PeerInfo, RPCServer, current_peer

__all__ = ["KVService"]

logger = logging.getLogger("kvrpc.kv")

T = TypeVar("T")

_WORKER = struct.Struct("<H")
_NS_ID_SIZE = 8


@dataclass(eq=False)
class _Namespace:
    """One (model name, world size): its id in pool keys and the layout its chunks have."""

    id: bytes
    model_name: str
    world_size: int
    layout: KVLayout | None = None
    block_size: int = 0
    chunk_nbytes: int = 0
    suffixes: list[bytes] = field(default_factory=list)


@dataclass(eq=False)
class _Instance:
    """A registered worker KV cache."""

    id: int
    owner: bytes
    namespace: _Namespace
    worker_id: int
    mode: str
    layout: KVLayout
    blocks_per_chunk: int
    chunk_nbytes: int
    layers: list[torch.Tensor]
    mappings: list[SharedMapping]
    suffix: bytes
    #: cuda_ipc only: the GPU's copy engine, and the worker's events this server opened.
    engine: CopyEngine | None = None
    events: set[CudaEventHandle] = field(default_factory=set)
    closed: bool = False


@dataclass(eq=False)
class _Session:
    """A request's pins: slot -> worker id of the chunk pinned there."""

    owner: bytes
    pins: dict[int, int] = field(default_factory=dict)
    jobs: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Job:
    """A prefetch started by a lookup; its count is taken exactly once."""

    owner: bytes
    session: tuple[bytes, str]
    result: int | None = None
    #: Set when the job's request ended or its client left: it must then pin nothing.
    dropped: bool = False


@dataclass(eq=False)
class _Client:
    """What one adapter (by client id) owns on this server."""

    last_seen: float
    instances: set[int] = field(default_factory=set)
    sessions: set[tuple[bytes, str]] = field(default_factory=set)
    jobs: set[str] = field(default_factory=set)


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    lookups: int = 0
    stores: int = 0
    store_refused: int = 0
    store_duplicates: int = 0
    retrieves: int = 0
    retrieve_misses: int = 0
    prefetch_jobs: int = 0
    prefetched: int = 0
    clients_expired: int = 0


class KVService:
    """The KV-cache server's state and handlers; :meth:`register` puts them on a server.

    ``chunk_size`` is tokens per chunk; ``cpu_buffer_bytes`` bounds the L1 pool (its slots
    are sized by the first registered layout); ``copy_workers`` is the number of copy
    threads; a client silent for ``client_timeout`` seconds is dropped with everything it
    owns. ``cuda_group_bytes`` sizes each of a GPU copy engine's two staging buffers. On a
    host with CUDA the pool is pinned, so that GPU copies run at PCIe speed. Open it
    (``async with``) on the server's loop before serving: that starts the task that drops
    silent clients.
    """

    def __init__(
        self,
        *,
        chunk_size: int = 256,
        cpu_buffer_bytes: int = 1 << 30,
        copy_workers: int = 2,
        client_timeout: float = 8.0,
        lower_tier: LowerTier | None = None,
        cuda_group_bytes: int = 256 << 20,
        loop_probe: bool = False,
    ) -> None:
        if chunk_size < 1:
            raise KVConfigError(f"chunk size must be at least 1 token, not {chunk_size}")
        if cpu_buffer_bytes < 1:
            raise KVConfigError(f"the CPU buffer must be at least 1 byte, not {cpu_buffer_bytes}")
        self.chunk_size = chunk_size
        self.cpu_buffer_bytes = cpu_buffer_bytes
        self.client_timeout = client_timeout
        self.lower_tier = lower_tier
        self.pool: ChunkPool | None = None
        self._copy_workers = copy_workers
        self._copier = concurrent.futures.ThreadPoolExecutor(copy_workers, "kvrpc-kv-copy")
        self._namespaces: dict[tuple[str, int], _Namespace] = {}
        self._namespaces_by_id: dict[bytes, _Namespace] = {}
        self._instances: dict[int, _Instance] = {}
        self._sessions: dict[tuple[bytes, str], _Session] = {}
        self._jobs: dict[str, _Job] = {}
        self._clients: dict[bytes, _Client] = {}
        self._counters = _Counters()
        self.cuda_group_bytes = cuda_group_bytes
        self._engines: dict[int, CopyEngine] = {}
        self._pool_ready: asyncio.Future[ChunkPool] | None = None
        self._loop_probe = loop_probe
        self._last_cuda_handler_seconds = 0.0
        self._probe: LoopLagProbe | None = None
        self._tasks: OwnedTaskGroup | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._saving = 0  # write-through saves in flight, each holding a pin on its slot
        self._save_finished = asyncio.Event()

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
        for definition in protocols.KV_PROTOCOLS:
            server.register(definition, handlers[definition.name])

    async def __aenter__(self) -> KVService:
        self._tasks = OwnedTaskGroup("kvrpc-kv-service")
        self._task_group = await self._tasks.open()
        self._task_group.start_soon(self._expire_silent_clients)
        if self._loop_probe:
            self._probe = LoopLagProbe(asyncio.get_running_loop()).start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop background work, drop every client, release mappings and the tier."""
        tasks, self._tasks, self._task_group = self._tasks, None, None
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.stop()
        if tasks is not None:
            await tasks.close()
        for client_id in list(self._clients):
            self._drop_client(client_id)
        self._copier.shutdown(wait=True, cancel_futures=True)
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            await asyncio.to_thread(engine.close)
        if self.lower_tier is not None:
            await self.lower_tier.aclose()

    def _start(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Run ``fn(*args)`` in the service's task group, from a task or a read callback."""
        if self._tasks is None:
            raise KVError("the KV service is not open: use 'async with service' while serving")
        self._tasks.spawn(fn, *args)

    async def _expire_silent_clients(self) -> None:
        period = max(0.05, min(1.0, self.client_timeout / 4))
        while True:
            await anyio.sleep(period)
            self.expire_clients()

    def expire_clients(self, now: float | None = None) -> int:
        """Drop the clients silent for longer than ``client_timeout``; returns how many."""
        deadline = (time.monotonic() if now is None else now) - self.client_timeout
        silent = [cid for cid, client in self._clients.items() if client.last_seen < deadline]
        for client_id in silent:
            logger.warning(
                "client %s silent for over %.1f s: releasing its KV caches, sessions and jobs",
                client_id.hex()[:8],
                self.client_timeout,
            )
            self._drop_client(client_id)
        self._counters.clients_expired += len(silent)
        return len(silent)

    def _client(self, client_id: bytes) -> _Client:
        if len(client_id) < 8:
            raise KVError("client id must be at least 8 random bytes (the adapters make one)")
        now = time.monotonic()
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = _Client(now)
        else:
            client.last_seen = now
        return client

    def _drop_client(self, client_id: bytes) -> None:
        client = self._clients.pop(client_id, None)
        if client is None:
            return
        for session_key in list(client.sessions):
            self._end_session(session_key)
        for job_id in client.jobs:
            job = self._jobs.pop(job_id, None)
            if job is not None:
                job.dropped = True
        for instance_id in list(client.instances):
            self._forget_instance(instance_id)

    def keepalive(self, client_id: bytes) -> None:
        """``kv.keepalive``: the client is alive."""
        self._client(client_id)

    def goodbye(self, client_id: bytes) -> None:
        """``kv.goodbye``: the client closes; drop what it owns now, without a warning."""
        self._drop_client(client_id)

    # ------------------------------------------------------------------ registration

    def _namespace(self, model_name: str, world_size: int) -> _Namespace | None:
        return self._namespaces.get((model_name, world_size))

    def _create_namespace(
        self, spec: KVCacheRegistration, layout: KVLayout, chunk_nbytes: int
    ) -> _Namespace:
        # The layout is part of the id: a disk tier's files of this model written with
        # another layout (a dtype change, say) must not be found after a restart.
        described = f"{spec.world_size}:{spec.block_size}:{layout.to_wire()}:{spec.model_name}"
        ns_id = hashlib.sha256(described.encode()).digest()[:_NS_ID_SIZE]
        ns = _Namespace(ns_id, spec.model_name, spec.world_size, layout, spec.block_size)
        ns.chunk_nbytes = chunk_nbytes
        ns.suffixes = [ns_id + _WORKER.pack(worker) for worker in range(spec.world_size)]
        self._namespaces[(spec.model_name, spec.world_size)] = ns
        self._namespaces_by_id[ns_id] = ns
        return ns

    async def register_kv_cache(
        self, client_id: bytes, spec: KVCacheRegistration, peer: PeerInfo | None = None
    ) -> int:
        """``kv.register_kv_cache``: check the layout, map the tensors, return an instance id.

        Memory is mapped only for a peer that owns it (see :mod:`kvrpc.kv.server.access`); ``peer``
        is the requesting one, by default the peer of the request being handled.
        """
        owner = memory_owner(spec.mode, current_peer() if peer is None else peer)
        self._client(client_id)
        if spec.worker_id >= spec.world_size:
            raise KVError(f"worker id {spec.worker_id} is not below world size {spec.world_size}")
        layout = spec.layout
        if layout.block_size != spec.block_size:
            raise KVConfigError(
                f"the KV tensors hold blocks of {layout.block_size} tokens, but block size "
                f"{spec.block_size} was given"
            )
        per_chunk = blocks_per_chunk(self.chunk_size, spec.block_size)
        chunk_nbytes = layout.chunk_nbytes(per_chunk)
        self._check_fits(spec, layout, chunk_nbytes)
        engine: CopyEngine | None = None
        if spec.mode == "cuda_ipc":
            engine, layers = await self._open_cuda(spec, layout)
            mappings: list[SharedMapping] = []
        elif spec.cuda_tensors:
            raise KVError("only the cuda_ipc transfer mode registers CUDA tensors")
        elif spec.mode == "shm":
            if len(spec.tensors) != layout.num_layers:
                raise KVConfigError(
                    f"layout has {layout.num_layers} layers but {len(spec.tensors)} tensors "
                    "were registered"
                )
            mappings = await self._in_copier(_open_all, spec.tensors, layout, owner)
            layers = [m.tensor for m in mappings]
        elif spec.tensors:
            raise KVError("the inline transfer mode registers no tensors")
        else:
            mappings, layers = [], []
        # Back on the loop. Another worker may have registered while the mappings opened,
        # so the layout is checked again before anything is recorded.
        try:
            self._check_fits(spec, layout, chunk_nbytes)
            await self._make_pool(chunk_nbytes)
            self._check_fits(spec, layout, chunk_nbytes)
        except BaseException:
            for mapping in mappings:
                mapping.close()
            if engine is not None:
                engine.release(layers)
            raise
        ns = self._namespace(spec.model_name, spec.world_size)
        if ns is None:
            ns = self._create_namespace(spec, layout, chunk_nbytes)
        instance_id = secrets.randbits(62)
        while instance_id in self._instances:
            instance_id = secrets.randbits(62)
        self._instances[instance_id] = _Instance(
            id=instance_id,
            owner=client_id,
            namespace=ns,
            worker_id=spec.worker_id,
            mode=spec.mode,
            layout=layout,
            blocks_per_chunk=per_chunk,
            chunk_nbytes=chunk_nbytes,
            layers=layers,
            mappings=mappings,
            suffix=ns.suffixes[spec.worker_id],
            engine=engine,
        )
        self._client(client_id).instances.add(instance_id)
        logger.info(
            "registered %s worker %d/%d (%s, %s): %d-byte chunks, instance %x",
            spec.model_name,
            spec.worker_id,
            spec.world_size,
            spec.mode,
            layout.describe(),
            chunk_nbytes,
            instance_id,
        )
        return instance_id

    async def _make_pool(self, chunk_nbytes: int) -> ChunkPool:
        """The pool, made once, in the copy executor: pinning gigabytes takes a while."""
        if self._pool_ready is None:
            self._pool_ready = asyncio.get_running_loop().create_future()
            try:
                self.pool = pool = await self._in_copier(
                    functools.partial(
                        ChunkPool,
                        self.cpu_buffer_bytes,
                        chunk_nbytes,
                        pin_memory=torch.cuda.is_available(),
                    )
                )
            except BaseException as exc:
                ready, self._pool_ready = self._pool_ready, None
                ready.set_exception(exc)
                ready.exception()  # retrieved: later registrations try again
                raise
            self._pool_ready.set_result(pool)
        return await asyncio.shield(self._pool_ready)

    async def _open_cuda(
        self, spec: KVCacheRegistration, layout: KVLayout
    ) -> tuple[CopyEngine, list[torch.Tensor]]:
        """Map a cuda_ipc worker's layers in its GPU's copy engine thread."""
        wrappers = spec.cuda_tensors
        if len(wrappers) != layout.num_layers:
            raise KVConfigError(
                f"layout has {layout.num_layers} layers but {len(wrappers)} CUDA tensors "
                "were registered"
            )
        if not torch.cuda.is_available():
            raise CudaUnavailable(
                "this KV server has no CUDA (a CPU build of torch, or no visible GPU), so it "
                "cannot map cuda_ipc KV caches; run it on the workers' host with their GPUs, "
                "or register CPU tensors"
            )
        devices = {w.device_uuid for w in wrappers}
        if len(devices) != 1:
            raise KVConfigError("a worker's KV layers must all be on one GPU")
        device = device_by_uuid(devices.pop())
        assert device.index is not None
        engine = self._engines.get(device.index)
        if engine is None:
            engine = CopyEngine(device, group_bytes=self.cuda_group_bytes)
            self._engines[device.index] = engine
        layers = await asyncio.wrap_future(engine.executor.submit(_open_cuda_all, wrappers, layout))
        return engine, layers

    def _check_fits(self, spec: KVCacheRegistration, layout: KVLayout, chunk_nbytes: int) -> None:
        """Refuse a layout that differs from its model's, or whose chunks outgrow the slots."""
        known = self._namespaces.get((spec.model_name, spec.world_size))
        if known is not None and known.layout is not None and known.layout != layout:
            raise KVConfigError(
                f"model {spec.model_name!r} (world size {spec.world_size}) is registered with "
                f"layout {known.layout.describe()}; this worker's is {layout.describe()}. "
                "Chunks of one model must share a layout: fix the worker, or restart the server"
            )
        if self.pool is not None and chunk_nbytes > self.pool.slot_nbytes:
            raise KVConfigError(
                f"a chunk of this layout takes {chunk_nbytes} bytes, but this server's pool "
                f"has {self.pool.slot_nbytes}-byte slots (set by the first registered model); "
                "run a server per model shape"
            )

    async def unregister_kv_cache(self, client_id: bytes, instance_id: int) -> bool:
        """``kv.unregister_kv_cache``: forget the instance; False if the client had no such."""
        client = self._client(client_id)
        if instance_id not in client.instances:
            return False
        self._forget_instance(instance_id)
        return True

    def _forget_instance(self, instance_id: int) -> None:
        instance = self._instances.pop(instance_id, None)
        if instance is None:
            return
        owner = self._clients.get(instance.owner)
        if owner is not None:
            owner.instances.discard(instance_id)
        still_there = any(
            other.namespace is instance.namespace and other.worker_id == instance.worker_id
            for other in self._instances.values()
        )
        if not still_there:
            # Nobody can retrieve this rank's chunks now: the sessions' pins on them go.
            ns_id = instance.namespace.id
            for (session_ns, _), session in self._sessions.items():
                if session_ns != ns_id:
                    continue
                for slot, worker in list(session.pins.items()):
                    if worker == instance.worker_id:
                        self._release_pin(session, slot)
        # A copy in flight holds its own references to the tensors; the mappings close when
        # the last reference goes. CUDA mappings are dropped in the engine thread once no
        # enqueued copy can touch them (closing one on the loop could stall it).
        instance.closed = True
        layers, instance.layers = instance.layers, []
        if instance.engine is not None:
            instance.engine.release(layers)
            forget_events(list(instance.events))
        for mapping in instance.mappings:
            mapping.close()

    def _instance(self, client_id: bytes, instance_id: int) -> _Instance:
        self._client(client_id)
        instance = self._instances.get(instance_id)
        if instance is None or instance.owner != client_id:
            raise UnknownInstance(
                f"no KV cache is registered under instance id {instance_id:x} for this client; "
                "register_kv_caches first (a server restart or a long silence forgets it)"
            )
        return instance

    # ------------------------------------------------------------------ store / retrieve

    def _key_problem(self, instance: _Instance, keys: KeyBatch) -> str | None:
        ns = instance.namespace
        if keys.model_name != ns.model_name or keys.world_size != ns.world_size:
            return (
                f"keys are for model {keys.model_name!r} world size {keys.world_size}, but "
                f"this instance serves {ns.model_name!r} world size {ns.world_size}"
            )
        if keys.worker_id != instance.worker_id:
            return (
                f"keys carry worker id {keys.worker_id}, this instance is worker "
                f"{instance.worker_id}"
            )
        return None

    def _check_batch(
        self, instance: _Instance, keys: KeyBatch, block_ids: torch.Tensor, *, retrieve: bool
    ) -> list[str | None]:
        """Per key: None if it may be copied, else why not.

        A retrieve's rows may hold ``SKIP_BLOCK`` for blocks the worker holds already.
        """
        n = len(keys)
        problem = self._key_problem(instance, keys)
        if problem is not None:
            return [problem] * n
        if instance.mode == "inline":
            return [None] * n
        per_chunk = instance.blocks_per_chunk
        if block_ids.dtype != torch.int64 or tuple(block_ids.shape) != (n, per_chunk):
            raise KVError(
                f"block ids must be an int64 tensor of shape [{n}, {per_chunk}] (one row of "
                f"blocks_per_chunk ids per key), not {block_ids.dtype} {list(block_ids.shape)}"
            )
        num_blocks = instance.layout.num_blocks
        low = SKIP_BLOCK if retrieve else 0
        bad_rows = ((block_ids < low) | (block_ids >= num_blocks)).any(dim=1).tolist()
        results: list[str | None] = [None] * n
        for i, bad in enumerate(bad_rows):
            if bad:
                row = block_ids[i]
                wrong = row[(row < low) | (row >= num_blocks)][0].item()
                results[i] = f"block id {wrong} is outside this KV cache's 0..{num_blocks - 1}"
        return results

    async def store(
        self,
        client_id: bytes,
        instance_id: int,
        keys: KeyBatch,
        block_ids: torch.Tensor,
        chunks: list[torch.Tensor],
    ) -> list[str | None]:
        """``kv.store``: copy each key's blocks into a pool slot; per key None or why not."""
        instance = self._instance(client_id, instance_id)
        _require_mode(instance, "shm", "inline")
        if instance.mode == "inline":
            _check_inline_chunks(chunks, len(keys), instance.chunk_nbytes)
        elif chunks:
            raise KVError("chunk bytes travel in the message only in the inline mode")
        results, reserved, key_bytes = await self._reserve_batch(instance, keys, block_ids)
        if not reserved:
            return results
        pool = self._require_pool()
        outs = [pool.slot_view(slot)[: instance.chunk_nbytes] for _, slot in reserved]
        if instance.mode == "inline":
            srcs = [chunks[i] for i, _ in reserved]
            works: list[Callable[[], None]] = [functools.partial(_copy_all, outs, srcs)]
        else:
            rows = block_ids[[i for i, _ in reserved]]
            works = self._by_layers(gather_chunks, instance, rows, outs)
        error = await self._copy(works, on_late_finish=lambda: _abort(pool, reserved))
        self._settle_store(instance, results, reserved, key_bytes, error)
        return results

    async def store_cuda(
        self,
        client_id: bytes,
        instance_id: int,
        keys: KeyBatch,
        block_ids: torch.Tensor,
        ready: CudaEventHandle,
    ) -> CudaCopyReply:
        """``kv.store_cuda``: the GPU copy engine gathers the blocks into pinned pool slots.

        Replies once the copy has completed, with the event the engine recorded after it.
        """
        started = time.perf_counter()
        instance = self._instance(client_id, instance_id)
        _require_mode(instance, "cuda_ipc")
        results, reserved, key_bytes = await self._reserve_batch(instance, keys, block_ids)
        if not reserved:
            return CudaCopyReply(errors=results)
        pool = self._require_pool()
        error, done = await self._gpu_copy(
            instance,
            block_ids,
            reserved,
            ready,
            retrieve=False,
            deadline=None,
            on_late_finish=lambda: _abort(pool, reserved),
        )
        self._settle_store(instance, results, reserved, key_bytes, error)
        self._last_cuda_handler_seconds = time.perf_counter() - started
        return CudaCopyReply(errors=results, cuda_event=done)

    async def _reserve_batch(
        self, instance: _Instance, keys: KeyBatch, block_ids: torch.Tensor
    ) -> tuple[list[str | None], list[tuple[int, int]], list[bytes]]:
        """Check a store and reserve a slot per storable key: (results, (key, slot)s, keys)."""
        results = self._check_batch(instance, keys, block_ids, retrieve=False)
        pool = self._require_pool()
        counters = self._counters
        reserved: list[tuple[int, int]] = []  # (key index, slot)
        key_bytes = _keys_of(keys.hashes, instance.suffix)
        for i, key in enumerate(key_bytes):
            if results[i] is not None:
                continue
            slot = pool.reserve(key)
            while slot is Reserve.FULL and self._saving:
                # Slots pinned only while the disk tier copies them free up soon: the tier's
                # write speed throttles stores instead of refusing them.
                self._save_finished.clear()
                await self._save_finished.wait()
                slot = pool.reserve(key)
            if slot is Reserve.EXISTS or slot is Reserve.FILLING:
                counters.store_duplicates += 1
                results[i] = "already stored" if slot is Reserve.EXISTS else "being stored"
            elif slot is Reserve.FULL:
                counters.store_refused += 1
                results[i] = "no free slot: every chunk in the pool is pinned or being written"
            else:
                assert isinstance(slot, int)
                reserved.append((i, slot))
        return results, reserved, key_bytes

    def _settle_store(
        self,
        instance: _Instance,
        results: list[str | None],
        reserved: list[tuple[int, int]],
        key_bytes: list[bytes],
        error: str | None,
    ) -> None:
        """Commit the copied slots (or abort them all) and start the write-through."""
        pool = self._require_pool()
        for i, slot in reserved:
            if error is None:
                pool.commit(slot)
            else:
                pool.abort(slot)
                results[i] = f"copy failed: {error}"
        if error is None:
            self._counters.stores += len(reserved)
            if self.lower_tier is not None:
                stored = [(key_bytes[i], slot) for i, slot in reserved]
                self._write_through(stored, instance.chunk_nbytes)

    async def retrieve(
        self,
        client_id: bytes,
        instance_id: int,
        request_ids: list[str],
        keys: KeyBatch,
        block_ids: torch.Tensor,
    ) -> RetrieveReply:
        """``kv.retrieve``: copy each key's chunk into its blocks (or into the reply)."""
        instance = self._instance(client_id, instance_id)
        _require_mode(instance, "shm", "inline")
        results, found = self._pin_batch(instance, request_ids, keys, block_ids)
        pool = self._require_pool()
        srcs = [pool.slot_view(slot)[: instance.chunk_nbytes] for _, slot in found]
        copies: list[torch.Tensor] = []
        if not found:
            works: list[Callable[[], None]] = []
        elif instance.mode == "inline":
            works = [functools.partial(_clone_into, srcs, copies)]
        else:
            rows = block_ids[[i for i, _ in found]]
            works = self._by_layers(scatter_chunks, instance, rows, srcs)
        error = await self._copy(works, on_late_finish=lambda: _unpin(pool, found))
        self._settle_retrieve(instance, request_ids, results, found, error)
        chunks: list[torch.Tensor] = []
        if instance.mode == "inline":
            by_index = dict(zip((i for i, _ in found), copies, strict=False))
            empty = torch.empty(0, dtype=torch.uint8)
            chunks = [
                by_index.get(i, empty) if results[i] is None else empty for i in range(len(keys))
            ]
        return RetrieveReply(errors=results, chunks=chunks)

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

        With a ``deadline`` (seconds from now), a copy that has not started by then never
        starts, and the keys fail with a reason; one that started finishes and succeeds.
        Either way the reply comes only when no byte can be written any more.
        """
        started = time.perf_counter()
        instance, expires, results, found = self._cuda_retrieve_batch(
            client_id, instance_id, request_ids, keys, block_ids, deadline
        )
        if not found:
            return CudaCopyReply(errors=results)
        pool = self._require_pool()
        error, done = await self._gpu_copy(
            instance,
            block_ids,
            found,
            ready,
            retrieve=True,
            deadline=expires,
            on_late_finish=lambda: _unpin(pool, found),
        )
        self._settle_retrieve(instance, request_ids, results, found, error)
        self._last_cuda_handler_seconds = time.perf_counter() - started
        return CudaCopyReply(errors=results, cuda_event=done)

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
        """``kv.retrieve_cuda_layers``: a retrieve in layer order, answered once enqueued.

        The reply carries one event per layer; the slots stay pinned, and the sessions'
        pins held, until the whole copy has completed (settled in the background).
        """
        started = time.perf_counter()
        instance, expires, results, found = self._cuda_retrieve_batch(
            client_id, instance_id, request_ids, keys, block_ids, deadline
        )
        if not found:
            return LayerCopyReply(errors=results)
        pool = self._require_pool()
        engine = instance.engine
        assert engine is not None

        def release() -> None:
            _unpin(pool, found)

        enqueued = await self._gpu_enqueue(
            instance, block_ids, found, ready, engine.submit_retrieve_layers, expires, release
        )
        if isinstance(enqueued, str):
            self._settle_retrieve(instance, request_ids, results, found, enqueued)
            return LayerCopyReply(errors=results)
        done, handle, layer_events = enqueued.result()
        settle = functools.partial(
            self._settle_retrieve, instance, request_ids, list(results), found
        )
        self._start(self._settle_after_copy, engine, done, handle, settle)
        self._last_cuda_handler_seconds = time.perf_counter() - started
        return LayerCopyReply(errors=results, layer_events=layer_events)

    def _cuda_retrieve_batch(
        self,
        client_id: bytes,
        instance_id: int,
        request_ids: list[str],
        keys: KeyBatch,
        block_ids: torch.Tensor,
        deadline: float | None,
    ) -> tuple[_Instance, float | None, list[str | None], list[tuple[int, int]]]:
        """A ``cuda_ipc`` retrieve's door: (instance, expiry time, results, pinned pairs).

        The deadline counts from here, when the server starts handling the call.
        """
        expires = None if deadline is None else time.monotonic() + deadline
        instance = self._instance(client_id, instance_id)
        _require_mode(instance, "cuda_ipc")
        results, found = self._pin_batch(instance, request_ids, keys, block_ids)
        return instance, expires, results, found

    async def _settle_after_copy(
        self,
        engine: CopyEngine,
        done: Any,
        handle: CudaEventHandle,
        settle: Callable[[str | None], None],
    ) -> None:
        """Settle an answered copy (``settle(None or why)``) once the engine completed it."""
        waited = engine.wait(done, handle)
        try:
            await asyncio.wrap_future(waited)
        except asyncio.CancelledError:  # shutting down: settle when the GPU is done with it
            loop = asyncio.get_running_loop()

            def late(_: object) -> None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(settle, "the server shut down")

            waited.add_done_callback(late)
            raise
        except Exception as exc:
            logger.error("waiting for a GPU copy failed", exc_info=exc)
            settle(f"{type(exc).__name__}: {exc}")
            return
        settle(None)

    def _pin_batch(
        self,
        instance: _Instance,
        request_ids: list[str],
        keys: KeyBatch,
        block_ids: torch.Tensor,
    ) -> tuple[list[str | None], list[tuple[int, int]]]:
        """Check a retrieve and pin each key's slot for the copy: (results, (key, slot)s)."""
        if len(request_ids) != len(keys):
            raise KVError(f"{len(keys)} keys but {len(request_ids)} request ids; give one per key")
        results = self._check_batch(instance, keys, block_ids, retrieve=True)
        pool = self._require_pool()
        found: list[tuple[int, int]] = []
        for i, key in enumerate(_keys_of(keys.hashes, instance.suffix)):
            if results[i] is not None:
                continue
            slot = pool.lookup(key)
            if slot is None:
                self._counters.retrieve_misses += 1
                results[i] = "not in the cache (never stored, or evicted)"
                continue
            pool.pin(slot)  # for the copy: the slot is not evicted or rewritten meanwhile
            pool.touch(slot)
            found.append((i, slot))
        return results, found

    def _settle_retrieve(
        self,
        instance: _Instance,
        request_ids: list[str],
        results: list[str | None],
        found: list[tuple[int, int]],
        error: str | None,
    ) -> None:
        """Unpin the copied slots and release the sessions' pins on what was copied."""
        pool = self._require_pool()
        ns_id = instance.namespace.id
        for i, slot in found:
            pool.unpin(slot)
            if error is not None:
                results[i] = f"copy failed: {error}"
                continue
            session = self._sessions.get((ns_id, request_ids[i]))
            if session is not None and slot in session.pins:
                self._release_pin(session, slot)
        if error is None:
            self._counters.retrieves += len(found)

    async def _worker_ready(
        self,
        instance: _Instance,
        ready_handle: CudaEventHandle,
        deadline: float | None,
        on_late_finish: Callable[[], None],
    ) -> tuple[str | None, Any]:
        """Open the worker's event and poll it: (None, the event) once it completed.

        Polled until it completes, never handed to a stream while pending (see
        :mod:`kvrpc.cuda`); ``(why not, None)`` past the client timeout or the deadline, or
        once the worker left.
        """
        engine = instance.engine
        assert engine is not None
        try:
            ready: Any = ready_handle.open()
        except Exception as exc:
            return f"cannot open the worker's CUDA event: {exc}", None
        instance.events.add(ready_handle)
        if not ready.query():
            limit = self.client_timeout
            if deadline is not None:
                limit = max(0.0, min(limit, deadline - time.monotonic()))
            polled = engine.wait_ready(ready, lambda: instance.closed, limit)
            try:
                ready_in_time = await asyncio.wrap_future(polled)
            except asyncio.CancelledError:
                on_late_finish()  # nothing was enqueued: the slots can go at once
                raise
            if not ready_in_time:
                if deadline is not None and time.monotonic() >= deadline:
                    return f"{_DEADLINE_TEXT} (the worker's event was still pending)", None
                return (
                    f"the worker's CUDA event did not complete within {limit:g} s, or the "
                    "worker left; nothing was copied"
                ), None
        if instance.closed:
            return "the worker unregistered; nothing was copied", None
        return None, ready

    def _transfer(
        self,
        instance: _Instance,
        block_ids: torch.Tensor,
        pairs: list[tuple[int, int]],
        ready: Any,
        deadline: float | None,
    ) -> Transfer:
        """The copy engine's job for ``pairs`` (key index, slot)."""
        pool = self._require_pool()
        return Transfer(
            instance.layers,
            instance.layout,
            block_ids[[i for i, _ in pairs]],
            pool.buffer,
            [slot for _, slot in pairs],
            pool.slot_nbytes,
            ready,
            deadline,
        )

    async def _gpu_enqueue(
        self,
        instance: _Instance,
        block_ids: torch.Tensor,
        pairs: list[tuple[int, int]],
        ready_handle: CudaEventHandle,
        submit: Callable[[Transfer], concurrent.futures.Future[Any]],
        deadline: float | None,
        on_late_finish: Callable[[], None],
    ) -> str | concurrent.futures.Future[Any]:
        """Wait for the worker's event, then hand ``pairs`` (key index, slot) to ``submit``.

        Returns the engine's future, resolved, once the copy is enqueued, or why not once
        it is certain never to run. If the handler is cancelled, the slots are released by
        ``on_late_finish`` once no copy can touch them.
        """
        engine = instance.engine
        assert engine is not None
        error, ready = await self._worker_ready(instance, ready_handle, deadline, on_late_finish)
        if error is not None:
            return error
        enqueued = submit(self._transfer(instance, block_ids, pairs, ready, deadline))
        try:
            await asyncio.wrap_future(enqueued)
        except asyncio.CancelledError:
            _after_engine(enqueued, engine, asyncio.get_running_loop(), on_late_finish)
            raise
        except DeadlinePassed:
            return _DEADLINE_TEXT
        except Exception as exc:
            logger.error("a GPU copy failed", exc_info=exc)
            return f"{type(exc).__name__}: {exc}"
        return enqueued

    async def _gpu_copy(
        self,
        instance: _Instance,
        block_ids: torch.Tensor,
        pairs: list[tuple[int, int]],
        ready_handle: CudaEventHandle,
        *,
        retrieve: bool,
        deadline: float | None,
        on_late_finish: Callable[[], None],
    ) -> tuple[str | None, CudaEventHandle | None]:
        """Copy ``pairs`` (key index, slot) through the instance's copy engine.

        Returns (None or why not, the completion event), once the copy has completed, or
        once it is certain never to run.
        """
        engine = instance.engine
        assert engine is not None
        submit = engine.submit_retrieve if retrieve else engine.submit_store
        enqueued = await self._gpu_enqueue(
            instance, block_ids, pairs, ready_handle, submit, deadline, on_late_finish
        )
        if isinstance(enqueued, str):
            return enqueued, None
        done, handle = enqueued.result()
        try:
            await asyncio.wrap_future(engine.wait(done, handle))
        except asyncio.CancelledError:
            _after_engine(enqueued, engine, asyncio.get_running_loop(), on_late_finish)
            raise
        except Exception as exc:
            logger.error("a GPU copy failed", exc_info=exc)
            return f"{type(exc).__name__}: {exc}", None
        return None, handle

    async def _copy(
        self, works: list[Callable[[], None]], *, on_late_finish: Callable[[], None]
    ) -> str | None:
        """Run ``works`` in the copy executor at once; None if all succeeded, else an error.

        Waits for every part even after one fails, since the others write the same slots.
        If the handler is cancelled (server shutdown), running copies cannot be stopped: the
        slots they use are released by ``on_late_finish`` once the last one has finished.
        """
        futures = [self._copier.submit(work) for work in works]
        try:
            outcomes = await asyncio.gather(
                *(asyncio.wrap_future(f) for f in futures), return_exceptions=True
            )
        except asyncio.CancelledError:
            loop = asyncio.get_running_loop()
            left = [len(futures)]

            def one_finished(_: object) -> None:
                left[0] -= 1
                if left[0] == 0:
                    loop.call_soon_threadsafe(on_late_finish)

            for future in futures:
                future.add_done_callback(one_finished)
            raise
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                logger.error("a KV copy failed", exc_info=outcome)
                return f"{type(outcome).__name__}: {outcome}"
        return None

    def _by_layers(
        self,
        fn: Callable[..., None],
        instance: _Instance,
        rows: torch.Tensor,
        slots: list[torch.Tensor],
    ) -> list[Callable[[], None]]:
        """``fn`` over the batch, split into layer ranges that copy threads run side by side.

        Bytes ``[a * L, b * L)`` of a slot (``L`` = one layer's part) are a whole slot for
        ``layers[a:b]``, so the parts never touch the same bytes.
        """
        layout, layers = instance.layout, list(instance.layers)
        per_layer = layout.layer_chunk_nbytes(instance.blocks_per_chunk)
        parts = max(1, min(self._copy_workers, os.cpu_count() or 1, layout.num_layers))
        bounds = [layout.num_layers * i // parts for i in range(parts + 1)]
        return [
            functools.partial(
                fn,
                layers[a:b],
                dataclasses.replace(layout, num_layers=b - a),
                rows,
                [slot[a * per_layer : b * per_layer] for slot in slots],
            )
            for a, b in itertools.pairwise(bounds)
        ]

    async def _in_copier(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._copier, functools.partial(fn, *args))

    def _write_through(self, stored: list[tuple[bytes, int]], nbytes: int) -> None:
        """Copy a store's chunks ``(key, slot)`` to the lower tier, in the background.

        The slots stay pinned while the tier reads them and are unpinned together, in the
        order they were stored, so the LRU order does not depend on which write ends first.
        """
        tier, pool = self.lower_tier, self.pool
        if tier is None or pool is None or self._task_group is None:
            return
        todo = [(key, slot) for key, slot in stored if not tier.contains(key)]
        if not todo:
            return
        slots = [slot for _, slot in todo]
        pool.pin_many(slots)
        self._saving += len(todo)

        async def save() -> None:
            try:
                assert tier is not None and pool is not None
                views = [(key, pool.slot_view(slot)[:nbytes]) for key, slot in todo]
                await asyncio.gather(*(tier.save(key, view) for key, view in views))
            finally:
                pool.unpin_many(slots)
                self._saving -= len(todo)
                self._save_finished.set()

        self._start(save)

    def _require_pool(self) -> ChunkPool:
        if self.pool is None:  # unreachable with a registered instance; kept for clarity
            raise KVError("no KV cache has been registered on this server yet")
        return self.pool

    # ------------------------------------------------------------------ lookup / sessions

    def lookup(self, client_id: bytes, request_id: str, keys: KeyBatch) -> int | str:
        """``kv.lookup``: leading chunks present on every rank, pinned for ``request_id``.

        Replaces the pins of an earlier lookup for the same request. Answers a prefetch job
        id instead when some of those chunks must first be loaded from the lower tier.
        """
        self._client(client_id)
        if keys.worker_id is not None:
            raise KVError("lookup keys carry no worker id: use CacheKey.no_worker_id_version()")
        counters = self._counters
        counters.lookups += 1
        n = len(keys)
        ns = self._namespace(keys.model_name, keys.world_size)
        pool = self.pool
        if ns is None or pool is None:
            counters.misses += n
            return 0
        session_key = (ns.id, request_id)
        session = self._open_session(client_id, session_key)
        tier = self.lower_tier
        hashes = keys.hashes
        suffixes = ns.suffixes
        find, pins = pool.lookup, session.pins  # a fresh session: no pins yet
        chunk_hashes = [hashes[i : i + HASH_SIZE] for i in range(0, n * HASH_SIZE, HASH_SIZE)]
        # The hot path of a scheduler's lookup: rank by rank, each scan stopping at the first
        # chunk that rank lacks, so a rank never looks beyond where an earlier one stopped.
        matched = n
        per_rank: list[list[int]] = []
        for suffix in suffixes:
            slots: list[int] = []
            for chunk_hash in chunk_hashes[:matched]:
                slot = find(chunk_hash + suffix)
                if slot is None:
                    break
                slots.append(slot)
            matched = len(slots)
            per_rank.append(slots)
        to_pin: list[int] = []
        for worker, slots in enumerate(per_rank):
            del slots[matched:]
            pins.update(zip(slots, itertools.repeat(worker)))
            to_pin += slots
        to_load: list[bytes] = []
        if tier is not None:  # past what every rank holds in memory: what the tier can add
            for chunk_hash in chunk_hashes[matched:]:
                found = [find(chunk_hash + suffix) for suffix in suffixes]
                missing = [chunk_hash + suffixes[w] for w, slot in enumerate(found) if slot is None]
                if not all(tier.contains(key) for key in missing):
                    break
                to_load.extend(missing)
                for worker, slot in enumerate(found):
                    if slot is not None:
                        pins[slot] = worker
                        to_pin.append(slot)
                matched += 1
        pool.pin_many(to_pin)
        if not to_load:
            counters.hits += matched
            counters.misses += n - matched
            return matched
        prefix = hashes[: matched * HASH_SIZE]
        return self._start_prefetch(client_id, session_key, prefix, to_load, n)

    def _start_prefetch(
        self,
        client_id: bytes,
        session_key: tuple[bytes, str],
        hashes: bytes,
        to_load: list[bytes],
        total: int,
    ) -> str:
        job_id = secrets.token_urlsafe(16)
        job = _Job(client_id, session_key)
        self._jobs[job_id] = job
        self._clients[client_id].jobs.add(job_id)
        self._sessions[session_key].jobs.add(job_id)
        self._counters.prefetch_jobs += 1
        self._start(self._prefetch, job, hashes, to_load, total)
        return job_id

    async def _prefetch(self, job: _Job, hashes: bytes, to_load: list[bytes], total: int) -> None:
        """Load ``to_load`` from the lower tier, then count and pin the leading chunks.

        Each loaded chunk is pinned for the session at once, so that loading the next one
        cannot evict it.
        """
        tier, pool = self.lower_tier, self.pool
        ns = self._namespaces_by_id.get(job.session[0])
        assert tier is not None and pool is not None and ns is not None
        for key in to_load:
            if job.dropped:  # the request is over: load nothing more for it
                break
            slot = pool.reserve(key)
            if not isinstance(slot, int):  # present after all, or no room: counted below
                continue
            try:
                ok = await tier.load(key, pool.slot_view(slot)[: ns.chunk_nbytes])
            except Exception:
                logger.exception("prefetch of a chunk from the lower tier failed")
                ok = False
            if not ok:
                pool.abort(slot)
                continue
            pool.commit(slot)
            self._counters.prefetched += 1
            session = None if job.dropped else self._sessions.get(job.session)
            if session is not None:
                self._pin(session, slot, _WORKER.unpack_from(key, HASH_SIZE + _NS_ID_SIZE)[0])
        matched = 0
        session = None if job.dropped else self._sessions.get(job.session)
        if session is not None:
            for start in range(0, len(hashes), HASH_SIZE):
                chunk_hash = hashes[start : start + HASH_SIZE]
                found = [pool.lookup(chunk_hash + suffix) for suffix in ns.suffixes]
                present = [slot for slot in found if slot is not None]
                if len(present) != len(found):
                    break
                for worker, slot in enumerate(present):
                    self._pin(session, slot, worker)
                matched += 1
        self._counters.hits += matched
        self._counters.misses += total - matched
        job.result = matched

    def query_prefetch_status(self, client_id: bytes, job_id: str) -> int | None:
        """``kv.query_prefetch_status``: None while running, then the count, exactly once."""
        client = self._client(client_id)
        job = self._jobs.get(job_id)
        if job is None or job.owner != client_id:
            raise UnknownJob(
                "no prefetch job with that id for this client: it was never given to this "
                "client, or its result was already taken"
            )
        if job.result is None:
            return None
        del self._jobs[job_id]
        client.jobs.discard(job_id)
        return job.result

    def end_session(
        self, client_id: bytes, model_name: str, world_size: int, request_id: str
    ) -> int:
        """``kv.end_session``: release the request's pins; returns how many were released."""
        self._client(client_id)
        ns = self._namespace(model_name, world_size)
        if ns is None:
            return 0
        return self._end_session((ns.id, request_id))

    def release_pins(self, client_id: bytes, request_id: str, keys: KeyBatch) -> int:
        """``kv.release_pins``: unpin these chunks of the request's session, on every rank.

        The session stays open for the rest of its pins. Chunks the session never pinned are
        ignored, so releasing twice releases once. Returns how many pins were released.
        """
        self._client(client_id)
        if keys.worker_id is not None:
            raise KVError("release_pins keys carry no worker id, as a lookup's do")
        ns = self._namespace(keys.model_name, keys.world_size)
        pool = self.pool
        if ns is None or pool is None:
            return 0
        session = self._sessions.get((ns.id, request_id))
        if session is None or session.owner != client_id:
            return 0
        released = 0
        hashes = keys.hashes
        for start in range(0, len(hashes), HASH_SIZE):
            chunk_hash = hashes[start : start + HASH_SIZE]
            for suffix in ns.suffixes:
                slot = pool.lookup(chunk_hash + suffix)
                if slot is not None and slot in session.pins:
                    self._release_pin(session, slot)
                    released += 1
        return released

    def _open_session(self, client_id: bytes, key: tuple[bytes, str]) -> _Session:
        self._end_session(key)
        session = self._sessions[key] = _Session(client_id)
        self._clients[client_id].sessions.add(key)
        return session

    def _end_session(self, key: tuple[bytes, str]) -> int:
        session = self._sessions.pop(key, None)
        if session is None:
            return 0
        owner = self._clients.get(session.owner)
        if owner is not None:
            owner.sessions.discard(key)
        for job_id in session.jobs:  # nobody may ask for them once the request is over
            job = self._jobs.pop(job_id, None)
            if job is None:
                continue
            job.dropped = True
            job_owner = self._clients.get(job.owner)
            if job_owner is not None:
                job_owner.jobs.discard(job_id)
        pins = session.pins
        released = len(pins)
        if self.pool is not None:
            self.pool.unpin_many(pins)
        pins.clear()
        return released

    def _pin(self, session: _Session, slot: int, worker: int) -> None:
        # No touch: a pinned slot is out of the LRU order, and its last unpin makes it the
        # most recently used.
        assert self.pool is not None
        if slot not in session.pins:
            self.pool.pin(slot)
            session.pins[slot] = worker

    def _release_pin(self, session: _Session, slot: int) -> None:
        if session.pins.pop(slot, None) is not None and self.pool is not None:
            self.pool.unpin(slot)

    # ------------------------------------------------------------------ stats / clear

    def stats(self) -> dict[str, int]:
        """``kv.stats``: counters and the pool's occupancy."""
        counters = self._counters
        pool = self.pool
        report = {
            "hits": counters.hits,
            "misses": counters.misses,
            "lookups": counters.lookups,
            "stores": counters.stores,
            "store_refused": counters.store_refused,
            "store_duplicates": counters.store_duplicates,
            "retrieves": counters.retrieves,
            "retrieve_misses": counters.retrieve_misses,
            "evictions": pool.evictions if pool is not None else 0,
            "chunks": pool.ready_slots if pool is not None else 0,
            "bytes_used": pool.bytes_used if pool is not None else 0,
            "bytes_free": pool.bytes_free if pool is not None else self.cpu_buffer_bytes,
            "slot_bytes": pool.slot_nbytes if pool is not None else 0,
            "pinned_chunks": pool.pinned_slots if pool is not None else 0,
            "sessions": len(self._sessions),
            "clients": len(self._clients),
            "clients_expired": counters.clients_expired,
            "instances": len(self._instances),
            "prefetch_jobs": counters.prefetch_jobs,
            "prefetch_jobs_open": len(self._jobs),
            "prefetched": counters.prefetched,
            "chunk_size": self.chunk_size,
        }
        if self.lower_tier is not None:
            for name, value in self.lower_tier.stats().items():
                report[f"tier_{name}"] = value
        if self._engines:
            engines = list(self._engines.values())
            report["cuda_batches"] = sum(e.batches for e in engines)
            report["cuda_bytes_moved"] = sum(e.bytes_moved for e in engines)
            report["cuda_staging_bytes"] = sum(e.staging_bytes() for e in engines)
            report["cuda_last_batch_gpu_us"] = round(max(e.last_gpu_seconds for e in engines) * 1e6)
            # The last kv.store_cuda / kv.retrieve_cuda handler, from its start to its reply.
            report["cuda_last_handler_us"] = round(self._last_cuda_handler_seconds * 1e6)
            # Everything this process allocated on its GPUs: the engines' buffers and
            # temporaries (the workers' KV caches are mapped, not allocated here).
            report["cuda_peak_allocated_bytes"] = sum(
                int(torch.cuda.max_memory_allocated(e.device)) for e in engines
            )
        if self._probe is not None:
            report.update(self._probe.take())  # since the last kv.stats
        return report

    def clear(self) -> int:
        """``kv.clear``: drop every unpinned stored chunk; returns how many were dropped."""
        return self.pool.clear() if self.pool is not None else 0


# ---------------------------------------------------------------------- copy work (threads)


def _keys_of(hashes: bytes, suffix: bytes) -> list[bytes]:
    return [hashes[i : i + HASH_SIZE] + suffix for i in range(0, len(hashes), HASH_SIZE)]


def _check_inline_chunks(chunks: Sequence[torch.Tensor], n: int, nbytes: int) -> None:
    if len(chunks) != n:
        raise KVError(f"{n} keys but {len(chunks)} chunks of bytes; give one per key")
    for i, chunk in enumerate(chunks):
        if chunk.dtype != torch.uint8 or chunk.dim() != 1 or chunk.numel() != nbytes:
            raise KVError(
                f"chunk {i} must be a 1-D uint8 tensor of {nbytes} bytes, not "
                f"{chunk.dtype} {list(chunk.shape)}"
            )


def _open_all(
    refs: list[SharedTensorRef], layout: KVLayout, owner: MemoryOwner | None
) -> list[SharedMapping]:
    mappings: list[SharedMapping] = []
    try:
        for index, ref in enumerate(refs):
            mapping = open_shared(ref, owner)
            mappings.append(mapping)
            _check_matches(layout, index, mapping.tensor, "tensor")
    except BaseException:
        for mapping in mappings:
            mapping.close()
        raise
    return mappings


_DEADLINE_TEXT = "the deadline passed before the copy started; no block was written"


def _require_mode(instance: _Instance, *modes: str) -> None:
    if instance.mode not in modes:
        which = (
            "kv.store_cuda / kv.retrieve_cuda"
            if instance.mode == "cuda_ipc"
            else ("kv.store / kv.retrieve")
        )
        raise KVError(
            f"this KV cache was registered in the {instance.mode} transfer mode: use {which}"
        )


def _after_engine(
    enqueued: concurrent.futures.Future[Any],
    engine: CopyEngine,
    loop: asyncio.AbstractEventLoop,
    then: Callable[[], None],
) -> None:
    """Call ``then`` on ``loop`` once an abandoned engine job can no longer touch memory."""

    def finish(_: object = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nothing to release into
            loop.call_soon_threadsafe(then)

    def enqueued_done(future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            finish()  # nothing was enqueued
        else:
            engine.wait(future.result()[0]).add_done_callback(finish)

    enqueued.add_done_callback(enqueued_done)


def _open_cuda_all(wrappers: list[CudaIPCWrapper], layout: KVLayout) -> list[torch.Tensor]:
    layers = [wrapper.to_tensor() for wrapper in wrappers]
    for index, tensor in enumerate(layers):
        _check_matches(layout, index, tensor, "CUDA tensor")
    return layers


def _check_matches(layout: KVLayout, index: int, tensor: torch.Tensor, what: str) -> None:
    """Refuse a mapped layer whose shape or dtype is not the registered layout's."""
    if tuple(tensor.shape) != layout.shape or tensor.dtype != layout.torch_dtype:
        raise KVConfigError(
            f"{what} {index} is {tensor.dtype} {list(tensor.shape)}, but the layout "
            f"says {layout.torch_dtype} {list(layout.shape)}"
        )


def _copy_all(outs: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    for out, src in zip(outs, srcs, strict=True):
        out.copy_(src)


def _clone_into(srcs: list[torch.Tensor], copies: list[torch.Tensor]) -> None:
    # The reply must not alias pool memory: the slot is reused once it is unpinned.
    copies.extend(src.clone() for src in srcs)


def _abort(pool: ChunkPool, reserved: list[tuple[int, int]]) -> None:
    for _, slot in reserved:
        pool.abort(slot)


def _unpin(pool: ChunkPool, found: list[tuple[int, int]]) -> None:
    pool.unpin_many(slot for _, slot in found)
