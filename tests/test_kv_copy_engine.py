"""The GPU copy engine's gather/scatter maths, checked on the CPU against kvrpc.kv.layout.

:func:`gather_group` and :func:`scatter_group` copy a group of chunks between the layers and
a staging buffer ``[g, chunk_nbytes]`` whose rows are pool slots; they must move exactly the
bytes that :func:`gather_chunks` / :func:`scatter_chunks` move, for every layout kind and
dtype, so a chunk stored by the GPU path reads back on the CPU path and the other way round.

The engine's warm-up (:meth:`CopyEngine.submit_warm`) is checked on the GPU (``pytest -m
cuda``): it must change no byte of the layers or the pool, and leave the first copies
nothing to capture or allocate.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, cast

import pytest
import torch

from kvrpc.cuda import CudaEventHandle
from kvrpc.errors import KVError
from kvrpc.kv import integrity
from kvrpc.kv.layout import KVLayout, LayoutKind, dtype_name, gather_chunks, scatter_chunks
from kvrpc.kv.server import copy_engine, lanes
from kvrpc.kv.server.copy_engine import CopyEngine
from kvrpc.kv.server.copy_plan import (
    Transfer,
    carrier_dtype,
    contiguous_runs,
    gather_group,
    group_sizes,
    last_occurrences,
    scatter_group,
    warm_group_sizes,
)
from kvrpc.kv.server.dma_plan import plan_calls, plan_groups
from kvrpc.kv.server.lanes import IpcEventRing
from kvrpc.kv.stamps import StampedEvent, open_stamps

NUM_LAYERS = 3
NUM_BLOCKS = 12
BPC = 3

# Per kind, a layer whose row (last dim) is 16 elements wide, and one 5 elements wide: in
# 16-bit dtypes that is 32 / 10 bytes (complex128 / int16 carriers), in fp8 16 / 5 bytes
# (complex128 / uint8), so every carrier width the engine can pick is exercised.
SHAPES = {
    (LayoutKind.PAGED, "wide"): (2, NUM_BLOCKS, 4, 2, 16),
    (LayoutKind.PAGED, "odd"): (2, NUM_BLOCKS, 4, 2, 5),
    (LayoutKind.BLOCKS_FIRST, "wide"): (NUM_BLOCKS, 2, 4, 2, 16),
    (LayoutKind.BLOCKS_FIRST, "odd"): (NUM_BLOCKS, 2, 4, 2, 5),
    (LayoutKind.MLA, "wide"): (NUM_BLOCKS, 4, 16),
    (LayoutKind.MLA, "odd"): (NUM_BLOCKS, 4, 5),
}
DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn]

# Chunks as rows of block ids: every block id differs, in no particular order.
DISTINCT = [[7, 2, 9], [0, 11, 4], [5, 1, 10], [3, 8, 6]]
# Block 5 is named by rows 0 and 2, block 9 by rows 0, 1 and 3: the later row must win.
REPEATED = [[5, 2, 9], [0, 9, 4], [5, 1, 10], [3, 8, 9]]

params = pytest.mark.parametrize(
    ("kind", "width"), list(SHAPES), ids=[f"{k.value}-{w}" for k, w in SHAPES]
)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)


# ------------------------------------------------------------------ helpers


def random_bytes(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor of random bit patterns: NaNs, infinities and denormals included."""
    generator = torch.Generator().manual_seed(seed)
    count = torch.Size(shape).numel() * dtype.itemsize
    bits = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator)
    return bits.view(dtype).view(shape)


def random_layers(layout: KVLayout, seed: int) -> list[torch.Tensor]:
    return [
        random_bytes(layout.shape, layout.torch_dtype, seed * 100 + i)
        for i in range(layout.num_layers)
    ]


def layout_of(kind: LayoutKind, width: str, dtype: torch.dtype) -> KVLayout:
    return KVLayout(kind, NUM_LAYERS, SHAPES[kind, width], dtype_name(dtype))


def bits(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.view(torch.uint8) for t in tensors]


def same_bits(left: list[torch.Tensor], right: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(bits(left), bits(right), strict=True))


def staging_for(layout: KVLayout, groups: int, fill: int = 0xA5) -> torch.Tensor:
    """A staging buffer ``[groups, chunk_nbytes]`` full of a junk byte."""
    return torch.full((groups, layout.chunk_nbytes(BPC)), fill, dtype=torch.uint8)


def scratch_for(layout: KVLayout, groups: int) -> torch.Tensor:
    """Scratch of exactly one layer's share of the group, as the engine sizes it."""
    return torch.empty(groups * layout.layer_chunk_nbytes(BPC), dtype=torch.uint8)


def id_rows(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def block_bytes(layer: torch.Tensor, layout: KVLayout, block: int) -> torch.Tensor:
    return layer.select(layout.block_dim, block).contiguous().view(-1).view(torch.uint8)


# ------------------------------------------------------------------ gather


@params
@dtypes
def test_gather_group_fills_each_staging_row_exactly_as_gather_chunks_fills_a_slot(
    kind: LayoutKind, width: str, dtype: torch.dtype
) -> None:
    layout = layout_of(kind, width, dtype)
    layers = random_layers(layout, seed=1)
    before = [layer.clone() for layer in layers]
    ids = id_rows(DISTINCT)
    expected = staging_for(layout, len(DISTINCT), fill=0)
    gather_chunks(layers, layout, ids, list(expected.unbind(0)))

    staging = staging_for(layout, len(DISTINCT))
    gather_group(layers, layout, ids.view(-1), staging, scratch_for(layout, len(DISTINCT)))

    assert torch.equal(staging, expected)
    assert same_bits(layers, before)  # a gather only reads the layers


@params
@dtypes
def test_gather_group_of_repeated_block_ids_copies_the_block_into_every_row_naming_it(
    kind: LayoutKind, width: str, dtype: torch.dtype
) -> None:
    layout = layout_of(kind, width, dtype)
    layers = random_layers(layout, seed=2)
    ids = id_rows(REPEATED)
    expected = staging_for(layout, len(REPEATED), fill=0)
    gather_chunks(layers, layout, ids, list(expected.unbind(0)))

    staging = staging_for(layout, len(REPEATED))
    gather_group(layers, layout, ids.view(-1), staging, scratch_for(layout, len(REPEATED)))

    assert torch.equal(staging, expected)


def test_gather_group_of_one_chunk_is_one_slot() -> None:
    layout = layout_of(LayoutKind.PAGED, "wide", torch.bfloat16)
    layers = random_layers(layout, seed=3)
    ids = id_rows([[11, 0, 6]])
    expected = staging_for(layout, 1, fill=0)
    gather_chunks(layers, layout, ids, [expected[0]])

    staging = staging_for(layout, 1)
    gather_group(layers, layout, ids.view(-1), staging, scratch_for(layout, 1))

    assert torch.equal(staging, expected)


def test_gather_group_uses_a_larger_scratch_than_it_needs_without_harm() -> None:
    layout = layout_of(LayoutKind.BLOCKS_FIRST, "odd", torch.float8_e4m3fn)
    layers = random_layers(layout, seed=4)
    ids = id_rows(DISTINCT[:2])
    expected = staging_for(layout, 2, fill=0)
    gather_chunks(layers, layout, ids, list(expected.unbind(0)))

    staging = staging_for(layout, 2)
    scratch = torch.empty(10 * layout.chunk_nbytes(BPC) + 1, dtype=torch.uint8)
    gather_group(layers, layout, ids.view(-1), staging, scratch)

    assert torch.equal(staging, expected)


# ------------------------------------------------------------------ scatter


@params
@dtypes
def test_scatter_group_writes_the_blocks_exactly_as_scatter_chunks_does(
    kind: LayoutKind, width: str, dtype: torch.dtype
) -> None:
    layout = layout_of(kind, width, dtype)
    staging = random_bytes((len(DISTINCT), layout.chunk_nbytes(BPC)), torch.uint8, seed=5)
    ids = id_rows(DISTINCT)
    expected = random_layers(layout, seed=6)
    layers = [layer.clone() for layer in expected]
    scatter_chunks(expected, layout, ids, list(staging.unbind(0)))
    staged = staging.clone()

    scatter_group(layers, layout, ids.view(-1), staging, scratch_for(layout, len(DISTINCT)))

    assert same_bits(layers, expected)
    assert torch.equal(staging, staged)  # a scatter only reads the staging rows


@params
@dtypes
def test_scatter_group_with_repeated_block_ids_keeps_the_later_row_as_scatter_chunks_does(
    kind: LayoutKind, width: str, dtype: torch.dtype
) -> None:
    layout = layout_of(kind, width, dtype)
    staging = random_bytes((len(REPEATED), layout.chunk_nbytes(BPC)), torch.uint8, seed=7)
    ids = id_rows(REPEATED)
    expected = random_layers(layout, seed=8)
    layers = [layer.clone() for layer in expected]
    scatter_chunks(expected, layout, ids, list(staging.unbind(0)))

    flat = ids.view(-1)
    keep = last_occurrences(flat.tolist())
    assert keep is not None
    scatter_group(
        layers,
        layout,
        flat,
        staging,
        scratch_for(layout, len(REPEATED)),
        keep=torch.tensor(keep, dtype=torch.int64),
    )

    assert same_bits(layers, expected)


def block_in_slot(layout: KVLayout, slot: torch.Tensor, layer: int, position: int) -> torch.Tensor:
    """The bytes of the chunk's ``position``-th block of ``layer``, by the slot layout formula."""
    size = layout.layer_chunk_nbytes(BPC)
    part = slot[layer * size : (layer + 1) * size].view(layout.torch_dtype)
    block = part.view(layout.chunk_shape(BPC)).select(layout.block_dim, position)
    return block.contiguous().view(-1).view(torch.uint8)


def test_a_repeated_block_ends_with_the_bytes_of_the_last_row_that_names_it() -> None:
    layout = layout_of(LayoutKind.PAGED, "wide", torch.float16)
    staging = random_bytes((len(REPEATED), layout.chunk_nbytes(BPC)), torch.uint8, seed=9)
    layers = random_layers(layout, seed=10)
    flat = id_rows(REPEATED).view(-1)
    keep = torch.tensor(last_occurrences(flat.tolist()) or [], dtype=torch.int64)
    scatter_group(layers, layout, flat, staging, scratch_for(layout, len(REPEATED)), keep=keep)

    for index, layer in enumerate(layers):
        # Block 5: rows 0 and 2, position 0; block 9: rows 0, 1 and 3, last at position 2.
        five, nine = block_bytes(layer, layout, 5), block_bytes(layer, layout, 9)
        assert torch.equal(five, block_in_slot(layout, staging[2], index, 0))
        assert torch.equal(nine, block_in_slot(layout, staging[3], index, 2))
        assert not torch.equal(nine, block_in_slot(layout, staging[1], index, 1))


def test_scatter_group_without_keep_leaves_untouched_blocks_alone() -> None:
    layout = layout_of(LayoutKind.MLA, "odd", torch.float8_e4m3fn)
    staging = random_bytes((1, layout.chunk_nbytes(BPC)), torch.uint8, seed=11)
    layers = random_layers(layout, seed=12)
    before = [layer.clone() for layer in layers]
    written = [2, 7, 4]
    scatter_group(layers, layout, torch.tensor(written), staging, scratch_for(layout, 1))

    for layer, old in zip(layers, before, strict=True):
        for block in range(NUM_BLOCKS):
            same = torch.equal(block_bytes(layer, layout, block), block_bytes(old, layout, block))
            assert same is (block not in written), block


@params
@dtypes
def test_gather_group_then_scatter_group_into_other_blocks_moves_the_bytes_exactly(
    kind: LayoutKind, width: str, dtype: torch.dtype
) -> None:
    layout = layout_of(kind, width, dtype)
    source = random_layers(layout, seed=13)
    target = [torch.zeros_like(layer) for layer in source]
    gathered, scattered = id_rows(DISTINCT[:2]), id_rows([[11, 10, 9], [0, 1, 2]])
    staging = staging_for(layout, 2)
    scratch = scratch_for(layout, 2)

    gather_group(source, layout, gathered.view(-1), staging, scratch)
    scatter_group(target, layout, scattered.view(-1), staging, scratch)

    for src, dst in zip(source, target, strict=True):
        for a, b in zip(gathered.view(-1).tolist(), scattered.view(-1).tolist(), strict=True):
            assert torch.equal(block_bytes(dst, layout, b), block_bytes(src, layout, a))


# ------------------------------------------------------------------ helpers of the engine


@pytest.mark.parametrize(
    ("slots", "runs"),
    [
        ([], []),
        ([5], [(0, 1)]),
        ([3, 4, 5], [(0, 3)]),
        ([3, 4, 5, 9, 10, 2], [(0, 3), (3, 2), (5, 1)]),
        ([8, 7, 6], [(0, 1), (1, 1), (2, 1)]),  # descending slots are not a run
        ([4, 4, 5], [(0, 1), (1, 2)]),  # a repeated slot starts a new run
        ([0, 2, 4], [(0, 1), (1, 1), (2, 1)]),
    ],
)
def test_contiguous_runs_are_the_first_index_and_length_of_each_run_of_consecutive_slots(
    slots: list[int], runs: list[tuple[int, int]]
) -> None:
    assert contiguous_runs(slots) == runs


def test_contiguous_runs_cover_every_slot_once_in_order() -> None:
    slots = [10, 11, 12, 0, 1, 40, 7, 8, 9, 10]
    runs = contiguous_runs(slots)
    covered = [slots[i] for first, count in runs for i in range(first, first + count)]
    assert covered == slots


@pytest.mark.parametrize("ids", [[], [3], [1, 2, 3], [9, 0, 5, 7]])
def test_last_occurrences_is_none_when_no_id_repeats(ids: list[int]) -> None:
    assert last_occurrences(ids) is None


@pytest.mark.parametrize(
    ("ids", "keep"),
    [
        ([4, 4], [1]),
        ([4, 7, 4, 9, 7], [2, 3, 4]),
        ([1, 2, 3, 1, 2, 3], [3, 4, 5]),
        ([5, 2, 9, 0, 9, 4, 5, 1, 10, 3, 8, 9], [1, 3, 5, 6, 7, 8, 9, 10, 11]),
    ],
)
def test_last_occurrences_are_the_positions_of_each_ids_last_use_in_order(
    ids: list[int], keep: list[int]
) -> None:
    assert last_occurrences(ids) == keep


@pytest.mark.parametrize(
    ("kind", "shape", "dtype", "carrier"),
    [
        (LayoutKind.PAGED, (2, 8, 16, 2, 128), "bfloat16", torch.complex128),  # 256-byte row
        (LayoutKind.MLA, (8, 16, 256), "float8_e4m3fn", torch.complex128),  # 256-byte row
        (LayoutKind.BLOCKS_FIRST, (8, 2, 16, 2, 4), "float16", torch.int64),  # 8-byte row
        (LayoutKind.MLA, (8, 16, 2), "float16", torch.int32),  # 4-byte row
        (LayoutKind.PAGED, (2, 8, 16, 2, 5), "bfloat16", torch.int16),  # 10-byte row
        (LayoutKind.MLA, (8, 16, 7), "float8_e4m3fn", torch.uint8),  # 7-byte row: odd
        (LayoutKind.PAGED, (2, 8, 16, 2, 1), "float8_e4m3fn", torch.uint8),  # 1-byte row
    ],
)
def test_carrier_dtype_is_the_widest_element_that_divides_a_row(
    kind: LayoutKind, shape: tuple[int, ...], dtype: str, carrier: torch.dtype
) -> None:
    assert carrier_dtype(KVLayout(kind, 2, shape, dtype)) is carrier


def test_group_sizes_cover_the_batch_within_the_group_size() -> None:
    # Every batch up to 80 chunks against every group size up to 12: a group over the size
    # would overrun the staging buffer (two chunks in groups of one once did).
    for chunks in range(1, 81):
        for per_group in range(1, 13):
            sizes = group_sizes(chunks, per_group)
            assert sum(sizes) == chunks, (chunks, per_group)
            assert max(sizes) <= per_group, (chunks, per_group, sizes)
            assert min(sizes) >= 1


def test_group_sizes_keep_the_first_and_last_groups_small() -> None:
    assert group_sizes(64, 8) == [2, 8, 8, 8, 8, 8, 8, 8, 4, 2]
    assert group_sizes(3, 8) == [3]
    assert group_sizes(0, 8) == []


def test_warm_group_sizes_cover_every_group_of_every_batch_up_to_sixteen_a_group() -> None:
    # The sizes CopyEngine._groups cuts a whole-chunk batch into, for every batch up to 200
    # chunks, on a ring of two buffers: each must have its graph captured by the warm-up.
    for fit in range(1, 17):
        warmed = set(warm_group_sizes(fit))
        for chunks in range(1, 201):
            per_group = min(fit, -(-chunks // 2))
            assert set(group_sizes(chunks, per_group)) <= warmed, (fit, chunks)


def test_warm_group_sizes_past_sixteen_are_the_end_and_full_groups_of_large_batches() -> None:
    assert warm_group_sizes(64) == [16, 64]
    for fit in (17, 33, 256):
        sizes = group_sizes(10 * fit, fit)
        assert {sizes[0], sizes[1]} <= set(warm_group_sizes(fit))
        assert len(warm_group_sizes(fit)) <= 2


def test_an_event_ring_filled_ahead_hands_out_its_events_in_turn_and_makes_no_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = itertools.count()

    def fake_event(device: Any) -> tuple[Any, CudaEventHandle]:
        number = next(made)
        return number, CudaEventHandle("GPU-fake", number.to_bytes(64, "little"))

    monkeypatch.setattr(lanes, "new_ipc_event", fake_event)
    ring = IpcEventRing(torch.device("cuda", 0), 5)
    assert ring.next()[0] == 0  # one made on first use
    assert ring.fill() == 4
    assert ring.fill() == 0
    assert [ring.next()[0] for _ in range(7)] == [1, 2, 3, 4, 0, 1, 2]
    assert next(made) == 5


def test_warm_up_refuses_chunks_larger_than_the_pools_slots_before_any_cuda_call() -> None:
    layout = layout_of(LayoutKind.PAGED, "wide", torch.bfloat16)
    engine = CopyEngine(torch.device("cuda", 0))  # makes threads only, no CUDA call
    try:
        host = torch.empty(4 * layout.chunk_nbytes(BPC), dtype=torch.uint8)
        small = layout.chunk_nbytes(BPC) - 1
        future = engine.submit_warm(random_layers(layout, 20), layout, BPC, host, small)
        with pytest.raises(KVError, match="slots"):
            future.result(timeout=30)
    finally:
        engine.executor.shutdown(wait=True)
        engine.waiters.shutdown(wait=True)
        engine.pollers.shutdown(wait=True)


# ------------------------------------------------------------------ the engine on a GPU

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: runs on the GPU machine with `pytest -m cuda`",
)
GPU_BLOCKS = 64
GPU_SHAPES = {
    "paged-bf16": (LayoutKind.PAGED, (2, GPU_BLOCKS, 16, 2, 64), "bfloat16"),
    "blocks_first-fp16": (LayoutKind.BLOCKS_FIRST, (GPU_BLOCKS, 2, 16, 2, 64), "float16"),
    "mla-fp8": (LayoutKind.MLA, (GPU_BLOCKS, 16, 5), "float8_e4m3fn"),  # a uint8 carrier
}
gpu_layouts = pytest.mark.parametrize("name", list(GPU_SHAPES))
GPU_BPC = 4
PATTERN = 0x5A


def gpu_layout(name: str) -> KVLayout:
    kind, shape, dtype = GPU_SHAPES[name]
    return KVLayout(kind, 4, shape, dtype)


def gpu_layers(layout: KVLayout, seed: int) -> list[torch.Tensor]:
    """Layers of random bit patterns (NaNs too, so compared as bytes)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    layers = []
    for _ in range(layout.num_layers):
        layer = torch.empty(layout.shape, dtype=layout.torch_dtype, device="cuda")
        layer.view(torch.uint8).random_(generator=generator)
        layers.append(layer)
    return layers


def pinned_pool(slots: int, slot_nbytes: int) -> torch.Tensor:
    return torch.full((slots * slot_nbytes,), PATTERN, dtype=torch.uint8).pin_memory()


def engine_for(layout: KVLayout, chunks_a_group: int = 3, **options: Any) -> CopyEngine:
    group = chunks_a_group * layout.chunk_nbytes(GPU_BPC)
    device = torch.device("cuda", torch.cuda.current_device())
    return CopyEngine(device, group_bytes=group, **options)


def blocks_of(layers: list[torch.Tensor], layout: KVLayout, ids: list[int]) -> list[torch.Tensor]:
    index = torch.tensor(ids, device="cuda")
    return [layer.view(torch.uint8).index_select(layout.block_dim, index) for layer in layers]


def run(engine: CopyEngine, submit: Any, transfer: Transfer) -> None:
    done, handle = submit(transfer).result(timeout=60)[:2]
    engine.wait(done, handle).result(timeout=60)


def engine_state(engine: CopyEngine) -> dict[str, Any]:
    lanes = (engine._store_lane, engine._retrieve_lane)
    return {
        "graphs": set(engine.graphs.captured()),
        "staging": [[t.data_ptr() for t in lane.staging] for lane in lanes],
        "scratch": [lane.scratch.data_ptr() if lane.scratch is not None else 0 for lane in lanes],
        "events": (len(engine._done._events), len(engine._layer_events._events)),
    }


@pytest.mark.parametrize("spare", [0, 4096], ids=["exact-slots", "larger-slots"])
@gpu_layouts
@pytest.mark.cuda
@needs_gpu
def test_warm_up_changes_no_byte_of_the_layers_or_the_pool(name: str, spare: int) -> None:
    layout = gpu_layout(name)
    layers = gpu_layers(layout, seed=30)
    before = [layer.view(torch.uint8).clone() for layer in layers]
    slot_nbytes = layout.chunk_nbytes(GPU_BPC) + spare
    host = pinned_pool(8, slot_nbytes)
    engine = engine_for(layout)
    try:
        engine.submit_warm(layers, layout, GPU_BPC, host, slot_nbytes).result(timeout=120)
        torch.cuda.synchronize()
        for layer, old in zip(layers, before, strict=True):
            assert torch.equal(layer.view(torch.uint8), old)
        assert bool((host == PATTERN).all())
        assert len(engine.graphs), "the warm-up captured no graph"
        assert set(engine.warm_timings) >= {"buffers", "ipc_events", "graphs_store"}
    finally:
        engine.close()


@gpu_layouts
@pytest.mark.cuda
@needs_gpu
def test_after_the_warm_up_the_first_copies_capture_allocate_and_make_nothing(name: str) -> None:
    layout = gpu_layout(name)
    layers = gpu_layers(layout, seed=31)
    slot_nbytes = layout.chunk_nbytes(GPU_BPC)
    host = pinned_pool(16, slot_nbytes)
    engine = engine_for(layout)
    order = torch.randperm(GPU_BLOCKS, generator=torch.Generator().manual_seed(32)).tolist()
    chunks = 5  # groups of 1, 3 and 1 chunks, on both buffers; three sets fit the blocks
    a, b, c = (order[i * chunks * GPU_BPC : (i + 1) * chunks * GPU_BPC] for i in range(3))
    slots = [9, 10, 11, 0, 2]  # runs and gaps
    source = [t.clone() for t in blocks_of(layers, layout, a)]
    try:
        engine.submit_warm(layers, layout, GPU_BPC, host, slot_nbytes).result(timeout=120)
        warmed = engine_state(engine)
        assert warmed["events"] == (copy_engine._DONE_EVENTS, copy_engine._LAYER_EVENTS)

        def transfer(ids: list[int]) -> Transfer:
            rows = torch.tensor(ids, dtype=torch.int64).view(chunks, GPU_BPC)
            return Transfer(layers, layout, rows, host, slots, slot_nbytes)

        run(engine, engine.submit_store, transfer(a))
        expected = torch.zeros(chunks, slot_nbytes, dtype=torch.uint8)
        rows = torch.tensor(a, dtype=torch.int64).view(chunks, GPU_BPC)
        gather_chunks([t.cpu() for t in layers], layout, rows, list(expected.unbind(0)))
        for row, slot in enumerate(slots):
            assert torch.equal(host[slot * slot_nbytes : (slot + 1) * slot_nbytes], expected[row])

        run(engine, engine.submit_retrieve, transfer(b))
        run(engine, engine.submit_retrieve_layers, transfer(c))
        torch.cuda.synchronize()
        for got in (blocks_of(layers, layout, b), blocks_of(layers, layout, c)):
            for layer, want in zip(got, source, strict=True):
                assert torch.equal(layer, want)
        assert engine_state(engine) == warmed  # nothing captured, reallocated or made
    finally:
        engine.close()


@pytest.mark.cuda
@needs_gpu
def test_warm_up_again_is_free_another_instance_gets_its_graphs_and_release_drops_them() -> None:
    layout = gpu_layout("paged-bf16")
    first, second = gpu_layers(layout, seed=33), gpu_layers(layout, seed=34)
    slot_nbytes = layout.chunk_nbytes(GPU_BPC)
    host = pinned_pool(8, slot_nbytes)
    engine = engine_for(layout)
    try:
        engine.submit_warm(first, layout, GPU_BPC, host, slot_nbytes).result(timeout=120)
        graphs = set(engine.graphs.captured())
        start = time.perf_counter()
        engine.submit_warm(first, layout, GPU_BPC, host, slot_nbytes).result(timeout=120)
        assert time.perf_counter() - start < 0.5
        assert set(engine.graphs.captured()) == graphs

        engine.submit_warm(second, layout, GPU_BPC, host, slot_nbytes).result(timeout=120)
        theirs = {key for key in engine.graphs.captured() if key[0] == id(second)}
        assert len(theirs) == len(graphs)
        assert set(engine.graphs.captured()) == graphs | theirs

        engine.release(first).result(timeout=60)
        assert set(engine.graphs.captured()) == theirs
        assert id(first) not in engine._warmed and id(second) in engine._warmed
    finally:
        engine.close()


@pytest.mark.parametrize("spare", [0, 4096], ids=["exact-slots", "larger-slots"])
@gpu_layouts
@pytest.mark.cuda
@needs_gpu
def test_a_store_folds_each_chunks_checksum_on_the_gpu_as_the_cpu_folds_its_slot(
    name: str, spare: int
) -> None:
    layout = gpu_layout(name)
    layers = gpu_layers(layout, seed=41)
    chunk_nbytes = layout.chunk_nbytes(GPU_BPC)
    slot_nbytes = chunk_nbytes + spare
    host = pinned_pool(16, slot_nbytes)
    engine = engine_for(layout)
    order = torch.randperm(GPU_BLOCKS, generator=torch.Generator().manual_seed(42)).tolist()
    chunks = 5  # groups of 1, 3 and 1: the fold runs per group, on both staging buffers
    slots = [9, 10, 11, 0, 2]
    try:
        engine.submit_warm(layers, layout, GPU_BPC, host, slot_nbytes).result(timeout=120)
        rows = torch.tensor(order[: chunks * GPU_BPC], dtype=torch.int64).view(chunks, GPU_BPC)
        transfer = Transfer(layers, layout, rows, host, slots, slot_nbytes, checksum=True)
        run(engine, engine.submit_store, transfer)
        assert transfer.checksums is not None and transfer.checksums.is_pinned()
        on_gpu = integrity.combine(transfer.checksums)
        on_cpu = [
            integrity.checksum(host[slot * slot_nbytes : slot * slot_nbytes + chunk_nbytes])
            for slot in slots
        ]
        assert on_gpu == on_cpu
        assert len(set(on_gpu)) == chunks  # five different chunks, five different sums
    finally:
        engine.close()


# ------------------------------------------------------------------ announced layer-wise retrieves


def _stamped_gates(engine: CopyEngine, announced: Any) -> list[StampedEvent]:
    """What a worker polls for each layer of an announced retrieve (see kvrpc.kv.stamps).

    The stamps are mapped as a worker maps them; the events are the engine's own, since
    CUDA refuses to open an interprocess handle in the process that made it.
    """
    assert engine.stamps.ref is not None
    stamps = open_stamps(engine.stamps.ref)
    return [
        StampedEvent(lambda event=event: event, stamps, announced.first_turn + layer)
        for layer, event in enumerate(announced.events)
    ]


@pytest.mark.cuda
@needs_gpu
def test_an_announced_layerwise_retrieve_stays_pending_until_the_engine_records_each_layer() -> (
    None
):
    layout = gpu_layout("paged-bf16")
    layers = gpu_layers(layout, seed=41)
    slot_nbytes = layout.chunk_nbytes(GPU_BPC)
    host = pinned_pool(8, slot_nbytes)
    slots = [1, 2, 5]
    engine = engine_for(layout)

    def transfer(ids: list[int]) -> Transfer:
        rows = torch.tensor(ids, dtype=torch.int64).view(len(slots), GPU_BPC)
        return Transfer(layers, layout, rows, host, slots, slot_nbytes)

    a, b = list(range(12)), list(range(20, 32))
    try:
        engine.submit_warm(layers, layout, GPU_BPC, host, slot_nbytes).result(timeout=120)
        run(engine, engine.submit_store, transfer(a))
        # The engine thread is busy (another batch's enqueue, say) when the retrieve is
        # answered: the worker holds the layers' events, none recorded for this batch.
        blocker = threading.Event()
        engine.executor.submit(blocker.wait, 60)
        announced = engine.announce_layers(layout.num_layers)
        gates = _stamped_gates(engine, announced)
        job = transfer(b)
        job.announced = announced
        future = engine.submit_retrieve_layers(job)
        assert [gate.query() for gate in gates] == [False] * layout.num_layers
        blocker.set()
        done, handle, handles = future.result(timeout=60)
        assert handles == announced.handles
        engine.wait(done, handle).result(timeout=60)
        assert all(gate.query() for gate in gates)
        for got, want in zip(
            blocks_of(layers, layout, b), blocks_of(layers, layout, a), strict=True
        ):
            assert torch.equal(got, want)
    finally:
        engine.close()


@pytest.mark.cuda
@needs_gpu
def test_an_announced_retrieve_past_its_deadline_fails_every_layer_and_writes_nothing() -> None:
    layout = gpu_layout("paged-bf16")
    layers = gpu_layers(layout, seed=42)
    slot_nbytes = layout.chunk_nbytes(GPU_BPC)
    host = pinned_pool(4, slot_nbytes)
    engine = engine_for(layout)
    b = list(range(40, 48))
    before = [t.clone() for t in blocks_of(layers, layout, b)]
    try:
        announced = engine.announce_layers(layout.num_layers)
        gates = _stamped_gates(engine, announced)
        rows = torch.tensor(b, dtype=torch.int64).view(2, GPU_BPC)
        job = Transfer(layers, layout, rows, host, [0, 3], slot_nbytes)
        job.deadline = time.monotonic() - 1.0
        job.announced = announced
        with pytest.raises(copy_engine.DeadlinePassed):
            engine.submit_retrieve_layers(job).result(timeout=60)
        for gate in gates:
            with pytest.raises(KVError, match="failed"):
                gate.query()
        torch.cuda.synchronize()
        for got, want in zip(blocks_of(layers, layout, b), before, strict=True):
            assert torch.equal(got, want)
    finally:
        engine.close()


# ------------------------------------------------------------------ DMA stores (no kernels)

# Block tables a DMA store copies a run at a time: a fresh allocator's, and a chunk a run
# with the chunks anywhere. Five chunks: groups of 1, 3 and 1 (see engine_for).
DMA_TABLES = {
    "consecutive": list(range(8, 8 + 5 * GPU_BPC)),
    "chunk-runs": [b for start in (40, 4, 24, 56, 12) for b in range(start, start + GPU_BPC)],
}
dma_tables = pytest.mark.parametrize("table", list(DMA_TABLES))


def stored_by(
    engine: CopyEngine, layers: list[torch.Tensor], layout: KVLayout, ids: list[int], **kw: Any
) -> tuple[Transfer, torch.Tensor]:
    """Store ``ids`` (five chunks) into a fresh pinned pool; (the transfer, the pool)."""
    slot_nbytes = kw.pop("slot_nbytes", layout.chunk_nbytes(GPU_BPC))
    host = pinned_pool(16, slot_nbytes)
    rows = torch.tensor(ids, dtype=torch.int64).view(-1, GPU_BPC)
    transfer = Transfer(layers, layout, rows, host, [9, 10, 11, 0, 2], slot_nbytes, **kw)
    run(engine, engine.submit_store, transfer)
    if transfer.folded is not None:
        transfer.folded.result(timeout=60)
    return transfer, host


@pytest.mark.parametrize("spare", [0, 4096], ids=["exact-slots", "larger-slots"])
@dma_tables
@gpu_layouts
@pytest.mark.cuda
@needs_gpu
def test_a_dma_store_writes_the_pool_byte_for_byte_as_a_kernel_store_with_the_same_checksums(
    name: str, table: str, spare: int
) -> None:
    layout = gpu_layout(name)
    layers = gpu_layers(layout, seed=50)
    ids = DMA_TABLES[table]
    slot_nbytes = layout.chunk_nbytes(GPU_BPC) + spare
    kernels, dma = engine_for(layout), engine_for(layout, store_copies="dma")
    try:
        by_kernels, kernel_pool = stored_by(
            kernels, layers, layout, ids, slot_nbytes=slot_nbytes, checksum=True
        )
        by_dma, dma_pool = stored_by(
            dma, layers, layout, ids, slot_nbytes=slot_nbytes, checksum=True
        )
        assert torch.equal(dma_pool, kernel_pool)  # the chunks, and every byte around them
        assert by_dma.folded is not None and by_kernels.folded is None
        assert by_dma.checksums is not None and by_kernels.checksums is not None
        assert integrity.combine(by_dma.checksums) == integrity.combine(by_kernels.checksums)
        assert (dma.dma_stores, dma.dma_fallbacks, kernels.dma_stores) == (1, 0, 0)
        assert dma.dma_copies > 0
        # No kernel ran for it: the DMA engine never made a staging buffer to gather into.
        assert dma.staging_bytes() == 0 and len(dma.graphs) == 0
    finally:
        kernels.close()
        dma.close()


@pytest.mark.cuda
@needs_gpu
def test_a_dma_store_of_a_fragmented_table_past_the_call_limit_goes_through_the_kernels() -> None:
    layout = gpu_layout("paged-bf16")
    layers = gpu_layers(layout, seed=51)
    order = torch.randperm(GPU_BLOCKS, generator=torch.Generator().manual_seed(52)).tolist()
    fragmented, runs = order[: 5 * GPU_BPC], DMA_TABLES["consecutive"]
    # A call limit that a consecutive table fits (two copies a group and layer: K and V)
    # and a fragmented one (a copy per block and layer) does not.
    slot_nbytes = layout.chunk_nbytes(GPU_BPC)

    def calls(ids: list[int]) -> int:  # the engine's groups for five chunks: 1, 3 and 1
        rows = torch.tensor(ids).view(5, GPU_BPC).tolist()
        groups = plan_groups(layout, rows, [9, 10, 11, 0, 2], slot_nbytes, [1, 3, 1])
        return plan_calls(groups, layout.num_layers)

    assert calls(runs) <= 64 < calls(fragmented)
    dma = engine_for(layout, store_copies="dma", dma_free_calls=64, dma_bytes_per_call=1 << 40)
    try:
        _, pool = stored_by(dma, layers, layout, fragmented, checksum=True)
        assert (dma.dma_stores, dma.dma_fallbacks) == (0, 1)
        _, again = stored_by(dma, layers, layout, runs, checksum=True)
        assert (dma.dma_stores, dma.dma_fallbacks) == (1, 1)
        for ids, host in ((fragmented, pool), (runs, again)):
            expected = torch.zeros(5, layout.chunk_nbytes(GPU_BPC), dtype=torch.uint8)
            rows = torch.tensor(ids, dtype=torch.int64).view(5, GPU_BPC)
            gather_chunks([t.cpu() for t in layers], layout, rows, list(expected.unbind(0)))
            for row, slot in enumerate([9, 10, 11, 0, 2]):
                got = host[slot * slot_nbytes : (slot + 1) * slot_nbytes]
                assert torch.equal(got, expected[row])
    finally:
        dma.close()


@pytest.mark.cuda
@needs_gpu
def test_a_dma_store_copies_the_blocks_as_the_workers_ready_event_left_them() -> None:
    layout = gpu_layout("blocks_first-fp16")
    layers = gpu_layers(layout, seed=53)
    ids = DMA_TABLES["consecutive"]
    fresh = gpu_layers(layout, seed=54)
    dma = engine_for(layout, store_copies="dma")
    try:
        # The "worker" writes the blocks on a stream of its own, after a long kernel; its
        # ready event comes after the writes. The store is enqueued at once, and must copy
        # the new bytes, not the old.
        writer = cast(Any, torch.cuda).Stream()
        writer.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(writer):
            torch.cuda._sleep(int(2e8))
            for layer, new in zip(layers, fresh, strict=True):
                layer.copy_(new)
            ready = cast(Any, torch.cuda).Event()
            ready.record(writer)
        _, host = stored_by(dma, layers, layout, ids, ready=ready)
        assert dma.dma_stores == 1
        expected = torch.zeros(5, layout.chunk_nbytes(GPU_BPC), dtype=torch.uint8)
        rows = torch.tensor(ids, dtype=torch.int64).view(5, GPU_BPC)
        gather_chunks([t.cpu() for t in fresh], layout, rows, list(expected.unbind(0)))
        slot_nbytes = layout.chunk_nbytes(GPU_BPC)
        for row, slot in enumerate([9, 10, 11, 0, 2]):
            assert torch.equal(host[slot * slot_nbytes : (slot + 1) * slot_nbytes], expected[row])
    finally:
        dma.close()


@gpu_layouts
@pytest.mark.cuda
@needs_gpu
def test_a_dma_engines_warm_up_changes_no_byte_and_its_first_store_makes_nothing(
    name: str,
) -> None:
    layout = gpu_layout(name)
    layers = gpu_layers(layout, seed=55)
    slot_nbytes = layout.chunk_nbytes(GPU_BPC)
    host = pinned_pool(16, slot_nbytes)
    before = [layer.view(torch.uint8).clone() for layer in layers]
    dma = engine_for(layout, store_copies="dma")
    try:
        dma.submit_warm(layers, layout, GPU_BPC, host, slot_nbytes).result(timeout=120)
        torch.cuda.synchronize()
        assert bool((host == PATTERN).all())
        for layer, old in zip(layers, before, strict=True):
            assert torch.equal(layer.view(torch.uint8), old)
        warmed = engine_state(dma)
        rows = torch.tensor(DMA_TABLES["chunk-runs"], dtype=torch.int64).view(5, GPU_BPC)
        transfer = Transfer(layers, layout, rows, host, [9, 10, 11, 0, 2], slot_nbytes)
        transfer.checksum = True
        run(dma, dma.submit_store, transfer)
        assert transfer.folded is not None
        transfer.folded.result(timeout=60)
        assert dma.dma_stores == 1
        assert engine_state(dma) == warmed
    finally:
        dma.close()
