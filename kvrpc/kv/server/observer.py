"""The seam through which the pool's owner and the tiers tell what chunks they hold.

The state core, the tier shell and the tiers call a :class:`ChunkObserver` at the moment a
chunk becomes held or stops being held on a tier, synchronously with the change: so an
observer that numbers what it is told sees the changes in the order they happened, and a
snapshot taken between two calls is exact. Chunks are named by their pool keys
(:mod:`~kvrpc.kv.server.poolkeys`); turning them into events is the observer's business
(:mod:`~kvrpc.kv.server.chunk_events`).

Every caller checks :attr:`ChunkObserver.watching` before it gathers keys, so that with
nobody listening an observed change costs one attribute read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Protocol, runtime_checkable

__all__ = [
    "CLEARED",
    "DELETED",
    "DISK",
    "EVICTED",
    "L1",
    "REDIS",
    "ChunkObserver",
    "Enumerable",
    "Observable",
]

#: The tiers, as events name them.
L1: Final = "l1"
DISK: Final = "disk"
REDIS: Final = "redis"

#: Why chunks stopped being held: room was needed for others,
EVICTED: Final = "evicted"
#: they were found bad (a checksum, a file's size) and dropped,
DELETED: Final = "deleted"
#: or ``kv.clear`` dropped them.
CLEARED: Final = "cleared"


class ChunkObserver(Protocol):
    """Told of every change to what a tier holds, synchronously, on the event loop.

    No method may raise or change the pool or a tier: they are called from the middle of
    a store, an eviction or a save.
    """

    @property
    def watching(self) -> bool:
        """False while nobody listens: callers then skip gathering keys at all."""
        ...

    def stored(self, tier: str, keys: Sequence[bytes], source: str | None = None) -> None:
        """``keys`` are held on ``tier`` now; ``source`` is the tier they were copied from.

        ``source`` None: new chunks (a store into L1). Otherwise a move between tiers,
        which in kvrpc is always a copy: the source keeps its copy (its eviction, if any,
        is its own :meth:`removed`).
        """

    def removed(self, tier: str, keys: Sequence[bytes], reason: str) -> None:
        """``keys`` are no longer held on ``tier``, for ``reason``.

        ``reason`` is :data:`EVICTED`, :data:`DELETED` or :data:`CLEARED`.
        """

    def cleared(self, tier: str) -> None:
        """``tier`` holds no chunk at all now."""


@runtime_checkable
class Observable(Protocol):
    """A tier that reports its own changes (evictions, saves, bad chunks dropped)."""

    def observe(self, observer: ChunkObserver) -> None:
        """Report every later change of what the tier holds to ``observer``."""


@runtime_checkable
class Enumerable(Protocol):
    """A tier that can list what it holds, for a snapshot (one with an index here)."""

    def held_keys(self) -> Iterable[bytes]:
        """The keys held now, as a copy that later changes of the tier leave alone."""
        ...
