"""The chunk checksum (:mod:`kvrpc.kv.integrity`): its definition, what it detects, CPU = GPU."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrpc.kv import integrity
from kvrpc.kv.integrity import ROW_WORDS

M32 = (1 << 32) - 1


def reference(data: bytes) -> int:
    """The checksum as the module doc defines it, in plain Python integers."""
    padded = data + b"\0" * (-len(data) % 4)
    words = [int.from_bytes(padded[i : i + 4], "little") for i in range(0, len(padded), 4)]
    rows = [words[i : i + ROW_WORDS] for i in range(0, len(words), ROW_WORDS)]
    columns = [0] * ROW_WORDS
    for row in rows:
        for c, word in enumerate(row):
            columns[c] = (columns[c] + word) & M32

    def weight(i: int, lane: int) -> int:
        mul, add = ((0x2545F491, 0x6A09E667), (0x3C6EF372, 0x1F83D9AB))[lane]
        return ((i * mul + add) & 0x7FFFFFFF) | 1

    lane_a = sum((s * weight(c, 0)) & M32 for c, s in enumerate(columns)) & M32
    row_sums = [sum(row) & M32 for row in rows]
    lane_b = sum((s * weight(r, 1)) & M32 for r, s in enumerate(row_sums)) & M32
    lane_b = (lane_b + len(data)) & M32
    return (lane_a << 32) | lane_b


def tensor(data: bytes) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 4095, 4096, 4097, 3 * 4096 + 7, 9 * 4096])
def test_the_fold_is_the_documented_function_of_the_bytes(n: int) -> None:
    data = random_bytes(n, n)
    assert integrity.checksum(tensor(data)) == reference(data)


def test_words_whose_sums_wrap_still_give_the_documented_value() -> None:
    data = b"\xff" * (5 * 4096 + 12)  # every sum and product past 2**32
    assert integrity.checksum(tensor(data)) == reference(data)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=3 * 4096 + 9))
def test_any_bytes_fold_as_documented(data: bytes) -> None:
    assert integrity.checksum(tensor(data)) == reference(data)


def test_a_batch_folds_each_row_like_a_single_chunk() -> None:
    rows = torch.randint(0, 256, (5, 2 * 4096 + 40), dtype=torch.uint8)
    assert integrity.checksums(rows) == [integrity.checksum(row) for row in rows]


def test_unaligned_and_strided_bytes_fold_like_a_contiguous_copy() -> None:
    backing = torch.randint(0, 256, (4, 9001), dtype=torch.uint8)
    parts = backing[:, 3:8003]  # rows not starting on a word, an odd row stride
    expected = [integrity.checksum(row.contiguous()) for row in parts]
    assert integrity.checksums(parts) == expected
    assert [reference(bytes(row.tolist())) for row in parts] == expected


def test_every_single_bit_flip_in_sampled_bytes_changes_the_checksum() -> None:
    data = torch.randint(0, 256, (3 * 4096 + 100,), dtype=torch.uint8)
    base = integrity.checksum(data)
    for offset in random.Random(1).sample(range(data.numel()), 200):
        for bit in range(8):
            flipped = data.clone()
            flipped[offset] ^= 1 << bit
            assert integrity.checksum(flipped) != base, (offset, bit)


def test_swapped_words_and_moved_rows_change_the_checksum() -> None:
    data = torch.randint(0, 256, (8 * 4 * ROW_WORDS,), dtype=torch.uint8)
    words = data.view(torch.int32)
    base = integrity.checksum(data)
    swaps = [(0, 1), (5, ROW_WORDS + 5), (7, 3 * ROW_WORDS + 100), (10, 7 * ROW_WORDS - 1)]
    for i, j in swaps:
        swapped = words.clone()
        swapped[i], swapped[j] = words[j].item(), words[i].item()
        assert integrity.checksum(swapped.view(torch.uint8)) != base, (i, j)
    rows = words.view(8, ROW_WORDS)
    rolled = torch.roll(rows, 1, dims=0).reshape(-1)  # every row one place on
    assert integrity.checksum(rolled.view(torch.uint8)) != base
    assert integrity.checksum(data[: data.numel() - 4]) != base  # cut short
    assert integrity.checksum(torch.cat([data, torch.zeros(4, dtype=torch.uint8)])) != base


def test_bad_input_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        integrity.fold(torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="2-D uint8"):
        integrity.fold(torch.zeros((2, 8), dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D"):
        integrity.checksum(torch.zeros((2, 8), dtype=torch.uint8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m cuda)")
@pytest.mark.parametrize("nbytes", [1, 4096, 4097, 3 * 4096 + 6, 64 << 10, (4 << 20) + 12])
def test_the_gpu_fold_equals_the_cpu_fold_on_the_same_bytes(nbytes: int) -> None:
    rows = torch.randint(0, 256, (6, nbytes), dtype=torch.uint8)
    rows[0] = 0xFF  # sums past 2**32 wrap the same way on both
    on_gpu = integrity.checksums(rows.cuda())
    assert on_gpu == integrity.checksums(rows)
    strided = torch.randint(0, 256, (3, nbytes + 9), dtype=torch.uint8)[:, 1 : nbytes + 1]
    assert integrity.checksums(strided.cuda()) == integrity.checksums(strided)
