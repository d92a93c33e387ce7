"""The copy engine's plan maths: which bytes of which block go where, in what groups.

Pure functions over torch tensors (any device) and plain numbers: the views a group's gather
or scatter runs through, how a batch splits into groups, which pool slots run together, and
the job record itself. No streams, no threads; tested on the CPU against
:mod:`kvrpc.kv.layout`.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvrpc.kv import integrity
from kvrpc.kv.layout import SKIP_BLOCK, KVLayout
from kvrpc.kv.server.dma import pitched_runs

if TYPE_CHECKING:  # lanes builds on this module's views
    from kvrpc.kv.server.lanes import LayerAnnouncement

__all__ = [
    "GroupViews",
    "Transfer",
    "carrier_dtype",
    "contiguous_runs",
    "fold_slots",
    "gather_group",
    "gather_views",
    "group_sizes",
    "group_views",
    "host_runs",
    "keep_rows",
    "last_occurrences",
    "layer_views",
    "scatter_group",
    "scatter_views",
    "warm_group_sizes",
    "yield_gil",
]

# Widest first; see kvrpc.kv.layout: a wide element type makes index_select / index_copy_
# move 16 bytes per element, and it covers fp8, which has no index kernels of its own.
_CARRIERS = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)
#: Group sizes the warm-up captures graphs for, at most, per staging buffer and direction:
#: each capture is about a millisecond of Python for 32 layers.
_WARM_SIZES = 16


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
    checksum: bool = False
    """Store: fold each chunk's checksum on the GPU beside the copy (:mod:`kvrpc.kv.integrity`)."""
    checksums: torch.Tensor | None = None
    """Store with ``checksum``: set by the engine, int64 ``[n, 2]`` on the host, each
    chunk's lanes. Through the kernels (pinned) it is filled once the batch's completion
    event has completed; through DMA once :attr:`folded` has."""
    folded: concurrent.futures.Future[None] | None = None
    """DMA store with ``checksum``: resolves once the CPU has folded every chunk's slot
    into :attr:`checksums` (or failed to). None on the kernel path."""
    announced: LayerAnnouncement | None = None
    """Layer-wise retrieve: the :class:`~kvrpc.kv.server.lanes.LayerAnnouncement` its reply
    named (None: the engine takes the layers' events itself)."""


def host_runs(
    transfer: Transfer, first: int, count: int, chunk_nbytes: int
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


def fold_slots(
    host: torch.Tensor, slots: Sequence[int], slot_nbytes: int, chunk_nbytes: int
) -> torch.Tensor:
    """Each slot's :func:`~kvrpc.kv.integrity.fold` lanes, int64 ``[len(slots), 2]``.

    Reads the first ``chunk_nbytes`` of each of ``slots`` in ``host`` (the pool's 1-D uint8
    buffer, slots ``slot_nbytes`` apart): one fold per run of consecutive slots, as a
    strided view, never a copy of the bytes. The same lanes the GPU folds from a staging
    row of the same bytes. Torch ops, which release the GIL: call it from a thread.
    """
    out = torch.empty((len(slots), 2), dtype=torch.int64)
    for start, length in contiguous_runs(slots):
        begin = slots[start] * slot_nbytes
        span = host[begin : begin + (length - 1) * slot_nbytes + chunk_nbytes]
        rows = span.as_strided((length, chunk_nbytes), (slot_nbytes, 1))
        out[start : start + length] = integrity.fold(rows)
    return out


def keep_rows(
    transfer: Transfer, first: int, count: int, device: torch.device
) -> torch.Tensor | None:
    """The rows' :func:`last_occurrences` on the GPU, enqueued on the current stream."""
    rows_ids = transfer.block_ids[first : first + count].reshape(-1).tolist()
    keep_list = last_occurrences(rows_ids)
    if keep_list is None:
        return None
    return torch.tensor(keep_list, dtype=torch.int64).to(device, non_blocking=True)


def yield_gil(layer: int) -> None:
    """Every few layers' launches, let the event loop's thread take the GIL.

    A torch launch holds it; without a pause the loop could wait for a whole group's.
    """
    if layer % 8 == 7:
        time.sleep(0)
