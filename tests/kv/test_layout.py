"""KV layouts: chunk sizes, the slot byte layout, and gather/scatter between layers and slots."""

from __future__ import annotations

import pytest
import torch

from kvrpc.errors import KVConfigError, KVError
from kvrpc.kv.layout import (
    KVLayout,
    LayoutKind,
    gather_chunk,
    gather_chunks,
    scatter_chunk,
    scatter_chunks,
)

NUM_LAYERS = 3
NUM_BLOCKS = 12
BPC = 4

# Small layer shapes of each kind; the last dim is 16 bytes or more in every dtype tested.
SHAPES = {
    LayoutKind.PAGED: (2, NUM_BLOCKS, 4, 2, 16),
    LayoutKind.MLA: (NUM_BLOCKS, 4, 24),
    LayoutKind.BLOCKS_FIRST: (NUM_BLOCKS, 2, 4, 2, 16),
    LayoutKind.PAGED_HND: (2, NUM_BLOCKS, 2, 4, 16),
    LayoutKind.BLOCKS_FIRST_HND: (NUM_BLOCKS, 2, 2, 4, 16),
    LayoutKind.BNHC: (NUM_BLOCKS, 4, 2, 32),
    LayoutKind.BHNC: (NUM_BLOCKS, 2, 4, 32),
    LayoutKind.HBNC: (2, NUM_BLOCKS, 4, 32),
}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]


def random_layers(
    kind: LayoutKind, dtype: torch.dtype, seed: int = 0, count: int = NUM_LAYERS
) -> list[torch.Tensor]:
    """Layers full of random bytes: NaNs, infinities and denormals included."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(count):
        layer = torch.empty(SHAPES[kind], dtype=dtype)
        flat = layer.view(-1).view(torch.uint8)
        flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8, generator=generator))
        layers.append(layer)
    return layers


def block_bytes(layer: torch.Tensor, layout: KVLayout, block: int) -> bytes:
    """The bytes of one block of one layer, in the layer's natural order."""
    return bytes(layer.select(layout.block_dim, block).contiguous().view(-1).view(torch.uint8))


def same_bytes(left: list[torch.Tensor], right: list[torch.Tensor]) -> bool:
    return all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        for a, b in zip(left, right, strict=True)
    )


def slot_for(layout: KVLayout, bpc: int = BPC) -> torch.Tensor:
    return torch.zeros(layout.chunk_nbytes(bpc), dtype=torch.uint8)


@pytest.mark.parametrize("kind", list(LayoutKind))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_then_scatter_into_other_blocks_copies_bytes_exactly(
    kind: LayoutKind, dtype: torch.dtype
) -> None:
    source = random_layers(kind, dtype, seed=1)
    layout = KVLayout.from_tensors(source, kind)
    target = [torch.zeros_like(layer) for layer in source]
    gathered_ids = torch.tensor([7, 2, 9, 4])
    scattered_ids = torch.tensor([0, 11, 5, 6])
    slot = slot_for(layout)

    gather_chunk(source, layout, gathered_ids, slot)
    scatter_chunk(target, layout, scattered_ids, slot)

    empty = bytes(layout.block_nbytes)
    for src_layer, dst_layer in zip(source, target, strict=True):
        for src_block, dst_block in zip(gathered_ids.tolist(), scattered_ids.tolist(), strict=True):
            assert block_bytes(dst_layer, layout, dst_block) == block_bytes(
                src_layer, layout, src_block
            )
        untouched = set(range(NUM_BLOCKS)) - set(scattered_ids.tolist())
        assert all(block_bytes(dst_layer, layout, b) == empty for b in untouched)


@pytest.mark.parametrize("kind", list(LayoutKind))
@pytest.mark.parametrize(
    "ids", [[7, 2, 9, 4], [3, 4, 5, 6]], ids=["scattered ids", "consecutive ids"]
)
def test_slot_holds_each_element_where_the_documented_formula_says(
    kind: LayoutKind, ids: list[int]
) -> None:
    layers = random_layers(kind, torch.bfloat16, seed=2)
    layout = KVLayout.from_tensors(layers, kind)
    slot = slot_for(layout)
    gather_chunk(layers, layout, torch.tensor(ids), slot)

    chunk_shape = list(layout.shape)
    chunk_shape[layout.block_dim] = BPC
    layer_part = layout.layer_chunk_nbytes(BPC)
    itemsize = 2
    # The last element of block position 2 (K/V index 1 where there is one) in layer 2.
    index = [n - 1 for n in chunk_shape]
    index[layout.block_dim] = 2
    flat = 0
    for i, n in zip(index, chunk_shape, strict=True):
        flat = flat * n + i
    at = 2 * layer_part + itemsize * flat
    layer_index = list(index)
    layer_index[layout.block_dim] = ids[2]
    element = layers[2][tuple(layer_index)].reshape(1)

    assert bytes(slot[at : at + itemsize]) == bytes(element.view(torch.uint8))


@pytest.mark.parametrize("kind", list(LayoutKind))
def test_slot_of_paged_and_other_kinds_is_the_layer_restricted_to_the_chunk(
    kind: LayoutKind,
) -> None:
    layers = random_layers(kind, torch.float16, seed=3)
    layout = KVLayout.from_tensors(layers, kind)
    ids = torch.tensor([10, 1, 8, 3])
    slot = slot_for(layout)
    gather_chunk(layers, layout, ids, slot)

    expected = b"".join(
        bytes(layer.index_select(layout.block_dim, ids).contiguous().view(-1).view(torch.uint8))
        for layer in layers
    )
    assert bytes(slot) == expected


def test_gather_chunks_fills_each_slot_as_gather_chunk_would() -> None:
    layers = random_layers(LayoutKind.PAGED, torch.float16, seed=4)
    layout = KVLayout.from_tensors(layers)
    rows = torch.tensor([[1, 2, 3, 4], [11, 0, 5, 6], [9, 9, 8, 7]])
    batch = [slot_for(layout) for _ in range(3)]
    gather_chunks(layers, layout, rows, batch)

    for row, slot in zip(rows, batch, strict=True):
        single = slot_for(layout)
        gather_chunk(layers, layout, row, single)
        assert torch.equal(slot, single)


def test_scatter_chunks_applies_rows_in_order_so_the_later_row_wins() -> None:
    layers = [torch.zeros(SHAPES[LayoutKind.MLA], dtype=torch.float32) for _ in range(2)]
    layout = KVLayout.from_tensors(layers)
    first, second = slot_for(layout), slot_for(layout)
    first.fill_(1)
    second.fill_(2)
    scatter_chunks(layers, layout, torch.tensor([[0, 1, 2, 3], [3, 4, 5, 6]]), [first, second])

    block3 = layers[0][3].view(-1).view(torch.uint8)
    block0 = layers[1][0].view(-1).view(torch.uint8)
    assert bool((block3 == 2).all()) and bool((block0 == 1).all())


def test_gather_into_a_slot_at_an_odd_byte_offset_still_copies_exactly() -> None:
    layers = random_layers(LayoutKind.PAGED, torch.float16, seed=5)
    layout = KVLayout.from_tensors(layers)
    ids = torch.tensor([5, 3, 1, 0])
    aligned = slot_for(layout)
    gather_chunk(layers, layout, ids, aligned)
    buffer = torch.zeros(layout.chunk_nbytes(BPC) + 1, dtype=torch.uint8)
    odd = buffer[1:]

    gather_chunk(layers, layout, ids, odd)
    target = [torch.zeros_like(layer) for layer in layers]
    scatter_chunk(target, layout, ids, odd)

    assert torch.equal(odd, aligned)
    for src, dst in zip(layers, target, strict=True):
        assert block_bytes(dst, layout, 3) == block_bytes(src, layout, 3)


def test_empty_batch_copies_nothing() -> None:
    layers = random_layers(LayoutKind.MLA, torch.float16)
    layout = KVLayout.from_tensors(layers)
    before = [layer.clone() for layer in layers]
    gather_chunks(layers, layout, torch.empty(0, BPC, dtype=torch.int64), [])
    scatter_chunks(layers, layout, torch.empty(0, BPC, dtype=torch.int64), [])
    assert same_bytes(layers, before)


def test_block_id_out_of_range_is_refused_naming_the_id_and_the_range() -> None:
    layers = random_layers(LayoutKind.PAGED, torch.float16)
    layout = KVLayout.from_tensors(layers)
    with pytest.raises(KVError, match=rf"block id 12 .*\[0, {NUM_BLOCKS}\)"):
        gather_chunk(layers, layout, torch.tensor([0, 1, 12, 3]), slot_for(layout))
    with pytest.raises(KVError, match=r"block id -1 "):
        layout.check_block_ids(torch.tensor([[0, -1]]))


def test_block_ids_must_be_int64() -> None:
    layout = KVLayout.from_tensors(random_layers(LayoutKind.MLA, torch.float16))
    with pytest.raises(KVError, match="int64"):
        layout.check_block_ids(torch.tensor([0, 1], dtype=torch.int32))


def test_failed_check_in_a_batch_writes_no_block() -> None:
    layers = random_layers(LayoutKind.PAGED, torch.float16)
    layout = KVLayout.from_tensors(layers)
    before = [layer.clone() for layer in layers]
    good, short = slot_for(layout), torch.ones(10, dtype=torch.uint8)
    good.fill_(7)

    with pytest.raises(KVConfigError, match=r"slot 1 must be .* uint8 tensor of \d+ bytes"):
        scatter_chunks(layers, layout, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), [good, short])
    assert same_bytes(layers, before)


def test_layers_that_do_not_match_the_layout_are_refused() -> None:
    layers = random_layers(LayoutKind.PAGED, torch.float16)
    layout = KVLayout.from_tensors(layers)
    with pytest.raises(KVConfigError, match="got 2 layer tensors but the layout has 3"):
        gather_chunk(layers[:2], layout, torch.tensor([0, 1, 2, 3]), slot_for(layout))
    wrong = [*layers[:2], layers[2].float()]
    with pytest.raises(KVConfigError, match="layer tensor 2 is float32"):
        gather_chunk(wrong, layout, torch.tensor([0, 1, 2, 3]), slot_for(layout))


def test_chunk_sizes_follow_from_the_layer_shape_and_dtype() -> None:
    paged = KVLayout(LayoutKind.PAGED, 32, (2, 512, 16, 8, 128), "float16")
    assert paged.block_dim == 1 and paged.num_blocks == 512 and paged.block_size == 16
    assert paged.block_nbytes == 2 * 16 * 8 * 128 * 2
    assert paged.layer_chunk_nbytes(16) == 16 * 65536
    assert paged.chunk_nbytes(16) == 32 * 16 * 65536

    mla = KVLayout(LayoutKind.MLA, 61, (1000, 64, 576), "float8_e4m3fn")
    assert (mla.block_dim, mla.num_blocks, mla.block_size) == (0, 1000, 64)
    assert mla.block_nbytes == 64 * 576
    assert mla.chunk_nbytes(4) == 61 * 4 * 64 * 576

    first = KVLayout(LayoutKind.BLOCKS_FIRST, 2, (100, 2, 16, 4, 64), "bfloat16")
    assert (first.block_dim, first.num_blocks, first.block_size) == (0, 100, 16)
    assert first.chunk_nbytes(8) == 2 * 8 * (2 * 16 * 4 * 64 * 2)


@pytest.mark.parametrize("bpc", [0, -1, 513])
def test_blocks_per_chunk_outside_the_cache_is_a_config_error(bpc: int) -> None:
    layout = KVLayout(LayoutKind.PAGED, 1, (2, 512, 16, 8, 128), "float16")
    with pytest.raises(KVConfigError, match=r"blocks per chunk must be an int in \[1, 512\]"):
        layout.chunk_nbytes(bpc)


@pytest.mark.parametrize(
    ("shape", "kind"),
    [
        ((2, 10, 16, 4, 8), LayoutKind.PAGED),
        ((10, 16, 64), LayoutKind.MLA),
        ((10, 2, 16, 4, 8), LayoutKind.BLOCKS_FIRST),
        ((2, 2, 16, 4, 8), LayoutKind.PAGED),
    ],
)
def test_from_tensors_tells_the_kind_from_the_shape(
    shape: tuple[int, ...], kind: LayoutKind
) -> None:
    layout = KVLayout.from_tensors([torch.zeros(shape, dtype=torch.bfloat16)] * 2)
    assert layout == KVLayout(kind, 2, shape, "bfloat16")
    assert layout.torch_dtype is torch.bfloat16


@pytest.mark.parametrize(
    ("kind", "block_size"),
    [
        (LayoutKind.PAGED_HND, 16),
        (LayoutKind.BLOCKS_FIRST_HND, 16),
        (LayoutKind.BNHC, 2),
        (LayoutKind.BHNC, 16),
        (LayoutKind.HBNC, 16),
    ],
)
def test_heads_before_tokens_kinds_read_the_block_size_from_their_own_dim(
    kind: LayoutKind, block_size: int
) -> None:
    shape = {
        LayoutKind.PAGED_HND: (2, 10, 4, 16, 8),
        LayoutKind.BLOCKS_FIRST_HND: (10, 2, 4, 16, 8),
        LayoutKind.BNHC: (10, 2, 16, 8),
        LayoutKind.BHNC: (10, 4, 16, 8),
        LayoutKind.HBNC: (4, 10, 16, 8),
    }[kind]
    layout = KVLayout.from_tensors([torch.zeros(shape)], kind)
    assert (layout.block_size, layout.num_blocks) == (block_size, 10)


def test_a_skipped_block_id_in_a_scatter_leaves_that_block_as_it_was() -> None:
    source = random_layers(LayoutKind.PAGED, torch.float16, seed=5)
    layout = KVLayout.from_tensors(source)
    target = random_layers(LayoutKind.PAGED, torch.float16, seed=6)
    before = [layer.clone() for layer in target]
    slot = slot_for(layout)
    gather_chunk(source, layout, torch.tensor([7, 2, 9, 4]), slot)

    scatter_chunk(target, layout, torch.tensor([-1, -1, 5, 6]), slot)

    for src, dst, old in zip(source, target, before, strict=True):
        assert block_bytes(dst, layout, 5) == block_bytes(src, layout, 9)
        assert block_bytes(dst, layout, 6) == block_bytes(src, layout, 4)
        untouched = set(range(NUM_BLOCKS)) - {5, 6}
        assert all(block_bytes(dst, layout, b) == block_bytes(old, layout, b) for b in untouched)


def test_a_gather_refuses_a_skipped_block_id() -> None:
    layers = random_layers(LayoutKind.MLA, torch.float16)
    layout = KVLayout.from_tensors(layers)
    with pytest.raises(KVError, match="block id -1 is out of range"):
        gather_chunk(layers, layout, torch.tensor([-1, 1, 2, 3]), slot_for(layout))


def test_from_tensors_takes_the_kind_when_the_shape_is_ambiguous() -> None:
    tensors = [torch.zeros(2, 2, 16, 4, 8)]
    layout = KVLayout.from_tensors(tensors, LayoutKind.BLOCKS_FIRST)
    assert layout.kind is LayoutKind.BLOCKS_FIRST and layout.num_blocks == 2


def test_from_tensors_names_the_tensor_of_another_shape() -> None:
    tensors = [torch.zeros(2, 8, 4, 2, 8)] * 2 + [torch.zeros(2, 9, 4, 2, 8)]
    with pytest.raises(
        KVConfigError, match=r"KV tensor 2 has shape \[2, 9, 4, 2, 8\] but tensor 0"
    ):
        KVLayout.from_tensors(tensors)


def test_from_tensors_names_the_tensor_of_another_dtype() -> None:
    tensors = [torch.zeros(8, 4, 16), torch.zeros(8, 4, 16, dtype=torch.float16)]
    with pytest.raises(
        KVConfigError, match="KV tensor 1 has dtype float16 but tensor 0 has float32"
    ):
        KVLayout.from_tensors(tensors)


def test_from_tensors_refuses_a_non_contiguous_tensor() -> None:
    base = torch.zeros(16, 4, 8)
    with pytest.raises(KVConfigError, match="KV tensor 1 is not contiguous"):
        KVLayout.from_tensors([base[:8], base[::2]])


@pytest.mark.parametrize(
    ("shape", "kind", "message"),
    [
        ((8, 16), None, "cannot tell the KV layout"),
        ((8, 2, 16, 64), None, "a 4-D KV layer .* pass its kind"),
        ((3, 8, 16, 4, 8), None, "cannot tell the KV layout"),
        ((8, 16, 4), LayoutKind.PAGED, "a paged layer has 5 dims"),
        ((3, 8, 16, 4, 8), LayoutKind.PAGED, "K and V on dim 0, which must be 2"),
        ((8, 3, 16, 4, 8), LayoutKind.BLOCKS_FIRST, "K and V on dim 1, which must be 2"),
    ],
)
def test_from_tensors_refuses_a_shape_that_fits_no_kind(
    shape: tuple[int, ...], kind: LayoutKind | None, message: str
) -> None:
    with pytest.raises(KVConfigError, match=message):
        KVLayout.from_tensors([torch.zeros(shape)], kind)


def test_from_tensors_refuses_no_tensors() -> None:
    with pytest.raises(KVConfigError, match="no KV tensors"):
        KVLayout.from_tensors([])


@pytest.mark.parametrize("kind", list(LayoutKind))
def test_layout_survives_the_wire(kind: LayoutKind) -> None:
    layout = KVLayout(kind, 4, SHAPES[kind], "float8_e4m3fn")
    wire = layout.to_wire()
    assert wire == {
        "kind": kind.value,
        "num_layers": 4,
        "shape": list(SHAPES[kind]),
        "dtype": "float8_e4m3fn",
    }
    assert KVLayout.from_wire(wire) == layout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "sliding"}, "unknown KV layout kind 'sliding'"),
        ({"dtype": "float17"}, "unknown KV dtype 'float17'"),
        ({"dtype": "half"}, "alias; spell it 'float16'"),
        ({"dtype": "bool"}, "cannot hold a KV cache"),
        ({"shape": [2, 8, 16]}, "a paged layer has 5 dims"),
        ({"shape": [2, 8, 0, 4, 8]}, "tuple of positive ints"),
        ({"num_layers": 0}, "num_layers must be a positive int"),
        ({"shape": "2x8"}, "shape must be a list"),
    ],
)
def test_malformed_layout_from_the_wire_is_a_config_error(
    change: dict[str, object], message: str
) -> None:
    wire = {**KVLayout(LayoutKind.PAGED, 2, (2, 8, 16, 4, 8), "float16").to_wire(), **change}
    with pytest.raises(KVConfigError, match=message):
        KVLayout.from_wire(wire)


def test_layout_from_the_wire_needs_exactly_its_keys() -> None:
    wire = KVLayout(LayoutKind.MLA, 2, (8, 16, 64), "float16").to_wire()
    with pytest.raises(KVConfigError, match="exactly the keys"):
        KVLayout.from_wire({**wire, "extra": 1})
    with pytest.raises(KVConfigError, match="exactly the keys"):
        KVLayout.from_wire([wire])


def test_describe_names_layers_kind_dtype_and_shape() -> None:
    layout = KVLayout(LayoutKind.PAGED, 32, (2, 512, 16, 8, 128), "bfloat16")
    assert layout.describe() == "32 x paged bfloat16[2, 512, 16, 8, 128]"


def test_a_single_chunk_takes_one_row_of_ids() -> None:
    layers = random_layers(LayoutKind.MLA, torch.float16)
    layout = KVLayout.from_tensors(layers)
    with pytest.raises(KVError, match="1-D tensor of blocks_per_chunk ids"):
        gather_chunk(layers, layout, torch.tensor([[0, 1, 2, 3]]), slot_for(layout))
