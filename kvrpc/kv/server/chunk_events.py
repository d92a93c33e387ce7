"""The KV server's events about its chunks: pool keys in, :mod:`~kvrpc.kv.server.events` out.

:class:`ChunkEvents` is the :class:`~kvrpc.kv.server.observer.ChunkObserver` the state core,
the tier shell and the tiers report to, and the snapshot source of the hub it owns. A pool
key names a chunk hash, a namespace id and a rank (:mod:`~kvrpc.kv.server.poolkeys`); here
the keys of one report are grouped by namespace and rank into the hub's chunk events, and
each namespace is named by the model and world size that registered it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from kvrpc.kv.keys import HASH_SIZE
from kvrpc.kv.server import poolkeys
from kvrpc.kv.server.events import ChunkGroup, EventHub, EventKind
from kvrpc.kv.server.observer import DISK, L1, Enumerable
from kvrpc.kv.server.state import KVState

__all__ = ["ChunkEvents"]

_NS_END = HASH_SIZE + poolkeys.NAMESPACE_ID_SIZE


class ChunkEvents:
    """Turns reports of pool keys into events on :attr:`hub`; lists L1 and ``disk`` for it.

    ``state`` gives the pool and the namespaces; ``disk`` is the lower tier, if it can list
    what it holds (a snapshot covers L1 and such a disk; a remote tier shared by many
    servers is not listed: only the writes this server made to it are told, live).
    """

    def __init__(
        self, state: KVState, *, disk: Enumerable | None = None, max_subscribers: int = 64
    ) -> None:
        self.hub = EventHub(
            chunk_tokens=state.chunk_size, snapshot=self._held, max_subscribers=max_subscribers
        )
        """The hub every subscription is taken from."""
        self._state = state
        self._disk = disk
        self._models: dict[bytes, tuple[str, int]] = {}

    # ------------------------------------------------------------------ ChunkObserver

    @property
    def watching(self) -> bool:
        """True while the hub has a subscriber."""
        return self.hub.watching

    def stored(self, tier: str, keys: Sequence[bytes], source: str | None = None) -> None:
        """Publish ``keys`` as stored on ``tier`` (moved there from ``source``, if given)."""
        kind = EventKind.STORED if source is None else EventKind.MOVED
        for group in self._groups(keys):
            self.hub.publish(kind, tier, group, source=source)

    def removed(self, tier: str, keys: Sequence[bytes], reason: str) -> None:
        """Publish ``keys`` as no longer held on ``tier``, for ``reason``."""
        for group in self._groups(keys):
            self.hub.publish(EventKind.REMOVED, tier, group, reason=reason)

    def cleared(self, tier: str) -> None:
        """Publish that ``tier`` holds nothing now."""
        self.hub.publish(EventKind.CLEARED, tier)

    # ------------------------------------------------------------------ the snapshot

    def _held(self, namespace: bytes | None) -> Iterator[tuple[str, ChunkGroup]]:
        """What L1 and the disk hold now (``namespace``'s only, unless None), copied now.

        The copy is the keys (references to the pool's and the disk index's own key
        objects, grouped by rank): the groups, and their hashes, are made as they are
        pulled, ``hub.max_hashes`` at a time.
        """
        copied: list[tuple[str, dict[bytes, list[bytes]]]] = []
        pool = self._state.pool
        if pool is not None:
            copied.append((L1, _by_rank(pool.keys(), namespace)))
        if self._disk is not None:
            copied.append((DISK, _by_rank(self._disk.held_keys(), namespace)))
        return self._pull(copied)

    def _pull(
        self, copied: list[tuple[str, dict[bytes, list[bytes]]]]
    ) -> Iterator[tuple[str, ChunkGroup]]:
        step = self.hub.max_hashes
        for tier, ranks in copied:
            for suffix, keys in ranks.items():
                for start in range(0, len(keys), step):
                    hashes = tuple(key[:HASH_SIZE] for key in keys[start : start + step])
                    yield tier, self._group(suffix, hashes)
                keys.clear()  # pulled: the copy lets go of these keys' references

    # ------------------------------------------------------------------ internals

    def _groups(self, keys: Sequence[bytes]) -> list[ChunkGroup]:
        """``keys`` as groups of one rank each, in the order each rank first appears."""
        ranks = _by_rank(keys, None)
        return [
            self._group(suffix, tuple(key[:HASH_SIZE] for key in held))
            for suffix, held in ranks.items()
        ]

    def _group(self, suffix: bytes, hashes: tuple[bytes, ...]) -> ChunkGroup:
        ns_id, worker = poolkeys.parse_suffix(suffix)
        model = self._model(ns_id)
        if model is None:
            return ChunkGroup(ns_id, worker, hashes)
        return ChunkGroup(ns_id, worker, hashes, model[0], model[1])

    def _model(self, ns_id: bytes) -> tuple[str, int] | None:
        """The (model, world size) of namespace ``ns_id``; None if none registered it."""
        model = self._models.get(ns_id)
        if model is None:  # a namespace registered since: look again (there are few)
            for ns in self._state.namespaces.values():
                self._models[ns.id] = (ns.model_name, ns.world_size)
            model = self._models.get(ns_id)
        return model


def _by_rank(keys: Iterable[bytes], namespace: bytes | None) -> dict[bytes, list[bytes]]:
    """Pool keys by their suffix (namespace id and rank), in order; others are skipped.

    A disk tier's directory may hold files named like keys of another length (not made
    by this server's pool): they name no chunk an event could tell of.
    """
    ranks: dict[bytes, list[bytes]] = {}
    for key in keys:
        if len(key) != poolkeys.POOL_KEY_SIZE:
            continue
        if namespace is not None and key[HASH_SIZE:_NS_END] != namespace:
            continue
        suffix = key[HASH_SIZE:]
        held = ranks.get(suffix)
        if held is None:
            ranks[suffix] = [key]
        else:
            held.append(key)
    return ranks
