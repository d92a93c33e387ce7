"""The I/O shell's record of each instance's mapped memory, and the pool it copies into.

The state core knows an instance by its id and layout; what the server mapped for it (the
worker's shared-memory layers, or its CUDA layers and the copy engine that serves them)
lives here, beside the pool's buffer, so that the copy jobs are built in one place.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import torch

from kvrpc.kv.protocols import KVCacheRegistration
from kvrpc.kv.server.copy_engine import Transfer
from kvrpc.kv.server.cpu_copies import CpuCopies
from kvrpc.kv.server.gpu_copies import CudaCache, GpuCopies
from kvrpc.kv.server.pool import ChunkPool
from kvrpc.kv.server.records import Instance
from kvrpc.kv.server.state import KVState
from kvrpc.kv.shm import MemoryOwner, SharedMapping, remove_if_orphaned

__all__ = ["Mapped", "Mappings"]

#: What one instance mapped: shared-memory layers (none inline), or a cuda_ipc worker's.
Mapped = list[SharedMapping] | CudaCache


class Mappings:
    """Instances' mapped memory by id, and the pool (made once, ``cpu_buffer_bytes``)."""

    def __init__(
        self, state: KVState, cpu: CpuCopies, gpu: GpuCopies, cpu_buffer_bytes: int
    ) -> None:
        self.state = state
        self.cpu = cpu
        self.gpu = gpu
        self.cpu_buffer_bytes = cpu_buffer_bytes
        self._mapped: dict[int, Mapped] = {}
        #: Shared-memory files of dead workers removed when their instances were dropped.
        self.orphans_removed = 0
        self._pool_ready: asyncio.Future[ChunkPool] | None = None

    async def open(
        self,
        spec: KVCacheRegistration,
        owner: MemoryOwner | None,
        blocks_per_chunk: int,
        recheck: Callable[[], object],
    ) -> Mapped:
        """Map a registering worker's memory, make the pool if need be, warm its engine.

        ``recheck`` runs once the tensors are mapped (another worker may have registered
        meanwhile), before the first registration's chunk size sizes the pool. On any
        failure the mappings are closed again.
        """
        mapped: Mapped = []
        try:
            if spec.mode == "cuda_ipc":
                mapped = await self.gpu.open(spec.cuda_tensors, spec.layout, spec.ready_events)
            elif spec.mode == "shm":
                mapped = await self.cpu.open_shared(spec.tensors, spec.layout, owner)
            recheck()
            pool = await self._make_pool(spec.layout.chunk_nbytes(blocks_per_chunk))
            if isinstance(mapped, CudaCache):
                await self.gpu.warm(mapped, blocks_per_chunk, pool)
        except BaseException:
            self.release(mapped)
            raise
        return mapped

    def keep(self, instance_id: int, mapped: Mapped) -> None:
        """Record what ``instance_id`` mapped, for its copies and its close."""
        self._mapped[instance_id] = mapped

    def release(self, mapped: Mapped) -> None:
        """Close mappings nobody will copy through any more."""
        if isinstance(mapped, CudaCache):
            self.gpu.close(mapped)  # in the engine thread, once no enqueued copy needs them
        else:
            # A copy in flight holds its own references to the tensors: the mappings close
            # when the last reference goes.
            for mapping in mapped:
                mapping.close()

    def close(self, instances: list[Instance]) -> None:
        """Release the memory the state's forgotten ``instances`` had mapped.

        A killed worker cannot remove its shared-memory files: those whose process is gone
        are removed here (see :func:`~kvrpc.kv.shm.remove_if_orphaned`), so that /dev/shm
        does not fill up with dead workers' KV caches. A live worker's are left to it.
        """
        for instance in instances:
            mapped = self._mapped.pop(instance.id, None)
            if mapped is None:
                continue
            if not isinstance(mapped, CudaCache):
                self.orphans_removed += sum(map(remove_if_orphaned, mapped))
            self.release(mapped)

    def cuda(self, instance: Instance) -> CudaCache:
        """A cuda_ipc instance's mapped layers and engine."""
        mapped = self._mapped[instance.id]
        assert isinstance(mapped, CudaCache)
        return mapped

    def shared_layers(self, instance: Instance) -> list[torch.Tensor]:
        """An shm instance's mapped layers."""
        mapped = self._mapped[instance.id]
        assert isinstance(mapped, list)
        return [mapping.tensor for mapping in mapped]

    def transfer(
        self,
        cache: CudaCache,
        block_ids: torch.Tensor,
        pairs: list[tuple[int, int]],
        deadline: float | None,
        ready: Any,
    ) -> Transfer:
        """The copy engine's job for ``pairs`` (key index, slot), after the worker's event."""
        pool = self._pool()
        rows = _rows_of(block_ids, [i for i, _ in pairs])
        slots = [slot for _, slot in pairs]
        return Transfer(
            cache.layers, cache.layout, rows, pool.buffer, slots, pool.slot_nbytes, ready, deadline
        )

    def slots(self, pairs: list[tuple[int, int]], nbytes: int) -> list[torch.Tensor]:
        """The first ``nbytes`` of each pair's pool slot."""
        pool = self._pool()
        return [pool.slot_view(slot)[:nbytes] for _, slot in pairs]

    def by_layers(
        self,
        fn: Callable[..., None],
        instance: Instance,
        pairs: list[tuple[int, int]],
        block_ids: torch.Tensor,
        slots: list[torch.Tensor],
    ) -> list[Callable[[], None]]:
        """An shm instance's copy ``fn`` over ``pairs``, split for the copy threads."""
        mapped = self._mapped[instance.id]
        assert isinstance(mapped, list)
        layers = [mapping.tensor for mapping in mapped]
        rows = _rows_of(block_ids, [i for i, _ in pairs])
        per_chunk = instance.blocks_per_chunk
        return self.cpu.by_layers(fn, layers, instance.layout, per_chunk, rows, slots)

    async def _make_pool(self, chunk_nbytes: int) -> ChunkPool:
        """The pool, made once, in the copy executor: pinning gigabytes takes a while."""
        if self._pool_ready is None:
            self._pool_ready = asyncio.get_running_loop().create_future()
            try:
                pool = await self.cpu.call(
                    functools.partial(_new_pool, self.cpu_buffer_bytes, chunk_nbytes)
                )
            except BaseException as exc:
                ready, self._pool_ready = self._pool_ready, None
                ready.set_exception(exc)
                ready.exception()  # retrieved: later registrations try again
                raise
            self.state.set_pool(pool)
            self._pool_ready.set_result(pool)
        return await asyncio.shield(self._pool_ready)

    def _pool(self) -> ChunkPool:
        pool = self.state.pool
        assert pool is not None  # an instance exists, so the pool does
        return pool


def _new_pool(capacity: int, chunk_nbytes: int) -> ChunkPool:
    # Off the loop: the first torch.cuda.is_available() of a process starts CUDA's driver.
    return ChunkPool(capacity, chunk_nbytes, pin_memory=torch.cuda.is_available())


def _rows_of(block_ids: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """The rows of ``block_ids`` at ``indices``; the tensor itself when that is every row."""
    if len(indices) == len(block_ids) and indices == list(range(len(indices))):
        return block_ids  # the common batch, every key copied: no gather, no new tensor
    return block_ids[indices]
