"""The DMA store's plan maths, checked on the CPU against kvrpc.kv.layout's gather.

:func:`plan_groups` says which pitched copies move a batch's blocks from the layer tensors
into the pool slots. Each copy is played here with plain slicing, row by row, exactly as
``cuMemcpy2DAsync`` would move it, and the slots must then hold exactly the bytes
:func:`gather_chunks` writes, for every layout kind, dtype and block table, with every byte
of a chunk written once and nothing else of the buffer touched. The copies' shapes must
be legal for the driver (pitches at least the width, at most :data:`MAX_PITCH`), and a
block table in runs must take few of them. The GPU side (``cuda`` tests in
tests/test_kv_copy_engine.py) checks that a DMA store equals a kernel store.
"""

from __future__ import annotations

import pytest
import torch

from kvrpc.kv import integrity
from kvrpc.kv.layout import KVLayout, LayoutKind, dtype_name, gather_chunks
from kvrpc.kv.server.copy_plan import fold_slots, group_sizes
from kvrpc.kv.server.dma_plan import (
    MAX_PITCH,
    BlockGeometry,
    DmaGroup,
    PitchedCopy,
    block_runs,
    call_limit,
    layer_copies,
    plan_calls,
    plan_groups,
)

NUM_BLOCKS = 24
LAYERS = 3
BPC = 4

# Every kind, with blocks of several outer indices (PAGED's K and V, HBNC's heads) and rows
# whose width is odd in bytes for fp8.
SHAPES = {
    LayoutKind.PAGED: (2, NUM_BLOCKS, 4, 2, 6),
    LayoutKind.MLA: (NUM_BLOCKS, 4, 5),
    LayoutKind.BLOCKS_FIRST: (NUM_BLOCKS, 2, 4, 2, 6),
    LayoutKind.PAGED_HND: (2, NUM_BLOCKS, 2, 4, 6),
    LayoutKind.BLOCKS_FIRST_HND: (NUM_BLOCKS, 2, 2, 4, 6),
    LayoutKind.BNHC: (NUM_BLOCKS, 4, 2, 6),
    LayoutKind.BHNC: (NUM_BLOCKS, 2, 4, 6),
    LayoutKind.HBNC: (3, NUM_BLOCKS, 4, 6),
}
DTYPES = [torch.bfloat16, torch.float8_e4m3fn, torch.float32]

# Block tables, one row per chunk.
TABLES = {
    # A fresh allocator's: every chunk's blocks follow the last chunk's.
    "consecutive": [[4 * c + j for j in range(BPC)] for c in range(5)],
    # Each chunk one run, the chunks anywhere.
    "chunk-runs": [[16, 17, 18, 19], [0, 1, 2, 3], [8, 9, 10, 11], [20, 21, 22, 23]],
    # Runs shorter than a chunk, across chunk boundaries too.
    "short-runs": [[3, 4, 10, 11], [12, 13, 14, 0], [1, 2, 22, 23]],
    # No two neighbours consecutive.
    "fragmented": [[7, 2, 9, 14], [0, 11, 4, 20], [5, 1, 23, 17], [3, 8, 6, 19]],
    # A recycled table, as vLLM hands one out again: descending.
    "descending": [[23, 22, 21, 20], [19, 18, 17, 16], [15, 14, 13, 12]],
    # The same block in several chunks, and twice in one.
    "repeated": [[5, 5, 6, 7], [0, 9, 4, 5], [5, 6, 7, 8]],
    "one-chunk": [[9, 10, 11, 12]],
}
# Slots per table size: consecutive, with gaps, out of order.
SLOT_ORDERS = {
    "in-order": lambda n: list(range(2, 2 + n)),
    "gaps": lambda n: [3 * i + 1 for i in range(n)],
    "shuffled": lambda n: [(5 * i + 3) % 17 for i in range(n)],
}


def random_layers(layout: KVLayout, seed: int) -> list[torch.Tensor]:
    """Layers of random bit patterns (NaNs included: compared as bytes)."""
    generator = torch.Generator().manual_seed(seed)
    count = torch.Size(layout.shape).numel() * layout.torch_dtype.itemsize
    return [
        torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator)
        .view(layout.torch_dtype)
        .view(layout.shape)
        for _ in range(layout.num_layers)
    ]


def play(
    copies: list[PitchedCopy],
    layers: list[torch.Tensor],
    host: torch.Tensor,
    layer_stride: int,
    written: torch.Tensor,
) -> None:
    """What ``copy_runs_to_host`` asks the driver for, row by row with slicing.

    Counts every byte written in ``written`` (int32, like ``host``), and checks each copy's
    shape as the driver would.
    """
    for copy in copies:
        assert copy.width > 0 and copy.height > 0
        if copy.height > 1:
            assert copy.width <= copy.src_pitch <= MAX_PITCH
            assert copy.width <= copy.dst_pitch <= MAX_PITCH
        else:
            assert copy.src_pitch == copy.dst_pitch == copy.width
    for index, layer in enumerate(layers):
        source = layer.view(-1).view(torch.uint8)
        for copy in copies:
            for row in range(copy.height):
                src = copy.src + row * copy.src_pitch
                dst = index * layer_stride + copy.dst + row * copy.dst_pitch
                assert src + copy.width <= source.numel(), "a copy reads past its layer"
                host[dst : dst + copy.width] = source[src : src + copy.width]
                written[dst : dst + copy.width] += 1


def check_plan(
    layout: KVLayout, rows: list[list[int]], slots: list[int], spare: int, sizes: list[int]
) -> list[DmaGroup]:
    """Plan, play and compare with gather_chunks; returns the plan."""
    chunk_nbytes = layout.chunk_nbytes(BPC)
    slot_nbytes = chunk_nbytes + spare
    layers = random_layers(layout, seed=len(rows) + spare)
    host = torch.full(((max(slots) + 1) * slot_nbytes,), 0xA5, dtype=torch.uint8)
    written = torch.zeros(host.numel(), dtype=torch.int32)
    groups = plan_groups(layout, rows, slots, slot_nbytes, sizes)
    assert [(g.first, g.count) for g in groups] == [
        (sum(sizes[:i]), size) for i, size in enumerate(sizes)
    ]
    for group in groups:
        play(group.copies, layers, host, layout.layer_chunk_nbytes(BPC), written)

    expected = torch.zeros((len(rows), chunk_nbytes), dtype=torch.uint8)
    ids = torch.tensor(rows, dtype=torch.int64)
    gather_chunks(layers, layout, ids, list(expected.unbind(0)))
    wanted = torch.zeros_like(written)
    for row, slot in enumerate(slots):
        begin = slot * slot_nbytes
        assert torch.equal(host[begin : begin + chunk_nbytes], expected[row])
        wanted[begin : begin + chunk_nbytes] = 1
    # Each chunk byte exactly once; the slots' spare bytes and every other slot untouched.
    assert torch.equal(written, wanted)
    assert bool((host[wanted == 0] == 0xA5).all())
    return groups


# ------------------------------------------------------------------ bytes


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("kind", list(SHAPES), ids=lambda k: k.value)
@pytest.mark.parametrize("table", list(TABLES))
def test_the_plan_moves_exactly_the_bytes_gather_chunks_puts_in_each_slot(
    kind: LayoutKind, dtype: torch.dtype, table: str
) -> None:
    layout = KVLayout(kind, LAYERS, SHAPES[kind], dtype_name(dtype))
    rows = TABLES[table]
    check_plan(layout, rows, SLOT_ORDERS["gaps"](len(rows)), 0, [len(rows)])


@pytest.mark.parametrize("order", list(SLOT_ORDERS))
@pytest.mark.parametrize("spare", [0, 40, 3], ids=["exact-slots", "larger-slots", "odd-spare"])
@pytest.mark.parametrize("kind", [LayoutKind.PAGED, LayoutKind.MLA, LayoutKind.HBNC])
@pytest.mark.parametrize("table", ["consecutive", "chunk-runs", "short-runs"])
def test_the_plan_writes_any_slots_of_any_size_and_nothing_around_them(
    kind: LayoutKind, spare: int, order: str, table: str
) -> None:
    layout = KVLayout(kind, LAYERS, SHAPES[kind], "float16")
    rows = TABLES[table]
    check_plan(layout, rows, SLOT_ORDERS[order](len(rows)), spare, [len(rows)])


@pytest.mark.parametrize("table", ["consecutive", "chunk-runs", "repeated"])
@pytest.mark.parametrize("kind", [LayoutKind.PAGED, LayoutKind.BLOCKS_FIRST])
def test_a_batch_cut_into_partial_groups_still_fills_every_slot(
    kind: LayoutKind, table: str
) -> None:
    layout = KVLayout(kind, LAYERS, SHAPES[kind], "bfloat16")
    rows = TABLES[table]
    for sizes in ([1] * len(rows), [1, len(rows) - 1], group_sizes(len(rows), 2)):
        check_plan(layout, rows, SLOT_ORDERS["in-order"](len(rows)), 0, sizes)


@pytest.mark.parametrize("kind", [LayoutKind.PAGED, LayoutKind.MLA, LayoutKind.HBNC])
def test_with_a_tiny_pitch_limit_nothing_merges_and_the_bytes_are_the_same(
    kind: LayoutKind,
) -> None:
    layout = KVLayout(kind, LAYERS, SHAPES[kind], "bfloat16")
    rows = TABLES["consecutive"]
    slots = SLOT_ORDERS["in-order"](len(rows))
    slot_nbytes = layout.chunk_nbytes(BPC)
    geometry = BlockGeometry.of(layout)
    copies = layer_copies(geometry, rows, slots, slot_nbytes, max_pitch=1)
    assert all(copy.height == 1 for copy in copies)
    # A run a chunk per outer index: the whole table in one row each, or a row per chunk.
    assert len(copies) == geometry.outer * len(rows)
    layers = random_layers(layout, seed=3)
    host = torch.zeros((max(slots) + 1) * slot_nbytes, dtype=torch.uint8)
    play(
        copies,
        layers,
        host,
        layout.layer_chunk_nbytes(BPC),
        torch.zeros_like(host, dtype=torch.int32),
    )
    expected = torch.zeros((len(rows), slot_nbytes), dtype=torch.uint8)
    gather_chunks(layers, layout, torch.tensor(rows), list(expected.unbind(0)))
    assert torch.equal(host[slots[0] * slot_nbytes :].view(len(rows), slot_nbytes), expected)


# ------------------------------------------------------------------ how many copies


def geometry_of(kind: LayoutKind) -> BlockGeometry:
    return BlockGeometry.of(KVLayout(kind, LAYERS, SHAPES[kind], "bfloat16"))


def test_the_geometry_is_the_dims_before_and_after_the_block_dim() -> None:
    assert geometry_of(LayoutKind.PAGED) == BlockGeometry(2, NUM_BLOCKS, 4 * 2 * 6 * 2)
    assert geometry_of(LayoutKind.MLA) == BlockGeometry(1, NUM_BLOCKS, 4 * 5 * 2)
    assert geometry_of(LayoutKind.HBNC) == BlockGeometry(3, NUM_BLOCKS, 4 * 6 * 2)
    layout = KVLayout(LayoutKind.PAGED, LAYERS, SHAPES[LayoutKind.PAGED], "bfloat16")
    assert geometry_of(LayoutKind.PAGED).layer_chunk_nbytes(BPC) == layout.layer_chunk_nbytes(BPC)


@pytest.mark.parametrize(
    ("kind", "copies"), [(LayoutKind.PAGED, 2), (LayoutKind.MLA, 1), (LayoutKind.HBNC, 3)]
)
def test_whole_chunks_of_consecutive_blocks_in_consecutive_slots_are_a_copy_per_outer_index(
    kind: LayoutKind, copies: int
) -> None:
    rows = TABLES["consecutive"]
    geometry = geometry_of(kind)
    slot_nbytes = geometry.layer_chunk_nbytes(BPC) * LAYERS + 8
    plan = layer_copies(geometry, rows, list(range(len(rows))), slot_nbytes)
    assert len(plan) == copies
    first = plan[0]
    assert first.height == len(rows)
    assert first.src_pitch == BPC * geometry.inner  # the next chunk's blocks follow
    assert first.dst_pitch == slot_nbytes  # into the next slot


def test_chunks_of_one_run_each_anywhere_are_a_copy_each_with_k_and_v_as_its_rows() -> None:
    rows = TABLES["chunk-runs"]
    geometry = geometry_of(LayoutKind.PAGED)
    plan = layer_copies(geometry, rows, [9, 2, 30, 4], geometry.layer_chunk_nbytes(BPC) * LAYERS)
    assert len(plan) == len(rows)
    assert {(c.height, c.width) for c in plan} == {(2, BPC * geometry.inner)}
    assert {c.src_pitch for c in plan} == {NUM_BLOCKS * geometry.inner}  # K to V
    assert {c.dst_pitch for c in plan} == {BPC * geometry.inner}


@pytest.mark.parametrize("table", ["fragmented", "descending"])
def test_a_table_without_ascending_runs_is_a_copy_per_block(table: str) -> None:
    rows = TABLES[table]
    geometry = geometry_of(LayoutKind.PAGED)
    slots = [0, 5, 9, 13][: len(rows)]
    plan = layer_copies(geometry, rows, slots, geometry.layer_chunk_nbytes(BPC) * LAYERS)
    assert len(plan) == len(rows) * BPC  # K and V of each block in one copy
    assert {c.width for c in plan} == {geometry.inner}


def test_the_plan_is_the_same_whatever_the_layer_count_and_counts_a_call_per_layer() -> None:
    rows = TABLES["chunk-runs"]
    plans = []
    for layers in (1, 5):
        layout = KVLayout(LayoutKind.MLA, layers, SHAPES[LayoutKind.MLA], "bfloat16")
        groups = plan_groups(layout, rows, [0, 2, 4, 6], layout.chunk_nbytes(BPC), [2, 2])
        plans.append([group.copies for group in groups])
        assert plan_calls(groups, layers) == layers * sum(len(g.copies) for g in groups)
    # Layer 0's copies; another layer count moves only the slot offsets.
    assert [len(g) for g in plans[0]] == [len(g) for g in plans[1]]


@pytest.mark.parametrize(
    ("ids", "runs"),
    [
        ([], []),
        ([5], [(0, 5, 1)]),
        ([1, 2, 3, 7, 8, 0], [(0, 1, 3), (3, 7, 2), (5, 0, 1)]),
        ([4, 3, 2], [(0, 4, 1), (1, 3, 1), (2, 2, 1)]),
        ([6, 6, 7], [(0, 6, 1), (1, 6, 2)]),
    ],
)
def test_block_runs_are_the_ascending_consecutive_stretches_in_order(
    ids: list[int], runs: list[tuple[int, int, int]]
) -> None:
    assert block_runs(ids) == runs


def test_plans_refuse_mismatched_chunks_and_slots_and_uneven_chunks() -> None:
    geometry = geometry_of(LayoutKind.MLA)
    with pytest.raises(ValueError, match="slots"):
        layer_copies(geometry, [[0, 1]], [0, 1], 100)
    with pytest.raises(ValueError, match="same number"):
        layer_copies(geometry, [[0, 1], [2]], [0, 1], 100)
    layout = KVLayout(LayoutKind.MLA, LAYERS, SHAPES[LayoutKind.MLA], "bfloat16")
    with pytest.raises(ValueError, match="cover"):
        plan_groups(layout, [[0, 1, 2, 3]] * 3, [0, 1, 2], 10_000, [2])


def test_the_call_limit_is_a_floor_or_a_call_per_so_many_bytes() -> None:
    assert call_limit(0, free_calls=10, bytes_per_call=100) == 10
    assert call_limit(999, free_calls=10, bytes_per_call=100) == 10
    assert call_limit(5_000, free_calls=10, bytes_per_call=100) == 50
    # The 2 GiB batch: a copy per chunk and layer fits, a copy per block does not.
    chunks, layers, blocks = 64, 32, 16
    assert chunks * layers <= call_limit(2 << 30) < chunks * layers * blocks


# ------------------------------------------------------------------ checksums from the slots


@pytest.mark.parametrize(("slot_nbytes", "chunk_nbytes"), [(4096, 4096), (4100, 4000), (97, 93)])
def test_fold_slots_gives_each_slots_chunk_its_own_checksum(
    slot_nbytes: int, chunk_nbytes: int
) -> None:
    generator = torch.Generator().manual_seed(9)
    host = torch.randint(0, 256, (8 * slot_nbytes,), dtype=torch.uint8, generator=generator)
    slots = [3, 4, 5, 0, 7, 1]  # a run of three, then single slots
    folded = integrity.combine(fold_slots(host, slots, slot_nbytes, chunk_nbytes))
    alone = [
        integrity.checksum(host[s * slot_nbytes : s * slot_nbytes + chunk_nbytes]) for s in slots
    ]
    assert folded == alone
    assert len(set(folded)) == len(slots)
