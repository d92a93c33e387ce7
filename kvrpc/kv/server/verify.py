"""``--verify-retrieves``: check the bytes a retrieve left in the worker's blocks.

After a retrieve's copy has finished, the chunks are read back out of the blocks they went
to (on the device of those blocks) and folded (:mod:`kvrpc.kv.integrity`); each result is
compared with the checksum the chunk was committed with in L1. A key that differs fails with
``CHECKSUM_MISMATCH``; if L1's own copy also fails its checksum, that copy is bad and is
dropped, else the copy into the blocks went wrong.

A row with skipped blocks (``SKIP_BLOCK``: the engine kept those tokens itself) cannot be
compared whole, since the blocks hold the engine's bytes there; such a key is checked on
L1's copy alone. A debug mode: it reads every retrieved byte back and costs about as much as
the retrieve's own copy again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvrpc.kv import integrity
from kvrpc.kv.layout import SKIP_BLOCK, KVLayout, gather_chunks

__all__ = ["blocks_checksums", "judge", "slot_checksums"]


def blocks_checksums(
    layers: Sequence[torch.Tensor], layout: KVLayout, rows: torch.Tensor
) -> list[int | None]:
    """Per row of block ids: the checksum of the chunk its blocks hold now; None if skipped.

    Runs on the layers' device (a GPU's current stream, waited for); call it from the
    thread that copies into them, once the copy is done.
    """
    skipped = (rows == SKIP_BLOCK).any(dim=1).tolist()
    whole = [i for i, skip in enumerate(skipped) if not skip]
    result: list[int | None] = [None] * len(skipped)
    if not whole:
        return result
    nbytes = layout.chunk_nbytes(rows.shape[1])
    device = layers[0].device
    back = torch.empty((len(whole), nbytes), dtype=torch.uint8, device=device)
    gather_chunks(layers, layout, rows[whole], list(back.unbind(0)))
    for i, value in zip(whole, integrity.checksums(back), strict=True):
        result[i] = value
    return result


def slot_checksums(slots: Sequence[torch.Tensor]) -> list[int]:
    """The checksum of each L1 slot's bytes (CPU tensors), recomputed."""
    return [integrity.checksum(slot) for slot in slots]


def judge(
    expected: Sequence[int | None],
    in_blocks: Sequence[int | None],
    in_slots: Sequence[int | None],
) -> tuple[list[int], list[int]]:
    """Which of a retrieve's found chunks failed, and which of those L1 holds bad copies of.

    Per found chunk: ``expected`` is the checksum it was committed with (None: stored
    without), ``in_blocks`` what its blocks hold (None: not comparable, skipped blocks),
    ``in_slots`` L1's bytes recomputed (None: not computed). Returns the positions (into
    these sequences) of the chunks to fail and of those whose L1 copy is bad. Pure.
    """
    failed: list[int] = []
    bad: list[int] = []
    for n, (want, blocks, slot) in enumerate(zip(expected, in_blocks, in_slots, strict=True)):
        slot_bad = want is not None and slot is not None and slot != want
        reference = want if want is not None else slot
        blocks_bad = blocks is not None and reference is not None and blocks != reference
        if slot_bad or blocks_bad:
            failed.append(n)
        if slot_bad:
            bad.append(n)
    return failed, bad
