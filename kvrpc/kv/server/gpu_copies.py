"""The I/O shell's GPU half: copy engines, a cuda_ipc worker's mapped layers, its copies.

One :class:`~kvrpc.kv.server.copy_engine.CopyEngine` per GPU, made on the first registration
that names it. Every CUDA call that can take long (opening IPC memory or events, waiting on
events) runs in an engine's threads; the loop only awaits futures. The state core decided
which slots a copy touches; this module runs the copy and says how it ended (None or why
not), never changing the state itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvrpc.cuda import (
    CudaEventHandle,
    device_by_uuid,
    device_uuid,
    forget_events,
    opened_event,
    poll_event,
)
from kvrpc.errors import CudaUnavailable, KVConfigError
from kvrpc.kv.cuda_ipc import CudaIPCWrapper
from kvrpc.kv.layout import KVLayout
from kvrpc.kv.outcomes import DEADLINE_PASSED, WORKER_GONE, KeyFailure, KeyStatus, copy_failed
from kvrpc.kv.server.copy_engine import (
    CopyEngine,
    DeadlinePassed,
    LayerAnnouncement,
    StoreCopies,
    Transfer,
)
from kvrpc.kv.server.pool import ChunkPool

__all__ = ["CudaCache", "GpuCopies"]

logger = logging.getLogger("kvrpc.kv")


@dataclass(eq=False)
class CudaCache:
    """A cuda_ipc worker's layers as this server mapped them, and the events it opened."""

    engine: CopyEngine
    layers: list[torch.Tensor]
    layout: KVLayout
    events: set[CudaEventHandle] = field(default_factory=set)
    closed: bool = False


@dataclass(eq=False)
class _Answered:
    """A copy already answered, until it is settled: once, by whoever notices it first."""

    done: Any  # the engine's completion event
    settle: Callable[[KeyFailure | None], None]
    settled: bool = False
    #: What else the background settle waits for after ``done`` (a DMA store's checksum
    #: folds); a handler that finds ``done`` completed settles without waiting for it.
    after: concurrent.futures.Future[None] | None = None

    def finish(self, error: KeyFailure | None) -> None:
        if not self.settled:
            self.settled = True
            self.settle(error)


class GpuCopies:
    """The server's copy engines and the GPU copies of its cuda_ipc instances.

    ``group_bytes`` sizes each of an engine's staging buffers; a worker's event that has not
    completed within ``client_timeout`` seconds fails the copy (a live worker records it
    just before asking); ``spawn(fn, *args)`` runs a background coroutine in the service's
    task group (the settles of answered copies); ``store_copies`` is each engine's store
    path (:class:`~kvrpc.kv.server.copy_engine.StoreCopies`).
    """

    def __init__(
        self,
        group_bytes: int,
        client_timeout: float,
        spawn: Callable[..., None],
        store_copies: StoreCopies | str = StoreCopies.KERNELS,
    ) -> None:
        self.store_copies = StoreCopies.parse(str(store_copies))
        self.group_bytes = group_bytes
        self.client_timeout = client_timeout
        self._spawn = spawn
        self._answered: list[_Answered] = []
        self.engines: dict[int, CopyEngine] = {}
        #: The last kv.store_cuda / kv.retrieve_cuda handler, from its start to its reply
        #: (sent once the copy is enqueued).
        self.last_handler_seconds = 0.0

    async def start_cuda(self) -> int:
        """Start CUDA and every visible GPU's context now, in a thread; returns the GPU count.

        For a server about to listen, before any client is there to wait: a process's first
        CUDA calls hold the GIL for a long while (a context's creation, ~130 ms on the lent
        H200), which at a worker's first registration stalled the event loop for every
        client. Does nothing (returns 0) where there is no CUDA.
        """
        return await asyncio.to_thread(_start_cuda)

    async def open(
        self,
        wrappers: list[CudaIPCWrapper],
        layout: KVLayout,
        ready_events: list[CudaEventHandle],
    ) -> CudaCache:
        """Map a worker's layers in its GPU's engine thread (the engine made on first use).

        The worker's ``ready_events`` are opened there too: opening an interprocess event
        holds the GIL for up to milliseconds, which the first copies would otherwise pay,
        stalling the loop.
        """
        devices = {w.device_uuid for w in wrappers}
        if len(devices) != 1:
            raise KVConfigError("a worker's KV layers must all be on one GPU")
        # In a thread: the first CUDA call of the process (finding the GPUs, reading their
        # properties) starts CUDA, which takes a few hundred milliseconds with the GIL held
        # at times; on the loop it would stall every client.
        device = await asyncio.to_thread(_device_of, devices.pop())
        assert device.index is not None
        engine = self.engines.get(device.index)
        if engine is None:
            engine = CopyEngine(
                device, group_bytes=self.group_bytes, store_copies=self.store_copies
            )
            self.engines[device.index] = engine
        opened = engine.executor.submit(_open_cuda_all, wrappers, layout, ready_events)
        layers = await asyncio.wrap_future(opened)
        return CudaCache(engine, layers, layout, set(ready_events))

    async def warm(self, cache: CudaCache, blocks_per_chunk: int, pool: ChunkPool) -> None:
        """Pay the first copy's one-time costs now, at registration, in the engine thread.

        Streams, staging, kernels, events (see :meth:`CopyEngine.submit_warm`): the worker's
        first store or retrieve then runs at the speed of the rest and does not stall the
        loop.
        """
        warm = cache.engine.submit_warm(
            cache.layers, cache.layout, blocks_per_chunk, pool.buffer, pool.slot_nbytes
        )
        await asyncio.wrap_future(warm)

    def close(self, cache: CudaCache) -> None:
        """Drop the mappings once no enqueued copy can touch them (in the engine thread)."""
        cache.closed = True
        layers, cache.layers = cache.layers, []
        cache.engine.release(layers)
        forget_events(list(cache.events))

    async def copy(
        self,
        cache: CudaCache,
        submit: Callable[[Transfer], concurrent.futures.Future[Any]],
        transfer: Callable[[Any], Transfer],
        ready_handle: CudaEventHandle,
        on_late_finish: Callable[[], None],
        deadline: float | None = None,
    ) -> tuple[KeyFailure | None, Any]:
        """Wait for the worker's event, then enqueue ``transfer(ready)`` with ``submit``.

        Returns (None, the engine's result: its completion event first) once the copy is
        enqueued, or (why not, None) once it is certain never to run; the caller settles
        the copy once it has completed (:meth:`settle_later`). If the handler is cancelled,
        ``on_late_finish`` runs on the loop once no copy can touch the slots any more.
        """
        error, ready = await self._worker_ready(cache, ready_handle, deadline, on_late_finish)
        if error is not None:
            return error, None
        engine = cache.engine
        enqueued = submit(transfer(ready))
        try:
            result = await asyncio.wrap_future(enqueued)
        except asyncio.CancelledError:
            _after_engine(enqueued, engine, asyncio.get_running_loop(), on_late_finish)
            raise
        except DeadlinePassed:
            return DEADLINE_PASSED, None
        except Exception as exc:
            logger.error("a GPU copy failed", exc_info=exc)
            return copy_failed(exc), None
        return None, result

    async def copy_announced(
        self,
        cache: CudaCache,
        transfer: Callable[[Any], Transfer],
        ready_handle: CudaEventHandle,
        on_late_finish: Callable[[], None],
        settle: Callable[[KeyFailure | None], None],
        started: float,
        deadline: float | None = None,
    ) -> tuple[KeyFailure | None, LayerAnnouncement | None]:
        """A layer-wise retrieve, answerable before it is enqueued: (None, its announcement).

        Waits for the worker's event as :meth:`copy` does, then takes the layers' events
        and hands the job to the engine thread *without waiting for it*: the caller answers
        with the announcement at once, and a worker polls each layer's stamp and event
        (:mod:`kvrpc.kv.stamps`) while the engine still enqueues the later layers.
        ``settle`` runs on the loop once the copy completed, or failed (the engine then
        stamped the layers it never recorded as failed). ``(why not, None)`` when nothing
        will be copied.
        """
        error, ready = await self._worker_ready(cache, ready_handle, deadline, on_late_finish)
        if error is None and deadline is not None and time.monotonic() > deadline:
            error = DEADLINE_PASSED
        if error is not None:
            return error, None
        engine = cache.engine
        job = transfer(ready)
        job.announced = announced = engine.announce_layers(cache.layout.num_layers)
        enqueued = engine.submit_retrieve_layers(job)
        loop = asyncio.get_running_loop()

        def on_enqueued(future: concurrent.futures.Future[Any]) -> None:  # engine thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to settle
                loop.call_soon_threadsafe(self._enqueued, engine, future, settle)

        enqueued.add_done_callback(on_enqueued)
        self.last_handler_seconds = time.perf_counter() - started
        return None, announced

    def _enqueued(
        self,
        engine: CopyEngine,
        future: concurrent.futures.Future[Any],
        settle: Callable[[KeyFailure | None], None],
    ) -> None:
        """An announced copy is enqueued (or failed to be): settle it once it completed."""
        exc = future.exception() if not future.cancelled() else None
        if future.cancelled():
            settle(copy_failed("the server shut down"))
        elif isinstance(exc, DeadlinePassed):
            settle(DEADLINE_PASSED)
        elif exc is not None:
            logger.error("a GPU copy failed", exc_info=exc)
            settle(copy_failed(exc))
        else:
            done, handle, _ = future.result()
            answered = _Answered(done, settle)
            self._answered.append(answered)
            self._spawn(self._settle_after, engine, handle, answered)

    def settle_later(
        self,
        engine: CopyEngine,
        results: list[KeyFailure | None],
        settle: Callable[[KeyFailure | None], None],
        enqueued: tuple[Any, ...],
        started: float,
        after: concurrent.futures.Future[None] | None = None,
    ) -> list[KeyFailure | None]:
        """What to answer for an enqueued copy now; ``settle`` runs once it has completed.

        ``enqueued`` is the engine's result (its completion event and handle first). The
        reply goes with ``results`` as they are, so the settle that follows must not change
        what was already answered: they are copied here. ``started`` is when the handler
        began (``time.perf_counter()``), for ``cuda_last_handler_us``. With ``after``, the
        background settle also waits for it (a failure is logged, and settles all the
        same); a handler that finds the copy's event completed settles at once, so that a
        lookup sent after the worker saw its store finish finds the chunks.
        """
        answered = _Answered(enqueued[0], settle, after=after)
        self._answered.append(answered)
        self._spawn(self._settle_after, engine, enqueued[1], answered)
        self.last_handler_seconds = time.perf_counter() - started
        return list(results)

    def settle_completed(self) -> None:
        """Settle now every answered copy whose completion event has completed.

        A worker learns that its copy is done from that event, before the engine's waiter
        thread has told the loop, so the service calls this before each of its handlers:
        a lookup sent after a store was reported finished finds the store's chunks.
        Querying the engine's own events takes microseconds and never blocks.
        """
        if not self._answered:
            return
        pending = []
        for answered in self._answered:
            if answered.settled:
                continue
            try:
                completed = bool(answered.done.query())
            except Exception:  # the waiter thread reports what went wrong
                completed = False
            if completed:
                answered.finish(None)
            else:
                pending.append(answered)
        self._answered = pending

    async def _settle_after(
        self, engine: CopyEngine, handle: CudaEventHandle, answered: _Answered
    ) -> None:
        """Settle an answered copy once the engine's waiter thread saw it complete."""
        settle = answered.finish
        waited = engine.wait(answered.done, handle)
        try:
            await asyncio.wrap_future(waited)
            if answered.after is not None and not answered.settled:
                try:
                    await asyncio.wrap_future(answered.after)
                except Exception as exc:  # the bytes are in; only their checksums are not
                    logger.error("folding a DMA store's checksums failed", exc_info=exc)
        except asyncio.CancelledError:  # shutting down: settle when the GPU is done with it
            loop = asyncio.get_running_loop()

            def late(_: object) -> None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(settle, copy_failed("the server shut down"))

            waited.add_done_callback(late)
            raise
        except Exception as exc:
            logger.error("waiting for a GPU copy failed", exc_info=exc)
            settle(copy_failed(exc))
            return
        settle(None)
        with contextlib.suppress(ValueError):  # gone already if a handler settled it
            self._answered.remove(answered)

    async def _worker_ready(
        self,
        cache: CudaCache,
        handle: CudaEventHandle,
        deadline: float | None,
        on_late_finish: Callable[[], None],
    ) -> tuple[KeyFailure | None, Any]:
        """Open the worker's event and poll it: (None, the event) once it has completed.

        Polled until it completes, never handed to a stream while pending (see
        :mod:`kvrpc.cuda`); opened in a poller thread the first time, since opening an
        interprocess event can take milliseconds. ``(why not, None)`` past the client
        timeout or the deadline, or once the worker left.
        """
        engine = cache.engine
        ready = opened_event(handle)
        if ready is None or not ready.query():
            limit = self.client_timeout
            if deadline is not None:
                limit = max(0.0, min(limit, deadline - time.monotonic()))
            polled = engine.pollers.submit(_open_and_poll, handle, lambda: cache.closed, limit)
            try:
                ready, ready_in_time = await asyncio.wrap_future(polled)
            except asyncio.CancelledError:
                on_late_finish()  # nothing was enqueued: the slots can go at once
                raise
            except Exception as exc:
                return copy_failed(f"cannot open the worker's CUDA event: {exc}"), None
            cache.events.add(handle)
            if not ready_in_time:
                if deadline is not None and time.monotonic() >= deadline:
                    pending = f"{DEADLINE_PASSED.detail} (the worker's event was still pending)"
                    return KeyFailure(KeyStatus.DEADLINE_PASSED, pending), None
                return copy_failed(
                    f"the worker's CUDA event did not complete within {limit:g} s, or the "
                    "worker left; nothing was copied"
                ), None
        if cache.closed:
            return WORKER_GONE, None
        return None, ready

    def stats(self) -> dict[str, int]:
        """The engines' part of ``kv.stats`` (empty without an engine)."""
        if not self.engines:
            return {}
        engines = list(self.engines.values())
        return {
            "cuda_batches": sum(e.batches for e in engines),
            "cuda_bytes_moved": sum(e.bytes_moved for e in engines),
            "cuda_staging_bytes": sum(e.staging_bytes() for e in engines),
            "cuda_last_batch_gpu_us": round(max(e.last_gpu_seconds for e in engines) * 1e6),
            "cuda_busy_us": round(sum(e.gpu_seconds for e in engines) * 1e6),
            "cuda_last_handler_us": round(self.last_handler_seconds * 1e6),
            "cuda_dma_stores": sum(e.dma_stores for e in engines),
            "cuda_dma_copies": sum(e.dma_copies for e in engines),
            "cuda_dma_store_fallbacks": sum(e.dma_fallbacks for e in engines),
            # Everything this process allocated on its GPUs: the engines' buffers and
            # temporaries (the workers' KV caches are mapped, not allocated here).
            "cuda_peak_allocated_bytes": sum(
                int(torch.cuda.max_memory_allocated(e.device)) for e in engines
            ),
        }

    async def aclose(self) -> None:
        """Finish enqueued copies and stop every engine's threads."""
        engines, self.engines = list(self.engines.values()), {}
        for engine in engines:
            await asyncio.to_thread(engine.close)


def _start_cuda() -> int:
    if not torch.cuda.is_available():
        return 0
    count = int(torch.cuda.device_count())
    for index in range(count):
        torch.cuda.synchronize(index)  # creates the device's primary context
    device_by_uuid(device_uuid(0))  # and reads every GPU's UUID once
    return count


def _device_of(uuid: str) -> torch.device:
    if not torch.cuda.is_available():
        raise CudaUnavailable(
            "this KV server has no CUDA (a CPU build of torch, or no visible GPU), so it "
            "cannot map cuda_ipc KV caches; run it on the workers' host with their GPUs, "
            "or register CPU tensors"
        )
    return device_by_uuid(uuid)


def _open_and_poll(
    handle: CudaEventHandle, give_up: Callable[[], bool], timeout: float
) -> tuple[Any, bool]:
    event = handle.open()
    return event, poll_event(event, timeout, give_up)


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


def _open_cuda_all(
    wrappers: list[CudaIPCWrapper], layout: KVLayout, ready_events: list[CudaEventHandle]
) -> list[torch.Tensor]:
    layers = [wrapper.to_tensor() for wrapper in wrappers]
    for handle in ready_events:
        try:
            handle.open()  # kept by kvrpc.cuda, found there by the copies (opened_event)
        except Exception as exc:
            raise KVConfigError(f"cannot open the worker's ready event: {exc}") from exc
    for index, tensor in enumerate(layers):
        if tuple(tensor.shape) != layout.shape or tensor.dtype != layout.torch_dtype:
            raise KVConfigError(
                f"CUDA tensor {index} is {tensor.dtype} {list(tensor.shape)}, but the layout "
                f"says {layout.torch_dtype} {list(layout.shape)}"
            )
    return layers
