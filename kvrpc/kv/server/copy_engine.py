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

The gather and scatter maths (:func:`gather_group`, :func:`scatter_group`) are plain torch
and work on any device; the tests check them on the CPU against :mod:`kvrpc.kv.layout`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch

from kvrpc.cuda import CudaEventHandle, new_ipc_event, poll_event
from kvrpc.errors import KVError
from kvrpc.kv.layout import SKIP_BLOCK, KVLayout
from kvrpc.kv.server.dma import copy_rows_to_device, pitched_runs

__all__ = [
    "CopyEngine",
    "DeadlinePassed",
    "GroupViews",
    "Transfer",
    "carrier_dtype",
    "contiguous_runs",
    "gather_group",
    "gather_views",
    "group_sizes",
    "group_views",
    "last_occurrences",
    "layer_views",
    "scatter_group",
    "scatter_views",
    "warm_group_sizes",
]

# Widest first; see kvrpc.kv.layout: a wide element type makes index_select / index_copy_
# move 16 bytes per element, and it covers fp8, which has no index kernels of its own.
_CARRIERS = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)

#: Completion events each engine cycles through (see :class:`_IpcEventRing`).
_DONE_EVENTS = 256
#: Per-layer events of layer-wise retrieves (one a layer but the last).
_LAYER_EVENTS = 512
#: Group sizes the warm-up captures graphs for, at most, per staging buffer and direction:
#: each capture is about a millisecond of Python for 32 layers.
_WARM_SIZES = 16


logger = logging.getLogger("kvrpc.kv")

# torch.cuda's classes are untyped; the engine holds them as Any.
_cuda = cast(Any, torch.cuda)


class DeadlinePassed(KVError):
    """A retrieve's deadline passed before its copy started: no byte was written."""


def carrier_dtype(layout: KVLayout) -> torch.dtype:
    """The widest element type whose size divides one row (the layout's last dim) in bytes."""
    row = layout.shape[-1] * layout.torch_dtype.itemsize
    return next(c for c in _CARRIERS if row % c.itemsize == 0)


@dataclass(frozen=True, eq=False)
class GroupViews:
    """One group's staging rows and the scratch buffer, as the carrier views a copy needs.

    Building them takes a few torch calls per layer; the engine builds them once per
    staging buffer and group size and reuses them, so that a group costs two launches a
    layer and little else.
    """

    rows: torch.Tensor
    """The staging rows themselves, uint8 ``[g, chunk_nbytes]``: what the DMAs move."""
    parts: list[torch.Tensor]
    """Per layer: that layer's part of every row, ``[g, *chunk shape]`` in the carrier type."""
    picked: torch.Tensor
    """The scratch as one layer with ``g * bpc`` blocks: what ``index_select`` fills."""
    moved: torch.Tensor
    """``picked`` with its block dim split into ``(g, bpc)`` and ``g`` moved first."""


def layer_views(layers: Sequence[torch.Tensor], layout: KVLayout) -> list[torch.Tensor]:
    """The layers in the carrier type (no copy)."""
    carrier = carrier_dtype(layout)
    return [layer.view(carrier) for layer in layers]


def group_views(layout: KVLayout, staging: torch.Tensor, scratch: torch.Tensor) -> GroupViews:
    """The views for a group of ``staging.shape[0]`` chunks (uint8 ``[g, chunk_nbytes]``)."""
    carrier = carrier_dtype(layout)
    groups, num_layers = staging.shape[0], layout.num_layers
    per_layer = staging.shape[1] // num_layers
    dim = layout.block_dim
    blocks_per_chunk = per_layer // layout.block_nbytes
    chunk_shape = list(layout.shape)
    chunk_shape[dim] = blocks_per_chunk
    chunk_shape[-1] = chunk_shape[-1] * layout.torch_dtype.itemsize // carrier.itemsize
    by_layer = staging.view(groups, num_layers, per_layer)
    parts = [
        by_layer[:, index].view(carrier).view(groups, *chunk_shape) for index in range(num_layers)
    ]
    shape = list(chunk_shape)
    shape[dim] = groups * blocks_per_chunk
    picked = scratch[: math.prod(shape) * carrier.itemsize].view(carrier).view(shape)
    split = list(chunk_shape)
    split[dim : dim + 1] = [groups, blocks_per_chunk]
    return GroupViews(staging, parts, picked, picked.view(split).movedim(dim, 0))


def gather_views(
    sources: Sequence[torch.Tensor],
    views: GroupViews,
    dim: int,
    block_ids: torch.Tensor,
    pause: Callable[[int], None] | None = None,
) -> None:
    """Gather a group: per layer, ``index_select`` into the scratch, then one strided copy.

    ``pause(layer)``, if given, is called after each layer (the engine yields the GIL there).
    """
    picked, moved = views.picked, views.moved
    for index, (source, part) in enumerate(zip(sources, views.parts, strict=True)):
        torch.index_select(source, dim, block_ids, out=picked)
        part.copy_(moved)
        if pause is not None:
            pause(index)


def scatter_views(
    targets: Sequence[torch.Tensor],
    views: GroupViews,
    dim: int,
    block_ids: torch.Tensor,
    keep: torch.Tensor | None = None,
    pause: Callable[[int], None] | None = None,
) -> None:
    """Scatter a group: per layer, one strided copy into the scratch, then ``index_copy_``.

    ``keep``, when a block id appears more than once, holds the positions to write (the last
    occurrence of each id, see :func:`last_occurrences`), so that the later chunk wins as on
    the CPU path; ``index_copy_`` with repeated ids would pick one at random.
    """
    ids = block_ids if keep is None else block_ids.index_select(0, keep)
    picked, moved = views.picked, views.moved
    for index, (target, part) in enumerate(zip(targets, views.parts, strict=True)):
        moved.copy_(part)
        source = picked if keep is None else picked.index_select(dim, keep)
        target.index_copy_(dim, ids, source)
        if pause is not None:
            pause(index)


def gather_group(
    layers: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    staging: torch.Tensor,
    scratch: torch.Tensor,
) -> None:
    """Gather ``g`` chunks into ``staging`` (uint8 ``[g, chunk_nbytes]``), one slot per row.

    ``block_ids`` is the ``g * bpc`` block ids of the chunks, flat, on the layers' device;
    ``scratch`` is a uint8 buffer of at least one layer's share of the group. The rows come
    out exactly as :func:`kvrpc.kv.layout.gather_chunks` writes slots.
    """
    views = group_views(layout, staging, scratch)
    gather_views(layer_views(layers, layout), views, layout.block_dim, block_ids)


def scatter_group(
    layers: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    staging: torch.Tensor,
    scratch: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> None:
    """Scatter the rows of ``staging`` into the blocks ``block_ids`` names (the reverse copy).

    ``keep`` is as for :func:`scatter_views`.
    """
    views = group_views(layout, staging, scratch)
    scatter_views(layer_views(layers, layout), views, layout.block_dim, block_ids, keep)


def last_occurrences(block_ids: list[int]) -> list[int] | None:
    """Positions of the last occurrence of each id, in order; None when every id is written once.

    A :data:`~kvrpc.kv.layout.SKIP_BLOCK` id (a block a retrieve must leave alone) is never
    among the positions.
    """
    last: dict[int, int] = {}
    for position, block in enumerate(block_ids):
        if block != SKIP_BLOCK:
            last[block] = position
    if len(last) == len(block_ids):
        return None
    return sorted(last.values())


def group_sizes(chunks: int, per_group: int) -> list[int]:
    """How a batch of ``chunks`` is cut into groups of at most ``per_group`` chunks.

    The first and the last group are a quarter of the others: nothing overlaps the first
    group's gather (a store's DMA waits for it) or the last group's scatter (a retrieve's
    end waits for it), so keeping them small shortens the batch.
    """
    if chunks <= 0:
        return []
    small = max(1, per_group // 4)
    if chunks <= min(per_group, 2 * small):
        return [chunks]
    sizes = [small]
    left = chunks - small
    while left > per_group + small:
        sizes.append(per_group)
        left -= per_group
    if left > small:
        sizes += [left - small, small]
    else:
        sizes.append(left)
    return sizes


def warm_group_sizes(per_group: int) -> list[int]:
    """The group sizes whose graphs :meth:`CopyEngine.submit_warm` captures.

    Every size a whole-chunk batch's groups can have (:func:`group_sizes` with at most
    ``per_group`` a group: every size up to it) while there are at most
    :data:`_WARM_SIZES` of them; past that, the small end groups and the full group, which
    every large batch has (its one remainder group is captured on first use).
    """
    if per_group <= _WARM_SIZES:
        return list(range(1, per_group + 1))
    return sorted({max(1, per_group // 4), per_group})


def contiguous_runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """``(first index, count)`` of each run of consecutive slot numbers, in order."""
    return pitched_runs(slots, 1)


@dataclass(eq=False)
class Transfer:
    """One batch for the engine: whose blocks, which ones, which pool slots."""

    layers: list[torch.Tensor]
    layout: KVLayout
    block_ids: torch.Tensor
    """``[n, bpc]`` int64 on the CPU, one row per chunk."""
    host: torch.Tensor
    """The pool's whole pinned buffer (1-D uint8)."""
    slots: list[int]
    slot_nbytes: int
    ready: Any = None
    """The worker's event: its blocks are ready to read (store) or to write (retrieve)."""
    deadline: float | None = None
    """``time.monotonic()`` past which the copy must not start (retrieve)."""


@dataclass(eq=False)
class _Lane:
    """One direction's streams and staging ring (see the module docstring).

    ``kernels`` runs the gathers (store) or scatters (retrieve), ``dma`` the host copies.
    """

    kernels: Any = None
    dma: Any = None
    staging: list[torch.Tensor] = field(default_factory=list)
    scratch: torch.Tensor | None = None
    free: list[Any] = field(default_factory=list)
    """Per staging buffer: the event after which its last reader is done (None: free)."""
    next_buffer: int = 0
    views: dict[tuple[int, int, int, KVLayout], GroupViews] = field(default_factory=dict)
    loaded: list[Any] = field(default_factory=list)
    """Per staging buffer, a plain event re-recorded each use: its DMA is done (layer-wise)."""
    freed: list[Any] = field(default_factory=list)
    """Per staging buffer, likewise: its scatter is done (layer-wise)."""


class _IpcEventRing:
    """Interprocess events handed out in turn, each made on first use, reused after ``size``.

    Only the engine thread takes them. A worker may look at an event a while after the
    reply that named it; the ring is long enough that it has not been recorded again by
    then (were it, the worker would only wait for more, never for less).
    """

    def __init__(self, device: torch.device, size: int) -> None:
        self.device = device
        self.size = size
        self._events: list[tuple[Any, CudaEventHandle]] = []
        self._turn = itertools.count()

    def next(self) -> tuple[Any, CudaEventHandle]:
        """The next event and its handle."""
        index = next(self._turn) % self.size
        if index == len(self._events):
            self._events.append(new_ipc_event(self.device))
        return self._events[index]

    def fill(self) -> int:
        """Make every event the ring will hand out, now; returns how many were made.

        Making an interprocess event (``cudaEventCreate`` and ``cudaIpcGetEventHandle``)
        holds the GIL; the engine's warm-up fills its rings so that no copy pays it. The
        GIL is let go every few events, so that the event loop's thread is not kept out.
        """
        made = 0
        while len(self._events) < self.size:
            self._events.append(new_ipc_event(self.device))
            made += 1
            if made % 16 == 0:
                time.sleep(0)
        return made


class CopyEngine:
    """One GPU's copy engine: an executor thread, a lane per direction, their staging rings.

    ``group_bytes`` bounds one staging buffer (rounded down to whole chunks, at least one)
    and ``depth`` is how many each lane has; ``waiters`` threads wait for completion events,
    and as many others poll workers' ready events, so that slow or dead workers never delay
    the completions of the others.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        group_bytes: int = 256 << 20,
        depth: int = 2,
        waiters: int = 4,
    ) -> None:
        self.device = device
        self.group_bytes = group_bytes
        self.depth = depth
        name = f"kvrpc-copy-{device.index}"
        self.executor = concurrent.futures.ThreadPoolExecutor(1, name)
        self.waiters = concurrent.futures.ThreadPoolExecutor(waiters, f"{name}-wait")
        self.pollers = concurrent.futures.ThreadPoolExecutor(waiters, f"{name}-poll")
        self._store_lane = _Lane()
        self._retrieve_lane = _Lane()
        self._done = _IpcEventRing(device, _DONE_EVENTS)
        # The layer-wise retrieves' events have a ring of their own, a few batches long: the
        # handles a worker sees repeat soon, so it opens each once (opening an IPC event
        # costs far more than polling it).
        self._layer_events = _IpcEventRing(device, _LAYER_EVENTS)
        self._timings: dict[CudaEventHandle, tuple[Any, Any]] = {}
        self._graphs: dict[tuple[int, int, int, bool], tuple[Any, torch.Tensor]] = {}
        self._graphs_broken = False
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

    # --------------------------------------------------------------- run in the engine thread

    def _fit(self, row_nbytes: int) -> int:
        """How many rows of ``row_nbytes`` one staging buffer holds: the largest group."""
        return max(1, self.group_bytes // row_nbytes)

    def _setup(self, lane: _Lane, per_group: int, chunk_nbytes: int, layer_bytes: int) -> None:
        """Make the lane's streams on first use, and buffers for groups of ``per_group``."""
        if lane.kernels is None:
            torch.cuda.set_device(self.device)
            lane.kernels = _cuda.Stream(self.device)
            lane.dma = _cuda.Stream(self.device)
            # Recorded again each use: a stream's wait takes the record it sees when
            # enqueued, and making events costs more than the rest of a layer's enqueue on
            # some hosts.
            lane.loaded = [_cuda.Event() for _ in range(self.depth)]
            lane.freed = [_cuda.Event() for _ in range(self.depth)]
        need = per_group * chunk_nbytes
        if not lane.staging or lane.staging[0].numel() < need:
            self._drain(lane)
            lane.staging = [
                torch.empty(need, dtype=torch.uint8, device=self.device) for _ in range(self.depth)
            ]
            lane.views.clear()
            lane.free = [None] * self.depth
            self._graphs.clear()
        scratch = per_group * layer_bytes
        if lane.scratch is None or lane.scratch.numel() < scratch:
            self._drain(lane)
            lane.scratch = torch.empty(scratch, dtype=torch.uint8, device=self.device)
            lane.views.clear()
            self._graphs.clear()

    def _drain(self, *lanes: _Lane) -> None:
        for lane in lanes or (self._store_lane, self._retrieve_lane):
            if lane.kernels is not None:
                lane.kernels.synchronize()
                lane.dma.synchronize()

    def _groups(
        self, transfer: Transfer, lane: _Lane, *, layerwise: bool = False
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

    def _host_runs(
        self, transfer: Transfer, first: int, count: int, chunk_nbytes: int
    ) -> list[tuple[torch.Tensor, int, int]]:
        """Host views to copy for chunks ``first..first+count``: (view, staging row, rows)."""
        slots = transfer.slots[first : first + count]
        size = transfer.slot_nbytes
        out = []
        if size == chunk_nbytes:
            for start, length in contiguous_runs(slots):
                begin = slots[start] * size
                out.append((transfer.host[begin : begin + length * size], start, length))
        else:
            for start, slot in enumerate(slots):
                begin = slot * size
                out.append((transfer.host[begin : begin + chunk_nbytes], start, 1))
        return out

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
        self, lane: _Lane, count: int, chunk_nbytes: int, layout: KVLayout
    ) -> tuple[int, GroupViews, Any]:
        """Take the lane's next staging buffer: (its number, views, event it is free after).

        The views for ``count`` chunks are built once per buffer, size and layout.
        """
        b = lane.next_buffer
        lane.next_buffer = (b + 1) % self.depth
        return b, self._views(lane, b, count, chunk_nbytes, layout), lane.free[b]

    def _views(
        self, lane: _Lane, b: int, count: int, chunk_nbytes: int, layout: KVLayout
    ) -> GroupViews:
        """Staging buffer ``b``'s views for a group of ``count`` chunks, built once."""
        key = (b, count, chunk_nbytes, layout)
        views = lane.views.get(key)
        if views is None:
            assert lane.scratch is not None
            staging = lane.staging[b][: count * chunk_nbytes].view(count, chunk_nbytes)
            views = lane.views[key] = group_views(layout, staging, lane.scratch)
        return views

    def _run_group(
        self,
        layers: list[torch.Tensor],
        views_of_layers: list[torch.Tensor],
        views: GroupViews,
        layout: KVLayout,
        ids: torch.Tensor,
        b: int,
        count: int,
        scatter: bool,
    ) -> None:
        """Gather (or scatter) one group on the current stream, as one CUDA graph replay.

        Two launches a layer cost about a millisecond of Python for 32 layers, and the
        first group's DMA waits for them. A graph captured once per (KV cache, staging
        buffer, group size, direction) replays them in one launch; its block ids are copied
        into the graph's own ids tensor first. Where capture fails, the group runs eagerly.
        """
        dim = layout.block_dim
        entry = self._graph(layers, views_of_layers, views, dim, ids, b, count, scatter)
        if entry is None:
            run = scatter_views if scatter else gather_views
            run(views_of_layers, views, dim, ids, pause=_yield)
            return
        graph, static_ids = entry
        static_ids.copy_(ids, non_blocking=True)
        graph.replay()

    def _graph(
        self,
        layers: list[torch.Tensor],
        views_of_layers: list[torch.Tensor],
        views: GroupViews,
        dim: int,
        ids: torch.Tensor,
        b: int,
        count: int,
        scatter: bool,
    ) -> tuple[Any, torch.Tensor] | None:
        """The group's graph and its ids tensor, captured on first use; None: run eagerly."""
        if self._graphs_broken:
            return None
        key = (id(layers), b, count, scatter)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(views_of_layers, views, dim, ids, scatter)
            if entry is not None:
                self._graphs[key] = entry
        return entry

    def _capture(
        self,
        views_of_layers: list[torch.Tensor],
        views: GroupViews,
        dim: int,
        ids: torch.Tensor,
        scatter: bool,
    ) -> tuple[Any, torch.Tensor] | None:
        static_ids = torch.empty_like(ids)
        graph = _cuda.CUDAGraph()
        try:
            # Captured on the lane's own stream (the current one here). Not through
            # torch.cuda.graph(), which first synchronizes the device and runs a full GC
            # pass; thread-local mode keeps the waiter threads' CUDA calls legal meanwhile.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                if scatter:
                    scatter_views(views_of_layers, views, dim, static_ids)
                else:
                    gather_views(views_of_layers, views, dim, static_ids)
            finally:
                graph.capture_end()
        except Exception:
            logger.warning("CUDA graph capture failed; the copy engine runs eagerly", exc_info=True)
            self._graphs_broken = True
            return None
        return graph, static_ids

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
        for first, count, ids in groups:
            b, views, free = self._next_views(lane, count, chunk_nbytes, layout)
            staging = views.rows
            if free is not None:
                gather.wait_event(free)
            with torch.cuda.stream(gather):
                self._run_group(transfer.layers, sources, views, layout, ids, b, count, False)
                gathered = _cuda.Event()
                gathered.record(gather)
            copy.wait_event(gathered)
            with torch.cuda.stream(copy):
                for view, row, rows in self._host_runs(transfer, first, count, chunk_nbytes):
                    view.copy_(staging[row : row + rows].view(-1), non_blocking=True)
                freed = _cuda.Event()
                freed.record(copy)
            lane.free[b] = freed
            time.sleep(0)
        return self._finish(copy, started, chunk_nbytes * len(transfer.slots))

    def _check_deadline(self, transfer: Transfer) -> None:
        if transfer.deadline is not None and time.monotonic() > transfer.deadline:
            raise DeadlinePassed(
                "the retrieve's deadline passed before its copy started; no block was written"
            )

    def _start_retrieve(self, transfer: Transfer, lane: _Lane) -> Any:
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
                for view, row, rows in self._host_runs(transfer, first, count, chunk_nbytes):
                    staging[row : row + rows].view(-1).copy_(view, non_blocking=True)
                loaded = _cuda.Event()
                loaded.record(copy)
            scatter.wait_event(loaded)
            with torch.cuda.stream(scatter):
                keep = self._keep(transfer, first, count)
                if keep is None:
                    self._run_group(transfer.layers, targets, views, layout, ids, b, count, True)
                else:  # repeated block ids: rare, run eagerly
                    scatter_views(targets, views, layout.block_dim, ids, keep, _yield)
                freed = _cuda.Event()
                freed.record(scatter)
            lane.free[b] = freed
            time.sleep(0)  # let the event loop thread take the GIL between groups
        return self._finish(scatter, started, chunk_nbytes * len(transfer.slots))

    def _keep(self, transfer: Transfer, first: int, count: int) -> torch.Tensor | None:
        """The rows' :func:`last_occurrences` on the GPU, enqueued on the current stream."""
        rows_ids = transfer.block_ids[first : first + count].reshape(-1).tolist()
        keep_list = last_occurrences(rows_ids)
        if keep_list is None:
            return None
        return torch.tensor(keep_list, dtype=torch.int64).to(self.device, non_blocking=True)

    def _retrieve_layers(
        self, transfer: Transfer
    ) -> tuple[Any, CudaEventHandle, list[CudaEventHandle]]:
        """A retrieve in layer order, an interprocess event recorded after each layer.

        Layer ``l``'s part of a chunk is bytes ``[l * L, (l + 1) * L)`` of its slot (``L``
        one layer's share), so each layer is one pitched DMA per run of consecutive slots
        (:func:`kvrpc.kv.server.dma.copy_rows_to_device`) into a staging buffer laid out as a
        one-layer slot, then one scatter into that layer's blocks. Runs eagerly
        (two launches a layer and group): a graph per layer would buy little here, since the
        copies of later layers, not these launches, are what an engine waits for.
        """
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
            keeps = [self._keep(transfer, first, count) for first, count, _ in groups]
        bases = [[slot * size for slot in transfer.slots[f : f + c]] for f, c, _ in groups]
        loaded, freed = lane.loaded, lane.freed
        handles: list[CudaEventHandle] = []
        for layer, target in enumerate(targets):
            offset = layer * layer_bytes
            for (_, count, ids), keep, base in zip(groups, keeps, bases, strict=True):
                b, views, free = self._next_views(lane, count, layer_bytes, one_layer)
                if free is not None:
                    copy.wait_event(free)
                offsets = [start + offset for start in base]
                copy_rows_to_device(views.rows, transfer.host, offsets, size, copy)
                loaded[b].record(copy)
                scatter.wait_event(loaded[b])
                with torch.cuda.stream(scatter):
                    scatter_views([target], views, layout.block_dim, ids, keep)
                freed[b].record(scatter)
                lane.free[b] = freed[b]
            if layer == len(targets) - 1:
                break  # the batch's own completion event stands for the last layer
            event, handle = self._layer_events.next()
            event.record(scatter)
            handles.append(handle)
            _yield(layer)
        nbytes = layer_bytes * layout.num_layers * len(transfer.slots)
        done, handle = self._finish(scatter, started, nbytes)
        handles.append(handle)
        return done, handle, handles

    def _warm(
        self,
        layers: list[torch.Tensor],
        layout: KVLayout,
        blocks_per_chunk: int,
        host: torch.Tensor,
        slot_nbytes: int,
    ) -> None:
        """Pay what the first copies of ``layers`` would pay; see :meth:`submit_warm`."""
        if id(layers) in self._warmed:
            return
        chunk_nbytes = layout.chunk_nbytes(blocks_per_chunk)
        layer_bytes = layout.layer_chunk_nbytes(blocks_per_chunk)
        if chunk_nbytes > slot_nbytes or host.numel() < slot_nbytes:
            raise KVError(
                f"cannot warm up for {chunk_nbytes}-byte chunks: the pool's slots are "
                f"{slot_nbytes} bytes and its buffer {host.numel()}"
            )
        timings: dict[str, float] = {}
        mark = [time.perf_counter()]

        def step(name: str) -> None:
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - mark[0]
            mark[0] = now
            time.sleep(0)  # each step holds the GIL: let the event loop's thread in between

        torch.cuda.set_device(self.device)
        # Alone on the GPU: the warm-up writes staging buffers without the lanes' free
        # events, so no copy of another instance may be in flight meanwhile (nor be
        # enqueued: this thread is the only one that enqueues).
        self._drain()
        step("drain")

        # Streams, events and buffers at the largest group a copy of this layout uses:
        # whole chunks (store, retrieve) and single layers (layer-wise retrieve, whose
        # groups, and scratch, are up to group_bytes). The caching allocator takes the
        # memory from the driver now (cudaMalloc holds the GIL; the first stream costs 3
        # ms, on an H200), and nothing a copy asks for later is larger, so no copy
        # reallocates them. Reallocating drops every captured graph: without this, the
        # first layer-wise retrieve of a large batch grew the retrieve scratch and threw
        # away both lanes' graphs.
        fit, fit_layer = self._fit(chunk_nbytes), self._fit(layer_bytes)
        store, retrieve = self._store_lane, self._retrieve_lane
        self._setup(retrieve, fit_layer, layer_bytes, layer_bytes)
        self._setup(retrieve, fit, chunk_nbytes, layer_bytes)
        self._setup(store, fit, chunk_nbytes, layer_bytes)
        step("buffers")

        # Every interprocess event the rings will hand out: about 13 us of driver calls
        # each under the GIL (0.55 ms the first), 10 ms for the 768, that would otherwise
        # be paid one a batch and one a layer (layer-wise) by the first few hundred copies.
        self._done.fill()
        self._layer_events.fill()
        step("ipc_events")

        dim = layout.block_dim
        bpc = blocks_per_chunk
        with torch.cuda.stream(store.kernels):
            cpu_ids = torch.arange(fit * bpc, dtype=torch.int64) % layout.num_blocks
            ids = cpu_ids.to(self.device, non_blocking=True)
        step("ids")

        # Store lane. Kernels load lazily (CUDA's default lazy module loading): the first
        # launch of each kernel loads its module under the GIL. Measured on an H200: the
        # first gather of a group over 32 layers took 85 ms against 0.9 ms after, the
        # first scatter 31 ms against 0.8; that was most of what a cold server's first
        # store (90 ms against 40) and retrieve (62 ms) paid. One eager gather of a whole
        # group from the worker's layers (a read; the rows land in staging) loads
        # index_select's and the strided copy's kernels before any capture.
        sources = layer_views(layers, layout)
        counts = warm_group_sizes(fit)
        with torch.cuda.stream(store.kernels):
            gather_views(sources, self._views(store, 0, fit, chunk_nbytes, layout), dim, ids)
            timing = _cuda.Event(enable_timing=True)
            timing.record(store.kernels)
        step("kernels_store")
        # The graphs a store replays, keyed by (these layers, staging buffer, group size):
        # every size a batch's groups can have (warm_group_sizes) on every buffer, since
        # which buffer a group gets depends on the batches before it. The first capture in
        # a process took 20 ms, later ones about 1 ms. Replayed once each (reads of the
        # layers again) so that their first launch (graph upload) is paid here too.
        with torch.cuda.stream(store.kernels):
            for count in counts:
                for b in range(self.depth):
                    views = self._views(store, b, count, chunk_nbytes, layout)
                    self._run_group(
                        layers, sources, views, layout, ids[: count * bpc], b, count, False
                    )
                    step("graphs_store")
        # The device-to-host path, into engine-owned pinned memory (the pool's slots may
        # hold chunks): the first copy_ of a kind sets up torch's and the driver's paths.
        if self._sink is None:
            self._sink = torch.empty(1 << 16, dtype=torch.uint8, pin_memory=True)
        sink = self._sink
        rows = self._views(store, 0, 1, chunk_nbytes, layout).rows.view(-1)
        store.dma.wait_stream(store.kernels)
        with torch.cuda.stream(store.dma):
            width = min(sink.numel(), rows.numel())
            sink[:width].copy_(rows[:width], non_blocking=True)
        step("dma_store")

        # Retrieve lane: the host-to-device paths read the pool (a read changes no byte):
        # one whole chunk as Tensor.copy_ moves it, and one layer of two slots as the
        # layer-wise retrieve's pitched cuMemcpy2DAsync moves it (its first call resolves
        # the driver entry point).
        last = self.depth - 1
        one = self._views(retrieve, 0, 1, chunk_nbytes, layout)
        pair = min(2, host.numel() // slot_nbytes)
        one_layer = replace(layout, num_layers=1)
        layered = self._views(retrieve, last, pair, layer_bytes, one_layer)
        with torch.cuda.stream(retrieve.dma):
            one.rows.view(-1).copy_(host[:chunk_nbytes], non_blocking=True)
        offsets = [slot * slot_nbytes for slot in range(pair)]
        copy_rows_to_device(layered.rows, host, offsets, slot_nbytes, retrieve.dma)
        step("dma_retrieve")
        # The scatter kernels (strided copy, index_copy_, and the repeated-ids path's
        # index_select), loaded by eager scatters into an engine-owned stand-in for one
        # chunk's blocks of a layer, never into the worker's layers.
        retrieve.kernels.wait_stream(retrieve.dma)
        with torch.cuda.stream(retrieve.kernels):
            shape = list(layout.shape)
            shape[dim] = bpc
            stand_in = layer_views(
                [torch.empty(shape, dtype=layout.torch_dtype, device=self.device)], layout
            )
            own = torch.arange(bpc, dtype=torch.int64, device=self.device)
            scatter_views(stand_in * layout.num_layers, one, dim, own, pause=_yield)
            scatter_views(stand_in * layout.num_layers, one, dim, own, own, _yield)
            layer_one = self._views(retrieve, last, 1, layer_bytes, one_layer)
            scatter_views(stand_in, layer_one, dim, own)
        step("kernels_retrieve")
        # The graphs a retrieve replays, captured on the worker's layers but not replayed:
        # a replay would write them. Capture only records the launches.
        targets = layer_views(layers, layout)
        with torch.cuda.stream(retrieve.kernels):
            for count in counts:
                for b in range(self.depth):
                    views = self._views(retrieve, b, count, chunk_nbytes, layout)
                    self._graph(layers, targets, views, dim, ids[: count * bpc], b, count, True)
                    step("graphs_retrieve")

        # The waiter and poller threads start on first use, and a thread's first CUDA call
        # binds the device's context: start one of each now, each doing what it does.
        done = _cuda.Event()
        done.record(retrieve.kernels)
        self.wait(done).result()
        self.wait_ready(done, lambda: False, 10.0).result()
        step("threads")
        self._drain()
        timing.synchronize()
        step("drain")
        self._warmed[id(layers)] = layers
        self.warm_timings = timings
        logger.info(
            "copy engine on %s warmed up for %s in %.1f ms (%d graphs cached)",
            self.device,
            layout.describe(),
            sum(timings.values()) * 1e3,
            len(self._graphs),
        )

    # --------------------------------------------------------------- called from the loop

    def submit_store(
        self, transfer: Transfer
    ) -> concurrent.futures.Future[tuple[Any, CudaEventHandle]]:
        """Enqueue a store in the engine thread; resolves to (done event, its IPC handle)."""
        return self.executor.submit(self._store, transfer)

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
        return self.executor.submit(self._warm, layers, layout, blocks_per_chunk, host, slot_nbytes)

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


def _yield(layer: int) -> None:
    # Every few layers' launches, let the event loop's thread take the GIL: a torch launch
    # holds it, and without a pause the loop could wait for a whole group's launches.
    if layer % 8 == 7:
        time.sleep(0)


def _release(engine: CopyEngine, tensors: list[torch.Tensor]) -> None:
    engine._drain()
    # The graphs captured for these tensors hold their addresses: drop them before the
    # list (and so, possibly, its id) goes.
    for key in [key for key in engine._graphs if key[0] == id(tensors)]:
        del engine._graphs[key]
    if engine._warmed.get(id(tensors)) is tensors:
        del engine._warmed[id(tensors)]
    tensors.clear()
