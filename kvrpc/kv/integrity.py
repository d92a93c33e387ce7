"""A chunk's end-to-end checksum: a 64-bit fold of its bytes, the same on the CPU and a GPU.

Every chunk gets one when it is stored (on the GPU for ``cuda_ipc`` stores, beside the copy;
on the CPU otherwise), it travels with the chunk through L1, the disk and Redis, and it is
checked whenever the chunk comes back up from a lower tier (and, with
``kvrpc serve --verify-retrieves``, after every copy into a worker's blocks).

The fold uses only integer torch ops whose results do not depend on the order of a
reduction, so a CPU recomputes exactly what a GPU computed. The chunk's bytes are read as
little-endian 32-bit words (a tail of fewer than 4 bytes padded with zeros) and laid out as
a matrix of rows of :data:`ROW_WORDS` words (the last row possibly short). Two sums of every
word, each mod 2**32 (a sum that wraps is exact modulo 2**32 in any order), make the two
32-bit lanes:

* lane A (columns): each column's sum, times an odd weight of its column, summed;
* lane B (rows): each row's sum, times an odd weight of its row, summed, plus the length.

The per-column and per-row steps run over ``nbytes / 4096`` values, so the cost is two
integer reductions over the bytes (no temporary as large as the chunk): a few GB/s on one
CPU core, and far below the PCIe copy it rides beside on a GPU.

So any change confined to one 32-bit word changes both lanes (an odd weight is invertible
mod 2**32); two words swapped within a row change lane A, across rows lane B (unless the
difference of their weights times theirs is 0 mod 2**32), and so does a block of rows moved
elsewhere; random damage goes unseen with odds near 2**-64. What it cannot see is a change
whose every row sum and every column sum stays the same (four words changed in a rectangle,
by amounts that cancel both ways): far from what a flipped bit, a short read, a stale value
or a copy into the wrong blocks does.

It is a check against accidents (a flipped bit, a short read, a copy into the wrong
blocks, a value of another chunk), not against an adversary who can rewrite the store.
"""

from __future__ import annotations

import threading
from typing import Final

import torch

__all__ = ["ROW_WORDS", "checksum", "checksums", "combine", "fold"]

#: Words per row of the fold: the size of the per-word weight table.
ROW_WORDS: Final = 1024

_MASK: Final = 0xFFFFFFFF
_MIX: Final = ((0x2545F491, 0x6A09E667), (0x3C6EF372, 0x1F83D9AB))
_CACHED_ROWS: Final = 1 << 16  # row weights kept per device for chunks up to 256 MiB

_weights: dict[tuple[torch.device, int, int], torch.Tensor] = {}
_weights_lock = threading.Lock()


def _weights_of(count: int, lane: int, device: torch.device) -> torch.Tensor:
    """``count`` odd int64 weights below 2**31 for lane ``lane`` (columns 0, rows 1)."""
    key = (device, lane, count)
    weights = _weights.get(key)
    if weights is None:
        i = torch.arange(count, dtype=torch.int64, device=device)
        mul, add = _MIX[lane]
        weights = ((i * mul + add) & 0x7FFFFFFF) | 1
        if lane == 0 or count <= _CACHED_ROWS:  # column weights are always ROW_WORDS long
            with _weights_lock:
                weights = _weights.setdefault(key, weights)
    return weights


def _words(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (uint8 ``[n, nbytes]``) as int32 words ``[n, ceil(nbytes / 4)]``.

    A view where the bytes allow one (a multiple of 4 bytes a row, aligned); else a
    zero-padded copy.
    """
    n, nbytes = rows.shape
    aligned = (
        nbytes % 4 == 0
        and rows.stride(1) == 1
        and (n == 1 or rows.stride(0) % 4 == 0)
        and rows.storage_offset() % 4 == 0
    )
    if nbytes == 0:
        return torch.zeros((n, 0), dtype=torch.int32, device=rows.device)
    if aligned:
        if n == 1:  # a single row's outer stride is free: take it as a contiguous 1-D run
            return rows.reshape(-1).view(torch.int32).view(1, -1)
        return rows.view(torch.int32)
    padded = torch.zeros((n, -(-nbytes // 4) * 4), dtype=torch.uint8, device=rows.device)
    padded[:, :nbytes] = rows
    return padded.view(torch.int32)


def fold(rows: torch.Tensor) -> torch.Tensor:
    """The two 32-bit lanes of each row's checksum: int64 ``[n, 2]`` on ``rows``' device.

    ``rows`` is a 2-D uint8 tensor, one chunk a row, on the CPU or a GPU (its last dim
    contiguous). Enqueued on the current stream on a GPU; nothing waits for it. Use
    :func:`combine` for the 64-bit values.
    """
    if rows.dtype != torch.uint8 or rows.dim() != 2:
        raise ValueError(f"fold takes a 2-D uint8 tensor, not {rows.dtype} {list(rows.shape)}")
    n, nbytes = rows.shape
    device = rows.device
    if n == 0:
        return torch.zeros((0, 2), dtype=torch.int64, device=device)
    words = _words(rows)
    total = words.shape[1]
    full = total // ROW_WORDS
    tail = words[:, full * ROW_WORDS :]
    rows_sums: list[torch.Tensor] = []
    if full:
        body = words[:, : full * ROW_WORDS].reshape(n, full, ROW_WORDS)
        columns = body.sum(dim=1, dtype=torch.int32)
        rows_sums.append(body.sum(dim=2, dtype=torch.int32))
    else:
        columns = torch.zeros((n, ROW_WORDS), dtype=torch.int32, device=device)
    if tail.shape[1]:
        columns[:, : tail.shape[1]] += tail
        rows_sums.append(tail.sum(dim=1, keepdim=True, dtype=torch.int32))
    if not rows_sums:  # no bytes at all
        rows_sums.append(torch.zeros((n, 0), dtype=torch.int32, device=device))
    per_row = torch.cat(rows_sums, dim=1) if len(rows_sums) > 1 else rows_sums[0]
    lanes = []
    for lane, sums in enumerate((columns, per_row)):
        weights = _weights_of(sums.shape[1], lane, device)
        # Each factor below 2**32 and 2**31: the products and their sum stay exact in int64.
        mixed = ((sums.to(torch.int64) & _MASK) * weights) & _MASK
        lanes.append(mixed.sum(dim=-1) & _MASK)
    lanes[1] = (lanes[1] + nbytes) & _MASK
    return torch.stack(lanes, dim=1)


def combine(lanes: torch.Tensor) -> list[int]:
    """The 64-bit checksums (``A << 32 | B``) of a :func:`fold` result, read on the host."""
    return [(a << 32) | b for a, b in lanes.tolist()]


def checksums(rows: torch.Tensor) -> list[int]:
    """Each row's checksum (see :func:`fold`); waits for a GPU's result."""
    return combine(fold(rows))


def checksum(data: torch.Tensor) -> int:
    """The checksum of one chunk's bytes, ``data`` a 1-D uint8 tensor (CPU or GPU)."""
    if data.dim() != 1:
        raise ValueError(f"checksum takes a 1-D uint8 tensor, not {list(data.shape)}")
    return checksums(data.view(1, -1) if data.is_contiguous() else data.reshape(1, -1))[0]
