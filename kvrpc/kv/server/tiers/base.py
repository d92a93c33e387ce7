"""The seam behind L1: storage tiers a chunk can be prefetched from.

The service writes every stored chunk through to its lower tier (if it has one) and, on a
lookup, loads chunks that L1 no longer holds back from it; the lookup then answers with a
prefetch job id instead of a count. A tier is used only from the server's event loop; it
does its IO in threads of its own so the loop never waits on a disk.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["LowerTier"]


@runtime_checkable
class LowerTier(Protocol):
    """A store of chunk bytes by key, slower and larger than L1."""

    def contains(self, key: bytes) -> bool:
        """True if the tier holds ``key``'s bytes now (cheap: an in-memory index)."""
        ...

    async def save(self, key: bytes, data: torch.Tensor) -> None:
        """Keep a copy of ``data`` (1-D uint8) under ``key``.

        The caller keeps ``data`` unchanged until this returns; failures are the tier's to
        log and count, a chunk it fails to keep is simply not in it.
        """

    async def load(self, key: bytes, out: torch.Tensor) -> bool:
        """Copy ``key``'s bytes into ``out`` (1-D uint8 of the same length); False if absent."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters, reported by ``kv.stats`` with the tier's prefix."""
        ...

    async def aclose(self) -> None:
        """Finish or abandon pending IO and release files; idempotent."""
