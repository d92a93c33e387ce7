"""The GPU copy engine: workers' paged KV blocks to pinned pool slots and back.

One :class:`CopyEngine` per GPU, made by the server when the first ``cuda_ipc`` worker of
that GPU registers. It owns one executor thread and two *lanes*, one per direction, each
with two CUDA streams and a small staging ring in GPU memory:

* in the store lane, the *kernel* stream picks a group of chunks' blocks out of every layer
  (one ``index_select`` and one strided copy per layer) into a staging buffer laid out
  exactly like the pool's slots (:mod:`kvrpc.kv.layout`), so that
* its *DMA* stream moves each chunk to its pinned slot in one copy (neighbouring slots in
  one copy together), while the kernel stream already works on the next group.

The retrieve lane runs the same pipeline backwards (DMA in, then a strided copy and one
``index_copy_`` per layer). PCIe is full duplex: with a lane per direction, a store's
device-to-host copies and a retrieve's host-to-device copies run at the same time instead
of queueing on one stream. Each staging ring is ``depth`` buffers of ``group_bytes``,
reused in stream order (an event per buffer says when its last reader is done), so the
engine's GPU memory stays fixed however large a batch is.

A *layer-wise* retrieve (:meth:`CopyEngine.submit_retrieve_layers`) moves layer 0 of every
chunk first, then layer 1, and so on, and records an interprocess event after each layer:
an engine computing a prompt's suffix waits for layer ``l``'s event before layer ``l``'s
attention, so the transfer of the later layers overlaps the compute of the earlier ones.

Each group's per-layer launches (two a layer) are captured once as a CUDA graph per KV
cache, staging buffer and group size, and replayed: one launch a group. The executor thread
only *enqueues* work (about 2 ms of Python for a 2 GB batch) and returns the interprocess
event recorded after it; waiting for that event happens in a pool
of waiter threads (:meth:`CopyEngine.wait`), never on the event loop and never in the
engine thread, so the next batch is enqueued while this one is still moving.

With ``store_copies="dma"`` (``kvrpc serve --store-copies dma``) a store runs no kernel at
all: the store lane's DMA stream copies the blocks straight from the worker's layers into
the pinned slots, one ``cuMemcpy2DAsync`` per run of consecutive blocks and layer
(:mod:`~kvrpc.kv.server.dma_plan`, :func:`~kvrpc.kv.server.dma.copy_runs_to_host`).
Kernels of this process take turns on the SMs with the engine's own (a decode step, say);
the copy engines' DMA does not. A batch whose block table is too fragmented for that
(:func:`~kvrpc.kv.server.dma_plan.call_limit`) goes through the kernels and is counted in
:attr:`CopyEngine.dma_fallbacks`. Its checksums are folded on the CPU from the slots, group
by group as each lands, in the engine's fold threads (:attr:`Transfer.folded`).

The plan maths (views, groups, slot runs: :mod:`~kvrpc.kv.server.copy_plan`) are plain
torch and work on any device; the lanes and event rings (:mod:`~kvrpc.kv.server.lanes`), the
graph cache (:mod:`~kvrpc.kv.server.graphs`) and the warm-up (:mod:`~kvrpc.kv.server.warmup`)
each have a module of their own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import torch

from kvrpc.cuda import CudaEventHandle, poll_event
from kvrpc.errors import DeadlinePassed, KVConfigError
from kvrpc.kv import integrity
from kvrpc.kv.layout import KVLayout
from kvrpc.kv.server import dma, dma_plan
from kvrpc.kv.server.copy_plan import (
    GroupViews,
    Transfer,
    fold_slots,
    group_sizes,
    group_views,
    host_runs,
    keep_rows,
    layer_views,
    scatter_views,
    yield_gil,
)
from kvrpc.kv.server.dma import copy_runs_to_device, pitched_runs
from kvrpc.kv.server.graphs import GraphCache
from kvrpc.kv.server.lanes import IpcEventRing, Lane, LayerAnnouncement
from kvrpc.kv.server.warmup import warm
from kvrpc.kv.stamps import LayerStamps

__all__ = ["CopyEngine", "DeadlinePassed", "LayerAnnouncement", "StoreCopies", "Transfer"]

#: Completion events each engine cycles through (see :class:`_IpcEventRing`).
_DONE_EVENTS = 256
#: Per-layer events of layer-wise retrieves (one a layer but the last).
_LAYER_EVENTS = 512


logger = logging.getLogger("kvrpc.kv")

# torch.cuda's classes are untyped; the engine holds them as Any.
_cuda = cast(Any, torch.cuda)


class StoreCopies(enum.StrEnum):
    """How a store moves blocks to the pool: the value is ``kvrpc serve --store-copies``'s.

    - ``KERNELS``: gather kernels into a GPU staging buffer, a checksum fold kernel, then
      one DMA per run of slots (the pipeline of the module docstring);
    - ``DMA``: pitched device-to-host copies straight from the blocks, no kernel; checksums
      folded on the CPU. Too fragmented a block table goes through the kernels.
    """

    KERNELS = "kernels"
    DMA = "dma"

    @classmethod
    def parse(cls, value: str) -> StoreCopies:
        """``value`` as a :class:`StoreCopies`; :class:`KVConfigError` naming the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(c.value) for c in cls)
            raise KVConfigError(f"store copies must be one of {choices}, not {value!r}") from None


class CopyEngine:
    """One GPU's copy engine: an executor thread, a lane per direction, their staging rings.

    ``group_bytes`` bounds one staging buffer (rounded down to whole chunks, at least one)
    and ``depth`` is how many each lane has; ``waiters`` threads wait for completion events,
    and as many others poll workers' ready events, so that slow or dead workers never delay
    the completions of the others. ``store_copies`` picks the store path
    (:class:`StoreCopies`); a DMA store may take
    ``call_limit(nbytes, dma_free_calls, dma_bytes_per_call)`` driver calls
    (:func:`~kvrpc.kv.server.dma_plan.call_limit`), and ``waiters`` more threads fold its
    checksums.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        group_bytes: int = 256 << 20,
        depth: int = 2,
        waiters: int = 4,
        store_copies: StoreCopies | str = StoreCopies.KERNELS,
        dma_free_calls: int = dma_plan.FREE_CALLS,
        dma_bytes_per_call: int = dma_plan.BYTES_PER_CALL,
    ) -> None:
        self.device = device
        self.group_bytes = group_bytes
        self.depth = depth
        self.store_copies = StoreCopies.parse(str(store_copies))
        self.dma_free_calls = dma_free_calls
        self.dma_bytes_per_call = dma_bytes_per_call
        name = f"kvrpc-copy-{device.index}"
        self.executor = concurrent.futures.ThreadPoolExecutor(1, name)
        self.waiters = concurrent.futures.ThreadPoolExecutor(waiters, f"{name}-wait")
        self.pollers = concurrent.futures.ThreadPoolExecutor(waiters, f"{name}-poll")
        # DMA stores' CPU checksum folds: threads of their own, so that a fold never holds
        # up a completion wait (waiters) nor the polling of a worker's event (pollers).
        self.folders = concurrent.futures.ThreadPoolExecutor(waiters, f"{name}-fold")
        self._store_lane = Lane()
        self._retrieve_lane = Lane()
        self._done = IpcEventRing(device, _DONE_EVENTS)
        # The layer-wise retrieves' events have a ring of their own, a few batches long: the
        # handles a worker sees repeat soon, so it opens each once (opening an IPC event
        # costs far more than polling it).
        self._layer_events = IpcEventRing(device, _LAYER_EVENTS)
        #: Which layer events are recorded, in shared memory for the workers to read.
        self.stamps = LayerStamps.shared(_LAYER_EVENTS)
        self._timings: dict[CudaEventHandle, tuple[Any, Any]] = {}
        self.graphs = GraphCache()
        # The layer lists warmed up (see submit_warm), by id: held so that no other list
        # can take the id of one whose graphs are still cached, until release drops both.
        self._warmed: dict[int, list[torch.Tensor]] = {}
        # Engine-owned pinned bytes: where the warm-up's device-to-host copy lands, since
        # the pool's slots may hold chunks.
        self._sink: torch.Tensor | None = None
        #: Seconds each step of the last :meth:`submit_warm` took, by step (see there).
        self.warm_timings: dict[str, float] = {}
        self.batches = 0
        self.bytes_moved = 0
        #: GPU time of the last completed batch, first copy to last, in seconds.
        self.last_gpu_seconds = 0.0
        #: GPU time of every timed batch so far, in seconds: the engine's busy time.
        self.gpu_seconds = 0.0
        #: Stores that went through DMA alone, and the driver calls they took.
        self.dma_stores = 0
        self.dma_copies = 0
        #: Stores asked for through DMA that went through the kernels instead: a block
        #: table too fragmented for the call limit (or no driver entry point).
        self.dma_fallbacks = 0

    # --------------------------------------------------------------- run in the engine thread

    def _fit(self, row_nbytes: int) -> int:
        """How many rows of ``row_nbytes`` one staging buffer holds: the largest group."""
        return max(1, self.group_bytes // row_nbytes)

    def _setup(self, lane: Lane, per_group: int, chunk_nbytes: int, layer_bytes: int) -> None:
        """Make the lane's streams on first use, and buffers for groups of ``per_group``."""
        self._streams(lane)
        need = per_group * chunk_nbytes
        if not lane.staging or lane.staging[0].numel() < need:
            self._drain(lane)
            lane.staging = [
                torch.empty(need, dtype=torch.uint8, device=self.device) for _ in range(self.depth)
            ]
            lane.views.clear()
            lane.free = [None] * self.depth
            self.graphs.clear()
        scratch = per_group * layer_bytes
        if lane.scratch is None or lane.scratch.numel() < scratch:
            self._drain(lane)
            lane.scratch = torch.empty(scratch, dtype=torch.uint8, device=self.device)
            lane.views.clear()
            self.graphs.clear()

    def _streams(self, lane: Lane) -> None:
        """Make the lane's streams and reusable events on first use (no buffers)."""
        if lane.kernels is None:
            torch.cuda.set_device(self.device)
            lane.kernels = _cuda.Stream(self.device)
            lane.dma = _cuda.Stream(self.device)
            # Recorded again each use: a stream's wait takes the record it sees when
            # enqueued, and making events costs more than the rest of a layer's enqueue on
            # some hosts.
            lane.loaded = [_cuda.Event() for _ in range(self.depth)]
            lane.freed = [_cuda.Event() for _ in range(self.depth)]

    def _drain(self, *lanes: Lane) -> None:
        for lane in lanes or (self._store_lane, self._retrieve_lane):
            if lane.kernels is not None:
                lane.kernels.synchronize()
                lane.dma.synchronize()

    def _groups(
        self, transfer: Transfer, lane: Lane, *, layerwise: bool = False
    ) -> tuple[int, list[tuple[int, int, torch.Tensor]]]:
        """Per group: first chunk, chunk count, its flat block ids on the GPU.

        Returns the bytes of one chunk's row in the staging buffer first: a whole chunk, or
        one layer's part of it for a layer-wise retrieve.

        A group is at most ``group_bytes``. A whole-chunk batch is also split over the ring
        (so that a small batch does not make the engine hold large buffers) with small
        first and last groups (:func:`group_sizes`); a layer-wise one moves a layer of as
        many chunks as fit at once, since every layer is a step of its own already.
        """
        layout, n = transfer.layout, len(transfer.slots)
        bpc = transfer.block_ids.shape[1]
        layer_bytes = layout.layer_chunk_nbytes(bpc)
        row_nbytes = layer_bytes if layerwise else layout.chunk_nbytes(bpc)
        fit = self._fit(row_nbytes)
        per_group = min(fit, n) if layerwise else min(fit, -(-n // self.depth))
        self._setup(lane, per_group, row_nbytes, layer_bytes)
        with torch.cuda.stream(lane.kernels):
            flat = transfer.block_ids.reshape(-1).to(self.device, non_blocking=True)
        if layerwise:
            sizes = [min(per_group, n - f) for f in range(0, n, per_group)]
        else:
            sizes = group_sizes(n, per_group)
        groups = []
        first = 0
        for count in sizes:
            groups.append((first, count, flat[first * bpc : (first + count) * bpc]))
            first += count
        return row_nbytes, groups

    def _finish(self, last: Any, started: Any, nbytes: int) -> tuple[Any, CudaEventHandle]:
        """Record the batch's completion on ``last``, the stream its final copies ran on."""
        ended = _cuda.Event(enable_timing=True)
        ended.record(last)
        done, handle = self._done.next()
        done.record(last)
        self._timings[handle] = (started, ended)
        self.batches += 1
        self.bytes_moved += nbytes
        return done, handle

    def _next_views(
        self, lane: Lane, count: int, chunk_nbytes: int, layout: KVLayout
    ) -> tuple[int, GroupViews, Any]:
        """Take the lane's next staging buffer: (its number, views, event it is free after).

        The views for ``count`` chunks are built once per buffer, size and layout.
        """
        b = lane.next_buffer
        lane.next_buffer = (b + 1) % self.depth
        return b, self._views(lane, b, count, chunk_nbytes, layout), lane.free[b]

    def _views(
        self, lane: Lane, b: int, count: int, chunk_nbytes: int, layout: KVLayout
    ) -> GroupViews:
        """Staging buffer ``b``'s views for a group of ``count`` chunks, built once."""
        key = (b, count, chunk_nbytes, layout)
        views = lane.views.get(key)
        if views is None:
            assert lane.scratch is not None
            staging = lane.staging[b][: count * chunk_nbytes].view(count, chunk_nbytes)
            views = lane.views[key] = group_views(layout, staging, lane.scratch)
        return views

    def _store(self, transfer: Transfer) -> tuple[Any, CudaEventHandle]:
        lane = self._store_lane
        chunk_nbytes, groups = self._groups(transfer, lane)
        gather, copy = lane.kernels, lane.dma
        layout = transfer.layout
        sources = layer_views(transfer.layers, layout)
        if transfer.ready is not None:
            gather.wait_event(transfer.ready)
        started = _cuda.Event(enable_timing=True)
        started.record(gather)
        lanes = None
        if transfer.checksum:
            with torch.cuda.stream(gather):
                lanes = torch.empty((len(transfer.slots), 2), dtype=torch.int64, device=self.device)
        for first, count, ids in groups:
            b, views, free = self._next_views(lane, count, chunk_nbytes, layout)
            staging = views.rows
            if free is not None:
                gather.wait_event(free)
            with torch.cuda.stream(gather):
                self.graphs.run_group(transfer.layers, sources, views, layout, ids, b, count, False)
                gathered = _cuda.Event()
                gathered.record(gather)
                if lanes is not None:
                    # After the event the DMA waits for, so the fold of the staged rows runs
                    # beside their copy to the host; the next gather into this buffer comes
                    # after it on this stream.
                    lanes[first : first + count] = integrity.fold(staging)
            copy.wait_event(gathered)
            with torch.cuda.stream(copy):
                for view, row, rows in host_runs(transfer, first, count, chunk_nbytes):
                    view.copy_(staging[row : row + rows].view(-1), non_blocking=True)
                freed = _cuda.Event()
                freed.record(copy)
            lane.free[b] = freed
            time.sleep(0)
        if lanes is not None:
            self._checksums_to_host(transfer, lanes, gather, copy)
        return self._finish(copy, started, chunk_nbytes * len(transfer.slots))

    def _store_any(self, transfer: Transfer) -> tuple[Any, CudaEventHandle]:
        """A store by the engine's :attr:`store_copies`: DMA where its plan fits, else kernels."""
        if self.store_copies is StoreCopies.DMA:
            groups = self._dma_plan(transfer)
            if groups is not None:
                return self._store_dma(transfer, groups)
            self.dma_fallbacks += 1
        return self._store(transfer)

    def _dma_plan(self, transfer: Transfer) -> list[dma_plan.DmaGroup] | None:
        """The DMA store's groups and copies, or None if they take too many driver calls.

        Groups as a kernel store's (:func:`group_sizes`): each is folded once it has landed,
        and the small last group keeps what is left to fold after the batch short.
        """
        if not dma.available():
            return None
        layout = transfer.layout
        layout.check_block_ids(transfer.block_ids)  # the copies read wherever an id points
        n, bpc = len(transfer.slots), transfer.block_ids.shape[1]
        chunk_nbytes = layout.chunk_nbytes(bpc)
        per_group = min(self._fit(chunk_nbytes), -(-n // self.depth))
        rows = transfer.block_ids.tolist()
        groups = dma_plan.plan_groups(
            layout, rows, transfer.slots, transfer.slot_nbytes, group_sizes(n, per_group)
        )
        calls = dma_plan.plan_calls(groups, layout.num_layers)
        limit = dma_plan.call_limit(n * chunk_nbytes, self.dma_free_calls, self.dma_bytes_per_call)
        return groups if calls <= limit else None

    def _store_dma(
        self, transfer: Transfer, groups: list[dma_plan.DmaGroup]
    ) -> tuple[Any, CudaEventHandle]:
        """Copy the blocks straight into the slots on the store lane's DMA stream.

        No kernel runs: the copy engines' DMA does not take SMs from the worker's own
        kernels. With checksums, an event after each group tells a fold thread that the
        group's slots hold their bytes (see :meth:`_fold_later` for why there).
        """
        lane = self._store_lane
        self._streams(lane)
        copy = lane.dma
        layout = transfer.layout
        bpc = transfer.block_ids.shape[1]
        layer_bytes = layout.layer_chunk_nbytes(bpc)
        if transfer.ready is not None:
            copy.wait_event(transfer.ready)
        started = _cuda.Event(enable_timing=True)
        started.record(copy)
        landed: list[tuple[Any, dma_plan.DmaGroup]] = []
        calls = 0
        try:
            for group in groups:
                calls += dma.copy_runs_to_host(
                    transfer.layers, transfer.host, group.copies, layer_bytes, copy
                )
                if transfer.checksum:
                    event = _cuda.Event()
                    event.record(copy)
                    landed.append((event, group))
                time.sleep(0)  # let the event loop's thread take the GIL between groups
        except BaseException:
            # The copies enqueued already are let finish before anyone hears of the failure:
            # the store then aborts its slots, which a copy still in flight must not write.
            with contextlib.suppress(Exception):
                copy.synchronize()
            raise
        self.dma_stores += 1
        self.dma_copies += calls
        if transfer.checksum:
            transfer.checksums = torch.empty((len(transfer.slots), 2), dtype=torch.int64)
            transfer.folded = self._fold_later(transfer, landed, transfer.checksums)
        return self._finish(copy, started, layout.chunk_nbytes(bpc) * len(transfer.slots))

    def _fold_later(
        self,
        transfer: Transfer,
        landed: list[tuple[Any, dma_plan.DmaGroup]],
        out: torch.Tensor,
    ) -> concurrent.futures.Future[None]:
        """Fold each group's slots on the CPU once its event completed; resolves after all.

        In the fold threads, group by group, as each lands: not in the engine thread, which
        would hold up every later batch's enqueue (and this batch's reply) for the folds;
        not after the completion event, which would leave every fold until the last byte
        landed. The batch's completion event is recorded after the copies alone, so the
        worker may reuse its blocks as soon as they are read; the server commits the chunks
        with their checksums once this resolves, or without them earlier if a handler sees
        the event first (the service then adds them as they come, see ``KVService``).
        """
        bpc = transfer.block_ids.shape[1]
        chunk_nbytes = transfer.layout.chunk_nbytes(bpc)
        jobs = []
        for event, group in landed:
            slots = transfer.slots[group.first : group.first + group.count]
            rows = out[group.first : group.first + group.count]
            jobs.append(
                self.folders.submit(
                    _fold_group,
                    event,
                    transfer.host,
                    slots,
                    transfer.slot_nbytes,
                    chunk_nbytes,
                    rows,
                )
            )
        return _all_done(jobs)

    def _checksums_to_host(self, transfer: Transfer, lanes: Any, gather: Any, copy: Any) -> None:
        """Copy the folded checksums into pinned ``transfer.checksums``, before the done event."""
        folded = _cuda.Event()
        folded.record(gather)
        copy.wait_event(folded)
        transfer.checksums = torch.empty(lanes.shape, dtype=torch.int64, pin_memory=True)
        with torch.cuda.stream(copy):
            transfer.checksums.copy_(lanes, non_blocking=True)
        lanes.record_stream(copy)  # made on the gather stream, read on this one

    def _check_deadline(self, transfer: Transfer) -> None:
        if transfer.deadline is not None and time.monotonic() > transfer.deadline:
            raise DeadlinePassed(
                "the retrieve's deadline passed before its copy started; no block was written"
            )

    def _start_retrieve(self, transfer: Transfer, lane: Lane) -> Any:
        """Order the lane after the worker's event; returns the batch's timing start event."""
        scatter, copy = lane.kernels, lane.dma
        if transfer.ready is not None:
            scatter.wait_event(transfer.ready)
        started = _cuda.Event(enable_timing=True)
        started.record(scatter)
        copy.wait_event(started)
        return started

    def _retrieve(self, transfer: Transfer) -> tuple[Any, CudaEventHandle]:
        self._check_deadline(transfer)
        lane = self._retrieve_lane
        chunk_nbytes, groups = self._groups(transfer, lane)
        scatter, copy = lane.kernels, lane.dma
        layout = transfer.layout
        targets = layer_views(transfer.layers, layout)
        started = self._start_retrieve(transfer, lane)
        for first, count, ids in groups:
            b, views, free = self._next_views(lane, count, chunk_nbytes, layout)
            staging = views.rows
            if free is not None:
                copy.wait_event(free)
            with torch.cuda.stream(copy):
                for view, row, rows in host_runs(transfer, first, count, chunk_nbytes):
                    staging[row : row + rows].view(-1).copy_(view, non_blocking=True)
                loaded = _cuda.Event()
                loaded.record(copy)
            scatter.wait_event(loaded)
            with torch.cuda.stream(scatter):
                keep = keep_rows(transfer, first, count, self.device)
                if keep is None:
                    self.graphs.run_group(
                        transfer.layers, targets, views, layout, ids, b, count, True
                    )
                else:  # repeated block ids: rare, run eagerly
                    scatter_views(targets, views, layout.block_dim, ids, keep, yield_gil)
                freed = _cuda.Event()
                freed.record(scatter)
            lane.free[b] = freed
            time.sleep(0)  # let the event loop thread take the GIL between groups
        return self._finish(scatter, started, chunk_nbytes * len(transfer.slots))

    def _retrieve_layers(
        self, transfer: Transfer
    ) -> tuple[Any, CudaEventHandle, list[CudaEventHandle]]:
        """A retrieve in layer order, an interprocess event recorded after each layer.

        Layer ``l``'s part of a chunk is bytes ``[l * L, (l + 1) * L)`` of its slot (``L``
        one layer's share), so each layer is one pitched DMA per run of consecutive slots
        (:func:`kvrpc.kv.server.dma.copy_rows_to_device`, the runs found once for every
        layer) into a staging buffer laid out as a one-layer slot, then one scatter into
        that layer's blocks. Runs eagerly (two launches a layer and group): a graph per
        layer would buy little here, since the copies of later layers, not these launches,
        are what an engine waits for.

        The layers' events are the transfer's :class:`LayerAnnouncement` (taken when the
        retrieve was answered, see :meth:`announce_layers`), or taken here. Each is stamped
        once recorded; if the batch fails part way, the rest are stamped failed.
        """
        announced = transfer.announced
        if announced is None:
            announced = self.announce_layers(transfer.layout.num_layers)
        try:
            done, handle = self._enqueue_layers(transfer, announced)
        except BaseException:
            # The layers enqueued already are let finish before anyone hears of the
            # failure: the retrieve then settles as failed, its slots may be reused and the
            # worker recomputes the blocks, none of which a copy still in flight may see.
            with contextlib.suppress(Exception):
                self._drain(self._retrieve_lane)
            announced.fail_rest()
            raise
        return done, handle, announced.handles

    def _enqueue_layers(
        self, transfer: Transfer, announced: LayerAnnouncement
    ) -> tuple[Any, CudaEventHandle]:
        self._check_deadline(transfer)
        lane = self._retrieve_lane
        layer_bytes, groups = self._groups(transfer, lane, layerwise=True)
        scatter, copy = lane.kernels, lane.dma
        layout = transfer.layout
        one_layer = replace(layout, num_layers=1)
        targets = layer_views(transfer.layers, layout)
        size = transfer.slot_nbytes
        started = self._start_retrieve(transfer, lane)
        with torch.cuda.stream(scatter):  # the scatters read them on this stream
            keeps = [keep_rows(transfer, first, count, self.device) for first, count, _ in groups]
        # Each group's runs of consecutive slots, found once: every layer moves the same
        # rows, at its own offset into the slots.
        plans = []
        for first, count, _ in groups:
            offsets = [slot * size for slot in transfer.slots[first : first + count]]
            runs = pitched_runs(offsets, size)
            plans.append((runs, [offsets[row] for row, _ in runs]))
        loaded, freed = lane.loaded, lane.freed
        last = len(targets) - 1
        done: Any = None
        handle: Any = None
        for layer, target in enumerate(targets):
            offset = layer * layer_bytes
            for (_, count, ids), keep, (runs, starts) in zip(groups, keeps, plans, strict=True):
                b, views, free = self._next_views(lane, count, layer_bytes, one_layer)
                if free is not None:
                    copy.wait_event(free)
                copy_runs_to_device(views.rows, transfer.host, runs, starts, offset, size, copy)
                loaded[b].record(copy)
                scatter.wait_event(loaded[b])
                with torch.cuda.stream(scatter):
                    scatter_views([target], views, layout.block_dim, ids, keep)
                freed[b].record(scatter)
                lane.free[b] = freed[b]
            if layer == last:
                # The batch's own completion event (what the server settles on) before the
                # last layer's stamp: a worker told "all done" finds it recorded.
                nbytes = layer_bytes * layout.num_layers * len(transfer.slots)
                done, handle = self._finish(scatter, started, nbytes)
            announced.record(scatter)
            # The first layers are what a waiting engine needs soonest: let the loop's
            # thread (sending the reply, reading the next request) in after each of them.
            if layer < 4:
                time.sleep(0)
            else:
                yield_gil(layer)
        return done, handle

    def announce_layers(self, count: int) -> LayerAnnouncement:
        """Take the ``count`` events of a layer-wise retrieve now, before it is enqueued.

        Any thread may call it (the server's loop does, to answer the retrieve at once);
        hand the result to the engine as :attr:`Transfer.announced`. Until the engine
        records a layer's event its turn stays pending in :attr:`stamps`, which the reply
        names so that a worker can tell.
        """
        first, taken = self._layer_events.take(count)
        return LayerAnnouncement(
            first, [event for event, _ in taken], [h for _, h in taken], self.stamps
        )

    def submit_store(
        self, transfer: Transfer
    ) -> concurrent.futures.Future[tuple[Any, CudaEventHandle]]:
        """Enqueue a store in the engine thread; resolves to (done event, its IPC handle)."""
        return self.executor.submit(self._store_any, transfer)

    def submit_retrieve(
        self, transfer: Transfer
    ) -> concurrent.futures.Future[tuple[Any, CudaEventHandle]]:
        """Enqueue a retrieve (or raise :class:`DeadlinePassed`); resolves like a store."""
        return self.executor.submit(self._retrieve, transfer)

    def submit_retrieve_layers(
        self, transfer: Transfer
    ) -> concurrent.futures.Future[tuple[Any, CudaEventHandle, list[CudaEventHandle]]]:
        """Enqueue a layer-wise retrieve; resolves to (done event, its handle, layer handles).

        ``layer handles[l]`` is an interprocess event that completes once layer ``l`` of
        every chunk is in its blocks (the last one is the batch's own).
        """
        return self.executor.submit(self._retrieve_layers, transfer)

    def submit_warm(
        self,
        layers: list[torch.Tensor],
        layout: KVLayout,
        blocks_per_chunk: int,
        host: torch.Tensor,
        slot_nbytes: int,
    ) -> concurrent.futures.Future[None]:
        """Pay, in the engine thread, the one-time costs of the first copies of ``layers``.

        Call once a ``cuda_ipc`` worker's layers are mapped, before its first copy:
        ``layers`` is the very list that later transfers carry (the captured graphs are
        keyed by it), ``blocks_per_chunk`` theirs, ``host`` the pool's pinned buffer and
        ``slot_nbytes`` its slot size. Without it the first store and retrieve pay, inside
        the request, and partly under the GIL (so stalling the server's event loop):

        * the lanes' streams and events, and their staging and scratch buffers, allocated
          here at the largest group a copy of this layout uses (``group_bytes``), so that
          no later copy grows them (growing drops every captured graph);
        * every interprocess event of the completion and per-layer rings;
        * the first launch of each kernel (CUDA loads modules lazily), through eager
          gathers from the layers and eager scatters into an engine-owned stand-in;
        * the CUDA graph capture of every (staging buffer, group size) a whole-chunk store
          or retrieve of these layers uses (:func:`warm_group_sizes`): the store's graphs
          are replayed once too, the retrieve's only captured, since replaying them would
          write the layers;
        * the device-to-host, host-to-device and pitched (``cuMemcpy2DAsync``) copy paths,
          and the waiter and poller threads.

        Never changes a byte a client can see: it reads the layers and the pool's buffer
        and writes only staging, scratch and engine-owned memory. It waits for the copies
        in flight first and for its own work last, so it never shares a staging buffer with
        a copy. Calling it again for the same list does nothing; for another instance on
        this engine it costs that instance's graphs and a few eager launches.
        :attr:`warm_timings` says what each step took. The future fails with
        :class:`KVError` if a chunk does not fit a slot.
        """
        return self.executor.submit(warm, self, layers, layout, blocks_per_chunk, host, slot_nbytes)

    def wait(
        self, event: Any, handle: CudaEventHandle | None = None
    ) -> concurrent.futures.Future[None]:
        """A future resolved (in a waiter thread) once ``event`` has completed.

        With the batch's ``handle``, also notes the batch's GPU time (``last_gpu_seconds``).
        """
        return self.waiters.submit(self._wait, event, handle)

    def _wait(self, event: Any, handle: CudaEventHandle | None) -> None:
        event.synchronize()
        timing = self._timings.pop(handle, None) if handle is not None else None
        if timing is not None:
            started, ended = timing
            self.last_gpu_seconds = started.elapsed_time(ended) / 1e3
            # Waiter threads may add at once; a lost sum would be a monitoring figure a
            # batch short, never a wrong copy.
            self.gpu_seconds += self.last_gpu_seconds

    def wait_ready(
        self, event: Any, give_up: Callable[[], bool], timeout: float
    ) -> concurrent.futures.Future[bool]:
        """Poll a worker's event until it completes; False on ``give_up()`` or timeout.

        Polled, not waited on: a stream waiting on the event of a process that died would
        wait forever (see :mod:`kvrpc.cuda`).
        """
        return self.pollers.submit(poll_event, event, timeout, give_up)

    def release(self, tensors: list[torch.Tensor]) -> concurrent.futures.Future[None]:
        """Drop ``tensors`` (closing their IPC mappings) once no enqueued copy can use them."""
        return self.executor.submit(_release, self, tensors)

    def staging_bytes(self) -> int:
        """GPU bytes the engine holds for staging and scratch."""
        total = 0
        for lane in (self._store_lane, self._retrieve_lane):
            total += sum(int(t.numel()) for t in lane.staging)
            total += int(lane.scratch.numel()) if lane.scratch is not None else 0
        return total

    def close(self) -> None:
        """Finish enqueued work and stop the threads."""
        self.executor.submit(self._drain).result()
        self.executor.shutdown(wait=True)
        self.waiters.shutdown(wait=True)
        self.pollers.shutdown(wait=True)
        self.folders.shutdown(wait=True)
        self.stamps.release()


def _fold_group(
    landed: Any,
    host: torch.Tensor,
    slots: list[int],
    slot_nbytes: int,
    chunk_nbytes: int,
    out: torch.Tensor,
) -> None:
    """In a fold thread: wait for a DMA group's event, then fold its slots into ``out``."""
    landed.synchronize()  # releases the GIL while it waits
    out.copy_(fold_slots(host, slots, slot_nbytes, chunk_nbytes))


def _all_done(futures: list[concurrent.futures.Future[None]]) -> concurrent.futures.Future[None]:
    """A future resolved once every one of ``futures`` is: with the first failure, if any."""
    combined: concurrent.futures.Future[None] = concurrent.futures.Future()
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(future: concurrent.futures.Future[None]) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if not last:
            return
        for each in futures:
            failure = each.exception() if not each.cancelled() else None
            if each.cancelled():
                failure = concurrent.futures.CancelledError("a checksum fold was cancelled")
            if failure is not None:
                combined.set_exception(failure)
                return
        combined.set_result(None)

    if not futures:
        combined.set_result(None)
    for future in futures:
        future.add_done_callback(one_done)
    return combined


def _release(engine: CopyEngine, tensors: list[torch.Tensor]) -> None:
    engine._drain()
    # The graphs captured for these tensors hold their addresses: drop them before the
    # list (and so, possibly, its id) goes.
    engine.graphs.drop(tensors)
    if engine._warmed.get(id(tensors)) is tensors:
        del engine._warmed[id(tensors)]
    tensors.clear()
