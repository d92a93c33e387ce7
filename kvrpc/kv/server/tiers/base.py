"""The seams behind L1: storage tiers a chunk can be prefetched from.

Two kinds: a :class:`LowerTier` of this host (the disk), with an index in memory, and a
:class:`RemoteTier` shared by many hosts (Redis), asked over the network.

The service writes every stored chunk through to its lower tier (if it has one) and, on a
lookup, loads chunks that L1 no longer holds back from it; the lookup then answers with a
prefetch job id instead of a count. A tier is used only from the server's event loop; it
does its IO in threads of its own so the loop never waits on a disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from kvrpc.kv.server.records import Namespace
from kvrpc.kv.server.tiers.values import Header

__all__ = ["LowerTier", "RemoteTier"]


@runtime_checkable
class LowerTier(Protocol):
    """A store of chunk bytes by key, slower and larger than L1."""

    def contains(self, key: bytes) -> bool:
        """True if the tier holds ``key``'s bytes now (cheap: an in-memory index)."""
        ...

    async def save(self, key: bytes, data: torch.Tensor, checksum: int | None = None) -> None:
        """Keep a copy of ``data`` (1-D uint8) under ``key``, with its ``checksum``.

        ``checksum`` is the chunk's end-to-end one (:mod:`kvrpc.kv.integrity`); None: the
        tier computes it from ``data``. The caller keeps ``data`` unchanged until this
        returns; failures are the tier's to log and count, a chunk it fails to keep is
        simply not in it.
        """

    async def load(self, key: bytes, out: torch.Tensor) -> int | None:
        """Copy ``key``'s bytes into ``out`` (1-D uint8 of the same length); their checksum.

        The bytes are verified against the checksum saved with them first: a copy that
        fails is a miss (None), counted by the tier and deleted. None also when absent.
        """
        ...

    def stats(self) -> dict[str, int]:
        """Counters, reported by ``kv.stats`` with the tier's prefix."""
        ...

    async def aclose(self) -> None:
        """Finish or abandon pending IO and release files; idempotent."""


@runtime_checkable
class RemoteTier(Protocol):
    """A store shared by many servers (Redis): asked, never waited on, skipped when down.

    Unlike a :class:`LowerTier`, it keeps no index here: a lookup asks it which chunks it
    holds (:meth:`find`, one round trip for the batch), and only while it is
    :meth:`available`. Writes are offered and dropped when it cannot take them.
    """

    def available(self) -> bool:
        """False while the tier is skipped (it failed, and its probe has not yet worked)."""
        ...

    def offer(
        self,
        ns: Namespace,
        key: bytes,
        data: torch.Tensor,
        done: Callable[[], None],
        checksum: int | None = None,
    ) -> bool:
        """Queue a write of ``data`` and its ``checksum`` (None: computed by the writer).

        True if queued (then ``done()`` once ``data`` is free).
        """
        ...

    async def find(self, ns: Namespace, keys: Sequence[bytes]) -> list[Header | None]:
        """Per key, what the tier holds of it (None: nothing usable), in one round trip."""
        ...

    async def load(self, ns: Namespace, key: bytes, header: Header, out: torch.Tensor) -> bool:
        """Copy a found chunk into ``out``; False if it is gone, corrupt, or the tier failed.

        True only once the bytes matched ``header.checksum`` (recomputed); a chunk that
        does not is counted and deleted.
        """
        ...

    async def run(self) -> None:
        """Background work (writers, probes) until cancelled."""

    def stats(self) -> dict[str, int]:
        """Counters, reported by ``kv.stats`` with the tier's prefix."""
        ...

    async def aclose(self) -> None:
        """Drop pending writes (releasing their data) and disconnect; idempotent."""
