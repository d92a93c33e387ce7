"""The I/O shell's CPU half: shared-memory mappings and byte copies in the copy executor.

A store or retrieve in the ``shm`` mode gathers or scatters a worker's blocks straight from
its shared memory, split by layer ranges across the executor's threads; in the ``inline``
mode the chunk bytes travel in the messages and are copied whole. The state core decided
which slots a copy touches and keeps them reserved or pinned while it runs, so the loop and
a copy thread never race on the same bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from kvrpc.errors import KVConfigError, KVError
from kvrpc.kv.layout import KVLayout
from kvrpc.kv.outcomes import KeyFailure, copy_failed
from kvrpc.kv.shm import MemoryOwner, SharedMapping, SharedTensorRef, open_shared

__all__ = ["CpuCopies", "check_inline_chunks", "clone_into", "copy_all"]

logger = logging.getLogger("kvrpc.kv")

T = TypeVar("T")


class CpuCopies:
    """The copy executor: ``workers`` threads that copy bytes and open mappings."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor = concurrent.futures.ThreadPoolExecutor(workers, "kvrpc-kv-copy")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the copy executor (slow set-up work: pinning, mapping)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    async def open_shared(
        self, refs: list[SharedTensorRef], layout: KVLayout, owner: MemoryOwner | None
    ) -> list[SharedMapping]:
        """Map a worker's shared layers, each checked against ``layout``."""
        return await self.call(_open_all, refs, layout, owner)

    async def run(
        self, works: list[Callable[[], None]], *, on_late_finish: Callable[[], None]
    ) -> KeyFailure | None:
        """Run ``works`` side by side; None if all succeeded, else the first error's failure.

        Waits for every part even after one fails, since the others write the same slots.
        If the handler is cancelled (server shutdown), running copies cannot be stopped: the
        slots they use are released by ``on_late_finish`` once the last one has finished.
        """
        futures = [self.executor.submit(work) for work in works]
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
                return copy_failed(outcome)
        return None

    def by_layers(
        self,
        fn: Callable[..., None],
        layers: Sequence[torch.Tensor],
        layout: KVLayout,
        blocks_per_chunk: int,
        rows: torch.Tensor,
        slots: list[torch.Tensor],
    ) -> list[Callable[[], None]]:
        """``fn`` over the batch, split into layer ranges that copy threads run side by side.

        Bytes ``[a * L, b * L)`` of a slot (``L`` = one layer's part) are a whole slot for
        ``layers[a:b]``, so the parts never touch the same bytes.
        """
        per_layer = layout.layer_chunk_nbytes(blocks_per_chunk)
        parts = max(1, min(self.workers, os.cpu_count() or 1, layout.num_layers))
        bounds = [layout.num_layers * i // parts for i in range(parts + 1)]
        return [
            functools.partial(
                fn,
                list(layers[a:b]),
                dataclasses.replace(layout, num_layers=b - a),
                rows,
                [slot[a * per_layer : b * per_layer] for slot in slots],
            )
            for a, b in itertools.pairwise(bounds)
        ]

    def close(self) -> None:
        """Stop the threads once running copies end; queued ones never start."""
        self.executor.shutdown(wait=True, cancel_futures=True)


def check_inline_chunks(chunks: Sequence[torch.Tensor], n: int, nbytes: int) -> None:
    """Refuse inline chunk bytes that are not ``n`` 1-D uint8 tensors of ``nbytes`` each."""
    if len(chunks) != n:
        raise KVError(f"{n} keys but {len(chunks)} chunks of bytes; give one per key")
    for i, chunk in enumerate(chunks):
        if chunk.dtype != torch.uint8 or chunk.dim() != 1 or chunk.numel() != nbytes:
            raise KVError(
                f"chunk {i} must be a 1-D uint8 tensor of {nbytes} bytes, not "
                f"{chunk.dtype} {list(chunk.shape)}"
            )


def copy_all(outs: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """Copy each source into its output (an inline store's chunks into their slots)."""
    for out, src in zip(outs, srcs, strict=True):
        out.copy_(src)


def clone_into(srcs: list[torch.Tensor], copies: list[torch.Tensor]) -> None:
    """Append a copy of each source (an inline retrieve's reply) to ``copies``."""
    # The reply must not alias pool memory: the slot is reused once it is unpinned.
    copies.extend(src.clone() for src in srcs)


def _open_all(
    refs: list[SharedTensorRef], layout: KVLayout, owner: MemoryOwner | None
) -> list[SharedMapping]:
    mappings: list[SharedMapping] = []
    try:
        for index, ref in enumerate(refs):
            mapping = open_shared(ref, owner)
            mappings.append(mapping)
            tensor = mapping.tensor
            if tuple(tensor.shape) != layout.shape or tensor.dtype != layout.torch_dtype:
                raise KVConfigError(
                    f"tensor {index} is {tensor.dtype} {list(tensor.shape)}, but the layout "
                    f"says {layout.torch_dtype} {list(layout.shape)}"
                )
    except BaseException:
        for mapping in mappings:
            mapping.close()
        raise
    return mappings
