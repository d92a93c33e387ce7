"""The DMA store's plan: which bytes of which block land where in a slot, as pitched copies.

A store without kernels moves a worker's blocks straight from its layer tensors into the
pinned pool slots, one ``cuMemcpy2DAsync`` per :class:`PitchedCopy` and layer
(:func:`kvrpc.kv.server.dma.copy_runs_to_host`). This module says what those copies are,
from the :class:`~kvrpc.kv.layout.KVLayout`, the chunks' block ids and their slots alone:
pure functions over ints, tested on the CPU against :func:`kvrpc.kv.layout.gather_chunks`.

Geometry
--------
Every layout kind is, as bytes, ``[outer, num_blocks, inner]`` per layer: ``outer`` is the
product of the dims before the block dim (2 for ``PAGED``'s K and V, the heads for ``HBNC``,
1 where blocks come first) and ``inner`` the bytes of everything after it. So byte ``x`` of
block ``b`` under outer index ``o`` is at ``(o * num_blocks + b) * inner + x`` of the layer.
A slot holds layer ``l`` at ``[l * L, (l + 1) * L)`` (``L = bpc * outer * inner``), in the
layer's own order with the block dim cut to the chunk's ``bpc`` blocks
(:mod:`kvrpc.kv.layout`): position ``j`` of the chunk under ``o`` is at
``l * L + (o * bpc + j) * inner``.

Runs
----
Consecutive positions ``j .. j + k - 1`` holding ascending consecutive block ids ``b .. b +
k - 1`` are ``k * inner`` consecutive bytes on both sides: one *piece* per outer index.
Pieces of equal width whose source and destination both step by fixed amounts (the same
chunk's K then V; the same position range of neighbouring chunks in neighbouring slots)
make one 2-D copy. The plan is the same for every layer but for the layer's base address
and ``l * L``, so it is made once, for layer 0.

A block table that is not in ascending runs (random, or descending as a recycled table can
be) needs a copy per block and layer; :func:`call_limit` bounds what a batch may take
before the engine falls back to its gather kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvrpc.kv.layout import KVLayout

__all__ = [
    "BYTES_PER_CALL",
    "FREE_CALLS",
    "MAX_PITCH",
    "BlockGeometry",
    "DmaGroup",
    "PitchedCopy",
    "block_runs",
    "call_limit",
    "layer_copies",
    "plan_calls",
    "plan_groups",
]

#: The largest pitch ``cuMemcpy2DAsync`` takes (``CU_DEVICE_ATTRIBUTE_MAX_PITCH`` on every
#: GPU the engine runs on): larger steps are not merged, and copy row by row.
MAX_PITCH = (1 << 31) - 1

#: Driver calls any batch may take, however small (a call costs a few microseconds).
FREE_CALLS = 128
#: Past :data:`FREE_CALLS`, a batch may take a call per this many bytes: about where a
#: call's host time (a few microseconds) matches the time PCIe takes to move the bytes.
BYTES_PER_CALL = 256 << 10


@dataclass(frozen=True)
class BlockGeometry:
    """A layer as bytes ``[outer, num_blocks, inner]`` (see the module docstring)."""

    outer: int
    num_blocks: int
    inner: int

    @classmethod
    def of(cls, layout: KVLayout) -> BlockGeometry:
        """The geometry of ``layout``'s layers."""
        dim = layout.block_dim
        outer = math.prod(layout.shape[:dim])
        inner = math.prod(layout.shape[dim + 1 :]) * layout.torch_dtype.itemsize
        return cls(outer, layout.num_blocks, inner)

    def layer_chunk_nbytes(self, blocks_per_chunk: int) -> int:
        """``L``: one layer's part of a chunk's slot."""
        return self.outer * blocks_per_chunk * self.inner


@dataclass(frozen=True, slots=True)
class PitchedCopy:
    """``height`` rows of ``width`` bytes, from a layer tensor to the host buffer.

    ``src`` is a byte offset into the layer tensor; ``dst`` a byte offset into the pool's
    buffer for layer 0 (layer ``l``'s copy lands ``l * L`` further). Row ``r`` reads
    ``src + r * src_pitch`` and writes ``dst + r * dst_pitch``; a single row's pitches are
    its width. Both pitches are at least the width, so rows never overlap.
    """

    src: int
    dst: int
    width: int
    height: int
    src_pitch: int
    dst_pitch: int


@dataclass(frozen=True)
class DmaGroup:
    """Chunks ``first .. first + count - 1`` of a batch and their layer-0 copies."""

    first: int
    count: int
    copies: list[PitchedCopy]


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(first position, first block id, length)`` of each run of ascending consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for index in range(1, len(block_ids) + 1):
        if index == len(block_ids) or block_ids[index] != block_ids[index - 1] + 1:
            runs.append((start, block_ids[start], index - start))
            start = index
    return runs


def _merge(pieces: list[tuple[int, int, int]], max_pitch: int) -> list[PitchedCopy]:
    """Greedily merge one-row pieces ``(src, dst, width)``, in order, into pitched copies.

    A piece joins the copy before it when it has the copy's width and continues both of its
    steps (the second row fixes them), each step at least the width and at most
    ``max_pitch``.
    """
    copies: list[PitchedCopy] = []
    src = dst = width = height = src_pitch = dst_pitch = 0
    for s, d, w in pieces:
        if height and w == width:
            if height == 1:
                sp, dp = s - src, d - dst
                if w <= sp <= max_pitch and w <= dp <= max_pitch:
                    height, src_pitch, dst_pitch = 2, sp, dp
                    continue
            elif s == src + height * src_pitch and d == dst + height * dst_pitch:
                height += 1
                continue
        if height:
            copies.append(PitchedCopy(src, dst, width, height, src_pitch, dst_pitch))
        src, dst, width, height, src_pitch, dst_pitch = s, d, w, 1, w, w
    if height:
        copies.append(PitchedCopy(src, dst, width, height, src_pitch, dst_pitch))
    return copies


def layer_copies(
    geometry: BlockGeometry,
    rows: Sequence[Sequence[int]],
    slots: Sequence[int],
    slot_nbytes: int,
    max_pitch: int = MAX_PITCH,
) -> list[PitchedCopy]:
    """The copies that move layer 0's part of chunks ``rows`` into pool ``slots``.

    ``rows[c]`` are chunk ``c``'s block ids (each in ``[0, num_blocks)``, any order,
    repeats allowed) and ``slots[c]`` its slot, ``slot_nbytes`` apart in the buffer. Two
    orders are tried and the one with fewer copies kept: every run as one copy of
    ``outer`` rows (K and V together), or each outer index's pieces merged across runs and
    chunks (whole chunks of consecutive blocks in consecutive slots: a copy per outer index
    for the group).
    """
    if len(rows) != len(slots):
        raise ValueError(f"{len(rows)} chunks of block ids but {len(slots)} slots")
    outer, num_blocks, inner = geometry.outer, geometry.num_blocks, geometry.inner
    runs = [
        (slot * slot_nbytes, position, block, length)
        for row, slot in zip(rows, slots, strict=True)
        for position, block, length in block_runs(list(row))
    ]
    if not runs:
        return []
    bpc = len(rows[0])
    if any(len(row) != bpc for row in rows):
        raise ValueError("every chunk of a batch has the same number of blocks")
    pieces = [
        ((o * num_blocks + block) * inner, base + (o * bpc + position) * inner, length * inner)
        for o in range(outer)
        for base, position, block, length in runs
    ]
    by_outer = _merge(pieces, max_pitch)
    if outer == 1 or num_blocks * inner > max_pitch:
        return by_outer
    by_run = [
        PitchedCopy(
            block * inner,
            base + position * inner,
            length * inner,
            outer,
            num_blocks * inner,
            bpc * inner,
        )
        for base, position, block, length in runs
    ]
    return by_run if len(by_run) <= len(by_outer) else by_outer


def plan_groups(
    layout: KVLayout,
    rows: Sequence[Sequence[int]],
    slots: Sequence[int],
    slot_nbytes: int,
    sizes: Sequence[int],
    max_pitch: int = MAX_PITCH,
) -> list[DmaGroup]:
    """The batch cut into groups of ``sizes`` chunks (in order), each with its copies.

    A group is the unit whose completion the engine records (its checksums are folded once
    it has landed); its copies merge only within it.
    """
    if sum(sizes) != len(rows):
        raise ValueError(f"group sizes {list(sizes)} do not cover {len(rows)} chunks")
    geometry = BlockGeometry.of(layout)
    groups = []
    first = 0
    for count in sizes:
        end = first + count
        copies = layer_copies(geometry, rows[first:end], slots[first:end], slot_nbytes, max_pitch)
        groups.append(DmaGroup(first, count, copies))
        first = end
    return groups


def plan_calls(groups: Sequence[DmaGroup], num_layers: int) -> int:
    """Driver calls the plan takes: each copy once per layer."""
    return num_layers * sum(len(group.copies) for group in groups)


def call_limit(
    nbytes: int, free_calls: int = FREE_CALLS, bytes_per_call: int = BYTES_PER_CALL
) -> int:
    """The most driver calls a DMA store of ``nbytes`` may take before it falls back.

    ``free_calls`` for any batch, or one per ``bytes_per_call`` bytes if that is more: a
    fragmented block table costs a call per block and layer, whose host time would then
    exceed the copy's own (and the DMA engines move small pieces slowly).
    """
    return max(free_calls, nbytes // bytes_per_call)
