"""The vLLM KV-cache events for what kvrpc holds: ``kv.events`` items in, block events out.

The connector's scheduler side feeds :class:`BlockEvents` the server's ``kv.events`` items
and tells it vLLM's names for the chunks it sees (:meth:`BlockEvents.name`); it answers with
:class:`StoredBlocks` and :class:`RemovedBlocks`, whose fields are those of vLLM's
``BlockStored`` and ``BlockRemoved``, for the connector to hand to vLLM's ``take_events``.
Pure: no vLLM, no I/O, one thread (vLLM's scheduler thread).

**Names.** A kvrpc chunk hash is a SHA-256 chain over token ids (and the cache salt): vLLM's
block hashes cannot be computed from it, since vLLM hashes each block with its own function
and extra keys (LoRA, multimodal inputs, the salt). The connector sees both for the requests
it looks up and stores: it records each chunk's vLLM block hashes, parent block hash and
tokens (:func:`chunk_names`), and a chunk so named is reported in vLLM's own block hashes,
the same ones vLLM's GPU events carry for those blocks. A chunk it never saw (stored by
another engine, or held before this engine started) is reported *unnamed*, as vLLM's
offloading connector reports a chunk it has no payload for: ``block_hashes`` is the one
32-byte kvrpc chunk hash, ``parent_block_hash`` None, ``token_ids`` empty and ``block_size``
0; a consumer that hashes prompts with :func:`~kvrpc.kv.keys.hashes_from_tokens` can use
it, any other can tell it apart by ``block_size`` 0. When a held, unnamed chunk is named
later (a request looked it up), it is withdrawn as unnamed and told again under its names.

**Held.** A chunk is held on a tier when every rank of this engine's KV (``world_size``
ranks of ``model_name``) holds it there, on every server that serves some of those ranks
(``expected``: per server, the ranks whose writers store into it). It is told stored when
that becomes true and removed when it stops being true (a rank's copy evicted, deleted or
cleared), at most once each way, with the medium of the tier (:func:`tier_medium`). Events
of other models, of other world sizes and of unknown models (a disk tier's chunks from
an earlier run) are not this engine's and are skipped.

**Lost events.** Every subscription starts with a snapshot (the feed subscribes that way):
:meth:`BlockEvents.resubscribed` says one begins; at its end every chunk the table holds
from that server is set to what the snapshot said, and what changed is told. A gap, a lost
connection or a server restart is followed by such a subscription, so what was missed is
made good, never guessed: vLLM's ``AllBlocksCleared`` is never sent, since it has no medium
and a consumer would drop the engine's GPU blocks with it.

**Bounded.** The table keeps at most ``max_chunks`` chunks (names and holdings), least
recently told of first out; a chunk that falls out while told stored is told removed, so
that what a consumer was told is always what the table can withdraw.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from kvrpc.integrations.vllm.plan import kv_ranks
from kvrpc.kv.client.hosts import host_of_rank
from kvrpc.kv.protocols import KVEvent

__all__ = [
    "MEDIUM_CPU",
    "MEDIUM_STORAGE",
    "OWNER_PREFIX",
    "BlockEvents",
    "ChunkNames",
    "RemovedBlocks",
    "StoredBlocks",
    "chunk_names",
    "expected_ranks",
    "tier_medium",
]

#: vLLM's medium strings (``vllm.distributed.kv_events.MEDIUM_CPU`` / ``MEDIUM_STORAGE``).
MEDIUM_CPU: Final = "CPU"
MEDIUM_STORAGE: Final = "STORAGE"
#: Every event's ``ownership`` is this and the kvrpc tier: ``kvrpc:l1``, ``kvrpc:disk``...
OWNER_PREFIX: Final = "kvrpc:"


def tier_medium(tier: str) -> str:
    """The vLLM medium of kvrpc tier ``tier``: ``CPU`` for ``l1`` (host memory), else ``STORAGE``.

    vLLM's own offloading tiers use the same two words, so a router that weighs media knows
    what a kvrpc tier costs to load; the tier itself is in ``ownership``.
    """
    return MEDIUM_CPU if tier == "l1" else MEDIUM_STORAGE


@dataclass(frozen=True, slots=True)
class ChunkNames:
    """The vLLM names of one kvrpc chunk's blocks, as vLLM's own ``BlockStored`` has them.

    ``block_hashes`` are vLLM's hashes of the chunk's blocks (``chunk_size // block_size``
    of them, in order), ``parent_block_hash`` the hash of the block before (None for a
    prompt's first chunk), ``token_ids`` the chunk's tokens (int32, as kvrpc hashes them).
    """

    block_hashes: tuple[bytes, ...]
    parent_block_hash: bytes | None
    token_ids: array[int]
    block_size: int
    lora_id: int | None = None
    lora_name: str | None = None


def chunk_names(
    block_hashes: Sequence[bytes],
    token_ids: Sequence[int],
    first: int,
    last: int,
    *,
    chunk_size: int,
    block_size: int,
    hashes_per_block: int = 1,
    lora_id: int | None = None,
    lora_name: str | None = None,
) -> list[ChunkNames]:
    """The names of chunks ``first`` to ``last - 1`` of one request.

    ``block_hashes`` is the request's ``block_hashes`` (vLLM hashes every
    ``block_size // hashes_per_block`` tokens; a block's hash is the last of its own, as
    vLLM's ``BlockHashListWithBlockSize`` takes it), ``token_ids`` its tokens. Stops at the
    first chunk whose blocks vLLM has not hashed yet, or whose tokens are not all there, or
    hold an id outside int32 (kvrpc could not have hashed those either).
    """
    per_chunk = chunk_size // block_size
    names: list[ChunkNames] = []
    for chunk in range(first, last):
        start = chunk * per_chunk
        if (start + per_chunk) * hashes_per_block > len(block_hashes):
            break
        if (chunk + 1) * chunk_size > len(token_ids):
            break
        try:
            tokens = array("i", token_ids[chunk * chunk_size : (chunk + 1) * chunk_size])
        except (OverflowError, TypeError):
            break
        hashes = tuple(
            bytes(block_hashes[(block + 1) * hashes_per_block - 1])
            for block in range(start, start + per_chunk)
        )
        parent = bytes(block_hashes[start * hashes_per_block - 1]) if start else None
        names.append(ChunkNames(hashes, parent, tokens, block_size, lora_id, lora_name))
    return names


def expected_ranks(
    world_size: int, tensor_parallel: int, use_mla: bool, hosts: int = 1
) -> tuple[int, ...]:
    """Per server (one per host, in host order), the bit mask of the kv ranks stored there.

    For an engine of ``world_size`` vLLM ranks: each rank that writes (see
    :func:`~kvrpc.integrations.vllm.plan.kv_ranks`) stores its kv rank into the server of
    its host, so a chunk is whole on a server once those kv ranks all hold it.
    """
    masks = [0] * hosts
    for rank in range(world_size):
        ranks = kv_ranks(world_size, rank, tensor_parallel, use_mla, hosts)
        if ranks.writer:
            masks[host_of_rank(rank, world_size, hosts)] |= 1 << ranks.rank
    return tuple(masks)


@dataclass(frozen=True, slots=True)
class StoredBlocks:
    """A ``BlockStored`` to tell: the fields of vLLM's, by name, for blocks kvrpc holds.

    ``named`` False: an unnamed chunk (see the module doc): one kvrpc chunk hash, no tokens,
    ``block_size`` 0. ``group_idx`` is 0: kvrpc moves one KV cache group.
    """

    block_hashes: tuple[bytes, ...]
    parent_block_hash: bytes | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None
    lora_name: str | None
    medium: str
    ownership: str
    named: bool = True


@dataclass(frozen=True, slots=True)
class RemovedBlocks:
    """A ``BlockRemoved`` to tell: blocks told stored on this medium that kvrpc let go of."""

    block_hashes: tuple[bytes, ...]
    medium: str
    ownership: str


BlockEvent = StoredBlocks | RemovedBlocks


class _Holding:
    """One (namespace, tier) copy of a chunk: the ranks each server has, what was told."""

    __slots__ = ("masks", "told")

    def __init__(self, servers: int) -> None:
        self.masks = [0] * servers
        self.told: tuple[bytes, ...] | None = None  # the hashes told stored; None: not told


class _Chunk:
    __slots__ = ("held", "names")

    def __init__(self) -> None:
        self.names: ChunkNames | None = None
        self.held: dict[tuple[bytes, str], _Holding] = {}


_Snapshot = dict[bytes, dict[tuple[bytes, str], int]]


class BlockEvents:
    """The chunks this engine's kvrpc servers hold, and the block events that tell of them.

    ``model_name`` and ``world_size`` are this engine's kvrpc namespace (its kv world size);
    ``expected`` is :func:`expected_ranks` of its servers, in the order the feed numbers
    them. Use from one thread.
    """

    def __init__(
        self,
        model_name: str,
        world_size: int,
        expected: Sequence[int],
        *,
        max_chunks: int = 16384,
        unnamed: bool = True,
    ) -> None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be at least 1, not {max_chunks}")
        if not expected or any(mask < 0 for mask in expected):
            raise ValueError(f"expected needs one rank mask per server, not {expected!r}")
        self.model_name = model_name
        self.world_size = world_size
        self.expected = tuple(expected)
        self.max_chunks = max_chunks
        self.unnamed = unnamed
        self.forgotten = 0
        """Chunks dropped from the table to keep it within ``max_chunks``."""
        self._chunks: dict[bytes, _Chunk] = {}  # in least-recently-told-of order
        self._snapshots: dict[int, _Snapshot] = {}
        self._out: list[BlockEvent] = []

    def __len__(self) -> int:
        """Chunks in the table (named, held, or both)."""
        return len(self._chunks)

    # ------------------------------------------------------------------ names

    def name(self, chunk_hash: bytes, names: ChunkNames) -> None:
        """Learn vLLM's names for ``chunk_hash``; a held chunk told otherwise is told again."""
        chunk = self._touch(chunk_hash)
        chunk.names = names
        for key, holding in chunk.held.items():
            if holding.told is not None and holding.told != names.block_hashes:
                self._removed(holding.told, key[1])
                holding.told = None
            if holding.told is None and self._complete(holding):
                self._tell_stored(chunk_hash, chunk, key[1], holding)
        self._bound()

    # ------------------------------------------------------------------ kv.events

    def resubscribed(self, server: int) -> None:
        """Server ``server``'s feed starts a new subscription: a snapshot comes first."""
        self._snapshots[server] = {}

    def feed(self, server: int, event: KVEvent) -> None:
        """Take one ``kv.events`` item from server ``server`` (its feed's number)."""
        kind = event.kind
        if kind == "snapshot_end":
            snapshot = self._snapshots.pop(server, None)
            if snapshot is not None:
                self._apply_snapshot(server, snapshot)
            return
        if kind == "cleared":
            self._cleared(server, event.tier)
            return
        if kind not in ("stored", "moved", "removed", "snapshot"):
            return  # a gap: the feed subscribes again, and that snapshot makes it good
        rank = self._rank(event)
        if rank is None:
            return
        key = (event.namespace, event.tier)
        if kind == "snapshot":
            snapshot = self._snapshots.get(server)
            if snapshot is not None:
                self._collect(snapshot, key, rank, event.hashes)
                return
            kind = "stored"  # a snapshot nobody announced: as good as stores
        bit = 1 << rank
        for chunk_hash in event.hashes:
            if kind == "removed":
                chunk = self._chunks.get(chunk_hash)
                holding = None if chunk is None else chunk.held.get(key)
                if chunk is None or holding is None:
                    continue
                holding.masks[server] &= ~bit
            else:
                chunk = self._touch(chunk_hash)
                holding = chunk.held.get(key)
                if holding is None:
                    holding = chunk.held[key] = _Holding(len(self.expected))
                holding.masks[server] |= bit
            self._settle(chunk_hash, chunk, key, holding)
        self._bound()

    def take(self) -> list[BlockEvent]:
        """What to tell since the last call, in order; consecutive runs merged as vLLM does.

        A named chunk continuing the previous one's chain (its parent is that one's last
        block) joins its ``BlockStored``; removals on one medium join one ``BlockRemoved``.
        """
        out, self._out = self._out, []
        runs: list[list[BlockEvent]] = []
        for event in out:
            run = runs[-1] if runs else None
            if run is not None and _continues(run[-1], event):
                run.append(event)
            else:
                runs.append([event])
        return [run[0] if len(run) == 1 else _merged(run) for run in runs]

    # ------------------------------------------------------------------ internals

    def _rank(self, event: KVEvent) -> int | None:
        """The event's rank if it is about this engine's chunks, else None."""
        if event.model_name != self.model_name or event.world_size != self.world_size:
            return None
        rank = event.worker_id
        if rank is None or not 0 <= rank < self.world_size:
            return None
        return rank

    def _complete(self, holding: _Holding) -> bool:
        return all(
            mask & want == want for mask, want in zip(holding.masks, self.expected, strict=True)
        )

    def _settle(
        self, chunk_hash: bytes, chunk: _Chunk, key: tuple[bytes, str], holding: _Holding
    ) -> None:
        """Tell what changed for one holding after its masks did; drop what is empty."""
        complete = self._complete(holding)
        if complete and holding.told is None:
            self._tell_stored(chunk_hash, chunk, key[1], holding)
        elif not complete and holding.told is not None:
            self._removed(holding.told, key[1])
            holding.told = None
        if not any(holding.masks):
            del chunk.held[key]
            if not chunk.held and chunk.names is None:
                del self._chunks[chunk_hash]

    def _tell_stored(self, chunk_hash: bytes, chunk: _Chunk, tier: str, holding: _Holding) -> None:
        names = chunk.names
        medium, owner = tier_medium(tier), OWNER_PREFIX + tier
        if names is not None:
            holding.told = names.block_hashes
            self._out.append(
                StoredBlocks(
                    names.block_hashes,
                    names.parent_block_hash,
                    tuple(names.token_ids),
                    names.block_size,
                    names.lora_id,
                    names.lora_name,
                    medium,
                    owner,
                )
            )
        elif self.unnamed:
            holding.told = (chunk_hash,)
            self._out.append(
                StoredBlocks((chunk_hash,), None, (), 0, None, None, medium, owner, named=False)
            )

    def _removed(self, hashes: tuple[bytes, ...], tier: str) -> None:
        self._out.append(RemovedBlocks(hashes, tier_medium(tier), OWNER_PREFIX + tier))

    def _cleared(self, server: int, tier: str) -> None:
        """Server ``server``'s ``tier`` holds nothing now, of any namespace."""
        for chunk_hash, chunk in list(self._chunks.items()):
            for key, holding in list(chunk.held.items()):
                if key[1] == tier and holding.masks[server]:
                    holding.masks[server] = 0
                    self._settle(chunk_hash, chunk, key, holding)
        snapshot = self._snapshots.get(server)
        if snapshot is not None:  # a clear while the snapshot was on its way
            for held in snapshot.values():
                for key in [k for k in held if k[1] == tier]:
                    del held[key]

    def _collect(
        self, snapshot: _Snapshot, key: tuple[bytes, str], rank: int, hashes: Iterable[bytes]
    ) -> None:
        bit = 1 << rank
        for chunk_hash in hashes:
            held = snapshot.get(chunk_hash)
            if held is None:
                if len(snapshot) >= self.max_chunks:
                    continue  # past what the table could keep anyway
                held = snapshot[chunk_hash] = {}
            held[key] = held.get(key, 0) | bit

    def _apply_snapshot(self, server: int, snapshot: _Snapshot) -> None:
        """Set what server ``server`` holds to ``snapshot``; tell what that changed."""
        servers = len(self.expected)
        for chunk_hash, chunk in list(self._chunks.items()):
            held = snapshot.pop(chunk_hash, {})
            for key in held:
                if key not in chunk.held:
                    chunk.held[key] = _Holding(servers)
            for key, holding in list(chunk.held.items()):
                mask = held.get(key, 0)
                if holding.masks[server] != mask:
                    holding.masks[server] = mask
                    self._settle(chunk_hash, chunk, key, holding)
        for chunk_hash, held in snapshot.items():
            chunk = self._touch(chunk_hash)
            for key, mask in held.items():
                holding = chunk.held[key] = _Holding(servers)
                holding.masks[server] = mask
                self._settle(chunk_hash, chunk, key, holding)
        self._bound()

    def _touch(self, chunk_hash: bytes) -> _Chunk:
        """The chunk's entry, made if new, moved to the most recent end."""
        chunk = self._chunks.pop(chunk_hash, None)
        if chunk is None:
            chunk = _Chunk()
        self._chunks[chunk_hash] = chunk
        return chunk

    def _bound(self) -> None:
        chunks = self._chunks
        while len(chunks) > self.max_chunks:
            chunk_hash = next(iter(chunks))
            chunk = chunks.pop(chunk_hash)
            self.forgotten += 1
            for (_, tier), holding in chunk.held.items():
                if holding.told is not None:
                    self._removed(holding.told, tier)


def _continues(last: BlockEvent, event: BlockEvent) -> bool:
    """True if ``event`` may join the run that ``last`` ends (see :meth:`BlockEvents.take`)."""
    if isinstance(last, RemovedBlocks) and isinstance(event, RemovedBlocks):
        return (event.medium, event.ownership) == (last.medium, last.ownership)
    if isinstance(last, StoredBlocks) and isinstance(event, StoredBlocks):
        return (
            event.named
            and last.named
            and event.parent_block_hash == last.block_hashes[-1]
            and (event.medium, event.ownership, event.block_size)
            == (last.medium, last.ownership, last.block_size)
            and (event.lora_id, event.lora_name) == (last.lora_id, last.lora_name)
        )
    return False


def _merged(run: list[BlockEvent]) -> BlockEvent:
    """One event for a run that :func:`_continues` joined."""
    first = run[0]
    hashes = tuple(h for event in run for h in event.block_hashes)
    if isinstance(first, RemovedBlocks):
        return RemovedBlocks(hashes, first.medium, first.ownership)
    tokens = tuple(t for event in run if isinstance(event, StoredBlocks) for t in event.token_ids)
    return StoredBlocks(
        hashes,
        first.parent_block_hash,
        tokens,
        first.block_size,
        first.lora_id,
        first.lora_name,
        first.medium,
        first.ownership,
    )
