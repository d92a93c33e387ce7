"""The copy engine's warm-up: the one-time costs of a KV cache's first copies, paid early.

Run by :meth:`CopyEngine.submit_warm <kvrpc.kv.server.copy_engine.CopyEngine.submit_warm>`
in the engine thread when a ``cuda_ipc`` worker registers. A friend of the engine: it drives
the engine's lanes, views and graphs directly, as the engine's own copies do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch

from kvrpc.errors import KVError
from kvrpc.kv import integrity
from kvrpc.kv.layout import KVLayout
from kvrpc.kv.server import dma
from kvrpc.kv.server.copy_plan import (
    gather_views,
    layer_views,
    scatter_views,
    warm_group_sizes,
    yield_gil,
)
from kvrpc.kv.server.dma import copy_rows_to_device
from kvrpc.kv.server.dma_plan import PitchedCopy

if TYPE_CHECKING:
    from kvrpc.kv.server.copy_engine import CopyEngine

__all__ = ["warm"]

logger = logging.getLogger("kvrpc.kv")

_cuda = cast(Any, torch.cuda)


def warm(
    engine: CopyEngine,
    layers: list[torch.Tensor],
    layout: KVLayout,
    blocks_per_chunk: int,
    host: torch.Tensor,
    slot_nbytes: int,
) -> None:
    """Pay what the first copies of ``layers`` would pay; see :meth:`CopyEngine.submit_warm`."""
    if id(layers) in engine._warmed:
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

    torch.cuda.set_device(engine.device)
    # Alone on the GPU: the warm-up writes staging buffers without the lanes' free
    # events, so no copy of another instance may be in flight meanwhile (nor be
    # enqueued: this thread is the only one that enqueues).
    engine._drain()
    step("drain")

    # Streams, events and buffers at the largest group a copy of this layout uses:
    # whole chunks (store, retrieve) and single layers (layer-wise retrieve, whose
    # groups, and scratch, are up to group_bytes). The caching allocator takes the
    # memory from the driver now (cudaMalloc holds the GIL; the first stream costs 3
    # ms, on an H200), and nothing a copy asks for later is larger, so no copy
    # reallocates them. Reallocating drops every captured graph: without this, the
    # first layer-wise retrieve of a large batch grew the retrieve scratch and threw
    # away both lanes' graphs.
    fit, fit_layer = engine._fit(chunk_nbytes), engine._fit(layer_bytes)
    store, retrieve = engine._store_lane, engine._retrieve_lane
    engine._setup(retrieve, fit_layer, layer_bytes, layer_bytes)
    engine._setup(retrieve, fit, chunk_nbytes, layer_bytes)
    engine._setup(store, fit, chunk_nbytes, layer_bytes)
    step("buffers")

    # Every interprocess event the rings will hand out: about 13 us of driver calls
    # each under the GIL (0.55 ms the first), 10 ms for the 768, that would otherwise
    # be paid one a batch and one a layer (layer-wise) by the first few hundred copies.
    engine._done.fill()
    engine._layer_events.fill()
    step("ipc_events")

    dim = layout.block_dim
    bpc = blocks_per_chunk
    with torch.cuda.stream(store.kernels):
        cpu_ids = torch.arange(fit * bpc, dtype=torch.int64) % layout.num_blocks
        ids = cpu_ids.to(engine.device, non_blocking=True)
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
        gather_views(sources, engine._views(store, 0, fit, chunk_nbytes, layout), dim, ids)
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
            for b in range(engine.depth):
                views = engine._views(store, b, count, chunk_nbytes, layout)
                engine.graphs.run_group(
                    layers, sources, views, layout, ids[: count * bpc], b, count, False
                )
                step("graphs_store")
    # The checksum fold's kernels (integer sums, a few small ops) and its weights, at the
    # group sizes a store folds: loaded here, not by the first store. It reads staging only.
    with torch.cuda.stream(store.kernels):
        for count in counts:
            integrity.fold(engine._views(store, 0, count, chunk_nbytes, layout).rows)
    step("checksums")
    # The device-to-host path, into engine-owned pinned memory (the pool's slots may
    # hold chunks): the first copy_ of a kind sets up torch's and the driver's paths.
    if engine._sink is None:
        engine._sink = torch.empty(1 << 16, dtype=torch.uint8, pin_memory=True)
    sink = engine._sink
    rows = engine._views(store, 0, 1, chunk_nbytes, layout).rows.view(-1)
    store.dma.wait_stream(store.kernels)
    with torch.cuda.stream(store.dma):
        width = min(sink.numel(), rows.numel())
        sink[:width].copy_(rows[:width], non_blocking=True)
    if engine.store_copies == "dma" and dma.available():
        # The DMA store's pitched device-to-host path, from a layer into the sink: its
        # first call per direction sets up the driver's path. The fold threads bind the
        # device's context on their first CUDA call, as the waiters do below.
        width = min(sink.numel(), layout.block_nbytes)
        dma.copy_runs_to_host(
            layers[:1], sink, [PitchedCopy(0, 0, width, 1, width, width)], 0, store.dma
        )
        landed = _cuda.Event()
        landed.record(store.dma)
        engine.folders.submit(landed.synchronize).result()
    step("dma_store")

    # Retrieve lane: the host-to-device paths read the pool (a read changes no byte):
    # one whole chunk as Tensor.copy_ moves it, and one layer of two slots as the
    # layer-wise retrieve's pitched cuMemcpy2DAsync moves it (its first call resolves
    # the driver entry point).
    last = engine.depth - 1
    one = engine._views(retrieve, 0, 1, chunk_nbytes, layout)
    pair = min(2, host.numel() // slot_nbytes)
    one_layer = replace(layout, num_layers=1)
    layered = engine._views(retrieve, last, pair, layer_bytes, one_layer)
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
            [torch.empty(shape, dtype=layout.torch_dtype, device=engine.device)], layout
        )
        own = torch.arange(bpc, dtype=torch.int64, device=engine.device)
        scatter_views(stand_in * layout.num_layers, one, dim, own, pause=yield_gil)
        scatter_views(stand_in * layout.num_layers, one, dim, own, own, yield_gil)
        layer_one = engine._views(retrieve, last, 1, layer_bytes, one_layer)
        scatter_views(stand_in, layer_one, dim, own)
    step("kernels_retrieve")
    # The graphs a retrieve replays, captured on the worker's layers but not replayed:
    # a replay would write them. Capture only records the launches.
    targets = layer_views(layers, layout)
    with torch.cuda.stream(retrieve.kernels):
        for count in counts:
            for b in range(engine.depth):
                views = engine._views(retrieve, b, count, chunk_nbytes, layout)
                engine.graphs.get(layers, targets, views, dim, ids[: count * bpc], b, count, True)
                step("graphs_retrieve")

    # The waiter and poller threads start on first use, and a thread's first CUDA call
    # binds the device's context: start one of each now, each doing what it does.
    done = _cuda.Event()
    done.record(retrieve.kernels)
    engine.wait(done).result()
    engine.wait_ready(done, lambda: False, 10.0).result()
    step("threads")
    engine._drain()
    timing.synchronize()
    step("drain")
    engine._warmed[id(layers)] = layers
    engine.warm_timings = timings
    logger.info(
        "copy engine on %s warmed up for %s in %.1f ms (%d graphs cached)",
        engine.device,
        layout.describe(),
        sum(timings.values()) * 1e3,
        len(engine.graphs),
    )


# --------------------------------------------------------------- called from the loop
